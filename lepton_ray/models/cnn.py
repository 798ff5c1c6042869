"""The built-in small convolutional network, over one image input ``[B, C, H, W]``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["CNN", "cnn"]


class CNN(nn.Module):
    """conv3x3 -> ReLU (-> 2x2 max-pool while H and W are >= 4) per channel width, then an MLP head.

    Pixels may come as any dtype: uint8 is scaled to [0, 1] here (``x.float() / 255``), so the batch travels
    from Parquet to the model at a quarter of float32's size; floats are used as they are.

    >>> m = CNN((1, 8, 8), 10, channels=[4, 8], hidden=[16])
    >>> m(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_shape: tuple[int, int, int], num_outputs: int, *, channels: list[int] = (16, 32), hidden: list[int] = (64,)):
        super().__init__()
        c, h, w = in_shape
        convs: list[nn.Module] = []
        for width in channels:
            convs += [nn.Conv2d(c, width, kernel_size=3, padding=1), nn.ReLU()]
            if h >= 4 and w >= 4:  # pool only while the map stays at least 2x2: an 8x8 digit survives two pools
                convs.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = width
        self.features = nn.Sequential(*convs)
        layers: list[nn.Module] = []
        width = c * h * w
        for n in hidden:
            layers += [nn.Linear(width, n), nn.ReLU()]
            width = n
        layers.append(nn.Linear(width, num_outputs))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        elif not x.is_floating_point():
            x = x.float()
        return self.head(self.features(x).flatten(1))


def _shape_hint(n: int) -> str:
    """A plausible ``[C, H, W]`` for ``n`` values per row (square images, 1 or 3 channels)."""
    for c in (1, 3):
        side = math.isqrt(n // c) if n % c == 0 else 0
        if side and c * side * side == n:
            return f"[{c}, {side}, {side}]"
    return f"[C, H, W] with C*H*W = {n}"


def cnn(schema: Any, hidden: list[int] = (64,), channels: list[int] = (16, 32)) -> nn.Module:
    """Registry entry ``model.name: cnn``; ``model.hidden`` sets the head, ``model.kwargs.channels`` the convs.

    >>> from lepton_ray.data.schema import Column, Schema
    >>> s = Schema(inputs=(Column("image", ("image",), "uint8", (1, 8, 8)),), targets=(Column("label", ("label",), "int64", (), 10),))
    >>> cnn(s).head[-1]
    Linear(in_features=64, out_features=10, bias=True)
    >>> cnn(Schema(inputs=(Column("image", ("image",), "uint8", (64,)),), targets=s.targets))
    Traceback (most recent call last):
    ...
    ValueError: the cnn needs one image input of shape [C, H, W] per row; data.inputs.image is uint8 [64] (set data.inputs.image.shape, e.g. [1, 8, 8])
    """
    from lepton_ray.models import flat_io

    if len(schema.inputs) != 1:
        raise ValueError(f"the cnn takes one image input, data.inputs has {len(schema.inputs)} ({', '.join(c.name for c in schema.inputs)})")
    col = schema.inputs[0]
    if len(col.shape) != 3:
        raise ValueError(f"the cnn needs one image input of shape [C, H, W] per row; data.inputs.{col.name} is {col.dtype} "
                         f"[{', '.join(map(str, col.shape))}] (set data.inputs.{col.name}.shape, e.g. {_shape_hint(math.prod(col.shape))})")
    if not channels or any(c <= 0 for c in channels):
        raise ValueError(f"model.kwargs.channels: expected a non-empty list of positive widths such as [16, 32], got {list(channels)}")
    return CNN(col.shape, flat_io(schema)[1], channels=list(channels), hidden=list(hidden))
