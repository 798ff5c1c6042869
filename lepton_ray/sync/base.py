"""The sync-strategy contract: how workers agree on the parameters.

The training loop (``lepton_ray/train/loop.py``) knows only this interface, never a strategy. A strategy

- builds the model it trains from a factory (on the meta device and then shard by shard, where it shards),
  and wraps it (``build``; ``model`` is the plain module for evaluation and checkpoints),
- makes the optimizer over what this worker holds of the parameters (``optimizer``),
- says whether a micro-batch's gradients are communicated (``no_sync``) and applies the step (``step``),
- saves and loads its state through a checkpoint folder that every rank writes its own part into (``save``,
  ``load``: whole files with ``put``/``get``, sharded state with ``put_sharded``/``load_sharded``),
- releases what it holds (``close``).

Workers advance in lock step unless a strategy says otherwise through its :class:`Pace` (only the parameter
server does: its elastic pace lives with it in ``param_server.py``). What a strategy needs on the driver
(actors that outlive a worker group) is its :class:`Services`. A strategy's options are its own section of
the config (``sync.<name>``), a dataclass it reads with :func:`options`. A new strategy is a new file under
``sync/`` plus its line in ``lepton_ray.sync.STRATEGIES``; the contract test holds every registered strategy
to "equals single-process training".
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lepton_ray.config import Config, build_section
from lepton_ray.train.breakdown import SyncTimer
from lepton_ray.train.optim import make_optimizer
from lepton_ray.train.precision import Precision

__all__ = ["Pace", "Services", "Strategy", "WorkerInfo", "options"]

T = TypeVar("T")


def options(section: type[T], config: Config) -> T:
    """The options section ``section`` (its ``PATH`` is ``sync.<key>``) of ``config``, built and checked.

    >>> from lepton_ray.sync.allreduce import AllReduceConfig
    >>> from lepton_ray.config import load_config
    >>> options(AllReduceConfig, load_config({"data": {"train": "t"}, "sync": {"allreduce": {"bucket_mb": 4}}})).bucket_mb
    4.0
    """
    key = section.PATH.split(".", 1)[1]  # type: ignore[attr-defined]
    return build_section(section, config.sync.options.get(key, {}))


@dataclass(frozen=True)
class WorkerInfo:
    """Who this worker is (passed explicitly; there is no global state)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Other workers share a process group with this one (False alone, or in a one-process run without one)."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


class Pace:
    """How the workers advance; this default is lock step: every worker computes one batch, steps, and the run's step
    is one more. The loop asks the pace, never the strategy's kind, when it may step, evaluate and checkpoint."""

    lockstep = True
    """Every worker runs the same steps in step: a collective may run every step (the loss all-reduce, a
    just-in-time checkpoint on SIGTERM). False where a per-step collective would re-synchronise the workers."""
    stepwise = True
    """Every worker takes the same steps, so evaluation and checkpoints may happen after any step (and an epoch's
    data is a fixed deal); False: only at epoch ends, where every worker meets after :meth:`drain`."""
    claim: Optional[Callable[[int, int], Optional[int]]] = None
    """A strategy that deals the data itself: ``claim(epoch, pieces)`` returns the next undealt piece; None = a fixed deal."""

    def held(self, batches: int) -> bool:
        """After each batch (``batches`` since the last step): True = compute another before stepping."""
        return False

    def advance(self, step: int) -> int:
        """The run's step after this worker's optimizer step."""
        return step + 1

    def drain(self, optimizer: torch.optim.Optimizer, batches: int, *, last: bool) -> Optional[int]:
        """At an epoch end where every worker meets: apply what is pending; returns the run's step (None: unchanged)."""
        return None


