"""lepton_ray: distributed PyTorch training on Ray from one YAML config.

>>> import lepton_ray
>>> cfg = lepton_ray.load_config("examples/digits.yaml", ["train.epochs=5"])  # doctest: +SKIP
>>> result = lepton_ray.Trainer(cfg).fit()  # doctest: +SKIP
>>> round(result.metrics["eval_accuracy"], 2)  # doctest: +SKIP
0.97
"""

from lepton_ray.config import Config, ConfigError, load_config
from lepton_ray.train import CheckpointError, Result, Trainer, TrainingError
from lepton_ray.tune import SweepResult, sweep

__all__ = ["Config", "ConfigError", "CheckpointError", "Result", "SweepResult", "Trainer", "TrainingError", "load_config", "sweep"]
__version__ = "0.1.0"
