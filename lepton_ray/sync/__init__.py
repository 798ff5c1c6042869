"""Sync strategies, by name: each a worker-side ``Strategy`` whose ``Services`` class is its driver side."""

from __future__ import annotations

from lepton_ray.sync.allreduce import AllReduce
from lepton_ray.sync.base import Services, Strategy, WorkerInfo
from lepton_ray.sync.hybrid import Hybrid
from lepton_ray.sync.param_server import ParamServer

__all__ = ["STRATEGIES", "Services", "Strategy", "WorkerInfo"]

STRATEGIES: dict[str, type[Strategy]] = {"allreduce": AllReduce, "ps": ParamServer, "hybrid": Hybrid}
