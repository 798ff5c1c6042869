"""Seeded synthetic click data with a real, learnable signal (``data.builder: clicks``).

Each row is one impression: ``num_fields`` categorical ids (``cat0..``), a few
dense features (``num0..``) and ``label`` (1 = click). Ids follow a Zipf-like
law (a few popular items, a long tail), as in real logs, so a batch touches a
small fraction of the table. Every id has a hidden effect; the click
probability is ``sigmoid(sum of the row's id effects + dense . beta + bias)``,
so the labels depend on the features (not noise) and the best possible AUC is
well above 0.5 while no model reaches 1.0. Field ``f``'s ids occupy rows
``[f * vocab, (f + 1) * vocab)`` of one shared table of ``num_fields * vocab``
rows (``model.kwargs.num_embeddings`` of the ``recommender``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from lepton_ray.data.builders import write_table

__all__ = ["clicks", "click_table"]


def click_table(rows: int, *, num_fields: int = 8, vocab: int = 1000, num_dense: int = 4, zipf: float = 1.1,
                effect_std: float = 0.8, seed: int = 0, world_seed: int = 0) -> pa.Table:
    """``rows`` impressions; ``world_seed`` fixes the hidden effects (share it between train and eval).

    >>> t = click_table(100, num_fields=2, vocab=10, num_dense=1)
    >>> t.column_names, t.num_rows
    (['cat0', 'cat1', 'num0', 'label'], 100)
    """
    world = np.random.default_rng([world_seed, 1])
    effects = world.normal(0.0, effect_std, size=(num_fields, vocab))
    beta = world.normal(0.0, 0.5, size=num_dense)
    popularity = [world.permutation(vocab) for _ in range(num_fields)]  # which ids are the popular ones, per field
    weights = 1.0 / np.arange(1, vocab + 1) ** zipf
    weights /= weights.sum()

    rng = np.random.default_rng([seed, 2])
    ids = np.stack([popularity[f][rng.choice(vocab, size=rows, p=weights)] for f in range(num_fields)], axis=1)
    dense = rng.normal(0.0, 1.0, size=(rows, num_dense))
    logit = effects[np.arange(num_fields), ids].sum(axis=1) + dense @ beta - 1.0
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    cols = {f"cat{f}": (ids[:, f] + f * vocab).astype(np.int64) for f in range(num_fields)}
    cols.update({f"num{j}": dense[:, j].astype(np.float32) for j in range(num_dense)})
    cols["label"] = label
    return pa.table(cols)


def clicks(train: str, eval: Optional[str], storage_options: Optional[dict] = None, *, train_rows: int = 40_000,
           eval_rows: int = 10_000, seed: int = 0, **kwargs) -> None:
    """Write a train (and eval) split of :func:`click_table` as Parquet (8 fields x 1,000 ids = 8,000 table rows)."""
    write_table(click_table(train_rows, seed=seed, world_seed=seed, **kwargs), train, storage_options)
    if eval:
        write_table(click_table(eval_rows, seed=seed + 1, world_seed=seed, **kwargs), eval, storage_options)
