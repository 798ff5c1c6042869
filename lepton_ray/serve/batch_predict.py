"""Batch prediction: a bundle's model over a Parquet data set with Ray Data, predictions written as Parquet.

The input needs the bundle's input columns (its schema: the same columns, dtypes and shapes as
in training; decoded with :func:`~lepton_ray.data.schema.decode`) and an id column. Each output row
is ``id`` (the input's id column, unchanged) plus the prediction: ``label`` and ``probabilities``
(list of float) for a classifier, ``next_token`` and ``probabilities`` for a language model,
``value`` for a regressor (``output`` otherwise); multi-dimensional values are written flat, as
fixed-size lists. Reading and writing go through :mod:`lepton_ray.storage`, so any URI works
(``s3://`` with the standard AWS environment or ``storage_options``).

>>> predict("bundles/digits", "s3://data/digits/", "s3://data/predictions/")  # doctest: +SKIP
{'rows': 1797, 'output': 's3://data/predictions/'}
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray.config import ConfigError
from lepton_ray.console import ray_log_level
from lepton_ray.data.schema import Schema, decode
from lepton_ray.data.table import list_parquet
from lepton_ray.storage import arrow_filesystem, filesystem

__all__ = ["predict"]


class _BatchModel:
    """One Ray Data actor: loads the bundle once, predicts every batch handed to it."""

    def __init__(self, bundle: str, id_column: str, storage_options: Optional[dict], threads: int):
        from lepton_ray.serve.bundle import load_bundle
        from lepton_ray.serve.predictor import Predictor

        self.predictor = Predictor(load_bundle(bundle, storage_options), threads=threads)
        self.id_column = id_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        p = self.predictor
        inputs = decode(Schema(inputs=p.bundle.schema.inputs, targets=()), batch)
        out = p.run(inputs)
        cols: dict[str, Any] = {self.id_column: batch.column(self.id_column)}
        if p.head in ("classifier", "language_model"):
            probs = out["probabilities"]
            cols["label" if p.head == "classifier" else "next_token"] = (
                pa.array(out["label"]) if p.head == "classifier" else pa.array(probs.argmax(axis=1)))
            cols["probabilities"] = _column(probs)
        else:
            name = "value" if p.head == "regression" else "output"
            cols[name] = _column(out[name])
        return pa.table(cols)


def _column(values: np.ndarray) -> pa.Array:
    """float32 ``[N]`` as a column, ``[N, ...]`` as fixed-size lists of the row's values (flattened)."""
    values = values.astype(np.float32)
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(len(values), -1).ravel()), values[0].size)


def predict(bundle: str, input: str, output: str, *, id_column: str = "id", batch_size: int = 1024,
            concurrency: int = 1, threads: int = 1, storage_options: Optional[dict] = None, verbose: bool = False) -> dict[str, Any]:
    """Predict every row of the Parquet data at ``input``; write Parquet files under ``output``.

    The input needs the bundle's input columns and ``id_column``. Returns the row count and the output URI.
    Progress is Ray Data's own bar (on a terminal); ``verbose``: Ray's and Ray Data's INFO lines too (its execution
    plan, and in a log file its progress every 10 s), by default their warnings only.
    """
    import ray

    from lepton_ray.serve.bundle import load_bundle

    meta = load_bundle(bundle, storage_options)  # fail here, not in an actor, when the bundle is bad
    fs_in, path_in = filesystem(input, storage_options)
    fs_out, path_out = filesystem(output, storage_options)
    files = list_parquet("--input", input, storage_options)
    schema = pq.read_schema(files[0], filesystem=arrow_filesystem(fs_in))
    need = list(dict.fromkeys([id_column, *Schema(inputs=meta.schema.inputs, targets=()).parquet_columns()]))
    missing = [c for c in need if c not in schema.names]
    if missing:
        what = "--id-column" if missing[0] == id_column else "input"
        raise ConfigError(f"--input: {what} column '{missing[0]}' is not in '{input}' (columns: {', '.join(schema.names)})")
    from lepton_ray.train.trainer import ensure_ray

    ensure_ray(verbose=verbose)  # RAY_ADDRESS, else a private local instance (never a guessed, possibly dead, cluster)
    ds = ray.data.read_parquet(files, filesystem=arrow_filesystem(fs_in)).select_columns(need)  # pushed down into the read
    out = ds.map_batches(_BatchModel, fn_constructor_args=(bundle, id_column, storage_options, threads),
                         batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
                         num_cpus=threads)
    fs_out.makedirs(path_out, exist_ok=True)
    data_log = logging.getLogger("ray.data")  # Ray Data's documented logger; its level set for this call only
    level = data_log.level
    data_log.setLevel(ray_log_level(verbose))
    try:
        out.write_parquet(path_out, filesystem=arrow_filesystem(fs_out))
    finally:
        data_log.setLevel(level)
    rows = sum(pq.read_metadata(f, filesystem=arrow_filesystem(fs_out)).num_rows
               for f in list_parquet("--output", output, storage_options))
    return {"rows": int(rows), "output": output}
