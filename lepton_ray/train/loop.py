"""The training loop every worker runs: one short function over a worker context.

The loop knows the sync-strategy interface, never a strategy, and asks the pure :class:`Schedule` when to
log, evaluate and checkpoint. It resumes from the newest committed checkpoint when one exists: the driver
guarantees a fresh run starts with an empty checkpoint directory, so a checkpoint here means ``--resume``
or a Ray Train restart after a worker failure.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lepton_ray.config import Config, TrainConfig, load_config
from lepton_ray.data.plan import Segment
from lepton_ray.data.stream import WorkerStream
from lepton_ray.data.table import TableInfo, load_arrays
from lepton_ray.data.transform import load_transform
from lepton_ray.imports import install
from lepton_ray.models import build_model
from lepton_ray.storage import redact_config
from lepton_ray.sync import STRATEGIES, Strategy, WorkerInfo
from lepton_ray.train import metrics as M
from lepton_ray.train.breakdown import StepTimes, peak_flops, stragglers
from lepton_ray.train.checkpoint import CheckpointReader, CheckpointStore, load_model, open_checkpoint, rng_state, set_rng_state
from lepton_ray.train.context import WorkerContext
from lepton_ray.train.losses import Evaluator, default_metrics, make_loss, model_inputs
from lepton_ray.train.memory import checkpoint_activations, memory_bytes, peak_memory
from lepton_ray.train.optim import make_scheduler
from lepton_ray.train.precision import Precision
from lepton_ray.train.schedule import Due, Schedule
from lepton_ray.train.step import compile_model, forward_backward
from lepton_ray.train.watchdog import Preempted, WorkerGuard

__all__ = ["LoopSpec", "train_loop", "evaluate"]

log = logging.getLogger(__name__)
HOST = socket.gethostname()


def device_wait(device: torch.device) -> Any:
    """What the step-time breakdown calls at each phase's end: a GPU's stream is synchronised there (else a phase
    would time the kernels' launch, not their run); nothing on CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, decided on the driver (plain data, sent once)."""

    config: dict[str, Any]
    train: TableInfo
    eval: Optional[TableInfo]
    checkpoint_uri: str
    sink: Any = None  # MetricsSink actor handle, or a Sink in rank 0's process
    services: Any = None
    """What the sync strategy's driver-side ``launch`` started (e.g. parameter-server actor handles)."""
    splits: Optional[list[Any]] = None
    """A user's ``ray.data.Dataset`` split per rank (``streaming_split``); None: the files of ``train``."""
    callables: dict[str, Any] = field(default_factory=dict)
    """Python callables the config names as ``callable:...`` (``Trainer(cfg, model=fn)``), by value."""
    phases: dict[str, Optional[float]] = field(default_factory=dict)
    """When each start-up phase ended (Unix time): the driver's, from ``fit`` (its call), then the worker's own
    (``worker_process``, ``worker_entry``) as the worker adds them; rank 0's start record has them after ``fit``."""


@dataclass
class _Parts:
    """What a run trains and saves, built the same way on every worker."""

    model: nn.Module
    net: nn.Module
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: Precision


def _max_over_ranks(values: list[float], ctx: WorkerContext, together: bool = True) -> list[float]:
    """Each value's maximum over the ranks (a collective); as is with one worker, or when not ``together`` (workers
    that do not advance in lock step: a collective would re-synchronise them)."""
    if ctx.world == 1 or not together:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _held(p: _Parts, ctx: WorkerContext, together: bool) -> dict[str, int]:
    """What a worker holds once gradients and optimizer state exist, and its peak memory so far: the maximum over the
    ranks (``together``: a collective; otherwise this rank's own)."""
    held = {**memory_bytes(p.model, p.optimizer), "peak_memory_bytes": peak_memory(ctx.device)}
    return {k: int(v) for k, v in zip(held, _max_over_ranks(list(held.values()), ctx, together))}


def evaluate(model: nn.Module, data: dict[str, torch.Tensor], evaluator: Evaluator, inputs: tuple[str, ...],
             precision: Precision, ctx: WorkerContext, batch: int) -> dict[str, float]:
    """``eval_*`` metrics over every rank's rows (a collective: every rank calls it). Every rank runs as many forward
    passes as the rank with the most rows (a sharded model all-gathers in each): one with no rows left runs one row and
    drops its output."""
    model.eval()
    evaluator.reset()
    rows = len(next(iter(data.values())))
    passes = int(_max_over_ranks([-(-rows // batch)], ctx)[0])
    with torch.no_grad(), precision.autocast():
        for i in range(0, passes * batch, batch):
            part = {k: v[i:i + batch] for k, v in data.items()}
            if not len(next(iter(part.values()))):
                model(model_inputs({k: v[:1] for k, v in data.items()}, inputs, evaluator.loss.name))
                continue
            evaluator.update(model(model_inputs(part, inputs, evaluator.loss.name)), part)
    model.train()
    return {f"{M.EVAL_PREFIX}{k}": v for k, v in evaluator.result(ctx.world, ctx.device).items()}


def _build(cfg: Config, spec: LoopSpec, strategy: Strategy, total: int, fresh: bool) -> _Parts:
    """The model as the strategy builds it (whole and wrapped, or sharded), the optimizer, schedule and precision.
    ``fresh``: not a resume, so ``train.init_from`` (a seed checkpoint) sets the starting weights."""
    t = cfg.train
    torch.manual_seed(t.seed)  # same seed everywhere: every replica starts equal
    net = strategy.build(lambda: checkpoint_activations(build_model(cfg.model, spec.train.batch_schema), t.activation_checkpointing))
    if fresh and t.init_from:
        load_model(open_checkpoint(t.init_from, cfg.checkpoint.storage_options), strategy.model)
    if t.compile:
        net = compile_model(net)
    optimizer = strategy.optimizer()
    return _Parts(strategy.model, net, strategy, optimizer, make_scheduler(cfg, optimizer, total), strategy.precision())


@dataclass
class _Resume:
    """Where a run starts: the newest committed checkpoint that verifies (``None``: a fresh start) and its position."""

    checkpoint: Optional[CheckpointReader] = None
    notes: list[str] = field(default_factory=list)
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def total_steps(self, t: TrainConfig, stream: WorkerStream, stepwise: bool) -> int:
        """The run's optimizer steps: ``train.max_steps``, else the steps of the epochs before this one as taken (a
        resize changes their count; the dynamic deal counts nominal steps) and the rest at this world size."""
        if t.max_steps is not None:
            return t.max_steps
        taken = self.step - self.step_in_epoch if stepwise else sum(stream.steps(e) for e in range(self.epoch))
        return taken + sum(stream.steps(e) for e in range(self.epoch, t.epochs))


def _resume_point(store: CheckpointStore, ctx: WorkerContext, spec: LoopSpec, stream: WorkerStream, stepwise: bool) -> _Resume:
    """The newest committed checkpoint that verifies (a newer torn or corrupted one is skipped, with a note and a
    warning; the ranks share the checks and agree). Resumed at another world size (an elastic resize), ``stream`` is
    told to deal only the rows of the interrupted epoch that the earlier world sizes left."""
    agree = (lambda ok: bool(_max_over_ranks([0.0 if ok else 1.0], ctx)[0] == 0.0)) if ctx.world > 1 else (lambda ok: ok)
    reader, skipped = store.open_latest(ctx.rank, ctx.world, agree)
    for why in skipped:
        log.warning("resume: %s", why)
    if reader is None:
        return _Resume()
    latest = reader.checkpoint
    meta, cursor, notes = latest.meta, latest.meta.get("data", {}), list(skipped)
    world = cursor.get("world_size", ctx.world)
    local_batch = cursor.get("local_batch", stream.local_batch * ctx.world // world)  # the global batch is the config's
    segments = tuple(Segment(*s) for s in cursor.get("segments", []))
    if (world, local_batch) != (ctx.world, stream.local_batch) and stepwise and meta["step_in_epoch"]:
        segments += (Segment(world, local_batch, cursor.get("step_in_segment", meta["step_in_epoch"])),)
        notes.append(f"resumed with {ctx.world} workers, checkpointed with {world}: the rest of epoch {meta['epoch']} is the"
                     f" rows the {world} workers had not read, dealt to {ctx.world} (every row once)")
    if segments:
        stream.resume_after(meta["epoch"], segments)
    if cursor.get("fingerprint", spec.train.fingerprint()) != spec.train.fingerprint():
        notes.append(f"{spec.train.key} changed since the checkpoint (fingerprint {cursor['fingerprint']} -> "
                     f"{spec.train.fingerprint()}): the data order differs from the interrupted run")
    return _Resume(reader, notes, meta["step"], meta["epoch"], meta["step_in_epoch"])


def _load(p: _Parts, ckpt: CheckpointReader, ctx: WorkerContext) -> None:
    p.strategy.load(ckpt, p.optimizer)
    p.scheduler.load_state_dict(ckpt.get("scheduler"))
    p.precision.load_state_dict(ckpt.get("scaler") if ckpt.has("scaler") else {})
    rngs = ckpt.get("rng")
    set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0])


def _save(store: CheckpointStore, p: _Parts, ctx: WorkerContext, spec: LoopSpec, model_io: dict[str, Any], *, step: int,
          cursor: tuple[int, int], stream: WorkerStream, metrics: dict[str, float]) -> Optional[str]:
    """Checkpoint (a collective); ``cursor``: the (epoch, step in epoch) a resumed run continues from."""
    rngs: list[Any] = [rng_state()]
    if ctx.world > 1:
        rngs = [None] * ctx.world
        dist.all_gather_object(rngs, rng_state())
    uri = None
    ckpt = store.writer(step)
    p.strategy.save(ckpt, p.optimizer)  # every rank writes its part (a collective may run here)
    if ctx.rank == 0:
        for name, obj in (("scheduler", p.scheduler.state_dict()), ("rng", rngs), ("scaler", p.precision.state_dict())):
            ckpt.put(name, obj)
    written = [ckpt.files]
    if ctx.world > 1:
        written = [None] * ctx.world
        dist.all_gather_object(written, ckpt.files)
    if ctx.rank == 0:
        meta = {"step": step, "epoch": cursor[0], "step_in_epoch": cursor[1], "config": redact_config(spec.config),
                # the data cursor: which rows of this epoch every worker has consumed, at which world sizes
                "data": {**stream.cursor(*cursor), "fingerprint": spec.train.fingerprint(),
                         "deal": "fixed" if p.strategy.pace.stepwise else "dynamic"},
                "model_io": model_io, "metrics": dict(metrics)}
        uri = store.commit(step, {k: v for files in written for k, v in files.items()}, meta).uri  # one manifest commits every rank's files
    if ctx.world > 1:
        dist.barrier()  # nobody runs ahead of a checkpoint that may still fail
    return uri


class _Window:
    """Rank 0's train-loss record of the steps since the previous record (loss per batch, global samples/s; for a model
    whose ``flops_per_sample()`` is known, the model TFLOP/s, and the MFU where the GPUs' peak is: ``peak`` over all)."""

    def __init__(self, step: int, stream: WorkerStream, device: torch.device, flops_per_sample: Optional[float] = None,
                 peak: Optional[float] = None):
        self.loss, self.stream, self.batches = torch.zeros((), device=device), stream, 0
        self.flops_per_sample, self.peak = flops_per_sample, peak
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.step, self.t0, self.wait = step, time.perf_counter(), self.stream.stats["wait_s"]

    def record(self, losses: M.LossLog, step: int, epoch: int, lr: float, batch_size: int, extra: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.step) * batch_size / elapsed
        if self.flops_per_sample:
            extra = {**extra, M.MODEL_TFLOPS: rate * self.flops_per_sample / 1e12,
                     **({M.MFU: rate * self.flops_per_sample / self.peak} if self.peak else {})}
        losses.add(self.loss, self.batches, {M.STEP: step, M.EPOCH: epoch, M.LR: lr, "time": time.time(), **extra,
                                             M.SAMPLES_PER_S: rate,
                                             M.DATA_WAIT_FRAC: (self.stream.stats["wait_s"] - self.wait) / elapsed})
        self.loss.zero_()
        self.batches = 0
        self._reset(step)


@dataclass
class _Run:
    """One worker's run: what evaluating, logging and checkpointing need (the loop's state stays in the loop)."""

    cfg: Config
    spec: LoopSpec
    ctx: WorkerContext
    parts: _Parts
    stream: WorkerStream
    store: CheckpointStore
    buffer: M.RecordBuffer
    losses: M.LossLog
    window: _Window
    evaluator: Evaluator
    eval_data: Optional[dict[str, torch.Tensor]]
    last_eval: dict[str, float]
    times: StepTimes
    lockstep: bool

    def breakdown(self, epoch: int, step: int) -> None:
        """This rank's step-time breakdown since the last one, to the sink: rank 0 gathers every rank's (one collective)
        and adds a ``straggler`` record for a rank whose compute is slow; workers not in lock step send their own."""
        mine = self.times.take(rank=self.ctx.rank, host=HOST, epoch=epoch, step=step, time=time.time())
        if not self.lockstep or self.ctx.world == 1:
            self.own.add(mine, now=True)
            return
        every: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(every, mine)
        if self.ctx.rank == 0:
            for r in every + stragglers(every, self.cfg.train.straggler_factor):
                self.buffer.add(r)
            self.buffer.flush()

    @property
    def own(self) -> M.RecordBuffer:
        """Where this rank's own breakdown goes: rank 0's buffer; another rank's own buffer to a sink actor (a sink in
        rank 0's process is not reachable from another)."""
        if self.ctx.rank == 0 or isinstance(self.spec.sink, M.Sink):
            return self.buffer
        if self._own is None:
            self._own = M.RecordBuffer(self.spec.sink)
        return self._own

    _own: Optional[M.RecordBuffer] = None

    def record(self, step: int, epoch: int) -> None:
        if self.window.batches:
            self.window.record(self.losses, step, epoch, self.parts.scheduler.get_last_lr()[0], self.cfg.train.batch_size,
                               self.parts.strategy.step_metrics())

    def finish(self, step: int) -> None:
        """The run's last records: rank 0's ``end`` record (the peak memory is every rank's maximum: a collective)."""
        self.losses.flush()
        peak = _max_over_ranks([peak_memory(self.ctx.device)], self.ctx, self.lockstep)[0]
        if self.ctx.rank == 0:
            newest = self.store.latest()
            self.buffer.add({"event": "end", M.STEP: step, **self.last_eval, "checkpoint": newest.uri if newest else None,
                             "data_stats": dict(self.stream.stats), "peak_memory_bytes": int(peak)}, now=True)
            self.buffer.flush(wait=True)

    def act(self, due: Due, step: int, epoch: int, cursor: tuple[int, int]) -> None:
        """Evaluate and/or checkpoint, as ``due`` says (every rank, at the same step)."""
        if due.evaluate and self.eval_data is not None:
            with self.times.phase("eval"):
                self.last_eval = evaluate(self.parts.model, self.eval_data, self.evaluator, tuple(c.name for c in self.spec.train.batch_schema.inputs),
                                          self.parts.precision, self.ctx, self.cfg.train.eval_batch_size)
            self.losses.flush()  # metrics.jsonl stays in step order
            self.buffer.add({M.STEP: step, M.EPOCH: epoch, **self.last_eval, "time": time.time()})
            if self.ctx.report is not None:
                self.buffer.flush(wait=True)  # a scheduler may stop the run on this report: its records are on disk first
                self.ctx.report({**self.last_eval, M.STEP: step, M.EPOCH: epoch})
        if due.save:
            self.losses.flush()  # every rank: a collective; the records before the checkpoint's record
            model_io = {"schema": self.spec.train.batch_schema.to_dict(), "loss": self.evaluator.loss.name,
                        "metrics": self.evaluator.metrics, "task": self.cfg.model.task}  # what serving rebuilds the model from
            with self.times.phase("checkpoint"):
                uri = _save(self.store, self.parts, self.ctx, self.spec, model_io, step=step, cursor=cursor,
                            stream=self.stream, metrics=self.last_eval)
            if uri:
                self.buffer.add({"event": "checkpoint", M.STEP: step, "checkpoint": uri}, now=True)


def _flops(model: nn.Module, ctx: WorkerContext, precision: str) -> tuple[Optional[float], Optional[float]]:
    """(training FLOPs per row, the group's peak FLOP/s): the first where the model says (``flops_per_sample()``, e.g.
    the built-in gpt), the second on GPUs whose peak is known for ``precision`` (:func:`breakdown.peak_flops`)."""
    per_row = model.flops_per_sample() if callable(getattr(model, "flops_per_sample", None)) else None
    peak = peak_flops(torch.cuda.get_device_name(ctx.device), precision) if ctx.device.type == "cuda" else None
    return per_row, peak * ctx.world if peak else None


def _stream(spec: LoopSpec, cfg: Config, ctx: WorkerContext, claim: Any) -> WorkerStream:
    """This worker's share of the training data: planned from files, or its split of a user's ``ray.data.Dataset``."""
    local_batch = cfg.train.batch_size // ctx.world
    if spec.splits is not None:
        from lepton_ray.data.dataset import DatasetStream

        return DatasetStream(spec.train, cfg.data, spec.splits[ctx.rank], world_size=ctx.world, local_batch=local_batch, device=ctx.device)
    return WorkerStream(spec.train, cfg.data, rank=ctx.rank, world_size=ctx.world, local_batch=local_batch, seed=cfg.train.seed,
                        device=ctx.device, claim=claim)


def _eval_rows(spec: LoopSpec, cfg: Config, ctx: WorkerContext) -> Optional[dict[str, torch.Tensor]]:
    """This rank's rows of the eval split (every world-th row), on the device."""
    if spec.eval is None:
        return None
    arrays = load_arrays(spec.eval, cfg.data.storage_options)
    transform = load_transform(cfg.data, cfg.train.seed)
    if transform is not None:  # the eval rows as the model sees them; a random transform draws with "epoch" -1
        arrays = transform(arrays, np.arange(spec.eval.num_rows), epoch=-1)
    return {k: torch.from_numpy(v[ctx.rank::ctx.world]).to(ctx.device) for k, v in arrays.items()}


def _start(spec: LoopSpec, ctx: WorkerContext, entered: float) -> tuple[_Run, _Resume, Schedule]:
    """Everything a worker's run needs, built (the first batches read meanwhile) and resumed from the newest
    checkpoint, and rank 0's ``start`` record written: (the run, where it resumes, when it logs, evaluates, saves)."""
    install(spec.callables)
    cfg = load_config(spec.config)
    t, schema = cfg.train, spec.train.batch_schema
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    # ---- data: this worker's share, streamed in a seeded, resumable order (global batch = all workers' batches)
    strategy = STRATEGIES[cfg.sync.strategy](cfg, WorkerInfo(rank=ctx.rank, world_size=ctx.world, device=ctx.device), spec.services)
    pace = strategy.pace  # lock step, unless the strategy paces its workers itself (the elastic parameter server)
    stream = _stream(spec, cfg, ctx, pace.claim)  # a strategy may deal the data itself
    store = CheckpointStore(spec.checkpoint_uri, cfg.checkpoint.storage_options, cfg.checkpoint.keep_last)
    resume = _resume_point(store, ctx, spec, stream, pace.stepwise)  # before the steps are counted
    total = resume.total_steps(t, stream, pace.stepwise)
    if resume.epoch < t.epochs if t.max_steps is None else resume.step < total:
        stream.start(resume.epoch, resume.step_in_epoch)  # the first batches are read while the model is built
    try:
        p = _build(cfg, spec, strategy, total, fresh=resume.checkpoint is None)
    except BaseException:
        stream.close()
        raise
    loss = make_loss(cfg.model, schema)
    torch.manual_seed(t.seed + 1000 * (ctx.rank + 1))  # per-rank dropout streams (a resume restores them)
    if resume.checkpoint is not None:
        _load(p, resume.checkpoint, ctx)
    buffer = M.RecordBuffer(spec.sink if ctx.rank == 0 else None)
    if ctx.rank == 0:
        phases = {**spec.phases, "loop_entered": entered, "ready": time.time()}  # ready: built, resumed; the first batch next
        latest = resume.checkpoint
        buffer.add({"event": "start", M.STEP: resume.step, "total_steps": total, "world_size": ctx.world,
                    "phases_s": M.since(phases.pop("fit", entered), phases),
                    "resumed_from": latest.checkpoint.uri if latest else None, "notes": resume.notes,
                    "bad_shards_skipped": list(spec.train.skipped), "entered": entered, "time": time.time(),
                    "compiled": getattr(p.net, "compiled", False), "data": stream.describe(), **p.strategy.describe()}, now=True)
    # a strategy that is not lock-step logs rank 0's own loss: a per-step collective would re-synchronise its workers
    run = _Run(cfg, spec, ctx, p, stream, store, buffer, M.LossLog(buffer, ctx.world, collective=pace.lockstep),
               _Window(resume.step, stream, ctx.device, *_flops(p.strategy.model, ctx, t.precision)),
               Evaluator(loss, default_metrics(cfg.model, schema)), _eval_rows(spec, cfg, ctx), {},
               StepTimes(p.strategy.sync_s, wait=device_wait(ctx.device)), pace.lockstep)
    return run, resume, Schedule(total, t.log_every_steps, t.eval_every_steps, cfg.checkpoint.every_n_steps)


def train_loop(spec: LoopSpec, ctx: WorkerContext, guard: Optional[WorkerGuard] = None) -> None:
    """Run (or resume) one data-parallel training run as worker ``ctx.rank`` of ``ctx.world``. ``guard``: the
    worker's heartbeat and SIGTERM handler (a Ray Train worker's, from trainer.py); told the step after every step."""
    run, resume, sched = _start(spec, ctx, time.time())
    t, p, stream, buffer, times = run.cfg.train, run.parts, run.stream, run.buffer, run.times
    pace, total = p.strategy.pace, sched.total_steps
    loss, inputs = run.evaluator.loss, tuple(c.name for c in spec.train.batch_schema.inputs)
    step, epoch, start = resume.step, resume.epoch, resume.step_in_epoch
    guard = guard or WorkerGuard()
    guard.start(ctx.world, ctx.device, jit=pace.lockstep and pace.stepwise)  # jit: may checkpoint at any step

    try:  # a run stopped at a report (a sweep trial ASHA stops) or failed leaves no threads or shared memory behind
        pending, announced = 0, False  # pending: batches whose gradients are accumulated but not yet stepped
        p.net.train()
        while epoch < t.epochs if t.max_steps is None else step < total:
            begin, stopped = sum(stream.steps(e) for e in range(epoch)), False
            for pos, batch in enumerate(times.batches(stream.epoch(epoch, start)), start=start):
                with times.phase("compute"):
                    run.window.loss += forward_backward(p.net, batch, micro=t.grad_accum_steps, inputs=inputs, loss=loss,
                                                        precision=p.precision, strategy=p.strategy)
                run.window.batches += 1
                pending += 1
                if pace.held(pending):
                    continue
                with times.phase("optimizer"):
                    p.strategy.step(p.optimizer, p.precision, pending)
                times.steps += 1
                held = None if announced else _held(p, ctx, pace.lockstep)  # before zero_grad: the gradients exist
                p.optimizer.zero_grad(set_to_none=True)
                before, step, pending = step, pace.advance(step), 0
                p.scheduler.last_epoch = step - 1  # the run's step sets the learning rate, however it advanced
                p.scheduler.step()
                if held is not None and ctx.rank == 0:
                    buffer.add({"event": "first_step", M.STEP: step, "time": time.time(), **held}, now=True)
                announced = True
                if sched.log(before, step):
                    run.record(step, epoch)
                preempted = guard.at_step(step)  # every rank: the ranks that got SIGTERM (an all-reduce every ~0.5 s)
                if pace.stepwise:
                    end_of_epoch = pos + 1 == stream.steps(epoch)
                    due = sched.at_step(step, end_of_epoch)
                    run.act(Due(due.evaluate, due.save or bool(preempted)), step, epoch, (epoch + 1, 0) if end_of_epoch else (epoch, pos + 1))
                    if preempted and step < total:  # a just-in-time checkpoint of this step is committed: stop here
                        buffer.add({"event": "preempted", M.STEP: step, "ranks": preempted}, now=True)
                        buffer.flush(wait=True)
                        raise Preempted(f"rank {', '.join(map(str, preempted))} got SIGTERM: every rank checkpointed step {step} "
                                        f"({run.store.latest().uri}) and stopped; --resume continues from it")
                if t.max_steps is not None and step >= total:
                    stopped = True
                    break
            last = stopped or (t.max_steps is None and epoch + 1 >= t.epochs)
            due = Due() if pace.stepwise else sched.at_epoch_end(begin, begin + stream.steps(epoch), last=last)
            if due:  # workers that take different numbers of batches meet here: finish what is pending first
                step = pace.drain(p.optimizer, pending, last=last) or step
                if pending:
                    p.optimizer.zero_grad(set_to_none=True)
                    pending = 0
                run.record(step, epoch)
                # the dynamic deal restarts an interrupted epoch (its pieces went to whichever worker was free)
                run.act(due, step, epoch, (epoch, 0) if stopped else (epoch + 1, 0))
            run.breakdown(epoch, step)
            if stopped:
                break
            epoch, start = epoch + 1, 0

        run.finish(step)
    finally:
        stream.close()
        p.strategy.close()
