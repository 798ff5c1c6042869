"""Every name a config refers to, checked by the registry that owns it.

``config.py`` checks the shape of a config (keys, types, ranges) and imports no registry; the names (a model,
a loss and its metrics, a column dtype, a strategy and its options section, a sweep's keys) are checked here,
each by its owner, when a run or a sweep is built: before any data is read or Ray starts.
"""

from __future__ import annotations

from lepton_ray.config import Config

__all__ = ["check_config"]


def check_config(cfg: Config) -> Config:
    """Raise ``ConfigError`` for a name no registry knows; returns ``cfg``.

    >>> from lepton_ray.config import load_config
    >>> check_config(load_config({"data": {"train": "t.parquet"}})).sync.strategy
    'allreduce'
    """
    from lepton_ray.data.schema import check_config as data
    from lepton_ray.models import check_config as models
    from lepton_ray.sync import check_config as sync
    from lepton_ray.train.losses import check_config as losses

    for check in (models, losses, data, sync):
        check(cfg)
    if cfg.sweep.enabled:
        from lepton_ray.tune.space import check_sweep

        check_sweep(cfg)  # every key and every value a trial can draw must make a valid config
    return cfg
