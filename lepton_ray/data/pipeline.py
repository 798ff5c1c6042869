"""Training data: what the driver checks, what each worker reads, and in which order.

Driver side, :func:`describe` lists the Parquet files behind a URI and checks
the columns before any worker starts (a missing column is a config error, not
a worker crash an hour later). Worker side, :func:`load_arrays` reads the rows
with pyarrow through :mod:`lepton_ray.storage`, and :class:`ShardedBatches`
decides the order: one seeded permutation per epoch, cut into *global*
batches, each worker taking its contiguous slice of every global batch. So

* the union of the workers' slices at step t is exactly global batch t, the
  same batch a single process would take (what makes DDP == single process);
* every row is used at most once per epoch (the last partial batch is dropped,
  so every worker's share is equal);
* the position is just ``(epoch, step)``: resuming mid-epoch continues with
  exactly the batches not yet consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lepton_ray.config import ConfigError, DataConfig
from lepton_ray.storage import arrow_filesystem, filesystem

__all__ = ["TableInfo", "describe", "load_arrays", "ShardedBatches", "data_exists"]


@dataclass(frozen=True)
class TableInfo:
    """What the driver learned about one split (plain data: it travels to the workers)."""

    key: str  # config key, e.g. "data.train"
    uri: str
    files: tuple[str, ...]
    num_rows: int
    features: tuple[str, ...]
    label: str
    feature_dim: int


def _list_parquet(key: str, uri: str, storage_options: dict) -> list[str]:
    fs, path = filesystem(uri, storage_options)
    try:
        if fs.isfile(path):
            return [path]
        if not fs.isdir(path):
            raise ConfigError(f"{key}: '{uri}' does not exist")
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/_" not in p[len(path):] and "/." not in p[len(path):])
    except ConfigError:
        raise
    except Exception as exc:  # endpoint down, no bucket, no permission: name the URI
        raise ConfigError(f"{key}: cannot list '{uri}': {type(exc).__name__}: {exc}") from None
    if not files:
        raise ConfigError(f"{key}: '{uri}' holds no .parquet files")
    return files


def data_exists(uri: str, storage_options: dict) -> bool:
    fs, path = filesystem(uri, storage_options)
    return bool(fs.exists(path))


def _feature_width(key: str, uri: str, field: pa.Field) -> int:
    t = field.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return 1
    if pa.types.is_fixed_size_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return t.list_size
    raise ConfigError(
        f"{key}: feature column '{field.name}' in '{uri}' has type {t}; features must be numeric scalars or fixed-size numeric lists"
    )


def describe(key: str, uri: str, cfg: DataConfig) -> TableInfo:
    """List the files behind ``uri`` and check the label and feature columns against their schema."""
    files = _list_parquet(key, uri, cfg.storage_options)
    fs, _ = filesystem(uri, cfg.storage_options)
    afs = arrow_filesystem(fs)
    schema: Optional[pa.Schema] = None
    num_rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f, filesystem=afs)
        except Exception as exc:
            raise ConfigError(f"{key}: '{f}' is not a readable Parquet file: {exc}") from None
        file_schema = meta.schema.to_arrow_schema()
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise ConfigError(f"{key}: '{f}' has schema {file_schema} but '{files[0]}' has {schema}; every file must match")
        num_rows += meta.num_rows
    assert schema is not None  # _list_parquet never returns an empty list
    names = schema.names
    if cfg.label not in names:
        raise ConfigError(f"data.label: column '{cfg.label}' is not in {key} '{uri}' (columns: {', '.join(names)})")
    features = tuple(cfg.features) if cfg.features is not None else tuple(n for n in names if n != cfg.label)
    missing = [c for c in features if c not in names]
    if missing:
        raise ConfigError(f"data.features: column '{missing[0]}' is not in {key} '{uri}' (columns: {', '.join(names)})")
    if not features:
        raise ConfigError(f"data.features: {key} '{uri}' has no column besides the label '{cfg.label}'")
    dim = sum(_feature_width(key, uri, schema.field(c)) for c in features)
    if num_rows == 0:
        raise ConfigError(f"{key}: '{uri}' has no rows")
    return TableInfo(key=key, uri=uri, files=tuple(files), num_rows=num_rows, features=features, label=cfg.label, feature_dim=dim)


def _column_matrix(col: pa.ChunkedArray) -> np.ndarray:
    """One feature column as float32 [rows, width]."""
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        flat = pa.concat_arrays([c.flatten() for c in col.chunks]) if col.num_chunks else pa.array([], col.type.value_type)
        return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    return col.to_numpy().astype(np.float32, copy=False).reshape(-1, 1)


def load_arrays(info: TableInfo, storage_options: dict) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(features float32 [N, D], labels [N])`` of one split, files in listed order."""
    fs, _ = filesystem(info.uri, storage_options)
    afs = arrow_filesystem(fs)
    table = pq.ParquetDataset(list(info.files), filesystem=afs).read(columns=[*info.features, info.label])
    for c in (*info.features, info.label):
        nulls = table.column(c).null_count
        if nulls:  # a null list row would vanish in flatten() and shift every later row against its label
            what = "label" if c == info.label else "feature"
            raise ConfigError(f"{info.key}: {what} column '{c}' in '{info.uri}' has {nulls} null value(s); fill or drop them first")
    x = np.concatenate([_column_matrix(table.column(c)) for c in info.features], axis=1)
    y = table.column(info.label).to_numpy().copy()  # writable: torch.from_numpy needs it
    return np.ascontiguousarray(x, dtype=np.float32), y


class ShardedBatches:
    """This worker's slice of every global batch, in a seeded per-epoch order.

    >>> x, y = torch.arange(20.).reshape(10, 2), torch.arange(10)
    >>> rank1 = ShardedBatches(x, y, global_batch=4, rank=1, world_size=2, seed=0)
    >>> rank1.steps_per_epoch
    2
    >>> [yb.tolist() for _, yb in rank1.epoch(0)] == [rank1.global_indices(0, s)[2:].tolist() for s in range(2)]
    True
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        n = len(x)
        if n < global_batch:
            raise ConfigError(f"train.batch_size: {global_batch} is larger than the training set ({n} rows)")
        self.x, self.y = x, y
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = n // global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all rows in ``epoch`` (identical on every worker)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Row indices of global batch ``step`` of ``epoch`` (all workers together)."""
        b = self.global_batch
        return self.permutation(epoch)[step * b : (step + 1) * b]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this worker's ``(x, y)`` for steps ``start_step..steps_per_epoch-1`` of ``epoch``."""
        perm = torch.from_numpy(self.permutation(epoch))
        lo = self.rank * self.local_batch
        for step in range(start_step, self.steps_per_epoch):
            idx = perm[step * self.global_batch + lo : step * self.global_batch + lo + self.local_batch]
            yield self.x[idx], self.y[idx]
