"""The built-in multi-layer perceptron."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per hidden width, then a Linear head, over each row flattened to floats
    (so ``[B, 1, 8, 8]`` uint8 pixels and ``[B, 64]`` float32 features are the same to it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return super().forward(x if x.is_floating_point() else x.float())


def mlp(schema: Any = None, hidden: list[int] = (128, 64), dropout: float = 0.0, *, input_dim: int = 0, num_outputs: int = 0) -> nn.Module:
    """Sized from ``schema`` (one input; the target's classes or values per row), or ``input_dim`` / ``num_outputs``.

    >>> mlp(hidden=[32], input_dim=64, num_outputs=10)
    MLP(
      (0): Linear(in_features=64, out_features=32, bias=True)
      (1): ReLU()
      (2): Linear(in_features=32, out_features=10, bias=True)
    )
    """
    if schema is not None:
        from lepton_ray.models import flat_io

        if len(schema.inputs) != 1:
            raise ValueError(f"the mlp takes one input, data.inputs has {len(schema.inputs)} ({', '.join(c.name for c in schema.inputs)})")
        input_dim, num_outputs = flat_io(schema)
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return MLP(*layers)
