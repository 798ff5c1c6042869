"""``allreduce``: DistributedDataParallel over the process group Ray Train set up.

gloo on CPU, NCCL on GPU (Ray Train picks the backend from ``use_gpu``). On CPU, workers that share a
host average their gradients through shared memory instead of gloo's loopback TCP
(``sync.allreduce.cpu_transport``, see :mod:`lepton_ray.sync.shm`).
DDP averages gradients in buckets during ``backward``, so :meth:`step` is a plain optimizer step.

``sync.allreduce.shard_optimizer: true`` is ZeRO-1: torch's ``ZeroRedundancyOptimizer`` keeps each
parameter's optimizer state (AdamW: 8 of its 16 bytes) on one worker only, which steps it and broadcasts
the new values. At a checkpoint every worker writes the state it holds (``optimizer-<rank>.pt``, keyed by
parameter), so a resume at any world size, with or without ZeRO-1, finds every parameter's state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lepton_ray.config import Section
from lepton_ray.sync.base import Strategy, WorkerInfo, options
from lepton_ray.sync.shm import SharedMemoryAllReduce, SharedMemoryUnavailable, bucket_capacity
from lepton_ray.train.breakdown import SyncTimer
from lepton_ray.train.optim import optimizer_class

__all__ = ["AllReduce", "AllReduceConfig", "build_ddp"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class AllReduceConfig(Section):
    """Options of the ``allreduce`` strategy (DDP); ``hybrid`` all-reduces its dense part with them too."""

    PATH: ClassVar[str] = "sync.allreduce"

    bucket_mb: float = 25.0
    """DDP gradient bucket size in MiB."""
    find_unused_parameters: bool = False
    cpu_transport: Literal["auto", "shm", "gloo"] = "auto"
    """How CPU workers average gradients. ``shm``: through a shared-memory mapping (every worker on one
    host; ~3x faster than loopback TCP for a 12.6 MB bucket); ``gloo``: over TCP, DDP's default;
    ``auto``: shm when every worker can map it, else gloo (the run's start record says which).
    GPU workers always use NCCL."""
    shm_dir: str = "/dev/shm"
    """Where the ``shm`` transport puts its mapping (a tmpfs: 2 x workers x at most 16 MiB, removed at start-up
    once every worker has it mapped)."""
    shard_optimizer: bool = False
    """ZeRO-1: each worker keeps the optimizer state of its share of the parameters only (AdamW: 8 bytes per
    parameter, divided by the workers), steps that share and broadcasts it. Same updates as unsharded."""

    def validate(self) -> None:
        self._require(self.bucket_mb > 0, "bucket_mb", "must be > 0")
        self._require(bool(self.shm_dir), "shm_dir", "must be a directory path")


class _Timed:
    """A DDP comm hook's state that times the hook ``inner(state, bucket)`` into ``synced``: the time the backward pass
    is blocked in it (the shared-memory transport averages inside the hook), and the wait from the last bucket's launch
    to its completion (the all-reduce not hidden behind backward: nothing is left to compute then)."""

    def __init__(self, inner: Any, state: Any, synced: SyncTimer):
        self.inner, self.state, self.synced = inner, state, synced

    @staticmethod
    def hook(timed, bucket):  # no annotations: DDP compares them with the real classes
        t0 = time.perf_counter()
        fut = timed.inner(timed.state, bucket)
        launched = time.perf_counter()
        timed.synced.add(launched - t0)
        if not bucket.is_last():
            return fut

        def waited(f):
            timed.synced.add(time.perf_counter() - launched)
            return f.value()

        return fut.then(waited)


def build_ddp(model: nn.Module, worker: WorkerInfo, opts: AllReduceConfig, reduced: list[torch.Tensor], synced: SyncTimer,
              **ddp_kwargs: Any) -> tuple[DistributedDataParallel, Optional[SharedMemoryAllReduce], dict[str, str]]:
    """DDP around ``model`` (``reduced``: the parameters it all-reduces), with the gradient transport
    ``opts.cpu_transport`` picks, its exposed time added to ``synced``. Collective: every rank calls it. DDP
    broadcasts rank 0's parameters at construction, so every replica starts equal.

    Returns ``(ddp, shm or None, description)``; the description (``allreduce_transport`` and, when
    ``auto`` fell back to gloo, ``allreduce_note`` with the reason) goes into the run's start record.
    """
    device_ids = [worker.device.index] if worker.device.type == "cuda" else None
    # DDP all-reduces the parameters that require grad when it is built: the others (the parameter
    # server's tables, for hybrid) are frozen for the constructor only, so DDP never registers them
    kept = {id(p) for p in reduced}
    frozen = [p for p in model.parameters() if id(p) not in kept and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=opts.bucket_mb,
                                      find_unused_parameters=opts.find_unused_parameters, **ddp_kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # what DDP does without a hook

    shm, describe = None, {"allreduce_transport": dist.get_backend()}
    if worker.device.type == "cpu" and opts.cpu_transport != "gloo":
        try:
            shm = SharedMemoryAllReduce(worker.rank, worker.world_size, bucket_capacity(reduced, opts.bucket_mb), opts.shm_dir)
            describe = {"allreduce_transport": "shm"}
        except SharedMemoryUnavailable as exc:
            if opts.cpu_transport == "shm":
                raise RuntimeError(f"sync.allreduce.cpu_transport 'shm' needs every worker on one host, sharing {opts.shm_dir}: {exc}. "
                                   f"Use 'auto' to fall back to gloo, or 'gloo'") from None
            if worker.rank == 0:
                log.warning("lepton_ray: gradients go over gloo, shared memory is unavailable: %s", exc)
            describe = {"allreduce_transport": "gloo", "allreduce_note": f"shared memory unavailable: {exc}"}
    inner = (SharedMemoryAllReduce.hook, shm) if shm is not None else (allreduce_hook, None)
    ddp.register_comm_hook(_Timed(*inner, synced), _Timed.hook)
    return ddp, shm, describe


class AllReduce(Strategy):
    name = "allreduce"
    sections = (AllReduceConfig,)

    def wrap(self, model: nn.Module) -> nn.Module:
        self.opts = options(AllReduceConfig, self.config)
        self._ddp: Optional[DistributedDataParallel] = None
        self._shm: Optional[SharedMemoryAllReduce] = None
        self._describe: dict[str, Any] = {}
        self._zero = False  # ZeRO-1: each rank steps (and saves) its share of the optimizer state
        if not self.worker.distributed:
            return model
        self._ddp, self._shm, self._describe = build_ddp(
            model, self.worker, self.opts, list(model.parameters()), self.synced,
            gradient_as_bucket_view=True)  # grads live in the comm buckets: one copy fewer per step
        return self._ddp

    def optimizer(self) -> torch.optim.Optimizer:
        if not (self.opts.shard_optimizer and self.worker.distributed):
            return super().optimizer()
        params = list(self.model.parameters())
        cls, kwargs = optimizer_class(self.config, params)
        self._describe["optimizer_sharded"], self._zero = "zero-1", True
        from torch.distributed.optim import ZeroRedundancyOptimizer  # ~1 s of imports (FSDP, DTensor) only ZeRO-1 needs

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def no_sync(self) -> ContextManager[Any]:
        return self._ddp.no_sync() if self._ddp is not None else super().no_sync()

    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        precision.step(optimizer, self.model.parameters(), self.config.train.grad_clip_norm)

    def close(self) -> None:
        if self._shm is not None:  # its gloo group and mapping: a warm worker group builds one per run
            self._shm.close()
            self._shm = None

    def save(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        if not self._zero:
            return super().save(ckpt, optimizer)
        # ZeRO-1: every rank writes the state of the parameters it steps (``optim``, its local optimizer), keyed by the
        # parameter's index in the model. Gathering it on one rank (ZeroRedundancyOptimizer.consolidate_state_dict)
        # held every rank's state there at once: 11.2 GiB on rank 0 for a 200 M-parameter gpt with AdamW.
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        local = optimizer.optim
        state = {index[id(p)]: local.state[p] for g in local.param_groups for p in g["params"] if p in local.state}
        ckpt.put(f"optimizer-{self.worker.rank}", {"state": state, "param_groups": _hyper(optimizer)})
        if self.worker.rank == 0:
            ckpt.put("model", self.model.state_dict())

    def load(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        if ckpt.has("optimizer"):  # written whole (no ZeRO-1), loaded whole: ZeroRedundancyOptimizer keeps its share
            return super().load(ckpt, optimizer)
        self.model.load_state_dict(ckpt.get("model"))
        params = list(self.model.parameters())
        mine = {id(p) for g in getattr(optimizer, "optim", optimizer).param_groups for p in g["params"]}
        state, rank, groups = {}, 0, _hyper(optimizer)
        while ckpt.has(f"optimizer-{rank}"):  # whatever world size wrote them: keep the parameters this rank steps now
            part = ckpt.get(f"optimizer-{rank}")
            state.update({i: st for i, st in part["state"].items() if id(params[i]) in mine})
            groups, rank = part["param_groups"], rank + 1
        index = {id(p): i for i, p in enumerate(params)}
        optimizer.load_state_dict({"state": state, "param_groups": [
            {**g, "params": [index[id(p)] for p in own["params"]]} for g, own in zip(groups, optimizer.param_groups)]})


def _hyper(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's parameter groups without their parameters (lr, betas, weight decay, ...)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
