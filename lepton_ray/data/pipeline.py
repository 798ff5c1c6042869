"""Training data: what the driver checks, what each worker streams, and in which order.

Driver side, :func:`describe` lists the shards behind a URI (from the
``_manifest.json`` of a prepared split, or from the Parquet footers of a plain
directory) and checks the columns before any worker starts: a missing column is
a config error, not a worker crash an hour later.

Worker side, :class:`WorkerStream` streams this worker's share. The unit of
work is a row group (tiny data sets are cut finer, so every worker gets some).
Each epoch the units are permuted with ``(seed, epoch)`` and dealt round-robin
to the workers; a worker reads its units in that order, a few at a time, in a
background thread (prefetch), shuffles the rows inside each window of
``shuffle_buffer_rows`` rows with ``(seed, epoch, rank, window)``, and cuts
batches of ``batch_size / num_workers`` rows. Every worker takes the same
number of steps (the shortest share decides; the rest of an epoch is dropped,
like ``drop_last``). Hence:

* every row is used at most once per epoch, and the order is a pure function of
  (data, seed, epoch, world size);
* the position is ``(epoch, step)``: resuming mid-epoch skips exactly the rows
  already consumed, reading only the windows it still needs;
* resuming at another number of workers (an elastic resize, or ``--resume`` with
  another ``scaling.num_workers``) rebuilds which rows the earlier world size
  consumed (a pure function of the data, seed, epoch and the steps each world
  size took: a :class:`Segment` each) and deals only the rest, in equal
  contiguous shares (:class:`Plan`). Across any number of resizes every row of
  the interrupted epoch is used at most once, and all but the last segment's
  tail (fewer than one batch per worker) exactly once.

With a ``claim`` function (an elastic sync strategy, ``sync.ps.balance: dynamic``)
the deal is dynamic instead: the epoch's pieces (cut 4x finer than for the fixed
deal) are permuted with ``(seed, epoch)`` as before, but each worker asks for the
next undealt piece when it needs rows (one piece read ahead), so a fast worker
takes more of the epoch than a slow one. Rows are shuffled inside each piece with
``(seed, epoch, piece)``; a worker drops the rows left over after its last full
batch of the epoch (fewer than one batch). Every row is still used at most once
per epoch; which worker trains on it depends on timing, and a run resumes at the
start of an epoch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lepton_ray.config import ConfigError, DataConfig
from lepton_ray.data.prepare import read_manifest
from lepton_ray.data.schema import Schema, decode
from lepton_ray.data.source import UNREACHABLE, ParquetSource, Source
from lepton_ray.storage import arrow_filesystem, filesystem

__all__ = ["Plan", "Segment", "Shard", "TableInfo", "WorkerStream", "data_exists", "describe", "epoch_units", "list_parquet", "load_arrays",
           "steps_in_epoch"]

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
    fs, _ = filesystem(info.uri, storage_options)
    table = pq.ParquetDataset(list(info.files), filesystem=arrow_filesystem(fs)).read(columns=info.schema.parquet_columns())
    return decode(info.schema, table, key=info.key, uri=info.uri)


# --------------------------------------------------------------------------- the epoch plan (pure functions)


@dataclass(frozen=True)
class Unit:
    """Rows ``start:stop`` of row group ``row_group`` of shard ``shard``."""

    shard: int
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def index(self) -> np.ndarray:
        """The unit's rows, as indices into its row group."""
        return np.arange(self.start, self.stop)


@dataclass(frozen=True, eq=False)
class Rows:
    """Some rows of one row group, in any order: what is left of a unit after a resize."""

    shard: int
    row_group: int
    index: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.index)


Piece = Union[Unit, Rows]


@dataclass(frozen=True)
class Segment:
    """Part of an epoch trained at one world size: each of ``world_size`` workers took ``steps`` batches of
    ``local_batch`` rows. An epoch interrupted by a resize has a segment per world size it ran at."""

    world_size: int
    local_batch: int
    steps: int


