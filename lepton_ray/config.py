"""The one configuration schema: a dataclass per section, validated when built.

A config comes from YAML (``load_config("run.yaml")``), from a dict, or from the
dataclasses directly; ``--set section.key=value`` overrides apply on top. Every
field is type-checked and range-checked at construction, so a typo fails before
Ray starts, with a message that names the key path, the bad value and what is
valid::

    >>> load_config({"data": {"train": "train.parquet"}, "train": {"lrr": 0.1}})
    Traceback (most recent call last):
    ...
    lepton_ray.config.ConfigError: train.lrr: unknown key (did you mean 'lr'?); valid keys in 'train' are: epochs, ...

This module checks shapes, types and ranges and imports no registry; the names a config refers to (a model, a
loss, a strategy and its ``sync.<key>`` section, a sweep's keys) are checked by their registries through
:func:`lepton_ray.checks.check_config`, which ``Trainer`` and ``sweep`` call first.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "ScalingConfig",
    "ServeConfig",
    "SyncConfig",
    "AshaConfig",
    "SweepConfig",
    "TrainConfig",
    "Section",
    "build_section",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------- YAML


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float; YAML 1.1 would make it a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


# --------------------------------------------------------------------------- type checking


def _describe(tp: Any) -> str:
    """A human name for a type hint: 'a number', 'a list of int', ..."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural or _describe(item)}"
    if origin is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + (" (or null)" if type(None) in typing.get_args(tp) else "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Return ``value`` checked against the type hint ``tp`` (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {_show(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return _build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {_show(value)}")
        (item_tp, *_) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return dict(value)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_show(value)}")
    return float(value) if tp is float else value


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    """Construct section ``cls`` from a mapping, rejecting unknown keys (an open section keeps them, see ``OPEN``)."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if getattr(cls, "OPEN", None):  # the other keys are sections their owners check (sync.allreduce, sync.fsdp, ...)
        values = dict(values)
        extra = {k: values.pop(k) for k in list(values) if k not in names}
        for key, v in extra.items():
            if dataclasses.is_dataclass(v):
                extra[key] = dataclasses.asdict(v)
            elif not isinstance(v, dict):
                raise ConfigError(f"{path}.{key}: expected a mapping, got {_show(v)}")
        values[cls.OPEN] = {**values.get(cls.OPEN, {}), **extra}
    for key in values:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            near = f" (did you mean '{hint[0]}'?)" if hint else ""
            if not path:
                raise ConfigError(f"{key}: unknown section{near}; valid sections are: {', '.join(names)}")
            raise ConfigError(f"{path}.{key}: unknown key{near}; valid keys in '{path}' are: {', '.join(names)}")
    return cls(**values)


def build_section(cls: type, values: dict[str, Any]) -> Any:
    """Section ``cls`` (a ``Section`` dataclass with its ``PATH``) from a mapping, checked like every section: how
    a section that lives with its owner (a strategy's options) is read. Raises :class:`ConfigError`."""
    return _build(cls, values, cls.PATH)


class Section:
    """Mixin of every config section (here, or with its owner: a strategy's options): type-check every field, then
    run the section's own range checks."""

    PATH: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            name = f"{self.PATH}.{f.name}"
            setattr(self, f.name, _coerce(name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:  # overridden per section
        pass

    def _require(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self.PATH}.{key}: {message}, got {_show(getattr(self, key))}")


# --------------------------------------------------------------------------- sections


@dataclass(kw_only=True, slots=True)
class ModelConfig(Section):
    """What network to train."""

    PATH: ClassVar[str] = "model"

    name: str = "mlp"
    """A built-in model (see ``lepton_ray.models.MODELS``); ignored when ``factory`` is set."""
    factory: Optional[str] = None
    """A user model as ``"package.module:function"``; called as ``function(schema=..., **kwargs)`` with the
    data's :class:`~lepton_ray.data.schema.Schema` (inputs and targets: names, dtypes, shapes, classes) and
    returning an ``nn.Module`` whose ``forward`` takes the one input tensor, or a dict of them when there
    are several. (A function without a ``schema`` parameter is called as ``function(input_dim=...,
    num_outputs=..., **kwargs)``, for one flat input.)"""
    task: Literal["classification", "regression"] = "classification"
    """classification: cross-entropy loss, accuracy; regression: MSE loss (the defaults of ``loss`` and ``metrics``)."""
    loss: Optional[str] = None
    """``cross_entropy`` (logits ``[B, C, ...]`` or ``[B, ..., C]`` against class ids ``[B, ...]``, skipping
    ``ignore_index``), ``mse``, ``bce`` (logits against 0/1 targets of the same shape), ``model`` (``forward``
    gets the whole batch, targets too, and returns the loss or a dict with ``loss`` plus metrics to log), or
    ``"package.module:function"`` called as ``function(output, target)``; omitted = by ``task``."""
    metrics: Optional[list[str]] = None
    """Eval metrics besides ``eval_loss``: ``accuracy``, ``auc`` (binary), ``mse``, ``bits_per_byte`` (the
    cross-entropy per byte token in bits); omitted = ``accuracy`` (+ ``auc`` for 2 classes) or ``mse`` by task."""
    ignore_index: int = -100
    """Target value ``cross_entropy`` and ``accuracy`` skip (padding)."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden layer widths of the built-in ``mlp``."""
    dropout: float = 0.0
    """Dropout probability after each hidden layer of the built-in ``mlp``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model function."""

    def validate(self) -> None:
        if self.factory is not None:  # a built-in name, a loss and metrics are checked by their registries
            mod, _, fn = self.factory.partition(":")
            self._require(bool(mod) and bool(fn), "factory", "must look like 'package.module:function'")
        self._require(all(h > 0 for h in self.hidden), "hidden", "every width must be > 0")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass(kw_only=True, slots=True)
class TransformResources(Section):
    """Where and how wide ``data.transform`` runs under ``data.engine: ray_data``."""

    PATH: ClassVar[str] = "data.transform_resources"

    num_cpus: float = 1.0
    """Logical CPUs each read-and-transform task (or actor) holds."""
    concurrency: Optional[int] = None
    """Omitted: stateless Ray tasks; n: a pool of n actors per worker (the transform is set up once per actor)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each task or actor needs, e.g. ``{cpu_node: 0.01}`` to run only on nodes started with
    ``ray start --resources='{"cpu_node": 4}'`` (keep transforms off the GPU nodes)."""

    def validate(self) -> None:
        self._require(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        if self.concurrency is not None:
            self._require(self.concurrency >= 1, "concurrency", "must be >= 1 (or omitted: tasks)")


@dataclass(kw_only=True, slots=True)
class DataConfig(Section):
    """Where the training and evaluation rows come from."""

    PATH: ClassVar[str] = "data"

    train: str = ""
    """Parquet file or directory (local path or URI such as ``s3://bucket/prefix``) with the training rows."""
    eval: Optional[str] = None
    """Parquet data held out for evaluation; omitted = no evaluation."""
    label: str = "label"
    """The label column: the one target when ``targets`` is omitted."""
    features: Optional[list[str]] = None
    """Feature columns (numeric scalars or fixed-size lists), concatenated into one float32 input ``x``;
    omitted = every column but the label. Ignored when ``inputs`` is set."""
    inputs: Optional[dict[str, Any]] = None
    """The model's inputs by name: ``{name: column}`` or ``{name: {column, shape, dtype}}``. Each keeps its
    column's dtype (int64 ids stay int64, uint8 stays uint8) and per-row shape: a fixed-size list of n values
    is ``[B, n]``, or ``[B, *shape]`` with ``shape``; an Arrow fixed-shape tensor keeps its shape. ``dtype``
    converts on the worker (one of float32, float64, float16, bfloat16, int64, int32, uint8, bool).
    The model gets the one input tensor, or a dict of them when there are several. Omitted = ``features``."""
    targets: Optional[dict[str, Any]] = None
    """The loss's targets by name, in the same form as ``inputs``; omitted = ``{label: label}``."""
    builder: Optional[str] = None
    """Writes ``train``/``eval`` when ``train`` does not exist yet: a built-in name (``digits``)
    or ``"package.module:function"`` called as ``function(train=URI, eval=URI, storage_options=..., **builder_kwargs)``."""
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the builder (e.g. ``root`` and ``block`` of the ``text`` builder)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the data URIs (endpoint, credentials); default: the standard AWS environment."""
    shuffle: bool = True
    """Shuffle every epoch (seeded by train.seed): row-group order, then rows within the shuffle buffer."""
    shuffle_buffer_rows: int = 65536
    """Rows shuffled together: consecutive row groups are read until the buffer holds this many."""
    prefetch_windows: int = 2
    """Shuffle buffers read ahead by a background thread while the model trains."""
    memory_cache_bytes: int = 2**30
    """Decoded rows each worker keeps in memory across epochs (least recently used row groups evicted
    beyond it): a share that fits is read and decoded once, not every epoch. 0 = decode every epoch."""
    cache_dir: Optional[str] = None
    """Local directory caching shards of a remote prepared split (read once, then from disk); omitted = no cache."""
    cache_max_bytes: int = 10 * 2**30
    """Cache size bound; least recently used shards are evicted beyond it."""
    read_retries: int = 3
    """Retries of a failed remote read (endpoint unreachable, connection reset, timeout) before the run fails, waiting
    1, 2, 4, ... s (at most 10 s) between tries: the default rides out about 7 s of storage outage."""
    on_bad_shard: Literal["error", "skip"] = "error"
    """A shard that cannot be opened or described on the driver (truncated file, damaged footer): ``error`` fails
    the run naming it; ``skip`` trains without it, with a warning, and lists it as ``bad_shards_skipped`` in the
    run's ``start`` record. A shard that opens but fails mid-read is an error either way."""
    engine: Literal["native", "ray_data"] = "native"
    """Who reads, decodes and transforms each worker's rows. ``native``: the worker itself (pyarrow, a background
    thread; no extra processes). ``ray_data``: Ray Data tasks (or actors), on CPUs of their own anywhere in the
    cluster, in the plan's order: for a transform heavier than the training step. Both give the same batches."""
    cpus: float = 2.0
    """``engine: ray_data``: logical CPUs the data tasks use in all (every worker's share together). A local Ray
    instance gets them on top of the machine's cores; on a cluster they must be free beside the workers'."""
    transform: Optional[str] = None
    """``"package.module:function"`` applied to every batch of rows read, before batching: a dict of numpy arrays
    (the inputs and targets, ``[n, *shape]``) in, the same keys out, one row out per row in; dtypes and shapes may
    change (uint8 ``[8, 8]`` -> float32 ``[1, 8, 8]``). A function with a ``seeds`` parameter also gets one uint64
    per row, derived from (train.seed, epoch, row id): a random augmentation is then the same on a resumed epoch."""
    transform_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the transform."""
    transform_resources: TransformResources = field(default_factory=TransformResources)
    """``engine: ray_data``: what each transform task or actor holds, and how many run."""

    def validate(self) -> None:
        self._require(bool(self.train), "train", "is required: a Parquet file or directory")
        self._require(self.shuffle_buffer_rows >= 1, "shuffle_buffer_rows", "must be >= 1")
        self._require(self.prefetch_windows >= 1, "prefetch_windows", "must be >= 1")
        self._require(self.cache_max_bytes >= 1, "cache_max_bytes", "must be >= 1")
        self._require(self.memory_cache_bytes >= 0, "memory_cache_bytes", "must be >= 0")
        self._require(self.read_retries >= 0, "read_retries", "must be >= 0")
        self._require(self.cpus > 0, "cpus", "must be > 0")
        if self.transform is not None:
            self._require(":" in self.transform, "transform", "must name a function as package.module:function")
        if self.features is not None:
            self._require(len(self.features) > 0, "features", "must name at least one column (or be omitted)")
            self._require(self.label not in self.features, "features", f"must not contain the label column '{self.label}'")
        for section in ("inputs", "targets"):
            specs = getattr(self, section)
            if specs is None:
                continue
            self._require(len(specs) > 0, section, "must name at least one column (or be omitted)")
            for name, spec in specs.items():
                _check_column_spec(f"data.{section}.{name}", spec)


def _check_column_spec(path: str, spec: Any) -> None:
    if isinstance(spec, str):
        return
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a column name or a mapping with column, shape, dtype; got {_show(spec)}")
    unknown = [k for k in spec if k not in ("column", "shape", "dtype")]
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key; valid keys are: column, shape, dtype")
    if "column" in spec and not isinstance(spec["column"], str):
        raise ConfigError(f"{path}.column: expected a column name, got {_show(spec['column'])}")
    shape = spec.get("shape")
    if shape is not None and not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ConfigError(f"{path}.shape: expected a list of positive ints such as [1, 8, 8], got {_show(shape)}")
    if "dtype" in spec and not isinstance(spec["dtype"], (str, type(None))):  # the names: lepton_ray.data.schema
        raise ConfigError(f"{path}.dtype: expected a dtype name such as float32, got {_show(spec['dtype'])}")


@dataclass(kw_only=True, slots=True)
class TrainConfig(Section):
    """The optimisation: steps, batch, optimizer, schedule, precision."""

    PATH: ClassVar[str] = "train"

    epochs: int = 10
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; overrides ``epochs``."""
    batch_size: int = 64
    """The GLOBAL batch per optimizer step, split evenly across workers (and accumulation micro-steps)."""
    lr: float = 0.1
    """Peak learning rate."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at ``lr * min_lr_ratio``."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (each worker's share is split further)."""
    grad_clip_norm: Optional[float] = None
    """Clip the global gradient norm to this value."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16: autocast on CPU or GPU; fp16: autocast + GradScaler, GPU only."""
    seed: int = 0
    """Seeds model init, data order and every RNG."""
    eval_batch_size: int = 1024
    """Rows per forward pass when evaluating (per worker)."""
    eval_every_steps: Optional[int] = None
    """Evaluate every N steps; omitted = at the end of every epoch (and always at the end)."""
    log_every_steps: int = 1
    """Steps per metrics record in metrics.jsonl (each record costs one 2-number all-reduce)."""
    collective_timeout_s: float = 300.0
    """Hang guard (Ray Train runs). The driver's watchdog acts on a worker whose heartbeat has been silent for
    half of it (a frozen or lost process) or, when no worker advanced a step for all of it, on the workers at
    the lowest step: it writes the live workers' stacks to ``<run dir>/stacks/`` and kills the stuck ones, so
    the run restarts (``scaling.max_failures``) or fails naming them. A collective waiting a minute longer
    fails by itself (:attr:`process_group_timeout_s`). Keep it above the longest evaluation or checkpoint."""

    @property
    def process_group_timeout_s(self) -> float:
        """torch's own timeout for every collective of the run (the default group's and the shared-memory
        transport's barriers): ``collective_timeout_s`` plus a minute, so the watchdog, which acts at
        ``collective_timeout_s``, diagnoses a hang first; where none runs (a warm group) it ends the hang."""
        return self.collective_timeout_s + 60.0

    straggler_factor: float = 1.5
    """A rank whose compute time per step (forward + backward, its exposed synchronisation left out) exceeds the
    median over the ranks by more than this factor in an epoch is reported as a straggler (a warning naming the
    rank and host, a ``straggler`` record). With two ranks the median is their mean: a factor >= 2 never flags one."""

    activation_checkpointing: Optional[list[str]] = None
    """Module class names (e.g. ``[Block]`` for the built-in gpt) whose activations are recomputed in backward
    instead of kept from forward: less activation memory for ~one more forward of those modules; omitted = off."""
    compile: bool = False
    """``torch.compile`` the model (after the strategy wraps it). Where it cannot compile, the run logs a warning
    with the reason and trains the model as it is."""
    init_from: Optional[str] = None
    """A checkpoint folder (``.../step_NNNNNNNN``, or a checkpoint root: its newest; local or URI) whose model weights a fresh run starts from (a seed
    checkpoint: how a sharded model starts from given weights without any worker building it whole); a resume
    ignores it. Omitted = the model's own initialisation from ``seed``."""

    def validate(self) -> None:
        self._require(self.epochs >= 1, "epochs", "must be >= 1")
        if self.max_steps is not None:
            self._require(self.max_steps >= 1, "max_steps", "must be >= 1")
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.lr > 0, "lr", "must be > 0")
        self._require(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        self._require(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        if self.grad_clip_norm is not None:
            self._require(self.grad_clip_norm > 0, "grad_clip_norm", "must be > 0")
        if self.eval_every_steps is not None:
            self._require(self.eval_every_steps >= 1, "eval_every_steps", "must be >= 1")
        self._require(self.log_every_steps >= 1, "log_every_steps", "must be >= 1")
        self._require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        self._require(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0 seconds")
        self._require(self.straggler_factor > 1, "straggler_factor", "must be > 1 (the slowest rank's compute over the median's)")
        if self.activation_checkpointing is not None:
            self._require(len(self.activation_checkpointing) > 0, "activation_checkpointing", "must name at least one module class (or be omitted)")


@dataclass(kw_only=True, slots=True)
class ScalingConfig(Section):
    """How many Ray workers, with what resources."""

    PATH: ClassVar[str] = "scaling"

    num_workers: Union[int, list[int]] = 2
    """Data-parallel training workers (Ray Train actors). ``[min, max]``: elastic (a strategy that resumes at any size: ``allreduce``, ``fsdp``). The run
    starts with as many workers as the cluster has room for, up to ``max``; when a worker or node is lost it
    continues with fewer (down to ``min``, a restart under ``max_failures``) and grows back when room returns.
    Every resize resumes from the newest checkpoint, and the interrupted epoch deals only the rows not yet read,
    so no row is trained on twice. ``train.batch_size`` stays the global batch at every size. Each restart, and
    each try to start on a lost node Ray has not yet declared dead, counts against ``max_failures``: allow ~3 per loss."""
    resize_check_s: float = 60.0
    """Elastic runs: how often a healthy run checks whether the cluster has room for more workers (Ray Train's
    ``elastic_resize_monitor_interval_s``). Growing restarts the workers from the newest checkpoint."""
    use_gpu: bool = False
    """One GPU per worker; all-reduce then runs over NCCL."""
    cpus_per_worker: int = 1
    """Logical CPUs reserved per worker; torch uses this many threads."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may do; each restart resumes from the newest checkpoint."""
    poll_interval_s: float = 0.5
    """How often Ray Train's controller polls the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``).
    It paces failure detection, the end of a run and every ``ray.train.report`` a sweep trial
    makes (a report waits for the previous one to be collected): Ray's 2.0 s default adds up to
    2 s per evaluation and ~3 s per run. An explicit ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` wins."""
    worker_start_timeout_s: float = 60.0
    """How long Ray Train waits for a worker group to start (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``). After a
    node is lost Ray still counts its CPUs until it declares the node dead (~45 s on the 2-core test machine); a group
    placed there never starts, and each such try fails only when this runs out and counts against ``max_failures``
    (lost node -> first step at the smaller size: 77-81 s at 60, 59 s at 20). Keep it above a normal start (~15 s
    there; pulling images or many GPUs take longer)."""
    shared_filesystem: bool = False
    """Every node of the Ray cluster mounts the run's local paths (``data.train``, ``data.eval``, the
    checkpoint directory) at the same place (NFS, a cluster filesystem, or all nodes on one machine).
    Without it, a local path on a cluster where workers may run on another node than the driver is a
    config error before any worker starts (those workers would not find the file); use ``s3://...``
    URIs there, or set this. A single-node cluster needs neither."""

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers

    def validate(self) -> None:
        if self.elastic:
            self._require(len(self.num_workers) == 2 and 1 <= self.min_workers <= self.max_workers, "num_workers",
                          "must be a worker count >= 1 or an elastic [min, max] with 1 <= min <= max")
        self._require(self.min_workers >= 1, "num_workers", "must be >= 1")
        self._require(self.resize_check_s > 0, "resize_check_s", "must be > 0 seconds")
        self._require(self.cpus_per_worker >= 1, "cpus_per_worker", "must be >= 1")
        self._require(self.max_failures >= -1, "max_failures", "must be >= 0 (or -1 for unlimited)")
        self._require(0.05 <= self.poll_interval_s <= 60, "poll_interval_s", "must be between 0.05 and 60 seconds")
        self._require(self.worker_start_timeout_s > 0, "worker_start_timeout_s", "must be > 0 seconds")


@dataclass(kw_only=True, slots=True)
class SyncConfig(Section):
    """How workers agree on the parameters: a strategy by name, and the options sections of the strategies
    (``sync.allreduce``, ``sync.fsdp``, ``sync.ps``, ...), each defined and checked by the strategy that owns it
    (``lepton_ray.sync``: its registry names the strategies and their sections)."""

    PATH: ClassVar[str] = "sync"
    OPEN: ClassVar[str] = "options"

    strategy: str = "allreduce"
    """A registered strategy: ``allreduce``, ``fsdp``, ``ps``, ``hybrid`` (``lepton_ray.sync.STRATEGIES``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The strategies' options sections by name, as given (``sync.allreduce.bucket_mb: 4`` is ``options["allreduce"]``)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig(Section):
    """Where and how often checkpoints are committed."""

    PATH: ClassVar[str] = "checkpoint"

    dir: Optional[str] = None
    """Local path or URI (``s3://bucket/runs``); omitted = ``<run dir>/checkpoints``.
    Checkpoints of run NAME go to ``<dir>/NAME``."""
    every_n_steps: int = 100
    """Commit a checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Committed checkpoints kept; older ones are deleted after a newer one commits."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``dir``; default: the standard AWS environment."""

    def validate(self) -> None:
        self._require(self.every_n_steps >= 0, "every_n_steps", "must be >= 0")
        self._require(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class RunConfig(Section):
    """Where this run's metrics and result go."""

    PATH: ClassVar[str] = "run"

    name: str = "run"
    """Run name: the run directory is ``<dir>/<name>``."""
    dir: str = "runs"
    """Local directory holding run directories (``metrics.jsonl``, ``result.json``)."""
    tensorboard: bool = True
    """Also write the records as TensorBoard event files in ``<dir>/<name>/tensorboard/`` (``tensorboard --logdir runs``)."""

    def validate(self) -> None:
        self._require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")


# sweep distributions: the YAML spelling -> what the bounds must satisfy
SWEEP_DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


@dataclass(kw_only=True, slots=True)
class AshaConfig(Section):
    """Options of the ASHA scheduler (asynchronous successive halving).

    ASHA compares trials at the same number of evaluations (an evaluation is one
    report; by default one per epoch, so batch sizes are compared at equal epochs).
    """

    PATH: ClassVar[str] = "sweep.asha"

    grace_period: Optional[int] = None
    """Evaluations every trial gets before it may be stopped; omitted = the longest trial's
    evaluations // reduction_factor**2 (at least 1), so there are two or more rungs."""
    reduction_factor: int = 3
    """Only the top 1/reduction_factor of the trials at a rung go on to the next."""

    def validate(self) -> None:
        if self.grace_period is not None:
            self._require(self.grace_period >= 1, "grace_period", "must be >= 1")
        self._require(self.reduction_factor >= 2, "reduction_factor", "must be >= 2")


@dataclass(kw_only=True, slots=True)
class SweepConfig(Section):
    """A hyperparameter sweep (``lepton-ray sweep``): each trial is a normal training run.

    ``space`` maps a config key to a distribution, e.g.
    ``train.lr: {loguniform: [1e-4, 1.0]}`` or ``train.batch_size: {choice: [32, 128]}``.
    """

    PATH: ClassVar[str] = "sweep"

    space: dict[str, Any] = field(default_factory=dict)
    """Config key -> ``{loguniform: [low, high]}``, ``{uniform: [low, high]}``,
    ``{randint: [low, high]}`` (high excluded) or ``{choice: [v1, v2, ...]}``."""
    num_samples: int = 8
    """Trials to run (points drawn from ``space``)."""
    metric: str = "eval_accuracy"
    """The eval metric to optimise: eval_accuracy or eval_loss (classification), eval_mse or eval_loss (regression)."""
    mode: Literal["auto", "max", "min"] = "auto"
    """auto: max for accuracy, min for losses."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop poor trials early; fifo: run every trial to the end."""
    asha: AshaConfig = field(default_factory=AshaConfig)
    search: Literal["random", "optuna"] = "random"
    """random: seeded random search; optuna: TPE through Optuna (needs ``pip install optuna``)."""
    seed: int = 0
    """Seeds the search (which points are tried)."""
    max_concurrent_trials: Optional[int] = None
    """Trials running at once; omitted = as many as the cluster's free resources fit
    (each trial needs its workers' CPUs and GPUs; the trial's own process is rank 0)."""
    scale_lr_with_batch: Literal["none", "linear", "sqrt"] = "none"
    """When train.batch_size is swept: lr = lr x (batch / reference), or x sqrt(batch / reference)."""
    reference_batch_size: Optional[int] = None
    """The batch size ``train.lr`` is meant for; omitted = ``train.batch_size``."""
    name: Optional[str] = None
    """Sweep name; omitted = ``run.name``. Re-running the same sweep name continues it."""
    dir: str = "sweeps"
    """Local directory of sweeps: a sweep lives in ``<dir>/<name>`` (trials, results, plot, best.json)."""

    def validate(self) -> None:
        flat = flatten_space(self.space)
        for key, dist in flat.items():
            where = f"sweep.space.{key}"
            if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in SWEEP_DISTRIBUTIONS):
                raise ConfigError(f"{where}: expected one of {{{'|'.join(SWEEP_DISTRIBUTIONS)}: ...}}, got {_show(dist)}")
            kind, args = next(iter(dist.items()))
            if kind == "choice":
                if not isinstance(args, list):
                    raise ConfigError(f"{where}: choice needs a list of values, got {_show(args)}")
                if not args:
                    raise ConfigError(f"{where}: choice list is empty; give at least one value")
                continue
            if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
                raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {_show(args)}")
            low, high = args
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: randint bounds must be integers, got {_show(args)}")
            if low >= high:
                raise ConfigError(f"{where}: {kind} low must be < high, got low={_show(low)} high={_show(high)}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform bounds must be > 0, got low={_show(low)}")
        self.space = flat
        self._require(self.num_samples >= 1, "num_samples", "must be >= 1")
        if self.max_concurrent_trials is not None:
            self._require(self.max_concurrent_trials >= 1, "max_concurrent_trials", "must be >= 1 (or omitted: computed from the cluster)")
        if self.reference_batch_size is not None:
            self._require(self.reference_batch_size >= 1, "reference_batch_size", "must be >= 1")
        if self.name is not None:
            self._require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")

    @property
    def enabled(self) -> bool:
        return bool(self.space)


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": {"loguniform": [..]}}}`` -> ``{"train.lr": {"loguniform": [..]}}`` (both spellings allowed).

    >>> flatten_space({"train": {"lr": {"choice": [0.1]}}, "train.batch_size": {"choice": [32]}})
    {'train.lr': {'choice': [0.1]}, 'train.batch_size': {'choice': [32]}}
    """
    flat: dict[str, Any] = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        section = isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())
        if section and not (len(value) == 1 and next(iter(value)) in SWEEP_DISTRIBUTIONS):
            flat.update(flatten_space(value, f"{path}."))
        else:
            flat[path] = value
    return flat


@dataclass(kw_only=True, slots=True)
class ServeConfig(Section):
    """How a trained model is optimized and served (``lepton-ray optimize / serve / predict``)."""

    PATH: ClassVar[str] = "serve"

    max_accuracy_drop: float = 0.5
    """The optimizer picks the fastest form whose held-out accuracy is at most this many points
    (percent) below fp32's; 0 = only forms exactly as accurate as fp32."""
    candidates: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8", "compile"])
    """Forms the optimizer tries: fp32, bf16, int8 (dynamic quantization of Linear layers), compile."""
    bench_batch_size: int = 32
    """Batch size at which the optimizer times every form (the batch the server mostly runs)."""
    max_batch_size: int = 32
    """Dynamic batching: most requests one model call serves."""
    batch_wait_ms: float = 2.0
    """Dynamic batching under load: the longest a model call that is not full waits for more requests
    (only when the previous call had company; a request that finds the model idle runs at once)."""
    max_instances: int = 1024
    """Most instances one request may carry; more is a 400."""
    replicas: int = 1
    """Serve replicas (ignored when ``autoscaling`` is set)."""
    autoscaling: Optional[dict[str, Any]] = None
    """Ray Serve ``autoscaling_config`` passed through (``min_replicas``, ``max_replicas``, ...)."""
    threads_per_replica: int = 1
    """torch threads (and logical CPUs) per replica."""
    port: int = 8000
    """HTTP port."""
    host: str = "127.0.0.1"
    """IP address the server binds: 127.0.0.1 (this machine only), 0.0.0.0 / ``::`` (every interface) or one
    interface's address; anything but a loopback address needs ``auth_token_env``."""
    access_log: bool = False
    """Log one line per request in the replica (Ray Serve's access log); off saves per-request time."""
    auth_token_env: Optional[str] = None
    """Name of an environment variable holding a bearer token; set = every request but
    ``/healthz`` and ``/livez`` needs ``Authorization: Bearer <token>``."""

    def validate(self) -> None:
        self._require(0.0 <= self.max_accuracy_drop <= 100.0, "max_accuracy_drop", "must be in [0, 100] (accuracy points)")
        forms = ("fp32", "bf16", "int8", "compile")
        bad = [c for c in self.candidates if c not in forms]
        self._require(not bad and len(self.candidates) > 0, "candidates", f"every entry must be one of {', '.join(forms)}")
        self._require(self.bench_batch_size >= 1, "bench_batch_size", "must be >= 1")
        self._require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        self._require(self.batch_wait_ms >= 0, "batch_wait_ms", "must be >= 0")
        self._require(self.max_instances >= 1, "max_instances", "must be >= 1")
        self._require(self.replicas >= 1, "replicas", "must be >= 1")
        self._require(self.threads_per_replica >= 1, "threads_per_replica", "must be >= 1")
        self._require(1 <= self.port <= 65535, "port", "must be a TCP port in [1, 65535]")
        if self.auth_token_env is not None:
            self._require(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.auth_token_env)), "auth_token_env",
                          "must be an environment variable name")
        import ipaddress

        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = None
        self._require(loopback is not None, "host", "must be an IP address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
        self._require(loopback or self.auth_token_env is not None, "host",
                      "is not a loopback address: other machines reach it, so every request must carry a bearer token: "
                      "pass --auth-token-env NAME (serve.auth_token_env), NAME an environment variable holding the token, "
                      "or bind 127.0.0.1")


@dataclass(kw_only=True, slots=True)
class Config(Section):
    """A whole lepton_ray run. Build with :func:`load_config`."""

    PATH: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        t, s = self.train, self.scaling
        for workers in range(s.min_workers, s.max_workers + 1):  # elastic: at every size the run may take
            shares = workers * t.grad_accum_steps
            if t.batch_size % shares:
                at = f" (elastic {_show(s.num_workers)}: at {workers} workers)" if s.elastic else ""
                raise ConfigError(
                    f"train.batch_size: {t.batch_size} must be divisible by scaling.num_workers x train.grad_accum_steps"
                    f" = {workers} x {t.grad_accum_steps} = {shares}{at}"
                )
        if s.elastic and self.sweep.enabled:
            raise ConfigError(f"scaling.num_workers: elastic {_show(s.num_workers)} is for training runs; a sweep trial"
                              " runs at a fixed worker count (e.g. scaling.num_workers: 2)")
        d, r = self.data, self.data.transform_resources
        need = (r.concurrency or 0) * s.max_workers or 1  # a pool's actors all live at once; tasks may take turns
        if d.engine == "ray_data" and r.num_cpus and d.cpus // r.num_cpus < need:
            what = f"{r.concurrency} actors x {s.max_workers} workers" if r.concurrency else "one task"
            raise ConfigError(f"data.cpus: {d.cpus:g} CPUs hold {int(d.cpus // r.num_cpus)} data tasks of data.transform_resources.num_cpus"
                              f" {r.num_cpus:g}; the run needs room for {what}: set data.cpus >= {need * r.num_cpus:g}")
        if t.precision == "fp16" and not s.use_gpu:
            raise ConfigError("train.precision: 'fp16' needs a GPU (scaling.use_gpu: true); on CPU use 'bf16' or 'fp32'")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`load_config` turns back into an equal config."""
        out = dataclasses.asdict(self)
        out["sync"] = {"strategy": self.sync.strategy, **out["sync"]["options"]}
        return out


# --------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=0.05")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(
    source: Union[str, os.PathLike, dict[str, Any], Config, None] = None,
    overrides: Optional[list[str]] = None,
) -> Config:
    """Load and validate a config from a YAML file, a dict or a Config, then apply ``--set`` overrides.

    The run name defaults to the YAML file's stem.

    >>> cfg = load_config({"data": {"train": "data/train.parquet"}}, ["train.lr=0.05"])
    >>> cfg.train.lr, cfg.sync.strategy
    (0.05, 'allreduce')
    """
    if isinstance(source, Config):
        raw: dict[str, Any] = source.to_dict()
    elif isinstance(source, dict):
        raw = yaml.safe_load(yaml.safe_dump(source))  # a deep copy, and plain data only
    elif source is None:
        raw = {}
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}': expected a mapping of sections, got {type(raw).__name__}")
        run = raw.setdefault("run", {})
        if isinstance(run, dict):
            run.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    return _build(Config, raw, "")
