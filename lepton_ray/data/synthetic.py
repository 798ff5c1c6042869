"""Seeded synthetic click data with a real, learnable signal (``data.builder: clicks``).

Each row is one impression: ``ids`` (one categorical id per field, ``num_fields`` of them), ``dense``
features and ``label`` (1 = click). The ids look like a real log's hashed ids: each (field, item) pair
has a fixed random 40-bit id (from the seed), so they are spread over ``[0, 2**40)`` and only int64
holds them exactly; the ``recommender`` hashes them into its table of ``model.kwargs.num_embeddings``
rows. Items follow a Zipf-like law (a few popular items, a long tail), as in real logs, so a batch
touches a small fraction of the table. Every item has a hidden effect; the click probability is
``sigmoid(sum of the row's item effects + dense . beta + bias)``, so the labels depend on the features
(not noise) and the best possible AUC is well above 0.5 while no model reaches 1.0.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from lepton_ray.data.builders import write_table

__all__ = ["clicks", "click_table"]

ID_BITS = 40
"""Hashed ids are drawn from ``[0, 2**ID_BITS)``."""


def click_table(rows: int, *, num_fields: int = 8, vocab: int = 1000, num_dense: int = 4, zipf: float = 1.1,
                effect_std: float = 0.8, seed: int = 0, world_seed: int = 0) -> pa.Table:
    """``rows`` impressions; ``world_seed`` fixes the items' ids and hidden effects (share it between train and eval).

    >>> t = click_table(100, num_fields=2, vocab=10, num_dense=1)
    >>> t.column_names, t.num_rows, str(t.schema.field("ids").type)
    (['ids', 'dense', 'label'], 100, 'fixed_size_list<item: int64>[2]')
    >>> 2**32 < max(t.column("ids").combine_chunks().flatten().to_pylist()) < 2**40
    True
    """
    world = np.random.default_rng([world_seed, 1])
    effects = world.normal(0.0, effect_std, size=(num_fields, vocab))
    beta = world.normal(0.0, 0.5, size=num_dense)
    popularity = [world.permutation(vocab) for _ in range(num_fields)]  # which items are the popular ones, per field
    weights = 1.0 / np.arange(1, vocab + 1) ** zipf
    weights /= weights.sum()
    # A stream of its own, so the effects and labels above are those of the earlier per-field id ranges.
    hashed = np.random.default_rng([world_seed, 3]).integers(0, 2**ID_BITS, size=(num_fields, vocab), dtype=np.int64)

    rng = np.random.default_rng([seed, 2])
    items = np.stack([popularity[f][rng.choice(vocab, size=rows, p=weights)] for f in range(num_fields)], axis=1)
    dense = rng.normal(0.0, 1.0, size=(rows, num_dense))
    logit = effects[np.arange(num_fields), items].sum(axis=1) + dense @ beta - 1.0
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    ids = hashed[np.arange(num_fields), items]  # [rows, num_fields] int64
    cols = {"ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel(), pa.int64()), num_fields)}
    if num_dense:
        cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense.astype(np.float32).ravel(), pa.float32()), num_dense)
    cols["label"] = pa.array(label, pa.int64())
    return pa.table(cols)


def clicks(train: str, eval: Optional[str], storage_options: Optional[dict] = None, *, train_rows: int = 40_000,
           eval_rows: int = 10_000, seed: int = 0, **kwargs) -> None:
    """Write a train (and eval) split of :func:`click_table` as Parquet (default: 8 fields x 1,000 items)."""
    write_table(click_table(train_rows, seed=seed, world_seed=seed, **kwargs), train, storage_options)
    if eval:
        write_table(click_table(eval_rows, seed=seed + 1, world_seed=seed, **kwargs), eval, storage_options)
