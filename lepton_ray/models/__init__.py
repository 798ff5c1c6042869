"""Model registry: built-in models by name, user models by import path."""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from lepton_ray.config import ConfigError, ModelConfig
from lepton_ray.models.mlp import mlp
from lepton_ray.models.recommender import recommender

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "recommender": recommender}


def build_model(cfg: ModelConfig, input_dim: int, num_outputs: int) -> nn.Module:
    """Build the configured model for ``input_dim`` features and ``num_outputs`` outputs.

    >>> build_model(ModelConfig(hidden=[8]), 4, 3)[0]
    Linear(in_features=4, out_features=8, bias=True)
    """
    if cfg.factory is None:
        kwargs = {"hidden": list(cfg.hidden), "dropout": cfg.dropout} if cfg.name == "mlp" else {}
        if cfg.name == "recommender":
            kwargs = {"hidden": list(cfg.hidden)}
        try:
            return MODELS[cfg.name](input_dim=input_dim, num_outputs=num_outputs, **{**kwargs, **cfg.kwargs})
        except (TypeError, ValueError) as exc:  # a bad model.kwargs value: name it before any worker starts
            raise ConfigError(f"model: cannot build '{cfg.name}': {exc}") from None
    module, _, name = cfg.factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.factory: cannot import '{cfg.factory}': {exc}") from None
    model = fn(input_dim=input_dim, num_outputs=num_outputs, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
