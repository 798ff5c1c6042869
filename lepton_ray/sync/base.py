"""The sync-strategy interface: how workers agree on the parameters.

The training loop (``lepton_ray/train/loop.py``) knows only this interface.
A strategy wraps the model once, tells the loop whether gradients of a
micro-batch should be communicated, applies the optimizer step, and saves or
restores whatever state of its own it has. A new strategy is a new file plus an
entry in ``lepton_ray.sync.STRATEGIES``.

The driver side is separate (:class:`Services`, the strategy's ``Services`` class): it checks the
model before Ray starts and starts what outlives a worker group (parameter-server actors); what
``start`` returns reaches every worker's strategy as ``services``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Optional

import torch
from torch import nn

from lepton_ray.config import Config

__all__ = ["Services", "Strategy", "WorkerInfo", "optimizer_step", "fused_kwargs"]


@dataclass(frozen=True)
class WorkerInfo:
    """Who this worker is (passed explicitly; there is no global state)."""

    rank: int
    world_size: int
    device: torch.device


def fused_kwargs(params: list[torch.Tensor], *, scaled: bool = False) -> dict[str, bool]:
    """``{"fused": True}`` when torch's fused (single-kernel) SGD / AdamW can update ``params``, else ``{}``.

    The fused kernels update parameter, gradient and optimizer state in one pass over memory: on this
    project's 2-core CPU machine SGD with momentum over 3.16 M parameters takes 0.94-1.04 ms per step
    instead of 1.39-1.46 ms, AdamW 2.0 ms instead of 13.3 ms. Not used for sparse-gradient tables,
    non-float parameters, devices other than CPU/CUDA, or with fp16 gradient scaling (``scaled``).

    >>> fused_kwargs([torch.zeros(3, requires_grad=True)])
    {'fused': True}
    >>> fused_kwargs([torch.zeros(3, dtype=torch.int64)])
    {}
    """
    ok = not scaled and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if ok and params else {}


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], precision: Any, clip_norm: Optional[float]) -> None:
    """Unscale (fp16), clip the global grad norm, step: ``precision.step``, shared by every strategy."""
    precision.step(optimizer, params, clip_norm)


class Strategy(ABC):
    """One way of synchronising data-parallel workers."""

    name: str = ""

    lockstep: bool = True
    """Workers advance in lock step, so the loop may run a collective every step (the loss all-reduce).
    False for asynchronous strategies, where a per-step collective would re-synchronise the workers."""

    stepwise: bool = True
    """Every worker takes the same steps, so the loop may evaluate and checkpoint after any step. False when
    workers take different numbers of batches (the elastic parameter server): then only at epoch ends,
    where every worker meets, after :meth:`drain`."""

    def __init__(self, config: Config, worker: WorkerInfo, services: Any = None):
        self.config = config
        self.worker = worker
        self.services = services

    Services: ClassVar[type["Services"]]
    """The strategy's driver side (set below for the base class: no services)."""

    @property
    def claim(self) -> Optional[Callable[[int, int], Optional[int]]]:
        """For a strategy that deals the data itself: ``claim(epoch, pieces)`` returning the next undealt
        piece of ``epoch`` (``None`` when all are dealt); ``None`` = a fixed equal deal."""
        return None

    # ------------------------------------------------------------------ worker side

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Return the module the loop calls for training forward passes."""

    @abstractmethod
    def unwrap(self) -> nn.Module:
        """The plain model (for evaluation and checkpoints)."""

    def no_sync(self) -> ContextManager[Any]:
        """Context for a micro-batch whose gradients are only accumulated locally."""
        return contextlib.nullcontext()

    @abstractmethod
    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        """Apply one optimizer step from the accumulated gradients (the sum of ``batches`` batch-mean
        gradients; more than 1 only for elastic strategies)."""

    def held(self, batches: int) -> bool:
        """After each batch (``batches`` computed since the last step): True = compute another batch and add
        it to the next step instead of stepping now (a strategy that waits on others may defer its step)."""
        return False

    def advance(self, step: int) -> int:
        """The run's step after this worker's optimizer step ``step`` (lock-step: ``step + 1``)."""
        return step + 1

    def drain(self, optimizer: torch.optim.Optimizer, batches: int, *, last: bool) -> Optional[int]:
        """Every worker, at the same epoch end, before an evaluation or checkpoint: apply the ``batches``
        computed but not yet stepped, wait for every worker; returns the run's step (None: unchanged).
        ``last``: no more steps follow."""
        return None

    def describe(self) -> dict[str, Any]:
        """Worker, after :meth:`wrap`: how this strategy communicates (e.g. ``allreduce_transport``),
        merged into the run's start record in ``metrics.jsonl``."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        """Communication metrics since the previous call, merged into rank 0's per-step record."""
        return {}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Every rank, at a checkpoint (a collective may run here): the state this rank saves, by file name.

        Lock-step replicas are equal, so rank 0 saves the model and the optimizer and the others nothing. A
        strategy whose parameters live elsewhere (parameter servers) refreshes the model first and adds its own
        ``strategy`` state; a memory-sharded one (FSDP2) gathers or returns each rank's shard here.
        """
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()} if self.worker.rank == 0 else {}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Every rank, on resume: restore what :meth:`state_dict` saved (the checkpoint's files by name)."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

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


Strategy.Services = Services
