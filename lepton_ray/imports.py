"""User code named in a config as ``"package.module:attribute"`` (model factories, losses, data builders)."""

from __future__ import annotations

import importlib
from typing import Any

from lepton_ray.config import ConfigError

__all__ = ["import_object"]


def import_object(spec: str, option: str) -> Any:
    """The object ``spec`` names; ``ConfigError`` naming ``option`` when it cannot be imported.

    >>> import_object("math:pi", "model.factory")
    3.141592653589793
    >>> import_object("math:nope", "model.loss")
    Traceback (most recent call last):
    ...
    lepton_ray.config.ConfigError: model.loss: cannot import 'math:nope': module 'math' has no attribute 'nope'
    """
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{option}: cannot import '{spec}': {exc}") from None
