"""Precision as one object: autocast plus a ``GradScaler(enabled=...)``, so the step has no ``if scaler`` branches.

fp16 needs loss scaling (its small gradients underflow); bf16 has fp32's exponent range and needs none;
a disabled scaler's ``scale``/``unscale_``/``step``/``update`` are plain pass-throughs (as in nanoGPT).

>>> p = Precision("fp32", torch.device("cpu"))
>>> w = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([w], lr=0.5)
>>> with p.autocast():
...     loss = (w * 2).sum()
>>> p.backward(loss); p.step(opt, [w], clip_norm=None); w.tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional

import torch

__all__ = ["Precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``train.precision`` (fp32 | bf16 | fp16) on ``device``."""

    def __init__(self, precision: str, device: torch.device):
        self.name, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":  # not even a disabled torch.autocast: it costs ~10 us per forward on CPU
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], clip_norm: Optional[float]) -> None:
        """Unscale (fp16), clip the global gradient norm, step, update the scale."""
        self.scaler.unscale_(optimizer)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params), clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
