"""``allreduce``: DistributedDataParallel over the process group Ray Train set up.

gloo on CPU, NCCL on GPU (Ray Train picks the backend from ``use_gpu``).
DDP averages gradients in buckets during ``backward``, overlapping
communication with computation, so :meth:`step` is a plain optimizer step.
"""

from __future__ import annotations

from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lepton_ray.sync.base import Strategy, optimizer_step

__all__ = ["AllReduce"]


class AllReduce(Strategy):
    name = "allreduce"

    def wrap(self, model: nn.Module) -> nn.Module:
        self._model = model
        if not (dist.is_available() and dist.is_initialized()) or self.worker.world_size == 1:
            self._ddp: Optional[DistributedDataParallel] = None
            return model
        opts = self.config.sync.allreduce
        device_ids = [self.worker.device.index] if self.worker.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters at construction, so every replica starts equal.
        self._ddp = DistributedDataParallel(
            model,
            device_ids=device_ids,
            bucket_cap_mb=opts.bucket_mb,
            find_unused_parameters=opts.find_unused_parameters,
            gradient_as_bucket_view=True,  # grads live in the comm buckets: one copy fewer per step
        )
        return self._ddp

    def unwrap(self) -> nn.Module:
        return self._model

    def no_sync(self) -> ContextManager[Any]:
        return self._ddp.no_sync() if self._ddp is not None else super().no_sync()

    def step(self, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler], batches: int = 1) -> None:
        optimizer_step(optimizer, list(self._model.parameters()), scaler, self.config.train.grad_clip_norm)
