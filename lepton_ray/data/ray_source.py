"""``data.engine: ray_data``: each worker's windows read, decoded and transformed by Ray Data, off the trainer's cores.

The plan stays ours (:mod:`lepton_ray.data.plan`: which rows, in which order, where a resume starts); Ray Data
executes it. Per epoch (or per resumed segment) a worker builds one Dataset over the pieces it still needs, one
block per piece, maps each to its decoded, transformed rows in Ray tasks (or a pool of actors:
``data.transform_resources``) that hold CPUs of their own, and iterates the result with ``preserve_order``:
the stream receives the same rows in the same order as from the native source, and the cursor, the shuffle
and the batches are the stream's as before. Ray Data retries a task whose process died, and a retried task
reads the same piece again: no row is lost or repeated. Ray Data's own mid-epoch resume and ``streaming_split``
are not used: the open-source Ray has no resume, and ``streaming_split`` deals blocks to whichever worker asks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from lepton_ray.config import DataConfig
from lepton_ray.data.schema import decode
from lepton_ray.data.source import ParquetSource
from lepton_ray.data.transform import Transform, TransformError

__all__ = ["RayDataSource"]

_READERS: dict[tuple[str, str], ParquetSource] = {}  # per task process: one reader per split (open filesystems)


def _reader(info: Any, cfg: DataConfig) -> ParquetSource:
    key = (info.uri, info.fingerprint())
    if key not in _READERS:  # no decoded-row cache in a task process: whichever process runs a piece is chance
        reader = _READERS[key] = ParquetSource(info, dataclasses.replace(cfg, memory_cache_bytes=0), {})
        reader.whole_fetch_bytes = 0  # a task reads one piece of a shard: its row group's byte ranges, not the whole shard
    return _READERS[key]


def _read(ids: np.ndarray, info: Any, cfg: DataConfig, pieces: list[Any], transform: Optional[Transform], epoch: int) -> Any:
    """The rows of ``pieces[i]`` for each ``i`` in ``ids``, concatenated: without a transform, as read (an Arrow table:
    Ray Data's own block format, decoded by the consumer as the native source decodes); with one, decoded and transformed."""
    mine = [pieces[int(i)] for i in ids]
    reader = _reader(info, cfg)
    if transform is None:
        tables, handles = [], {}
        for p in mine:
            table = reader.read_table(p.shard, p.row_group, handles)
            tables.append(table.slice(p.start, p.rows) if hasattr(p, "start") else table.take(pa.array(p.index)))  # Unit | Rows
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    reader.transform = transform  # this task's (the reader is kept across tasks, the transform comes with each)
    return reader.window(mine, {}, epoch)[0]  # transformed rows come in piece order


class _ReadActor:
    """The same read, in an actor of a pool (``data.transform_resources.concurrency``): set up once per actor."""

    def __init__(self, info: Any, cfg: DataConfig, pieces: list[Any], transform: Optional[Transform], epoch: int):
        self.args = (info, cfg, pieces, transform, epoch)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        return _read(batch["id"], *self.args)


def _read_batch(batch: dict[str, np.ndarray], info: Any, cfg: DataConfig, pieces: list[Any], transform: Optional[Transform],
                epoch: int) -> Any:
    return _read(batch["id"], info, cfg, pieces, transform, epoch)


def _hold(ds: Any, cpus: float) -> Any:
    """``ds`` set to run in the plan's order (``preserve_order``, not whichever task finishes first), without
    progress bars, and on at most ``cpus`` logical CPUs. It is set on the Dataset's own context (a copy of the
    process's, taken when the Dataset was made), never on the process's: a worker's next-epoch prefetch thread and a
    user's own Ray Data code in the same process read that one at the same time."""
    ctx = ds.context
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=cpus)
    return ds


