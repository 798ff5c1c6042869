"""Model registry: built-in models by name, user models by import path.

Every model function is called as ``fn(schema=..., **kwargs)`` with the data's
:class:`~lepton_ray.data.schema.Schema` and returns an ``nn.Module``. A user function
without a ``schema`` parameter gets ``input_dim`` / ``num_outputs`` instead (one flat input).
"""

from __future__ import annotations

import inspect
import math
from torch import nn

from lepton_ray.config import Config, ConfigError, ModelConfig
from lepton_ray.data.schema import Schema
from lepton_ray.imports import import_object

__all__ = ["MODELS", "build_model", "check_config", "flat_io"]


def _registry() -> dict[str, str]:
    return {"mlp": "lepton_ray.models.mlp:mlp", "cnn": "lepton_ray.models.cnn:cnn", "gpt": "lepton_ray.models.gpt:gpt",
            "recommender": "lepton_ray.models.recommender:recommender"}


MODELS: dict[str, str] = _registry()
"""Built-in model name -> ``module:function`` (imported when built)."""


def check_config(cfg: Config) -> None:
    """``model.name`` is a built-in model (unless ``model.factory`` names a user function)."""
    m = cfg.model
    if m.factory is None and m.name not in MODELS:
        raise ConfigError(f"model.name: must be one of {', '.join(sorted(MODELS))} (or set model.factory), got {m.name!r}")


def flat_io(schema: Schema) -> tuple[int, int]:
    """``(input_dim, num_outputs)`` of a model over one flattened input: the input's values per row, and
    the target's classes (classification) or values per row (regression; 1 without a target).

    >>> from lepton_ray.data.schema import Column
    >>> flat_io(Schema(inputs=(Column("x", ("x",), "float32", (64,)),), targets=(Column("y", ("y",), "int64", (), 10),)))
    (64, 10)
    """
    dim = sum(math.prod(c.shape) for c in schema.inputs)
    t = schema.target
    outputs = 1 if t is None else (t.num_classes or math.prod(t.shape))
    return dim, outputs


def build_model(cfg: ModelConfig, schema: Schema) -> nn.Module:
    """Build the configured model for ``schema``.

    >>> from lepton_ray.data.schema import Column
    >>> s = Schema(inputs=(Column("x", ("x",), "float32", (4,)),), targets=(Column("y", ("y",), "int64", (), 3),))
    >>> build_model(ModelConfig(hidden=[8]), s)[0]
    Linear(in_features=4, out_features=8, bias=True)
    """
    if cfg.factory is None:
        fn = import_object(MODELS[cfg.name], "model.name")
        kwargs = {"hidden": list(cfg.hidden)} if cfg.name in ("mlp", "recommender", "cnn") else {}
        if cfg.name == "mlp":
            kwargs["dropout"] = cfg.dropout
        try:
            return fn(schema=schema, **{**kwargs, **cfg.kwargs})
        except (TypeError, ValueError) as exc:  # a bad model.kwargs value or an unsuitable schema: before any worker starts
            raise ConfigError(f"model: cannot build '{cfg.name}': {exc}") from None
    fn = import_object(cfg.factory, "model.factory")
    if "schema" in inspect.signature(fn).parameters:
        model = fn(schema=schema, **cfg.kwargs)
    else:
        input_dim, num_outputs = flat_io(schema)
        model = fn(input_dim=input_dim, num_outputs=num_outputs, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
