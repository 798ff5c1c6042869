"""Worker groups that run the training loop with this process as rank 0, besides Ray Train's.

- :class:`LocalGroup`: one worker, this process, no Ray (``lepton-ray train --local``).
- :class:`WarmGroup`: this process is rank 0 and ``world - 1`` helper actors are the other ranks; the
  torch process group is formed once and kept, so successive runs in the same process (sweep trials
  in one reused Tune actor) start in well under a second instead of a Ray Train worker group's
  controller, placement group, worker processes, imports and process group (~15 s on 2 cores).

A run is the same :func:`~lepton_ray.train.loop.train_loop` either way, so a run in a group equals
the same config under ``lepton-ray train`` to the bit. Nothing leaks from one run into the next:
every rank runs under :func:`isolated`, which restores the RNGs, the environment, torch's thread
count and the working directory afterwards, and everything else a run builds (model, optimizer,
data cursor) lives inside the loop call. (The driver's own model builds, for its checks, are isolated
the same way, so a run in the driver's process sees the process as a fresh worker would.)

``report(metrics)`` is called on rank 0 after every evaluation (Tune's ``report`` for a sweep
trial). Every rank then learns from rank 0 whether the run goes on, so a run the reporter stops
(Tune raises ``SystemExit`` in ``report`` when it stops a trial) ends on every rank at the same
step and the group stays usable.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from lepton_ray.train.context import WorkerContext, isolated
from lepton_ray.train.loop import LoopSpec, train_loop

__all__ = ["LocalGroup", "WarmGroup", "RunStopped", "is_warm", "warm_group"]

Report = Optional[Callable[[dict[str, Any]], None]]


class RunStopped(Exception):
    """Raised on the ranks other than 0 when rank 0's ``report`` stopped the run."""


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray gives each actor its own GPU as cuda:0


class LocalGroup:
    """One worker in this process, without Ray or a process group."""

    world = 1

    def __init__(self, use_gpu: bool = False):
        self.device = _device(use_gpu)

    def run(self, spec: LoopSpec, report: Report = None) -> None:
        with isolated():
            train_loop(spec, WorkerContext(0, 1, self.device, _Agree(report, 0, 1, self.device)))


class _Agree:
    """The loop's ``report`` on every rank: rank 0 calls ``report``; then every rank learns from rank 0
    whether the run goes on (a broadcast), so all ranks leave the loop at the same evaluation."""

    def __init__(self, report: Report, rank: int, world: int, device: torch.device):
        self.report, self.rank, self.world, self.device = report, rank, world, device
        self.stopped = False  # the reporter stopped the run (every rank knows): not a failure

    def __call__(self, metrics: dict[str, Any]) -> None:
        stop = torch.zeros(1, device=self.device)
        try:
            if self.rank == 0 and self.report is not None:
                self.report(metrics)
        except BaseException:
            self.stopped = True
            if self.world > 1:
                stop += 1
                dist.broadcast(stop, 0)
            raise
        if self.world > 1:
            dist.broadcast(stop, 0)
        if stop.item():
            self.stopped = True
            raise RunStopped("rank 0 stopped the run")