class Strategy(ABC):
    """One way of synchronising data-parallel workers (the lock-step contract; see the module docstring)."""

    name: str = ""
    Services: ClassVar[type["Services"]]
    """The strategy's driver side (set below for the base class: no services)."""
    sections: ClassVar[tuple[type, ...]] = ()
    """The options sections this strategy reads (``sync.<key>`` dataclasses), checked when a config is."""
    elastic: ClassVar[bool] = True
    """Can resume at another world size (``scaling.num_workers: [min, max]``)."""

    def __init__(self, config: Config, worker: WorkerInfo, services: Any = None):
        self.config, self.worker, self.services = config, worker, services
        self.pace = Pace()
        self.model: nn.Module = None  # type: ignore[assignment]  # set by build
        self.synced = SyncTimer()  # where the strategy waits on the others (see sync_s)

    @classmethod
    def check(cls, config: Config) -> None:
        """Before anything is built: raise ``ConfigError`` for options this strategy cannot run with."""

    # ------------------------------------------------------------------ worker side

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Build the model (``factory()`` returns it initialised, on the CPU) and return the module the loop calls for
        training forward passes; :attr:`model` is then the plain model. Every rank calls it (it may be a collective)."""
        self.model = factory().to(self.worker.device)
        return self.wrap(self.model)

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop trains, around ``model`` (lock-step replicas: DDP)."""

    def optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer (``train.optimizer``) over what this worker holds of the parameters."""
        return make_optimizer(self.config, list(self.model.parameters()))

    def precision(self) -> Precision:
        """The step's precision (autocast and gradient scaling) for ``train.precision``; a strategy with mixed precision
        of its own (FSDP's policy) returns an fp32 one."""
        return Precision(self.config.train.precision, self.worker.device)

    def no_sync(self) -> ContextManager[Any]:
        """Context for a micro-batch whose gradients are only accumulated locally."""
        return contextlib.nullcontext()

    @abstractmethod
    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        """Apply one optimizer step from the accumulated gradients (the sum of ``batches`` batch-mean gradients; more
        than 1 only where the pace holds steps back)."""

    def describe(self) -> dict[str, Any]:
        """After :meth:`build`: how this strategy communicates, merged into the run's start record."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        """Communication metrics since the previous call, merged into rank 0's per-step record."""
        return {}

    def sync_s(self) -> float:
        """Seconds this worker has waited on synchronisation so far (exposed: not overlapped with its own work), summed
        by the strategy into :attr:`synced`; the step-time breakdown counts them as ``sync``
        (:mod:`lepton_ray.train.breakdown`)."""
        return self.synced.total

    def save(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        """Every rank, at a checkpoint (a collective may run here): write this rank's part into ``ckpt`` (a
        :class:`~lepton_ray.train.checkpoint.CheckpointWriter`). Lock-step replicas are equal, so rank 0 writes the
        model and the optimizer whole; a sharded strategy writes every rank's shards with ``put_sharded``."""
        if self.worker.rank == 0:
            ckpt.put("model", self.model.state_dict())
            ckpt.put("optimizer", optimizer.state_dict())

    def load(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        """Every rank, on resume: restore what :meth:`save` wrote (``ckpt``: a ``CheckpointReader``), whatever the
        world size that wrote it."""
        self.model.load_state_dict(ckpt.get("model"))
        optimizer.load_state_dict(ckpt.get("optimizer"))

    def close(self) -> None:
        """Release what the worker side holds (shared memory, threads)."""


class Services:
    """A strategy's driver side (Ray Train's backend lifecycle): check the model and config before Ray
    starts, start what outlives a worker group (parameter-server actors), stop it after the run.
    What :meth:`start` returns reaches every worker's strategy as ``services``."""

    def __init__(self, config: Config):
        self.config = config

    def check(self, build: Callable[[], nn.Module]) -> None:
        """Before Ray starts: raise ``ConfigError`` for a model or config this strategy cannot train.
        ``build()`` returns the model exactly as every worker initialises it (call it only if needed)."""

    def start(self, build: Callable[[], nn.Module], checkpoint_uri: str, run_name: str) -> Any:
        """Ray connected: start what outlives a worker group; returns the workers' ``services``."""
        return None

    def stop(self, services: Any) -> None:
        """After the run: stop what :meth:`start` started."""

    @classmethod
    def starts_actors(cls) -> bool:
        """Whether :meth:`start` starts processes of its own (a run then needs Ray: no ``--local``)."""
        return cls.start is not Services.start


Strategy.Services = Services
