"""Training: the driver (:class:`Trainer`), the worker loop, checkpoints and metrics (imported on first use)."""

from __future__ import annotations

from typing import Any

from lepton_ray import lazy_attribute

__all__ = ["Checkpoint", "CheckpointError", "CheckpointStore", "Result", "Trainer", "TrainingError"]

_LAZY = {
    "Checkpoint": "lepton_ray.train.checkpoint",
    "CheckpointError": "lepton_ray.train.checkpoint",
    "CheckpointStore": "lepton_ray.train.checkpoint",
    "Result": "lepton_ray.train.trainer",
    "Trainer": "lepton_ray.train.trainer",
    "TrainingError": "lepton_ray.train.trainer",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)
