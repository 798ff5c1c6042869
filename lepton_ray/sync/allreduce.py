"""``allreduce``: DistributedDataParallel over the process group Ray Train set up.

gloo on CPU, NCCL on GPU (Ray Train picks the backend from ``use_gpu``). On CPU, workers that share a
host average their gradients through shared memory instead of gloo's loopback TCP
(``sync.allreduce.cpu_transport``, see :mod:`lepton_ray.sync.shm`).
DDP averages gradients in buckets during ``backward``, so :meth:`step` is a plain optimizer step.
"""

from __future__ import annotations

import logging
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lepton_ray.config import AllReduceConfig
from lepton_ray.sync.base import Strategy, WorkerInfo, optimizer_step
from lepton_ray.sync.shm import SharedMemoryAllReduce, SharedMemoryUnavailable, bucket_capacity

__all__ = ["AllReduce", "build_ddp"]

log = logging.getLogger(__name__)


def build_ddp(model: nn.Module, worker: WorkerInfo, opts: AllReduceConfig, reduced: list[torch.Tensor],
              **ddp_kwargs: Any) -> tuple[DistributedDataParallel, Optional[SharedMemoryAllReduce], dict[str, str]]:
    """DDP around ``model`` (``reduced``: the parameters it all-reduces), with the gradient transport
    ``opts.cpu_transport`` picks. Collective: every rank calls it. DDP broadcasts rank 0's parameters at
    construction, so every replica starts equal.

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
    if worker.device.type != "cpu" or opts.cpu_transport == "gloo":
        return ddp, None, {"allreduce_transport": dist.get_backend()}
    try:
        shm = SharedMemoryAllReduce(worker.rank, worker.world_size, bucket_capacity(reduced, opts.bucket_mb), opts.shm_dir)
    except SharedMemoryUnavailable as exc:
        if opts.cpu_transport == "shm":
            raise RuntimeError(f"sync.allreduce.cpu_transport 'shm' needs every worker on one host, sharing {opts.shm_dir}: {exc}. "
                               f"Use 'auto' to fall back to gloo, or 'gloo'") from None
        if worker.rank == 0:
            log.warning("lepton_ray: gradients go over gloo, shared memory is unavailable: %s", exc)
        return ddp, None, {"allreduce_transport": "gloo", "allreduce_note": f"shared memory unavailable: {exc}"}
    ddp.register_comm_hook(shm, SharedMemoryAllReduce.hook)
    return ddp, shm, {"allreduce_transport": "shm"}


class AllReduce(Strategy):
    name = "allreduce"

    def wrap(self, model: nn.Module) -> nn.Module:
        self._model = model
        self._ddp: Optional[DistributedDataParallel] = None
        self._shm: Optional[SharedMemoryAllReduce] = None
        self._describe: dict[str, str] = {}
        if not (dist.is_available() and dist.is_initialized()) or self.worker.world_size == 1:
            return model
        self._ddp, self._shm, self._describe = build_ddp(
            model, self.worker, self.config.sync.allreduce, list(model.parameters()),
            gradient_as_bucket_view=True)  # grads live in the comm buckets: one copy fewer per step
        return self._ddp

    def unwrap(self) -> nn.Module:
        return self._model

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def no_sync(self) -> ContextManager[Any]:
        return self._ddp.no_sync() if self._ddp is not None else super().no_sync()

    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        optimizer_step(optimizer, list(self._model.parameters()), precision, self.config.train.grad_clip_norm)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
