"""Training: the driver (:class:`Trainer`), the worker loop, checkpoints and metrics."""

from lepton_ray.train.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from lepton_ray.train.trainer import Result, Trainer, TrainingError

__all__ = ["Checkpoint", "CheckpointError", "CheckpointStore", "Result", "Trainer", "TrainingError"]
