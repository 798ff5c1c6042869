"""Sync strategies, by name: each a worker-side ``Strategy`` whose ``Services`` class is its driver side.

Adding one is a file under ``sync/`` and its line in :data:`STRATEGIES`; its options section (``sync.<key>``)
is the dataclass it lists in ``sections``, checked here with every config.
"""

from __future__ import annotations

import difflib

from lepton_ray.config import Config, ConfigError, build_section
from lepton_ray.sync.allreduce import AllReduce
from lepton_ray.sync.base import Services, Strategy, WorkerInfo
from lepton_ray.sync.fsdp import FSDP
from lepton_ray.sync.hybrid import Hybrid
from lepton_ray.sync.param_server import ParamServer

__all__ = ["SECTIONS", "STRATEGIES", "Services", "Strategy", "WorkerInfo", "check_config"]

STRATEGIES: dict[str, type[Strategy]] = {"allreduce": AllReduce, "fsdp": FSDP, "ps": ParamServer, "hybrid": Hybrid}

SECTIONS: dict[str, type] = {s.PATH.split(".", 1)[1]: s for cls in STRATEGIES.values() for s in cls.sections}
"""The strategies' options sections by key (``allreduce`` is ``sync.allreduce``)."""


def check_config(cfg: Config) -> None:
    """``sync.strategy`` names a registered strategy, every ``sync.<key>`` section is one a strategy reads (and valid),
    and the strategy accepts the rest of the config. Raises ``ConfigError``.

    >>> from lepton_ray.config import load_config
    >>> check_config(load_config({"data": {"train": "t"}, "sync": {"strategy": "fsdp", "fsdp": {"units": ["Block"]}}}))
    >>> check_config(load_config({"data": {"train": "t"}, "sync": {"strategy": "fsdb"}}))
    Traceback (most recent call last):
    lepton_ray.config.ConfigError: sync.strategy: 'fsdb' is not one of allreduce, fsdp, ps, hybrid (did you mean 'fsdp'?)
    """
    name = cfg.sync.strategy
    if name not in STRATEGIES:
        hint = difflib.get_close_matches(name, STRATEGIES, n=1)
        raise ConfigError(f"sync.strategy: {name!r} is not one of {', '.join(STRATEGIES)}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for key, values in cfg.sync.options.items():
        if key not in SECTIONS:
            hint = difflib.get_close_matches(key, SECTIONS, n=1)
            raise ConfigError(f"sync.{key}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                              + f"; valid keys in 'sync' are: strategy, {', '.join(SECTIONS)}")
        build_section(SECTIONS[key], values)
    STRATEGIES[name].check(cfg)
    if cfg.scaling.elastic and not STRATEGIES[name].elastic:
        raise ConfigError(f"scaling.num_workers: elastic {cfg.scaling.num_workers} needs a strategy that resumes at any worker"
                          f" count ({', '.join(n for n, c in STRATEGIES.items() if c.elastic)}); sync.strategy '{name}' does not;"
                          " use a fixed worker count")
