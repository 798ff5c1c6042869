"""``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded.

Each worker holds 1/N of every parameter, of its gradient and of the optimizer state (AdamW: 16 bytes per
parameter become 16/N), and all-gathers one unit's parameters just before the unit runs (forward and
backward), reduce-scattering its gradients right after. The units are module classes (``sync.fsdp.units``;
by default the blocks of the model's ``nn.ModuleList`` s, the usual transformer layout), then the root, which
holds the rest (the built-in gpt's tied embedding and output head). gloo on CPU, NCCL on GPU.

The model is created on the meta device (no memory), sharded, then materialised shard by shard
(``to_empty``) and initialised there: ``model.init_weights()`` where the model has one, else each
submodule's ``reset_parameters()``; so a model larger than one worker never exists whole on one. To start
from given weights instead (a seed checkpoint), set ``train.init_from``; a resume loads its checkpoint.

Checkpoints are sharded: every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP), and a
run resumes at another number of workers (DCP reshards on load). Mixed precision is FSDP's own
``MixedPrecisionPolicy`` (bf16 parameters for compute, ``reduce_dtype`` for gradient reduction), not autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Literal, Optional

import torch
from torch import nn

from lepton_ray.config import Config, ConfigError, Section
from lepton_ray.sync.base import Services, Strategy, options
from lepton_ray.train.breakdown import SyncTimer
from lepton_ray.train.memory import mmap_threshold
from lepton_ray.train.precision import Precision

__all__ = ["FSDP", "FSDPConfig", "FSDPServices", "shard_units"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# torch.distributed.fsdp and .checkpoint are imported where used: ~2 s of every other strategy's worker start-up

# On CPU, a unit's gathered parameters and their gradients are one tensor per parameter (1-4 MiB each at width 512),
# allocated and freed every step: below glibc's mmap threshold they stay in a fragmented heap. Measured on a
# 40 x 512 gpt (2 workers, AdamW, activation checkpointing): peak RSS 1.63 GiB per worker with the threshold at
# half the smallest unit (6 MiB), 1.39 with 1 MiB (the parameters, gradients and optimizer state are 0.94 GiB of
# it); a 20-layer step took the same time within 2 %.
_MMAP_THRESHOLD = 2**20


@dataclass(kw_only=True, slots=True)
class FSDPConfig(Section):
    """Options of the ``fsdp`` strategy (FSDP2)."""

    PATH: ClassVar[str] = "sync.fsdp"

    units: Optional[list[str]] = None
    """Module class names that become FSDP units (each all-gathered just before it runs, e.g. ``[Block]``);
    omitted = the classes of the modules in the model's ``nn.ModuleList`` s (a transformer's blocks)."""
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward and gather them again for backward (less memory,
    one more all-gather per unit); false keeps them from forward to backward."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients are reduced in when ``train.precision`` is bf16 (parameters compute in bf16)."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in host memory (GPU runs; the optimizer steps on
    the CPU)."""


def shard_units(model: nn.Module, names: Optional[list[str]]) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first: instances of the classes ``names``, or of the classes in
    the model's ``nn.ModuleList`` s. Raises ``ConfigError`` for a name no module of the model has.

    >>> m = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), nn.ReLU())
    >>> [type(u).__name__ for u in shard_units(m, None)], len(shard_units(m, ["ReLU"]))
    (['Linear', 'Linear'], 1)
    """
    if names is None:
        kinds = {type(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m}
    else:
        present = {type(m).__name__: type(m) for m in model.modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(f"sync.fsdp.units: {', '.join(map(repr, missing))} is not a module class of the model;"
                              f" its classes are: {', '.join(sorted(present))}")
        kinds = {present[n] for n in names}
    return [m for m in reversed(list(model.modules())) if type(m) in kinds and m is not model]


def _time_collectives(module: nn.Module, synced: SyncTimer) -> None:
    """Time what a ``fully_shard`` unit's forward and backward spend in its collectives into ``synced``: the
    all-gather (``unshard``: issued; ``wait_for_unshard``: waited on and copied out) and the reduce-scatter
    (``post_backward``). They run on the training thread, so on CPU this is what the step waited for; on a GPU
    these calls mostly enqueue work on FSDP's streams, and the wait they hide lands in the compute phase."""
    state = getattr(module, "_get_fsdp_state", None)
    group = state()._fsdp_param_group if state is not None else None
    if group is None:
        return
    for name in ("unshard", "wait_for_unshard", "post_backward"):  # this group's calls only (FSDP looks them up on it)
        setattr(group, name, synced.timed(getattr(group, name)))


