"""Optimized forms of a model: fp32, bf16, int8 (dynamic quantization of Linear layers), compile.

Each form is a function ``(fp32 model, example input) -> callable`` taking what the model
takes (one tensor, or a dict of them) and returning float32 outputs. Only floating-point
inputs change precision (token ids and other integer inputs pass through unchanged).
The callable keeps the model's ``generate`` (a language model's continuation) where the
model has one. A form that cannot be built on this machine raises :class:`FormUnavailable`
with the reason (the optimizer then reports it and moves on).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
>>> make_form("int8", net)(torch.zeros(1, 4)).dtype
torch.float32
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["FORMS", "FormUnavailable", "make_form"]


class FormUnavailable(RuntimeError):
    """This form cannot be built here (missing backend, compiler, unsupported layer...)."""


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors (in a dict too) to ``dtype``; anything else unchanged."""
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class _CastIO(nn.Module):
    """Runs ``inner`` in ``dtype``: floating inputs cast down, floating outputs cast back to float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: Any) -> Any:
        return _cast(self.inner(_cast(x, self.dtype)), torch.float32)

    def generate(self, idx: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner.generate(idx, *args, **kwargs)


def _fp32(net: nn.Module, example: Any = None) -> nn.Module:
    return net


def _bf16(net: nn.Module, example: Any = None) -> nn.Module:
    return _CastIO(copy.deepcopy(net).to(torch.bfloat16), torch.bfloat16).eval()


def _int8(net: nn.Module, example: Any = None) -> nn.Module:
    """Int8 weights, activations quantized per batch at run time, for every ``nn.Linear``.

    torchao's ``quantize_`` is the supported path when torchao is installed; otherwise
    ``torch.ao.quantization.quantize_dynamic`` (deprecated in favour of torchao, still
    shipped and working in torch 2.13), with its deprecation warnings silenced here.
    """
    if not any(isinstance(m, nn.Linear) for m in net.modules()):
        raise FormUnavailable("the model has no nn.Linear layer to quantize")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        out = copy.deepcopy(net)
        quantize_(out, Int8DynamicActivationInt8WeightConfig())
        return out.eval()
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            engines = torch.backends.quantized.supported_engines
            if torch.backends.quantized.engine == "none" and engines:
                torch.backends.quantized.engine = next(e for e in engines if e != "none")
            return quantize_dynamic(copy.deepcopy(net), {nn.Linear}, dtype=torch.qint8).eval()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the form is unavailable here
        raise FormUnavailable(f"int8 dynamic quantization failed: {type(exc).__name__}: {exc}") from None


def _rows(example: Any, rows: int) -> Any:
    """``example`` (one row: a tensor or a dict of them) repeated to ``rows`` rows."""
    if isinstance(example, dict):
        return {k: _rows(v, rows) for k, v in example.items()}
    return example.expand(rows, *example.shape[1:]).contiguous()


def _compile(net: nn.Module, example: Any = None) -> Callable[..., Any]:
    example = torch.zeros(1, _in_features(net)) if example is None else example
    try:
        compiled = torch.compile(copy.deepcopy(net), dynamic=True)
        with torch.inference_mode():  # compile now (needs a C++ compiler), not on the first request
            for rows in (1, 3):
                compiled(_rows(example, rows))
        return compiled
    except Exception as exc:  # noqa: BLE001
        raise FormUnavailable(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


def _in_features(net: nn.Module) -> int:
    first = next((m for m in net.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise FormUnavailable("cannot tell the input width (no nn.Linear layer)")
    return first.in_features


FORMS: dict[str, Callable[[nn.Module, Any], Callable[..., Any]]] = {
    "fp32": _fp32, "bf16": _bf16, "int8": _int8, "compile": _compile,
}


def make_form(name: str, net: nn.Module, example: Optional[Any] = None) -> Callable[..., Any]:
    """The ``name`` form of the fp32 model ``net`` (eval mode); raises :class:`FormUnavailable`.

    ``example``: one row of what the model takes (``compile`` compiles for it now, not on the
    first request); default ``zeros(1, in_features)`` of the first ``nn.Linear``.
    """
    if name not in FORMS:
        raise ValueError(f"unknown form {name!r}; choose one of: {', '.join(FORMS)}")
    return FORMS[name](net.eval(), example)
