"""One parameter-server shard: the parameters it owns, their optimizer state, and the update rules.

A shard owns *pieces*: whole dense tensors, or a contiguous row range of an
embedding table (:func:`plan_shards` decides, balanced by bytes). Workers push
gradients (one call per shard per step: a flat float32 buffer for the dense
pieces plus ``(row ids, row gradients)`` per table) and get the shard's fresh
dense parameters back in the reply; embedding rows are pulled on demand, only
the rows a batch touches. The optimizer runs here (``torch.optim`` on the
shard's tensors), so its state never lives on the workers.

Modes (``sync.ps.mode``):

* ``sync``: a push waits until every worker pushed the same step; the shard then
  applies the mean gradient once (the same update as all-reduce SGD) and answers all.
* ``async``: each push is applied on arrival (scaled by ``1/world``, so the
  pushes of one round add up to one mean-gradient step) and answered at once.
* ``ssp``: as ``async``, but the reply to a worker that has completed ``c``
  steps is held until ``c - min(completed steps of all workers) <= staleness``:
  nobody computes more than ``staleness`` steps ahead of the slowest.

Each shard records the largest such gap it ever released (``max_gap``).

Work-conserving ssp (``sync.ps.balance: dynamic``): a push with ``hold=False``
is applied and answered at once; when the worker is past the bound the reply
says ``held`` and the worker waits on :meth:`ShardServer.release` before its next
push, computing on the reply's parameters meanwhile. A worker that has stopped
(:meth:`ShardServer.finish`, until :meth:`ShardServer.resume`) no longer holds anyone back. ``advance=False``
pushes (the batches a worker computed while held, pushed before an epoch-end
checkpoint) are applied without counting a step. Shard 0 also deals the pieces of
each epoch (:meth:`ShardServer.claim`). Every shard counts the batches applied
(``batches``): the run's progress in steps is ``batches // world``.
:class:`ShardServer` is plain Python (unit-tested with asyncio); the strategy
runs it as an async Ray actor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lepton_ray.train.optim import fused_kwargs

__all__ = ["Piece", "PSStateError", "ShardServer", "plan_shards"]


class PSStateError(RuntimeError):
    """A worker and a shard disagree on the step (the shard restarted from a checkpoint)."""


@dataclass(frozen=True)
class Piece:
    """One parameter, or a row range ``[row_start, row_start + shape[0])`` of an embedding table, on one shard."""

    name: str
    shard: int
    shape: tuple[int, ...]
    sparse: bool
    row_start: int = 0

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return 4 * self.numel


def plan_shards(params: list[tuple[str, tuple[int, ...], bool]], num_shards: int) -> list[list[Piece]]:
    """Assign ``(name, shape, is_embedding)`` parameters to ``num_shards`` shards, balanced by bytes.

    Embedding tables are split by rows over the shards; dense tensors go whole,
    largest first, to the least-loaded shard. Raises ``ValueError`` when a shard
    would own nothing.

    >>> plan = plan_shards([("emb", (10, 4), True), ("w", (4, 4), False), ("b", (4,), False)], 2)
    >>> [[(p.name, p.shape, p.row_start) for p in s] for s in plan]
    [[('emb', (5, 4), 0), ('w', (4, 4), 0)], [('emb', (5, 4), 5), ('b', (4,), 0)]]
    """
    shards: list[list[Piece]] = [[] for _ in range(num_shards)]
    load = [0] * num_shards
    for name, shape, sparse in params:
        if not sparse:
            continue
        bounds = np.linspace(0, shape[0], num_shards + 1).round().astype(int)
        for i in range(num_shards):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                piece = Piece(name, i, (hi - lo, *shape[1:]), True, lo)
                shards[i].append(piece)
                load[i] += piece.nbytes
    dense = sorted(((n, s) for n, s, sp in params if not sp), key=lambda t: -int(np.prod(t[1], dtype=np.int64)))
    for name, shape in dense:
        i = min(range(num_shards), key=lambda j: (load[j], j))
        piece = Piece(name, i, tuple(shape), False)
        shards[i].append(piece)
        load[i] += piece.nbytes
    filled = sum(1 for s in shards if s)
    if filled < num_shards:
        n_dense = len(dense)
        rows = max((s[0] for _, s, sp in params if sp), default=0)
        raise ValueError(
            f"{num_shards} is more than the model's parameters allow: {n_dense} dense tensor(s) and embedding tables"
            f" of at most {rows} rows fill only {filled} shard(s)"
        )
    return shards


class ShardServer:
    """The state and update rules of one shard (run as an async Ray actor by the ``ps`` strategy).

    ``init`` maps each piece's name to its initial values (the row range for table pieces).
    ``train`` holds the optimizer settings: ``optimizer`` (sgd | adamw), ``momentum``,
    ``weight_decay``, ``lr``, ``embedding_optimizer`` (adagrad | sgd), ``embedding_lr``.
    When ``checkpoint_uri`` holds a committed checkpoint, the shard restores its part of it
    (a shard restarted by Ray comes back at the newest checkpoint).
    """

    def __init__(
        self,
        index: int,
        pieces: list[Piece],
        init: dict[str, np.ndarray],
        *,
        world_size: int,
        mode: str,
        staleness: int,
        train: dict[str, Any],
        timeout_s: float = 600.0,
        checkpoint_uri: Optional[str] = None,
        storage_options: Optional[dict] = None,
    ):
        torch.set_num_threads(1)
        self.index, self.world, self.mode, self.staleness, self.timeout_s = index, world_size, mode, staleness, timeout_s
        self.dense_pieces = [p for p in pieces if not p.sparse]
        # the dense pieces are views of ONE flat buffer: a reply is a single copy, a push a single view
        self.flat = torch.cat([torch.tensor(np.asarray(init[p.name]), dtype=torch.float32).reshape(-1) for p in self.dense_pieces]) \
            if self.dense_pieces else torch.zeros(0)
        self.dense, offset = [], 0
        for p in self.dense_pieces:
            self.dense.append(torch.nn.Parameter(self.flat[offset : offset + p.numel].view(p.shape)))
            offset += p.numel
        self.tables = {p.name: torch.nn.Parameter(torch.tensor(np.asarray(init[p.name]), dtype=torch.float32)) for p in pieces if p.sparse}
        self.lr = float(train["lr"])
        self.emb_lr_ratio = float(train.get("embedding_lr") or self.lr) / self.lr
        self.dense_opt: Optional[torch.optim.Optimizer] = None
        if self.dense:
            fast = fused_kwargs(self.dense)
            if train["optimizer"] == "sgd":
                self.dense_opt = torch.optim.SGD(self.dense, lr=self.lr, momentum=train["momentum"], weight_decay=train["weight_decay"], **fast)
            else:
                self.dense_opt = torch.optim.AdamW(self.dense, lr=self.lr, weight_decay=train["weight_decay"], **fast)
        self.sparse_opt: Optional[torch.optim.Optimizer] = None
        if self.tables:
            tables = list(self.tables.values())
            emb_lr = self.lr * self.emb_lr_ratio
            self.sparse_opt = torch.optim.Adagrad(tables, lr=emb_lr) if train["embedding_optimizer"] == "adagrad" else torch.optim.SGD(tables, lr=emb_lr)
        self.clocks = [0] * world_size  # steps each worker has completed (pushed)
        self.batches = 0  # local batches received from every worker (a push may carry several)
        self.done = [False] * world_size  # workers that stopped pushing (no longer hold others back)
        self.claims: dict[int, int] = {}  # epoch -> next piece to deal (balance: dynamic, shard 0)
        self.pending: dict[int, tuple[Optional[np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
        self.generation = 0  # bumped by restore(): waiting pushes of an older worker group give up
        self.max_gap = 0
        self.restored_from: Optional[str] = None
        self._cond: Optional[asyncio.Condition] = None
        self._round_reply: Any = None  # sync mode: the dense snapshot every worker of the last round gets
        if checkpoint_uri:
            self._restore_from_checkpoint(checkpoint_uri, storage_options or {})

    # ------------------------------------------------------------------ checkpoint state

    def _restore_from_checkpoint(self, uri: str, storage_options: dict) -> None:
        from lepton_ray.train.checkpoint import CheckpointStore

        store = CheckpointStore(uri, storage_options)
        latest, loaded, _ = store.load_latest(["strategy"])  # the checkpoint the workers resume from (the newest that verifies)
        if latest is None:
            return
        state = loaded.get("strategy")
        if state is not None:
            self._load(state["shards"][self.index])
            self.restored_from = latest.uri

    def state(self) -> dict[str, Any]:
        """This shard's parameters, optimizer state and clocks (tensors and plain data only)."""
        return {
            "dense": {p.name: t.detach().clone() for p, t in zip(self.dense_pieces, self.dense)},
            "tables": {n: t.detach().clone() for n, t in self.tables.items()},
            "dense_opt": self.dense_opt.state_dict() if self.dense_opt else None,
            "sparse_opt": self.sparse_opt.state_dict() if self.sparse_opt else None,
            "clocks": list(self.clocks),
            "batches": self.batches,
        }

    def _load(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, t in zip(self.dense_pieces, self.dense):
                t.copy_(state["dense"][p.name])
            for n, t in self.tables.items():
                t.copy_(state["tables"][n])
        if self.dense_opt is not None and state["dense_opt"] is not None:
            self.dense_opt.load_state_dict(state["dense_opt"])
        if self.sparse_opt is not None and state["sparse_opt"] is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.clocks = [int(min(state["clocks"]))] * self.world  # a checkpoint is taken with every worker at one step
        self.batches = int(state.get("batches", self.clocks[0] * self.world))
        self.done = [False] * self.world
        self.claims.clear()  # a resumed run deals its epoch anew
        self.pending.clear()
        self.generation += 1

    async def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpointed :meth:`state` (a resumed worker group); returns the step."""
        self._load(state)
        async with self._condition():
            self._condition().notify_all()
        return self.clocks[0]

    # ------------------------------------------------------------------ worker calls

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "restored_from": self.restored_from, "clocks": list(self.clocks), "batches": self.batches}

    def claim(self, epoch: int, pieces: int) -> Optional[int]:
        """The next undealt piece (an index below ``pieces``) of ``epoch``, or ``None`` once all are dealt."""
        i = self.claims.get(epoch, 0)
        if i >= pieces:
            return None
        self.claims[epoch] = i + 1
        return i

    def pull_dense(self) -> Optional[np.ndarray]:
        """The shard's dense pieces as one flat float32 buffer (``None`` when it has none)."""
        return self._dense_flat()

    def pull_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (local to this shard's range of table ``name``) as float32 ``[len(ids), dim]``."""
        return self.tables[name].detach()[torch.from_numpy(np.asarray(ids, dtype=np.int64))].numpy()

    async def push(
        self,
        worker: int,
        step: int,
        lr: float,
        dense: Optional[np.ndarray],
        sparse: dict[str, tuple[np.ndarray, np.ndarray]],
        batches: int = 1,
        hold: bool = True,
        advance: bool = True,
    ) -> dict[str, Any]:
        """Apply (or, in sync mode, collect) worker ``worker``'s gradients of step ``step`` (the sum of
        ``batches`` batch-mean gradients).

        Returns ``{"dense": fresh dense parameters, "gap": steps this worker is ahead of the
        slowest when released, "max_gap": the largest gap this shard released, "step": clock,
        "batches": batches received in all, "held": bool}``. ssp with ``hold=False`` answers at once:
        past the bound the reply is ``held`` (the next push waits for :meth:`release`). ``advance=False``
        (async / ssp): applied without counting a step, never held.
        """
        cond = self._condition()
        async with cond:
            if self.clocks[worker] != step:
                raise PSStateError(
                    f"PS shard {self.index} is at step {self.clocks[worker]} for worker {worker}, which pushed step {step}"
                    f" (shard restored from {self.restored_from}); resuming from the newest checkpoint replays the lost steps"
                )
            gen = self.generation
            self.batches += batches
            if self.mode == "sync":
                self.pending[worker] = (dense, sparse)
                if len(self.pending) == self.world:
                    self._apply_round(lr)
                    cond.notify_all()
                else:
                    await self._wait(cond, lambda: self.generation != gen or self.clocks[worker] > step, worker, step)
            else:
                self._apply(lr, dense, sparse, 1.0 / self.world)  # a push of k batches weighs k batches
                if advance:
                    self.clocks[worker] = step + 1
                    cond.notify_all()
                    if self.mode == "ssp" and hold:
                        await self._wait(cond, lambda: self.generation != gen or self._gap(worker) <= self.staleness, worker, step)
            if self.generation != gen:
                raise PSStateError(f"PS shard {self.index} was restored from a checkpoint while worker {worker} waited at step {step}")
            gap = self._gap(worker)
            if self.mode == "ssp" and advance and gap > self.staleness:
                # the freshest parameters still go back: batches computed while held read them (fresher than
                # the parameters of the last release), but the next push waits for :meth:`release`
                return {"dense": self._publish_dense(), "gap": gap, "max_gap": self.max_gap,
                        "step": self.clocks[worker], "batches": self.batches, "held": True}
            return self._reply(worker, record=advance)

    async def release(self, worker: int, step: int) -> dict[str, Any]:
        """ssp: wait until worker ``worker`` (clock ``step``, its push was ``held``) is within the bound again;
        the reply is :meth:`push`'s."""
        cond = self._condition()
        async with cond:
            gen = self.generation
            await self._wait(cond, lambda: self.generation != gen or self.clocks[worker] != step or self._gap(worker) <= self.staleness,
                             worker, step)
            if self.generation != gen or self.clocks[worker] != step:
                raise PSStateError(f"PS shard {self.index} was restored from a checkpoint while worker {worker} waited at step {step}")
            return self._reply(worker)

    async def finish(self, worker: int) -> None:
        """Worker ``worker`` pushes no more for now (it waits for the others at an epoch end, or the run is
        over for it): it no longer holds the others at the ssp bound, until :meth:`resume`."""
        async with self._condition():
            self.done[worker] = True
            self._condition().notify_all()

    def resume(self) -> None:
        """Every worker pushes again (after an epoch end that every worker reached)."""
        self.done = [False] * self.world

    # ------------------------------------------------------------------ internals

    def _gap(self, worker: int) -> int:
        """Steps ``worker`` is ahead of the slowest worker still pushing (0 when every other one stopped)."""
        active = [c for w, c in enumerate(self.clocks) if not self.done[w] or w == worker]
        return self.clocks[worker] - min(active)

    def _reply(self, worker: int, record: bool = True) -> dict[str, Any]:
        """``record``: this reply releases the worker to compute (an ``advance=False`` push's does not)."""
        gap = self._gap(worker)
        if record:
            self.max_gap = max(self.max_gap, gap)
        # sync: one snapshot per round, the same object for every worker; otherwise this push's own
        dense = self._round_reply if self.mode == "sync" else self._publish_dense()
        return {"dense": dense, "gap": gap, "max_gap": self.max_gap, "step": self.clocks[worker], "batches": self.batches, "held": False}

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def _wait(self, cond: asyncio.Condition, predicate, worker: int, step: int) -> None:
        try:
            await asyncio.wait_for(cond.wait_for(predicate), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise PSStateError(
                f"PS shard {self.index}: worker {worker} waited more than sync.ps.timeout_s={self.timeout_s:g} s at step {step}"
                f" for the other workers (clocks {self.clocks})"
            ) from None

    def _dense_flat(self) -> Optional[np.ndarray]:
        if not self.dense:
            return None
        return self.flat.numpy().copy()  # a snapshot: later updates must not change a reply in flight

    def _publish_dense(self) -> Any:
        """A snapshot of the dense parameters for push replies. The Ray actor overrides this with one
        ``ray.put`` (a single copy into the object store, which every worker of a sync round reads)."""
        return self._dense_flat()

    def _apply_round(self, lr: float) -> None:
        """sync mode: the mean of every worker's gradients, applied once."""
        pushes = [self.pending[w] for w in sorted(self.pending)]
        dense = None
        if self.dense:
            dense = np.array(pushes[0][0], dtype=np.float32)  # one writable copy, then in-place sums
            for d, _ in pushes[1:]:
                dense += d
        sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.tables:
            parts = [s[name] for _, s in pushes if name in s]
            if parts:
                sparse[name] = (np.concatenate([i for i, _ in parts]), np.concatenate([r for _, r in parts]))
        self._apply(lr, dense, sparse, 1.0 / self.world, owned=True)
        self.clocks = [c + 1 for c in self.clocks]
        self.pending.clear()
        self._round_reply = self._publish_dense()

    def _apply(self, lr: float, dense: Optional[np.ndarray], sparse: dict[str, tuple[np.ndarray, np.ndarray]], scale: float,
               owned: bool = False) -> None:
        """One optimizer step from ``scale`` x the gradients (``owned``: ``dense`` may be scaled in place)."""
        if self.dense_opt is not None and dense is not None:
            flat = torch.from_numpy(dense).mul_(scale) if owned else torch.from_numpy(np.multiply(dense, scale, dtype=np.float32))
            offset = 0
            for t in self.dense:
                t.grad = flat[offset : offset + t.numel()].view_as(t)
                offset += t.numel()
            for group in self.dense_opt.param_groups:
                group["lr"] = lr
            self.dense_opt.step()
            for t in self.dense:
                t.grad = None
        if self.sparse_opt is not None:
            touched = False
            for name, (ids, rows) in sparse.items():
                if len(ids) == 0:
                    continue
                t = self.tables[name]
                idx = torch.tensor(np.asarray(ids), dtype=torch.int64).unsqueeze(0)
                vals = torch.tensor(np.asarray(rows), dtype=torch.float32) * scale
                t.grad = torch.sparse_coo_tensor(idx, vals, t.shape, check_invariants=False)  # duplicates (several workers) are summed
                touched = True
            if touched:
                for group in self.sparse_opt.param_groups:
                    group["lr"] = lr * self.emb_lr_ratio
                self.sparse_opt.step()
                for t in self.tables.values():
                    t.grad = None
