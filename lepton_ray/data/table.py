"""A split's shards, as the driver describes them before any worker starts.

:func:`describe` lists the shards behind a URI (from the ``_manifest.json`` of a prepared split, or from the
Parquet footers of a plain directory) and checks the columns before any worker starts: a missing column is a
config error, not a worker crash an hour later. A :class:`TableInfo` is plain data: it travels to the workers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray.config import ConfigError, DataConfig
from lepton_ray.data.prepare import read_manifest
from lepton_ray.data.schema import Schema, decode
from lepton_ray.data.source import UNREACHABLE
from lepton_ray.storage import arrow_filesystem, filesystem

__all__ = ["Shard", "TableInfo", "data_exists", "describe", "list_parquet", "load_arrays"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Shard:
    """One Parquet file of a split."""

    path: str  # path inside the filesystem
    num_rows: int
    row_groups: tuple[int, ...]  # rows per row group
    bytes: int
    sha256: Optional[str] = None  # from the manifest; None for plain directories


@dataclass(frozen=True)
class TableInfo:
    """What the driver learned about one split (plain data: it travels to the workers)."""

    key: str  # config key, e.g. "data.train"
    uri: str
    files: tuple[str, ...]
    num_rows: int
    schema: Schema
    """The batch's inputs and targets: names, dtypes, per-row shapes."""
    shards: tuple[Shard, ...] = field(default=())
    prepared: bool = False  # has a committed _manifest.json
    skipped: tuple[str, ...] = ()
    """Shards left out because they could not be read (``data.on_bad_shard: skip``), each with why."""
    dataset: Any = field(default=None, compare=False, repr=False)
    """The ``ray.data.Dataset`` a user passed (``Trainer(datasets=...)``), read by :mod:`lepton_ray.data.dataset`; None: files."""
    transformed: Optional[Schema] = None
    """The batches' inputs and targets after ``data.transform`` (None: no transform; ``schema`` is what is read)."""
    scan: Any = field(default=None, compare=False, repr=False)
    """What the driver read of ``dataset`` (:class:`lepton_ray.data.dataset.Scan`) for its planning; not pickled."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "scan": None}  # a Dataset's target column stays on the driver, not in every worker

    @property
    def batch_schema(self) -> Schema:
        """What the model, its loss and a serving bundle see: ``schema``, after the transform if there is one."""
        return self.transformed or self.schema

    def row_ids(self, pieces: list[Any]) -> np.ndarray:
        """The ids of ``pieces``' rows (:class:`~lepton_ray.data.plan.Unit` or ``Rows``), concatenated in piece order."""
        if not pieces:
            return np.zeros(0, np.int64)
        return np.concatenate([self.row_base[p.shard, p.row_group] + p.index for p in pieces])

    @functools.cached_property
    def row_base(self) -> dict[tuple[int, int], int]:
        """The id of the first row of each ``(shard, row group)``: rows are numbered 0.. in file order."""
        base, n = {}, 0
        for i, s in enumerate(self.shards):
            for g, rows in enumerate(s.row_groups):
                base[i, g] = n
                n += rows
        return base

    def fingerprint(self) -> str:
        """Identifies the data (files, sizes, rows): a resumed run checks it is reading the same data."""
        text = "|".join(f"{s.path}:{s.num_rows}:{s.bytes}:{s.sha256}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _remote_error(key: str, uri: str, fs: Any, exc: BaseException) -> ConfigError:
    endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    where = f" (endpoint {endpoint})" if endpoint else ""
    return ConfigError(f"{key}: cannot read '{uri}'{where}: {type(exc).__name__}: {exc}")


def _list_parquet(key: str, uri: str, fs: Any, path: str) -> list[dict[str, Any]]:
    try:
        if fs.isfile(path):
            return [fs.info(path)]
        if not fs.isdir(path):
            raise ConfigError(f"{key}: '{uri}' does not exist")
        found = fs.find(path, detail=True)
    except ConfigError:
        raise
    except Exception as exc:  # endpoint down, no bucket, no permission: name the URI and endpoint
        raise _remote_error(key, uri, fs, exc) from None
    files = [info for p, info in sorted(found.items())
             if p.endswith(".parquet") and "/_" not in p[len(path):] and "/." not in p[len(path):]]
    if not files:
        raise ConfigError(f"{key}: '{uri}' holds no .parquet files")
    return files


def list_parquet(key: str, uri: str, storage_options: Optional[dict] = None) -> list[str]:
    """Paths of the Parquet files behind ``uri`` (a file, or a directory searched recursively, hidden files skipped).

    ``key`` names the option in errors, e.g. ``"--input"``.
    """
    fs, path = filesystem(uri, storage_options)
    return [info["name"] for info in _list_parquet(key, uri, fs, path)]


def data_exists(uri: str, storage_options: dict) -> bool:
    fs, path = filesystem(uri, storage_options)
    return bool(fs.exists(path))


def describe(key: str, uri: str, cfg: DataConfig) -> TableInfo:
    """List the shards behind ``uri`` and check the label and feature columns against their schema."""
    fs, path = filesystem(uri, cfg.storage_options)
    afs = arrow_filesystem(fs)
    manifest = None
    try:
        if not fs.isfile(path) and fs.isdir(path):
            manifest = read_manifest(fs, path, uri, key)
    except ConfigError:
        raise
    except Exception as exc:  # endpoint down, no permission: name the URI and the endpoint
        raise _remote_error(key, uri, fs, exc) from None
    if manifest is not None:
        files = [{"name": f"{path}/{s['path']}", "size": s["bytes"]} for s in manifest["shards"]]
    else:
        files = _list_parquet(key, uri, fs, path)
    schema: Optional[pa.Schema] = None
    shards, skipped = [], []
    for i, f in enumerate(files):
        name = f["name"]
        try:
            meta = pq.read_metadata(name, filesystem=afs)
        except UNREACHABLE as exc:  # the storage's fault, not the shard's: never skipped
            raise _remote_error(key, uri, fs, exc) from None
        except Exception as exc:
            if cfg.on_bad_shard == "error":
                raise ConfigError(f"{key}: '{name}' is not a readable Parquet file: {exc}; to train without it, set"
                                  " data.on_bad_shard: skip") from None
            log.warning("%s: skipping '%s' (data.on_bad_shard: skip): not a readable Parquet file: %s", key, name, exc)
            skipped.append(f"{name}: {exc}")
            continue
        file_schema = meta.schema.to_arrow_schema()
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise ConfigError(f"{key}: '{name}' has columns ({_schema_text(file_schema)}) but '{files[0]['name']}' has"
                              f" ({_schema_text(schema)}); every file must match")
        row_groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        sha = manifest["shards"][i]["sha256"] if manifest is not None else None
        if manifest is not None and list(row_groups) != manifest["shards"][i]["row_groups"]:
            raise ConfigError(f"{key}: '{name}' does not match {uri}/_manifest.json (row groups differ); prepare the data again")
        shards.append(Shard(path=name, num_rows=meta.num_rows, row_groups=row_groups, bytes=int(f["size"]), sha256=sha))
    if schema is None:
        raise ConfigError(f"{key}: none of the {len(files)} Parquet file(s) under '{uri}' is readable: " + "; ".join(skipped))
    typed = Schema.from_arrow(schema, inputs=cfg.inputs, targets=cfg.targets, features=cfg.features, label=cfg.label, key=key, uri=uri)
    num_rows = sum(s.num_rows for s in shards)
    if num_rows == 0:
        raise ConfigError(f"{key}: '{uri}' has no rows")
    return TableInfo(key=key, uri=uri, files=tuple(s.path for s in shards), num_rows=num_rows, schema=typed,
                     shards=tuple(shards), prepared=manifest is not None, skipped=tuple(skipped))


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def load_arrays(info: TableInfo, storage_options: dict) -> dict[str, np.ndarray]:
    """Read a whole split as one array per input and target (``[N, *shape]``), files in listed order."""
    if info.dataset is not None:
        from lepton_ray.data.dataset import dataset_arrays

        return dataset_arrays(info)
    fs, _ = filesystem(info.uri, storage_options)
    table = pq.ParquetDataset(list(info.files), filesystem=arrow_filesystem(fs)).read(columns=info.schema.parquet_columns())
    return decode(info.schema, table, key=info.key, uri=info.uri)
