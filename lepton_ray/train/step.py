"""One training step: forward, loss, backward over the micro-batches, then the strategy's optimizer step.

Shaped like nanoGPT's: gradient accumulation over ``grad_accum_steps`` micro-batches, communication only
on the last one (``strategy.no_sync()`` before it), precision as one object (no ``if scaler`` branches).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lepton_ray.train.losses import Loss, model_inputs
from lepton_ray.train.precision import Precision

__all__ = ["forward_backward"]


def forward_backward(net: nn.Module, batch: dict[str, torch.Tensor], *, micro: int, inputs: tuple[str, ...], loss: Loss,
                     precision: Precision, strategy: Any) -> torch.Tensor:
    """Accumulate the gradients of ``batch`` (split into ``micro`` micro-batches); returns its mean loss, detached."""
    parts = [dict(zip(batch, chunk)) for chunk in zip(*(t.chunk(micro) for t in batch.values()))]
    total = torch.zeros((), device=next(iter(batch.values())).device)
    for i, mb in enumerate(parts):
        # only the last micro-batch's backward communicates (DDP's all-reduce, a PS push)
        with strategy.no_sync() if i < micro - 1 else contextlib.nullcontext():
            with precision.autocast():
                value, _ = loss(net(model_inputs(mb, inputs, loss.name)), mb)
                value = value / micro  # the step's gradient is the mean over micro-batches
            precision.backward(value)
        total += value.detach().float()
    return total
