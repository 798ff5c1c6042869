"""User code a config names: ``"package.module:attribute"`` (model factories, losses, transforms, data builders),
or a Python callable passed to the API (``Trainer(cfg, model=fn)``), named ``"callable:module.qualname"``.

A callable defined in a notebook or script cannot be imported on a worker by name: :func:`register` gives it a
name the config records, and the run ships the registered objects to its workers (Ray's cloudpickle pickles a
``__main__`` function by value, as it does for a ``TorchTrainer``'s train function); :func:`install` puts them in
the worker's registry before the run imports anything.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from lepton_ray.config import ConfigError

__all__ = ["import_object", "install", "register", "registered"]

CALLABLE = "callable:"
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(fn: Callable[..., Any]) -> str:
    """Name ``fn`` ``"callable:module.qualname"`` in this process's registry and return the name.

    >>> register(len)
    'callable:builtins.len'
    >>> import_object('callable:builtins.len', 'model.factory') is len
    True
    """
    if not callable(fn):
        raise TypeError(f"expected a function or class, got {type(fn).__name__}")
    name = f"{CALLABLE}{getattr(fn, '__module__', None) or 'unknown'}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    _REGISTRY[name] = fn
    return name


def registered(*names: Any) -> dict[str, Callable[..., Any]]:
    """The registered callables among ``names`` (config values; others are ignored), to ship to workers."""
    return {n: _REGISTRY[n] for n in names if isinstance(n, str) and n in _REGISTRY}


def install(callables: dict[str, Callable[..., Any]]) -> None:
    """Put callables shipped from the driver into this process's registry."""
    _REGISTRY.update(callables)


def import_object(spec: str, option: str) -> Any:
    """The object ``spec`` names; ``ConfigError`` naming ``option`` when it cannot be imported.

    >>> import_object("math:pi", "model.factory")
    3.141592653589793
    >>> import_object("math:nope", "model.loss")
    Traceback (most recent call last):
    ...
    lepton_ray.config.ConfigError: model.loss: cannot import 'math:nope': module 'math' has no attribute 'nope'
    """
    if spec.startswith(CALLABLE):
        if spec in _REGISTRY:
            return _REGISTRY[spec]
        raise ConfigError(f"{option}: '{spec}' was a Python callable passed to the run (e.g. Trainer(cfg, model=fn)); this process"
                          f" has no such callable: call lepton_ray.imports.register(fn) with the same function first (or name"
                          f" an importable 'package.module:function' instead)")
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{option}: cannot import '{spec}': {exc}") from None