class _Peer:
    """Ranks 1.. of a :class:`WarmGroup`: a Ray actor that joins the process group once and runs loops."""

    def join(self, host: str, port: int, rank: int, world: int, backend: str, use_gpu: bool, timeout_s: float) -> int:
        import torch._dynamo  # noqa: F401 - DDP's constructor imports it (~1.5 s): before rank 0 is ready, not after

        self.rank, self.world, self.device = rank, world, _device(use_gpu)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)  # rank 0's, up since the group was made
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return os.getpid()

    def run(self, spec: LoopSpec) -> str:
        try:
            with isolated():
                train_loop(spec, WorkerContext(self.rank, self.world, self.device, _Agree(None, self.rank, self.world, self.device)))
            return "done"
        except RunStopped:
            return "stopped"
        except Exception:
            # die with the error: the process group's sockets close, so rank 0 fails at once instead of
            # waiting in a collective for the timeout; the traceback reaches the driver's log
            print(f"lepton_ray: rank {self.rank} of a warm worker group failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            os._exit(1)


class WarmGroup:
    """This process (rank 0) plus ``world - 1`` helper actors in one torch process group, kept across runs.

    Inside a Tune trial the helpers go into the trial's placement group (bundle ``i`` for rank ``i``;
    bundle 0 holds the trial itself). A run that fails (not one its reporter stopped) closes the
    group: the next :func:`warm_group` call builds a fresh one.
    """

    def __init__(self, world: int, cpus_per_worker: float, use_gpu: bool = False, timeout_s: float = 1800.0):
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.world, self.device, self.key = world, _device(use_gpu), (world, cpus_per_worker, use_gpu, timeout_s)
        pg = get_current_placement_group()
        actor = ray.remote(_Peer)
        self.peers = []
        for rank in range(1, world):
            where = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank) if pg is not None and rank < pg.bundle_count else None
            self.peers.append(actor.options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, scheduling_strategy=where).remote())
        # rank 0's rendezvous store is served from now on: a helper connects as soon as it starts and waits there for
        # rank 0's first run (with a tcp:// address and no server yet, its client retried with growing pauses: 2-4 s)
        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, world, is_master=True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        backend = "nccl" if use_gpu else "gloo"
        self._joined = [p.join.remote(host, self._store.port, rank, world, backend, use_gpu, timeout_s)
                        for rank, p in enumerate(self.peers, start=1)]
        self._init = (backend, timeout_s)
        self.pids: list[int] = []
        import torch._dynamo  # noqa: F401 - what DDP's constructor imports (~1.5 s), while the helpers start

    def _connect(self) -> None:
        """Rank 0 joins the process group (the helpers joined as they started): on the first run only."""
        import ray

        if self.pids:
            return
        backend, timeout_s = self._init
        if dist.is_initialized():  # another group's (a different world size): this process can hold one
            dist.destroy_process_group()
        dist.init_process_group(backend, store=self._store, rank=0, world_size=self.world, timeout=datetime.timedelta(seconds=timeout_s))
        self.pids = [os.getpid(), *ray.get(self._joined)]

    def run(self, spec: LoopSpec, report: Report = None) -> None:
        import ray

        self._connect()
        pending = [p.run.remote(spec) for p in self.peers]
        agree = _Agree(report, 0, self.world, self.device)
        try:
            with isolated():
                train_loop(spec, WorkerContext(0, self.world, self.device, agree))
        except BaseException:
            if not agree.stopped:  # a failure: the other ranks may be stuck in a collective
                self.close()
            else:
                ray.get(pending)  # stopped at an evaluation: every rank returns "stopped"
            raise
        ray.get(pending)

    def close(self) -> None:
        import ray

        for p in self.peers:
            ray.kill(p)
        self.peers = []
        if dist.is_initialized() and self.pids:
            dist.destroy_process_group()
        if _CACHE.get("group") is self:
            _CACHE.clear()


_CACHE: dict[str, WarmGroup] = {}


def is_warm(world: int, cpus_per_worker: float, use_gpu: bool = False, timeout_s: float = 1800.0) -> bool:
    """This process holds a warm group that :func:`warm_group` would return for these arguments (no new helpers)."""
    group = _CACHE.get("group")
    return group is not None and group.key == (world, cpus_per_worker, use_gpu, timeout_s)


def warm_group(world: int, cpus_per_worker: float, use_gpu: bool = False, timeout_s: float = 1800.0) -> "LocalGroup | WarmGroup":
    """This process's group for runs of ``world`` workers: built on first use, kept for the next run. ``timeout_s``:
    how long a collective may wait (a stuck rank fails the run then)."""
    if world == 1:
        return LocalGroup(use_gpu)
    group = _CACHE.get("group")
    if group is not None and group.key != (world, cpus_per_worker, use_gpu, timeout_s):
        group.close()
        group = None
    if group is None:
        group = _CACHE["group"] = WarmGroup(world, cpus_per_worker, use_gpu, timeout_s)
    return group
