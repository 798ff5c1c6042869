"""The built-in multi-layer perceptron."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(input_dim: int, num_outputs: int, hidden: list[int] = (128, 64), dropout: float = 0.0) -> nn.Module:
    """Linear -> ReLU (-> Dropout) per hidden width, then a Linear head.

    >>> mlp(64, 10, hidden=[32])
    Sequential(
      (0): Linear(in_features=64, out_features=32, bias=True)
      (1): ReLU()
      (2): Linear(in_features=32, out_features=10, bias=True)
    )
    """
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