def _initialise(model: nn.Module) -> None:
    """Fill materialised (``to_empty``) parameters: the model's ``init_weights()``, else every ``reset_parameters()``."""
    if callable(getattr(model, "init_weights", None)):
        model.init_weights()
        return
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


class FSDPServices(Services):
    """Nothing to start; on the driver, before Ray starts: the units name module classes the model has."""

    def check(self, build: Callable[[], nn.Module]) -> None:
        shard_units(build(), options(FSDPConfig, self.config).units)


class FSDP(Strategy):
    name = "fsdp"
    Services = FSDPServices
    sections = (FSDPConfig,)

    @classmethod
    def check(cls, config: Config) -> None:
        if config.train.precision == "fp16":
            raise ConfigError("train.precision: 'fp16' (gradient scaling) is not supported with sync.strategy 'fsdp'; use 'bf16'"
                              " (FSDP's mixed precision: bf16 compute, fp32 reduction) or 'fp32'")
        if options(FSDPConfig, config).cpu_offload and not config.scaling.use_gpu:
            raise ConfigError("sync.fsdp.cpu_offload: keeps GPU workers' shards in host memory; these workers are CPU workers"
                              " (scaling.use_gpu: false), whose shards are in host memory already")

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        opts = options(FSDPConfig, self.config)
        device = self.worker.device
        with torch.device("meta"):
            model = factory()
        units = shard_units(model, opts.units)
        self._describe: dict[str, Any] = {"fsdp_units": len(units), "reshard_after_forward": opts.reshard_after_forward}
        self._sharded = self.worker.distributed  # alone (a one-worker or local run) the model is built whole, as is
        if self._sharded:
            bf16 = self.config.train.precision == "bf16"
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=_DTYPES[opts.reduce_dtype]) if bf16 else MixedPrecisionPolicy()
            kw = {"mesh": init_device_mesh(device.type, (self.worker.world_size,)), "mp_policy": mp,
                  "offload_policy": CPUOffloadPolicy() if opts.cpu_offload else OffloadPolicy()}
            for unit in units:
                fully_shard(unit, reshard_after_forward=opts.reshard_after_forward, **kw)
            fully_shard(model, **kw)  # the root: what no unit holds (embeddings, the head, final norms)
            for module in model.modules():
                _time_collectives(module, self.synced)
            if device.type == "cpu":  # each unit's gathered parameters and gradients: mapped, and unmapped when freed
                smallest = min((sum(p.numel() * p.element_size() for p in u.parameters()) for u in units), default=0)
                if smallest >= 8 * 2**20 and mmap_threshold(_MMAP_THRESHOLD):
                    self._describe["malloc_mmap_threshold"] = _MMAP_THRESHOLD
        model.to_empty(device="cpu" if opts.cpu_offload else device)
        # random init of DTensor shards on CPU draws each rank's shard from the local generator: a per-rank
        # stream keeps the shards of one tensor different (equal shards would be repeated rows)
        torch.manual_seed(self.config.train.seed + 7919 * self.worker.rank)
        with torch.no_grad():
            _initialise(model)
        torch.manual_seed(self.config.train.seed)
        self.model = model
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # build shards the model itself

    def precision(self) -> Precision:
        # sharded, bf16 is the MixedPrecisionPolicy's (bf16 parameters in compute): no autocast on top
        return Precision("fp32", self.worker.device) if self._sharded else super().precision()

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    @contextlib.contextmanager
    def _accumulating(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)  # keep unsharded gradients; reduce-scatter on the last micro-batch
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def no_sync(self) -> ContextManager[Any]:
        return self._accumulating() if hasattr(self.model, "set_requires_gradient_sync") else super().no_sync()

    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        precision.step(optimizer, self.model.parameters(), self.config.train.grad_clip_norm)

    def save(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        ckpt.put_sharded("model", get_model_state_dict(self.model))
        ckpt.put_sharded("optimizer", get_optimizer_state_dict(self.model, optimizer))

    def load(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        model = get_model_state_dict(self.model)
        ckpt.load_sharded("model", model)
        set_model_state_dict(self.model, model)
        optim = get_optimizer_state_dict(self.model, optimizer)  # initialises the state, so DCP has tensors to load into
        ckpt.load_sharded("optimizer", optim)
        set_optimizer_state_dict(self.model, optimizer, optim)
