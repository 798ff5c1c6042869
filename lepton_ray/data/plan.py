"""The epoch plan: which rows each worker reads, in which order (pure functions of data, seed, epoch, world size).

The unit of work is a row group (tiny data sets are cut finer, so every worker gets some).
Each epoch the units are permuted with ``(seed, epoch)`` and dealt round-robin
to the workers; a worker reads its units in that order, a few at a time, shuffles the rows inside each window of
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

The dynamic deal (:func:`dynamic_units`) cuts the epoch 4x finer and hands pieces to whichever worker asks next.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Union

import numpy as np

from lepton_ray.data.table import TableInfo

__all__ = ["DYNAMIC_FINER", "Piece", "Plan", "Rows", "Segment", "Unit", "dynamic_units", "epoch_units", "steps_in_epoch"]


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
