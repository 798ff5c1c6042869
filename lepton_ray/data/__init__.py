"""Data: prepared Parquet splits, the per-worker stream with its resumable order, the shard cache."""

from lepton_ray.data.builders import BUILDERS, build_data
from lepton_ray.data.cache import ShardCache
from lepton_ray.data.plan import epoch_units, steps_in_epoch
from lepton_ray.data.stream import WorkerStream
from lepton_ray.data.table import TableInfo, data_exists, describe, load_arrays
from lepton_ray.data.prepare import prepare

__all__ = [
    "BUILDERS", "ShardCache", "TableInfo", "WorkerStream", "build_data", "data_exists", "describe",
    "epoch_units", "load_arrays", "prepare", "steps_in_epoch",
]