def _units(info: TableInfo, world_size: int, finer: int = 1) -> list[Unit]:
    """Row groups as units; when there are too few to deal fairly, each is cut into equal pieces
    (at least ``finer`` x max(16, 4 x world size) units in all)."""
    groups = [(i, g, n) for i, s in enumerate(info.shards) for g, n in enumerate(s.row_groups) if n > 0]
    target = max(16, 4 * world_size) * finer
    pieces = -(-target // len(groups)) if len(groups) < target else 1
    units = []
    for i, g, n in groups:
        cuts = np.linspace(0, n, min(pieces, n) + 1).astype(int)
        units += [Unit(i, g, int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return units


def _epoch_order(units: list[Unit], epoch: int, seed: int, shuffle: bool) -> list[Unit]:
    """``units`` permuted with ``(seed, epoch)`` (file order without ``shuffle``)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
    return [units[i] for i in order]


def epoch_units(info: TableInfo, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True) -> list[Unit]:
    """The units worker ``rank`` reads in ``epoch``, in order."""
    return _epoch_order(_units(info, world_size), epoch, seed, shuffle)[rank::world_size]


DYNAMIC_FINER = 4
"""The dynamic deal cuts units this many times finer than the fixed deal: the last pieces of an epoch
decide how unevenly the workers finish it."""


def dynamic_units(info: TableInfo, *, world_size: int, epoch: int, seed: int, shuffle: bool = True) -> list[Unit]:
    """Every piece of ``epoch`` in the order the dynamic deal hands them out."""
    return _epoch_order(_units(info, world_size, DYNAMIC_FINER), epoch, seed, shuffle)


def steps_in_epoch(info: TableInfo, *, world_size: int, local_batch: int, epoch: int, seed: int, shuffle: bool = True) -> int:
    """Steps every worker takes in ``epoch``: the shortest share decides."""
    return min(
        sum(u.rows for u in epoch_units(info, rank=r, world_size=world_size, epoch=epoch, seed=seed, shuffle=shuffle)) // local_batch
        for r in range(world_size)
    )


def _windows(units: list[Piece], buffer_rows: int) -> list[list[Piece]]:
    """Consecutive units grouped until each group holds at least ``buffer_rows`` rows."""
    out: list[list[Piece]] = []
    current: list[Piece] = []
    rows = 0
    for u in units:
        current.append(u)
        rows += u.rows
        if rows >= buffer_rows:
            out.append(current)
            current, rows = [], 0
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------- resizing mid-epoch (pure functions)
# A worker's share of a segment is a list of windows; it reads each window's rows in a seeded order. So the rows
# a segment consumed are known from (data, seed, epoch, the segments before it): the first steps x local_batch
# rows of every worker's read order. Whatever a segment left (a partly read window's other rows, the windows
# not reached, the tail a fixed-size deal drops) is dealt to the next world size in contiguous, equal shares.


@dataclass(frozen=True)
class Plan:
    """Where an epoch's rows go at one world size, after the segments ``history`` (plain data)."""

    info: TableInfo
    epoch: int
    seed: int
    shuffle: bool
    buffer_rows: int
    history: tuple[Segment, ...] = ()

    def share(self, rank: int, world_size: int) -> list[Piece]:
        """The rows worker ``rank`` of ``world_size`` reads in this segment, window by window."""
        if not self.history:
            return list(epoch_units(self.info, rank=rank, world_size=world_size, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle))
        rest = self.left
        total = sum(p.rows for p in rest)
        base, extra = divmod(total, world_size)
        lo = rank * base + min(rank, extra)
        return _slice(rest, lo, lo + base + (rank < extra))

    def windows(self, rank: int, world_size: int) -> list[tuple[list[Piece], np.ndarray]]:
        """``(pieces, order)`` per window of worker ``rank``'s share: ``order`` permutes the window's rows
        (concatenated in piece order) into the order they are read."""
        key = [self.seed, self.epoch, rank] + ([len(self.history)] if self.history else [])
        out = []
        for w, window in enumerate(_windows(self.share(rank, world_size), self.buffer_rows)):
            n = sum(p.rows for p in window)
            out.append((window, np.random.default_rng([*key, w]).permutation(n) if self.shuffle else np.arange(n)))
        return out

    def steps(self, world_size: int, local_batch: int) -> int:
        """Steps of this segment at ``world_size``: the shortest share decides."""
        if not self.history:
            return steps_in_epoch(self.info, world_size=world_size, local_batch=local_batch, epoch=self.epoch, seed=self.seed,
                                  shuffle=self.shuffle)
        return sum(p.rows for p in self.left) // world_size // local_batch

    @functools.cached_property
    def left(self) -> list[Piece]:
        """The rows of the epoch the segments in ``history`` did not consume, in a canonical order. Computed once
        per plan: every worker's share of the next segment reads it, and each segment's rebuilds the one before."""
        seg = self.history[-1]
        before = replace(self, history=self.history[:-1])
        rest: list[Piece] = []
        for rank in range(seg.world_size):
            consumed = seg.steps * seg.local_batch
            for window, order in before.windows(rank, seg.world_size):
                n = len(order)
                if consumed >= n:
                    consumed -= n
                    continue
                rest += _select(window, np.sort(order[consumed:])) if consumed else window
                consumed = 0
        return rest


def _select(window: list[Piece], positions: np.ndarray) -> list[Piece]:
    """The rows at sorted ``positions`` of a window's concatenated rows, as one :class:`Rows` per piece."""
    out: list[Piece] = []
    offset = 0
    for p in window:
        mine = positions[(positions >= offset) & (positions < offset + p.rows)] - offset
        if len(mine):
            out.append(Rows(p.shard, p.row_group, p.index[mine]))
        offset += p.rows
    return out


def _slice(pieces: list[Piece], lo: int, hi: int) -> list[Piece]:
    """Rows ``lo:hi`` of ``pieces`` concatenated."""
    out: list[Piece] = []
    offset = 0
    for p in pieces:
        a, b = max(lo - offset, 0), min(hi - offset, p.rows)
        if a < b:
            out.append(p if (a, b) == (0, p.rows) else Rows(p.shard, p.row_group, p.index[a:b]))
        offset += p.rows
        if offset >= hi:
            break
    return out


# --------------------------------------------------------------------------- the worker's stream

def _put(out: "queue.Queue[Any]", item: Any, stop: threading.Event) -> None:
    """``out.put(item)`` that gives up once ``stop`` is set (nobody will read the queue any more)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


class WorkerStream:
    """This worker's batches, streamed from storage with prefetching, in a resumable order.

    The rows come from its :class:`~lepton_ray.data.source.Source` (``source``); the stream plans, shuffles,
    prefetches and cuts batches. ``stats`` counts what the stream did, ``rows`` and ``wait_s`` (time the
    training loop waited for data), plus the source's own counters.
    """

    def __init__(self, info: TableInfo, cfg: DataConfig, *, rank: int, world_size: int, local_batch: int, seed: int,
                 device: torch.device = torch.device("cpu"),
                 claim: Optional[Callable[[int, int], Optional[int]]] = None):
        self.info, self.cfg, self.claim = info, cfg, claim
        self.rank, self.world_size, self.local_batch, self.seed = rank, world_size, local_batch, seed
        self.device = device
        # numpy has no bfloat16: those columns are decoded as float32 and cast per batch
        self._casts = {c.name: getattr(torch, c.dtype) for c in info.schema.columns if c.dtype == "bfloat16"}
        self.stats: dict[str, float] = {"rows": 0, "wait_s": 0.0}
        if claim is not None:
            self.stats.update(pieces_claimed=0, rows_dropped=0)
        self.source: Source = ParquetSource(info, cfg, self.stats)
        self._steps: dict[int, int] = {}
        self._history: dict[int, tuple[Segment, ...]] = {}  # an epoch begun at other world sizes: its earlier segments
        self._next: Optional[tuple[int, tuple["queue.Queue[Any]", threading.Event, threading.Thread]]] = None  # next epoch, prefetching

    def resume_after(self, epoch: int, history: tuple[Segment, ...]) -> None:
        """``epoch`` was begun at other world sizes (``history``, oldest first): this stream deals only the rows
        those segments left, so across the resize every row of the epoch is read at most once, and all but
        fewer than a batch per worker exactly once. Steps of ``epoch`` count from its start, all segments included."""
        if self.claim is not None:
            raise ValueError("the dynamic deal restarts an interrupted epoch; it has no segments to resume after")
        self._history[epoch] = tuple(history)
        self._steps.pop(epoch, None)

    def _plan(self, epoch: int) -> Plan:
        return Plan(self.info, epoch, self.seed, self.cfg.shuffle, self.cfg.shuffle_buffer_rows, self._history.get(epoch, ()))

    def _done(self, epoch: int) -> int:
        """Steps of ``epoch`` taken at earlier world sizes."""
        return sum(s.steps for s in self._history.get(epoch, ()))

    def steps(self, epoch: int) -> int:
        """Steps of ``epoch``: exact for the fixed deal; with the dynamic deal, the epoch's batches over the
        world size (workers take different numbers of batches)."""
        if epoch not in self._steps:
            if self.claim is not None:
                self._steps[epoch] = self.info.num_rows // self.local_batch // self.world_size
            else:
                self._steps[epoch] = self._done(epoch) + self._plan(epoch).steps(self.world_size, self.local_batch)
        return self._steps[epoch]

    def cursor(self, epoch: int, step: int) -> dict[str, Any]:
        """Where this worker is, for a checkpoint: ``step`` steps into ``epoch``, in its current segment, after the
        epoch's earlier segments. A resume at another world size rebuilds the rows already consumed from it."""
        done = self._done(epoch)
        return {"world_size": self.world_size, "local_batch": self.local_batch, "step_in_segment": step - done,
                "segments": [[s.world_size, s.local_batch, s.steps] for s in self._history.get(epoch, ())]}

    # ---- reading (background thread)

    def _read_window(self, window: list[Piece], files: dict[int, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(columns, rows)``: the window's row groups (one tensor per column, concatenated if several) and
        the indices of the window's rows in them, in unit order. A row group cut into several units is decoded once."""
        offsets: dict[tuple[int, int], int] = {}
        arrays: list[dict[str, np.ndarray]] = []
        rows, held = [], 0
        for u in window:
            key = (u.shard, u.row_group)
            if key not in offsets:
                arrays.append(self.source.row_group(u.shard, u.row_group, files))
                offsets[key], held = held, held + len(next(iter(arrays[-1].values())))
            rows.append(u.index + offsets[key])
        cols = {k: torch.from_numpy(arrays[0][k] if len(arrays) == 1 else np.concatenate([a[k] for a in arrays])) for k in arrays[0]}
        return cols, torch.from_numpy(np.concatenate(rows))

    def _produce(self, epoch: int, start_row: int, end_row: int, out: "queue.Queue[Any]", stop: threading.Event) -> None:
        try:
            files: dict[int, Any] = {}
            offset = 0
            for window, order in self._plan(epoch).windows(self.rank, self.world_size):
                n = len(order)
                lo, hi = max(start_row - offset, 0), min(end_row - offset, n)
                offset += n
                if hi <= 0 or lo >= n:  # entirely consumed already (resume) or past the epoch's end
                    if offset >= end_row:
                        break
                    continue
                cols, rows = self._read_window(window, files)
                if self.cfg.shuffle:  # the local shuffle buffer: a seeded permutation of the window's rows
                    rows = rows[torch.from_numpy(order)]
                # the rows still to be consumed; the consumer gathers each batch from the columns by these indices
                _put(out, (cols, rows[lo:hi]), stop)
                if stop.is_set() or offset >= end_row:
                    break
            self.source.report()
            _put(out, None, stop)
        except BaseException as exc:  # hand the error to the training loop
            _put(out, exc, stop)

    def _produce_dealt(self, epoch: int, out: "queue.Queue[Any]", room: threading.Semaphore, stop: threading.Event) -> None:
        """Dynamic deal: claim a piece only once the consumer took the previous one (one piece read ahead)."""
        try:
            units = dynamic_units(self.info, world_size=self.world_size, epoch=epoch, seed=self.seed, shuffle=self.cfg.shuffle)
            files: dict[int, Any] = {}
            while not stop.is_set():
                if not room.acquire(timeout=0.05):
                    continue
                i = self.claim(epoch, len(units)) if not stop.is_set() else None
                if i is None:
                    break
                self.stats["pieces_claimed"] += 1
                cols, rows = self._read_window([units[i]], files)
                if self.cfg.shuffle:
                    rows = rows[torch.from_numpy(np.random.default_rng([self.seed, epoch, i]).permutation(len(rows)))]
                _put(out, (cols, rows), stop)
            _put(out, None, stop)
        except BaseException as exc:  # hand the error to the training loop
            _put(out, exc, stop)

    def _dealt_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        out: "queue.Queue[Any]" = queue.Queue(maxsize=1)
        room, stop = threading.Semaphore(1), threading.Event()
        producer = threading.Thread(target=self._produce_dealt, args=(epoch, out, room, stop), daemon=True)
        producer.start()
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        try:
            while True:
                t0 = time.perf_counter()
                item = out.get()
                self.stats["wait_s"] += time.perf_counter() - t0
                room.release()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    self.stats["rows_dropped"] += held
                    return
                cols, rows = item
                pending.append({k: v.index_select(0, rows) for k, v in cols.items()})
                held += len(rows)
                while held >= self.local_batch:
                    merged = pending[0] if len(pending) == 1 else {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
                    b = self.local_batch
                    pending = [{k: v[b:] for k, v in merged.items()}] if held > b else []
                    held -= b
                    self.stats["rows"] += b
                    yield self._to_device({k: v[:b] for k, v in merged.items()})
        finally:
            stop.set()
            producer.join(timeout=10)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for k, dtype in self._casts.items():
            batch[k] = batch[k].to(dtype)
        if self.device.type == "cuda":  # pinned: the copy runs asynchronously
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.device.type != "cpu":
            return {k: v.to(self.device) for k, v in batch.items()}
        return batch

    # ---- consuming (training loop)

    def _start(self, epoch: int, start_step: int) -> tuple["queue.Queue[Any]", threading.Event, threading.Thread]:
        out: "queue.Queue[Any]" = queue.Queue(maxsize=self.cfg.prefetch_windows)
        stop = threading.Event()
        b, done = self.local_batch, self._done(epoch)  # rows count from the start of this world size's segment
        producer = threading.Thread(target=self._produce, args=(epoch, (start_step - done) * b, (self.steps(epoch) - done) * b, out, stop),
                                    daemon=True)
        producer.start()
        return out, stop, producer

    def close(self) -> None:
        """Stop the next epoch's prefetch, if one is running (the training loop calls this at its end)."""
        if self._next is not None:
            _, (_, stop, producer) = self._next
            self._next = None
            stop.set()
            producer.join(timeout=10)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batch (one tensor per input and target) for steps ``start_step .. steps(epoch)-1`` of ``epoch``.

        Once every row of this epoch has been read, the next epoch's first windows are read in the
        background, so the loop does not wait for data at the epoch boundary.

        Dynamic deal (``claim``): every full batch this worker gets of ``epoch`` (``start_step`` must be 0).
        """
        if self.claim is not None:
            if start_step:
                raise ValueError(f"the dynamic deal starts epochs at step 0, got start_step={start_step}")
            yield from self._dealt_epoch(epoch)
            return
        b, steps = self.local_batch, self.steps(epoch)
        if start_step >= steps:
            return
        if self._next is not None and self._next[0] == epoch and start_step == 0:
            (_, (out, stop, producer)), self._next = self._next, None
        else:
            self.close()
            out, stop, producer = self._start(epoch, start_step)
        segments: "deque[list[Any]]" = deque()  # [columns, rows, next position in rows]
        step, received, wanted = start_step, 0, (steps - start_step) * b
        try:
            while step < steps:
                parts, need = [], b
                while need:
                    if not segments:
                        t0 = time.perf_counter()
                        item = out.get()
                        self.stats["wait_s"] += time.perf_counter() - t0
                        if isinstance(item, BaseException):
                            raise item
                        if item is None:
                            raise RuntimeError(f"{self.info.key}: the data ended before step {steps} of epoch {epoch}")
                        segments.append([*item, 0])
                        received += len(item[1])
                        if received >= wanted and self.steps(epoch + 1) > 0:
                            self.close()
                            self._next = (epoch + 1, self._start(epoch + 1, 0))
                    seg = segments[0]
                    cols, rows, pos = seg
                    idx = rows[pos:pos + need]
                    # one batch-sized gather per step, like indexing an in-memory tensor
                    parts.append({k: v.index_select(0, idx) for k, v in cols.items()})
                    need -= len(idx)
                    seg[2] += len(idx)
                    if seg[2] == len(rows):
                        segments.popleft()
                batch = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                self.stats["rows"] += b
                yield self._to_device(batch)
                step += 1
        finally:
            stop.set()
            producer.join(timeout=10)
