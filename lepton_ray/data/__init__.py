"""Data: prepared Parquet splits, the per-worker stream with its resumable order, the shard cache.

Names are imported on first use: a Ray Data task that reads shards (``data.engine: ray_data``) imports
:mod:`lepton_ray.data.ray_source` and what it needs, not the stream and torch.
"""

import importlib
from typing import Any

from lepton_ray.data.prepare import prepare  # eager: the submodule of the same name would shadow a lazy one

_WHERE = {
    "BUILDERS": "builders", "build_data": "builders", "ShardCache": "cache", "epoch_units": "plan", "steps_in_epoch": "plan",
    "WorkerStream": "stream", "TableInfo": "table", "data_exists": "table", "describe": "table", "load_arrays": "table",
}

__all__ = ["BUILDERS", "ShardCache", "TableInfo", "WorkerStream", "build_data", "data_exists", "describe", "epoch_units",
           "load_arrays", "prepare", "steps_in_epoch"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lepton_ray.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"lepton_ray.data.{_WHERE[name]}"), name)
