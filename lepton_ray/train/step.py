"""One training step: forward, loss, backward over the micro-batches, then the strategy's optimizer step.

Shaped like nanoGPT's: gradient accumulation over ``grad_accum_steps`` micro-batches, communication only
on the last one (``strategy.no_sync()`` before it), precision as one object (no ``if scaler`` branches).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from lepton_ray.train.losses import Loss, model_inputs
from lepton_ray.train.precision import Precision

__all__ = ["Compiled", "compile_model", "forward_backward"]

log = logging.getLogger(__name__)


class Compiled(nn.Module):
    """``torch.compile(net)``, and ``net`` itself from the first call that fails to compile (logged with the reason):
    a run that asked for compilation trains either way. A forward that fails eagerly too raises its own error."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.eager = net
        self.compiled = True
        object.__setattr__(self, "_fast", torch.compile(net))  # not a child: the same parameters as ``eager``

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            return self._fast(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compilation failures come in many types; eager decides below
            out = self.eager(*args, **kwargs)
            self.compiled = False
            log.warning("lepton_ray: train.compile: torch.compile failed, training the model uncompiled: %s: %s",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return out


def compile_model(net: nn.Module) -> nn.Module:
    """``train.compile``: the module the loop trains, compiled where torch can compile it (see :class:`Compiled`)."""
    return Compiled(net)


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
