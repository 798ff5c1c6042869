"""Memory: activation checkpointing, and what a worker holds (parameters, gradients, optimizer state, peak).

``train.activation_checkpointing`` names module classes whose forward is recomputed in backward instead of
keeping its activations (``torch.utils.checkpoint``, non-reentrant). The modules keep their class name and
their parameters' names (the class is swapped for a subclass, as FSDP2 does), so checkpoints, FSDP units and
serving bundles see the same model.
"""

from __future__ import annotations

import ctypes
import resource
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lepton_ray.config import ConfigError
from lepton_ray.train.optim import is_sharded

__all__ = ["checkpoint_activations", "memory_bytes", "mmap_threshold", "peak_memory"]


class _Recomputed:
    """Mixin: the forward pass is recomputed in backward; nothing of it is kept but its inputs."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)  # type: ignore[misc]


_SUBCLASSES: dict[type, type] = {}


def checkpoint_activations(model: nn.Module, names: Optional[list[str]]) -> nn.Module:
    """Recompute the activations of every module of a class in ``names`` (None: none); returns ``model``.

    >>> m = checkpoint_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["Linear"])
    >>> type(m[0]).__name__, list(m.state_dict())
    ('Linear', ['0.weight', '0.bias'])
    """
    if not names:
        return model
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(f"train.activation_checkpointing: {', '.join(map(repr, missing))} is not a module class of the model;"
                          f" its classes are: {', '.join(sorted(present))}")
    for m in model.modules():
        cls = type(m)
        if cls.__name__ in names and not issubclass(cls, _Recomputed):
            if cls not in _SUBCLASSES:
                _SUBCLASSES[cls] = type(cls.__name__, (_Recomputed, cls), {"__qualname__": cls.__qualname__})
            m.__class__ = _SUBCLASSES[cls]
    return model


def _nbytes(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    local = t.to_local() if is_sharded(t) else t  # a sharded tensor: this worker's shard
    return local.numel() * local.element_size()


def memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This worker's parameter, gradient and optimizer-state bytes (its shards, where they are sharded).

    >>> m = nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters()); m(torch.ones(1, 4)).sum().backward(); opt.step()
    >>> memory_bytes(m, opt)
    {'param_bytes': 40, 'grad_bytes': 40, 'optimizer_bytes': 88}
    """
    params = list(model.parameters())
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard's optimizer here
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"param_bytes": sum(_nbytes(p) for p in params), "grad_bytes": sum(_nbytes(p.grad) for p in params),
            "optimizer_bytes": sum(_nbytes(v) for v in state)}


def peak_memory(device: torch.device) -> int:
    """The most memory this worker has held: allocated GPU memory on CUDA, else the process's high-water RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def mmap_threshold(nbytes: int) -> bool:
    """glibc only: allocations of ``nbytes`` or more are mapped on their own and returned to the OS when freed, from now on
    in this process (``mallopt(M_MMAP_THRESHOLD)``); False where the C library has no such knob.

    Why: glibc raises its threshold to the size of the last large block freed (up to 32 MiB), after which buffers that
    are freed and allocated again every step (FSDP's per-unit all-gathers and reduce-scatters) stay in the heap and
    fragment it. A gpt of 8 x 512 (25 M parameters) under fsdp on 2 CPU workers peaked at 0.95 GiB RSS per worker
    with glibc's default, 0.68 GiB with an 8 MiB threshold (allreduce: 0.84). A fixed threshold costs page faults on
    every such allocation: a low one (1-4 MiB) slowed an MLP step with 4 MiB gradients by ~30 %, so it is set only
    above the sizes a step allocates for activations and gradients of ordinary layers.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, int(nbytes)))  # -3: M_MMAP_THRESHOLD