@contextlib.contextmanager
def _data_logs() -> Iterator[None]:
    """Ray Data's lines in this worker (each execution's plan, at INFO) at the level of Ray Train's worker logs
    (WARNING unless the run is ``--verbose``), and not its warning that progress bars are off (the engine turns them
    off: a worker's bars would interleave in the console), put back after."""
    data_log, bars_log = logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")
    levels = data_log.level, bars_log.level
    data_log.setLevel(max(data_log.getEffectiveLevel(), logging.getLogger("ray.train").getEffectiveLevel()))
    bars_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        data_log.setLevel(levels[0])
        bars_log.setLevel(levels[1])


_RAISED = re.compile(r"^\S*(TransformError|OSError): (.*)$", re.M)


def _user_error(exc: Exception) -> Exception:
    """A task's ``TransformError`` or read error as itself: Ray Data hands it over as a ``UserCodeException`` whose
    text carries the task's traceback (the type is not kept across the process boundary)."""
    found = _RAISED.findall(str(exc))
    if not found:
        return exc
    kind, message = found[-1]
    return TransformError(message) if kind == "TransformError" else OSError(message)


class RayDataSource:
    """The ``ray_data`` engine's source: the stream's windows, read by Ray Data (see the module's docstring).

    Counts into ``stats``: ``ray_data_blocks`` (blocks received) and ``ray_data_datasets`` (executions started).
    Each of the ``world_size`` workers' executions holds at most its share of ``data.cpus`` (at least one task's), so
    the engine as a whole stays within ``data.cpus`` on a cluster with other work, whatever Ray Data's default
    (every free CPU of the cluster for each execution).
    """

    def __init__(self, info: Any, cfg: DataConfig, stats: dict[str, float], transform: Optional[Transform] = None,
                 world_size: int = 1):
        self.info, self.cfg, self.stats, self.transform = info, cfg, stats, transform
        self.cpus = max(cfg.cpus / world_size, cfg.transform_resources.num_cpus or 0)
        self.stats.update(ray_data_blocks=0, ray_data_datasets=0)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per execution per worker per epoch otherwise

    def report(self) -> None:
        pass

    def _dataset(self, pieces: list[Any], epoch: int) -> Any:
        import ray.data

        r = self.cfg.transform_resources
        args = (self.info, self.cfg, pieces, self.transform, epoch)
        where = {"num_cpus": r.num_cpus, **({"resources": dict(r.resources)} if r.resources else {})}
        ds = _hold(ray.data.range(len(pieces), override_num_blocks=len(pieces)), self.cpus)  # a task per piece
        if r.concurrency is None:
            return ds.map_batches(_read_batch, batch_size=None, batch_format="numpy", fn_args=args, **where)
        return ds.map_batches(_ReadActor, batch_size=None, batch_format="numpy", fn_constructor_args=args,
                              concurrency=r.concurrency, **where)

    def windows(self, windows: list[list[Any]], epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        pieces = [p for w in windows for p in w]
        if not pieces:
            return
        self.stats["ray_data_datasets"] += 1
        with _data_logs():  # the execution starts (and logs its plan) at the first block
            yield from self._windows(pieces, windows, epoch)

    def _windows(self, pieces: list[Any], windows: list[list[Any]], epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        arrow = self.transform is None  # then blocks are Arrow tables, decoded here
        blocks = iter(self._dataset(pieces, epoch).iter_batches(batch_size=None, batch_format="pyarrow" if arrow else "numpy",
                                                                 prefetch_batches=self.cfg.prefetch_windows))
        held: list[dict[str, np.ndarray]] = []
        have = 0
        for w in windows:
            n = sum(p.rows for p in w)
            while have < n:
                try:
                    b = next(blocks)
                except Exception as exc:
                    raise _user_error(exc) from None
                self.stats["ray_data_blocks"] += 1
                if arrow:
                    b = decode(self.info.schema, b, key=self.info.key, uri=self.info.uri)
                held.append(b)
                have += len(next(iter(b.values())))
            cols = held[0] if len(held) == 1 else {k: np.concatenate([b[k] for b in held]) for k in held[0]}
            held = [{k: v[n:] for k, v in cols.items()}] if have > n else []
            have -= n
            yield {k: np.require(v[:n], None, ["C", "W"]) for k, v in cols.items()}, np.arange(n)
