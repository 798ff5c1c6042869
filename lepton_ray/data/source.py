"""Where a worker's rows come from: the decoded columns of one row group of one shard.

The stream (``stream.WorkerStream``) decides which rows a worker takes and in which order (the plan),
and cuts shuffled batches from what a :class:`Source` returns; the source only reads and decodes. The
native source reads Parquet with pyarrow, in the worker, from any fsspec storage (with retries, an
on-disk shard cache and an in-memory cache of decoded row groups). A Ray Data engine implements the
same protocol by reading and transforming on the cluster, off the trainer's cores.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Iterator, Optional, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

from lepton_ray.config import DataConfig
from lepton_ray.data.cache import ShardCache
from lepton_ray.data.schema import decode
from lepton_ray.data.transform import Transform
from lepton_ray.storage import arrow_filesystem, filesystem

__all__ = ["ParquetSource", "SOURCES", "Source", "UNREACHABLE", "make_source"]

UNREACHABLE = (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError)
"""Errors that say the storage could not be reached (refused, reset, timed out), not that a file is bad.
(s3fs passes botocore's connection errors through as they are: they are not ``OSError``.)"""

_WHOLE_FETCH_BYTES = 256 * 2**20  # remote shards up to this size are fetched with one GET and read from memory


class Source(Protocol):
    """What the stream reads through (called from its reading thread)."""

    def windows(self, windows: list[list[Any]], epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Each window's rows, in order, transformed (``data.transform``): ``(columns, rows)``, where ``columns[k][rows]``
        are the window's rows in piece order. ``windows``: lists of plan pieces (``Unit`` or ``Rows``)."""

    def report(self) -> None:
        """Bring the source's own counters into the stream's ``stats``."""


SOURCES = {"native": "lepton_ray.data.source:ParquetSource", "ray_data": "lepton_ray.data.ray_source:RayDataSource"}
"""``data.engine`` -> its source (imported when used: Ray Data is imported only by a run that uses it)."""


def make_source(info: Any, cfg: DataConfig, stats: dict[str, float], transform: Optional[Transform], world_size: int = 1) -> "Source":
    """``world_size``: the workers reading beside this one (an engine that runs tasks shares ``data.cpus`` among them)."""
    module, _, name = SOURCES[cfg.engine].partition(":")
    source = getattr(importlib.import_module(module), name)
    return source(info, cfg, stats, transform, world_size=world_size) if cfg.engine == "ray_data" else source(info, cfg, stats, transform)


class ParquetSource:
    """The native source: pyarrow over fsspec storage, in the worker.

    Counts into ``stats``: ``row_groups_decoded`` (a share that fits in ``data.memory_cache_bytes`` is
    decoded once), ``remote_bytes`` (whole shards fetched from remote storage), ``remote_row_group_reads``
    (ranged row-group reads of remote shards too big to fetch whole), ``read_retries`` (remote reads tried
    again after a failure) and the shard cache's hits/misses.
    """

    def __init__(self, info: Any, cfg: DataConfig, stats: dict[str, float], transform: Optional[Transform] = None):
        self.info, self.cfg, self.stats, self.transform = info, cfg, stats, transform
        self.stats.update(remote_bytes=0, remote_row_group_reads=0, row_groups_decoded=0, read_retries=0)
        self.fs, _ = filesystem(info.uri, cfg.storage_options)
        self.afs = arrow_filesystem(self.fs)
        self.remote = "://" in info.uri and not info.uri.startswith("file://")
        self.cache = ShardCache(cfg.cache_dir, cfg.cache_max_bytes) if (cfg.cache_dir and self.remote and info.prepared) else None
        self._decoded: "OrderedDict[tuple[int, int], dict[str, np.ndarray]]" = OrderedDict()
        self._decoded_bytes = 0
        self._decoded_lock = threading.Lock()
        self.whole_fetch_bytes = _WHOLE_FETCH_BYTES
        """Remote shards up to this size are fetched whole (one GET) when first opened; larger ones are read by ranges."""

    def report(self) -> None:
        if self.cache is not None:
            self.stats.update({f"cache_{k}": v for k, v in self.cache.stats.items()})

    def _with_retries(self, what: str, fn):
        """``fn()`` (a remote read), tried again after a failure to reach the storage or a failed read, up to
        ``data.read_retries`` times. The waits (1, 2, 4 ... s, at most 10 s) ride out a storage server restarting:
        botocore's own retries (3 tries within ~1 s) do not."""
        attempts = self.cfg.read_retries + 1
        for attempt in range(attempts):
            try:
                return fn()
            except (OSError, *UNREACHABLE) as exc:
                if attempt == attempts - 1 or isinstance(exc, FileNotFoundError):  # a missing object does not appear by waiting
                    endpoint = (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
                    where = f" from endpoint {endpoint}" if endpoint else ""
                    raise IOError(f"reading {what}{where} failed after {attempt + 1} attempts: {type(exc).__name__}: {exc}") from None
                self.stats["read_retries"] += 1
                time.sleep(min(2.0**attempt, 10.0))

    def _open(self, shard: Any) -> pq.ParquetFile:
        if self.cache is not None and shard.sha256:
            def fetch() -> bytes:
                data = self._with_retries(shard.path, lambda: self.fs.cat_file(shard.path))
                self.stats["remote_bytes"] += len(data)
                return data

            return pq.ParquetFile(str(self.cache.get(shard.sha256, shard.bytes, fetch)), memory_map=True)
        if not self.remote:
            return pq.ParquetFile(shard.path, memory_map=True)
        if shard.bytes <= self.whole_fetch_bytes:  # one GET per shard, not a ranged GET per column chunk
            data = self._with_retries(shard.path, lambda: self.fs.cat_file(shard.path))
            self.stats["remote_bytes"] += len(data)
            return pq.ParquetFile(pa.BufferReader(data))
        fh = self._with_retries(shard.path, lambda: self.afs.open_input_file(shard.path))
        return pq.ParquetFile(fh, pre_buffer=True)  # a row group's column chunks in few coalesced GETs

    def read_table(self, shard: int, row_group: int, handles: dict[int, Any]) -> pa.Table:
        """One row group's input and target columns, as read (not decoded, not cached)."""
        path = self.info.shards[shard].path
        if shard not in handles:
            try:
                handles[shard] = self._open(self.info.shards[shard])
            except pa.ArrowInvalid as exc:  # read, but not Parquet (anything the storage did is an IOError already)
                raise IOError(f"{self.info.key}: opening '{path}' failed (a damaged shard?): {type(exc).__name__}: {exc}") from None
        pf = handles[shard]
        read = partial(pf.read_row_group, row_group, columns=self.info.schema.parquet_columns())
        if self.remote and self.cache is None and self.info.shards[shard].bytes > self.whole_fetch_bytes:  # ranged GETs
            self.stats["remote_row_group_reads"] += 1
            table = self._with_retries(path, read)
        else:  # from memory or local disk: a failure is a damaged shard, not worth retrying
            try:
                table = read()
            except Exception as exc:
                raise IOError(f"{self.info.key}: reading row group {row_group} of '{path}' failed (a damaged shard?): "
                              f"{type(exc).__name__}: {exc}") from None
        return table

    def row_group(self, shard: int, row_group: int, handles: dict[int, Any]) -> dict[str, np.ndarray]:
        """One row group, decoded to one array per input and target (``[n, *shape]``); kept in memory across epochs while the
        decoded row groups fit in ``data.memory_cache_bytes`` (least recently used evicted first)."""
        key = (shard, row_group)
        with self._decoded_lock:
            if key in self._decoded:
                self._decoded.move_to_end(key)
                return self._decoded[key]
        table = self.read_table(shard, row_group, handles)
        arrays = decode(self.info.schema, table, key=self.info.key, uri=self.info.shards[shard].path)
        self.stats["row_groups_decoded"] += 1
        with self._decoded_lock:
            self._decoded[key] = arrays
            self._decoded_bytes += sum(a.nbytes for a in arrays.values())
            while self._decoded and self._decoded_bytes > self.cfg.memory_cache_bytes:
                _, old = self._decoded.popitem(last=False)
                self._decoded_bytes -= sum(a.nbytes for a in old.values())
        return arrays

    def window(self, pieces: list[Any], handles: dict[int, Any], epoch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(columns, rows)`` of one window: without a transform, the window's row groups (concatenated if several; a row
        group cut into several units is decoded once) and the indices of its rows in them; with one, its rows transformed."""
        offsets: dict[tuple[int, int], int] = {}
        arrays: list[dict[str, np.ndarray]] = []
        rows, held = [], 0
        for u in pieces:
            key = (u.shard, u.row_group)
            if key not in offsets:
                arrays.append(self.row_group(u.shard, u.row_group, handles))
                offsets[key], held = held, held + len(next(iter(arrays[-1].values())))
            rows.append(u.index + offsets[key])
        cols = {k: arrays[0][k] if len(arrays) == 1 else np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
        index = np.concatenate(rows)
        if self.transform is None:
            return cols, index
        out = self.transform({k: v[index] for k, v in cols.items()}, self.info.row_ids(pieces), epoch)
        return out, np.arange(len(index))

    def windows(self, windows: list[list[Any]], epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        handles: dict[int, Any] = {}
        for w in windows:
            yield self.window(w, handles, epoch)
