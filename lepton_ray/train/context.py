"""The worker context: who this worker is and where its reports go, handed to the loop (no global state).

The same loop runs under Ray Train (:meth:`WorkerContext.from_ray`), in the calling process for debugging
(:meth:`WorkerContext.local`), in a warm worker group that sweep trials reuse (:mod:`lepton_ray.train.group`),
or under a plain ``torch.multiprocessing`` + gloo harness in unit tests (build it directly).

>>> WorkerContext.local().world
1
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

__all__ = ["WorkerContext", "isolated"]


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world: int
    device: torch.device = torch.device("cpu")
    report: Optional[Callable[[dict[str, Any]], None]] = None
    """Called on every rank after each evaluation (a sweep trial's report to Tune, which may stop the run
    by raising); the records before it are on disk first."""

    @classmethod
    def from_ray(cls, *, use_gpu: bool) -> "WorkerContext":
        """Inside a Ray Train worker."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        return cls(ctx.get_world_rank(), ctx.get_world_size(), device)

    @classmethod
    def local(cls, device: torch.device = torch.device("cpu")) -> "WorkerContext":
        """One worker in the calling process (no process group needed)."""
        return cls(0, 1, device)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Restore what a run may change in its process: the torch, numpy and Python RNG states, the
    environment variables, torch's intra-op thread count and the working directory."""
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate(), dict(os.environ), torch.get_num_threads(), os.getcwd())
    try:
        yield
    finally:
        rng, np_rng, py_rng, env, threads, cwd = state
        torch.set_rng_state(rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        for key in set(os.environ) - set(env):  # key by key: other threads of the process may read it meanwhile
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        torch.set_num_threads(threads)
        os.chdir(cwd)
