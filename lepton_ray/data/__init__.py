"""Data: describing Parquet splits, reading them on workers, batching them in a resumable order."""

from lepton_ray.data.builders import BUILDERS, build_data
from lepton_ray.data.pipeline import ShardedBatches, TableInfo, data_exists, describe, load_arrays

__all__ = ["BUILDERS", "ShardedBatches", "TableInfo", "build_data", "data_exists", "describe", "load_arrays"]
