"""lepton_ray: distributed PyTorch training on Ray from one YAML config.

>>> import lepton_ray
>>> cfg = lepton_ray.load_config("examples/digits.yaml", ["train.epochs=5"])  # doctest: +SKIP
>>> result = lepton_ray.Trainer(cfg).fit()  # doctest: +SKIP
>>> round(result.metrics["eval_accuracy"], 2)  # doctest: +SKIP
0.97

The names below are imported on first use: Ray starts many small actors from
lepton_ray's modules (the metrics sink, PS shards), and importing one of them must
not pull torch, Ray Tune and pandas into every such process.
"""

from __future__ import annotations

import importlib
from typing import Any

from lepton_ray.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "CheckpointError", "Result", "SweepResult", "Trainer", "TrainingError", "load_config", "sweep"]
__version__ = "0.1.0"

_LAZY = {
    "CheckpointError": "lepton_ray.train.checkpoint",
    "Result": "lepton_ray.train.trainer",
    "Trainer": "lepton_ray.train.trainer",
    "TrainingError": "lepton_ray.train.trainer",
    "SweepResult": "lepton_ray.tune.sweep",
    "sweep": "lepton_ray.tune.sweep",
}


def lazy_attribute(module: str, table: dict[str, str], name: str) -> Any:
    """PEP 562 ``__getattr__`` body shared by the package ``__init__`` modules."""
    if name not in table:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return getattr(importlib.import_module(table[name]), name)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
