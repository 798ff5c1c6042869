"""The worker's stream: this worker's batches, read ahead in a background thread, in the plan's resumable order.

The stream (:class:`WorkerStream`) follows the plan (:mod:`lepton_ray.data.plan`); its source
(:mod:`lepton_ray.data.source`, chosen by ``data.engine``) reads and decodes the rows.

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

import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from lepton_ray.config import DataConfig
from lepton_ray.data.plan import Plan, Segment, dynamic_units
from lepton_ray.data.source import Source, make_source
from lepton_ray.data.table import TableInfo
from lepton_ray.data.transform import load_transform

READ_AHEAD = "lepton-read-ahead"
"""The name of a stream's read-ahead (producer) threads."""

__all__ = ["WorkerStream"]


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
            if cfg.engine != "native":
                raise ValueError("the dynamic deal (sync.ps.balance: dynamic) reads with data.engine: native")
            self.stats.update(pieces_claimed=0, rows_dropped=0)
        self.source: Source = make_source(info, cfg, self.stats, load_transform(cfg, seed), world_size)
        self._steps: dict[int, int] = {}
        self._history: dict[int, tuple[Segment, ...]] = {}  # an epoch begun at other world sizes: its earlier segments
        # the reading already begun: (epoch, start step, its producer), for the next epoch or the loop's first
        self._next: Optional[tuple[int, int, tuple["queue.Queue[Any]", threading.Event, threading.Thread]]] = None

    def describe(self) -> dict[str, Any]:
        """Where this stream's rows are read and transformed (the run's ``start`` record says it)."""
        c = self.cfg
        if c.engine == "native":
            where = "in each training worker's process (a background thread)"
        else:
            r = c.transform_resources
            pool = f"a pool of {r.concurrency} actors per worker" if r.concurrency else "Ray tasks"
            where = (f"in Ray Data: {pool} of {r.num_cpus:g} CPU each"
                     + (f" on nodes with {', '.join(r.resources)}" if r.resources else "")
                     + f", at most {self.source.cpus:g} CPUs per worker (data.cpus {c.cpus:g}), off the training workers' CPUs")
        return {"engine": c.engine, "reads_in": where, "transform": c.transform}

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

    def _produce(self, epoch: int, start_row: int, end_row: int, out: "queue.Queue[Any]", stop: threading.Event) -> None:
        try:
            wanted, offset = [], 0  # (window, order, lo, hi): the windows still needed, and which of their rows
            for window, order in self._plan(epoch).windows(self.rank, self.world_size):
                n = len(order)
                lo, hi = max(start_row - offset, 0), min(end_row - offset, n)
                offset += n
                if 0 < hi and lo < n:  # not entirely consumed already (resume), nor past the epoch's end
                    wanted.append((window, order, lo, hi))
                if offset >= end_row:
                    break
            read = self.source.windows([w for w, *_ in wanted], epoch)
            for (_, order, lo, hi), (cols, rows) in zip(wanted, read):
                rows = torch.from_numpy(rows)
                if self.cfg.shuffle:  # the local shuffle buffer: a seeded permutation of the window's rows
                    rows = rows[torch.from_numpy(order)]
                # the rows still to be consumed; the consumer gathers each batch from the columns by these indices
                _put(out, ({k: torch.from_numpy(v) for k, v in cols.items()}, rows[lo:hi]), stop)
                if stop.is_set():
                    break
            read.close()
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
                cols, rows = self.source.window([units[i]], files, epoch)
                rows = torch.from_numpy(rows)
                if self.cfg.shuffle:
                    rows = rows[torch.from_numpy(np.random.default_rng([self.seed, epoch, i]).permutation(len(rows)))]
                _put(out, ({k: torch.from_numpy(v) for k, v in cols.items()}, rows), stop)
            _put(out, None, stop)
        except BaseException as exc:  # hand the error to the training loop
            _put(out, exc, stop)

    def _dealt_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        out: "queue.Queue[Any]" = queue.Queue(maxsize=1)
        room, stop = threading.Semaphore(1), threading.Event()
        producer = threading.Thread(target=self._produce_dealt, args=(epoch, out, room, stop), name=READ_AHEAD, daemon=True)
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
                                    name=READ_AHEAD, daemon=True)
        producer.start()
        return out, stop, producer

    def start(self, epoch: int, start_step: int = 0) -> None:
        """Begin reading ``epoch`` from ``start_step`` now, in the background: the loop calls this before it builds the
        model, so the first batches (and a Ray Data engine's start-up) overlap the build. ``epoch`` then picks it up."""
        if self.claim is None and start_step < self.steps(epoch):
            self.close()
            self._next = (epoch, start_step, self._start(epoch, start_step))

    def close(self) -> None:
        """Stop the next epoch's prefetch, if one is running (the training loop calls this at its end)."""
        if self._next is not None:
            _, _, (_, stop, producer) = self._next
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
        if self._next is not None and self._next[:2] == (epoch, start_step):
            (_, _, (out, stop, producer)), self._next = self._next, None
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
                            self._next = (epoch + 1, 0, self._start(epoch + 1, 0))
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
