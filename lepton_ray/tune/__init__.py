"""Hyperparameter sweeps on Ray Tune: each trial is a normal lepton_ray training run."""

from lepton_ray.tune.sweep import SweepResult, sweep

__all__ = ["SweepResult", "sweep"]
