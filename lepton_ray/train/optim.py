"""The optimizer and the learning-rate schedule a run's config asks for."""

from __future__ import annotations

import math

import torch
from torch import nn

from lepton_ray.config import Config
from lepton_ray.sync.base import fused_kwargs

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = list(model.parameters())
    # fused kernels, except for sparse-gradient tables (a parameter server strategy sets them sparse)
    sparse = any(getattr(m, "sparse", False) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
    fast = {} if sparse else fused_kwargs(params, scaled=t.precision == "fp16")
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fast)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fast)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
