"""The training loop every Ray Train worker runs (one function, one screen per phase).

The loop knows the sync-strategy interface, never a strategy. It resumes from
the newest committed checkpoint when one exists: the driver guarantees a fresh
run starts with an empty checkpoint directory, so a checkpoint here means
``--resume`` or a Ray Train restart after a worker failure.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lepton_ray.config import Config, load_config
from lepton_ray.data.pipeline import TableInfo, WorkerStream, load_arrays
from lepton_ray.models import build_model
from lepton_ray.storage import redact_config
from lepton_ray.sync import STRATEGIES, Strategy, WorkerInfo
from lepton_ray.sync.base import fused_kwargs
from lepton_ray.train import metrics as M
from lepton_ray.train.checkpoint import CheckpointStore

__all__ = ["LoopSpec", "train_loop", "make_optimizer", "make_scheduler", "loss_fn"]


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, decided on the driver (plain data, sent once)."""

    config: dict[str, Any]
    train: TableInfo
    eval: Optional[TableInfo]
    num_outputs: int
    checkpoint_uri: str
    sink: Any = None  # MetricsSink actor handle
    report_to_ray: bool = False
    """Also ``ray.train.report`` every evaluation (for Tune's schedulers). Off by default: in Ray
    Train V2 each report is a cross-worker barrier through the controller, ~2 s on this machine."""
    services: Any = None
    """What the sync strategy's driver-side ``launch`` started (e.g. parameter-server actor handles)."""


# --------------------------------------------------------------------------- pieces (pure, unit-tested)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = list(model.parameters())
    # fused kernels, except for sparse-gradient tables (a parameter server strategy sets them sparse)
    sparse = any(getattr(m, "sparse", False) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
    fast = {} if sparse else fused_kwargs(params, scaled=t.precision == "fp16")
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fast)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fast)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out.float(), y)
    return F.mse_loss(out.float().squeeze(-1), y)


def total_steps(cfg: Config, stream: WorkerStream) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return sum(stream.steps(e) for e in range(cfg.train.epochs))


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _allreduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


class _LossLog:
    """The per-step train-loss records, averaged over workers with one collective per batch of records.

    A collective per step costs ~0.5 ms of launch on CPU (1.2 % of the 43 ms step of
    ``benchmarks/train_overhead.py``), so each rank keeps its window losses and every ``every``
    records one all-reduce averages all of them. ``every`` starts at 1; once ``calibrate_after``
    records are logged, the slowest rank's mean interval between records (one all-reduce, so every rank
    computes the same value) sets it to about ``target_s`` worth of records (1..64): records reach the
    driver at most ~``target_s`` late, and a run of slow steps keeps one collective per step.
    :meth:`flush` (every rank, at the same steps: evaluation, checkpoint, end) reduces what is pending.
    Without ``collective`` (asynchronous strategies) each record carries this rank's own loss, at once.
    """

    def __init__(self, buffer: "M.RecordBuffer", world: int, collective: bool, *, target_s: float = 0.25,
                 calibrate_after: int = 8, max_every: int = 64):
        self.buffer, self.world, self.collective = buffer, world, collective
        self.target_s, self.calibrate_after, self.max_every = target_s, calibrate_after, max_every
        self.every = 1
        self._pending: list[tuple[torch.Tensor, dict[str, Any]]] = []
        self._logged = 0
        self._t0 = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, steps: int, record: dict[str, Any]) -> None:
        # torch.stack makes a new tensor: the caller may reset loss_sum right after
        sums = torch.stack([loss_sum.detach().to(torch.float64), torch.tensor(float(steps), dtype=torch.float64, device=loss_sum.device)])
        self._pending.append((sums, record))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        sums = torch.stack([p[0] for p in pending])  # [records, (loss sum, steps)]
        reduce = self.collective and self.world > 1
        if reduce:
            dist.all_reduce(sums)
        calibrate = reduce and self._logged < self.calibrate_after <= self._logged + len(pending)
        self._logged += len(pending)
        if calibrate:  # the slowest rank's mean seconds per record, so every rank picks the same batch size
            interval = torch.tensor([(time.perf_counter() - self._t0) / self._logged], dtype=torch.float64, device=sums.device)
            dist.all_reduce(interval, op=dist.ReduceOp.MAX)
            self.every = max(1, min(self.max_every, int(self.target_s / max(interval.item(), 1e-9))))
        for (total, n), (_, record) in zip(sums.tolist(), pending):
            self.buffer.add({**record, M.TRAIN_LOSS: total / n})


def _gathered_auc(logits: torch.Tensor, y: torch.Tensor, world: int) -> float:
    """ROC AUC of the positive-class score over every rank's eval rows."""
    score = (logits[:, 1] - logits[:, 0]).detach().cpu().numpy()
    parts = [(score, y.cpu().numpy())]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (score, y.cpu().numpy()))
    return M.binary_auc(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


# --------------------------------------------------------------------------- the loop


def train_loop(spec: LoopSpec) -> None:
    """Ray Train's ``train_loop_per_worker``: run (or resume) one data-parallel training run."""
    entered = time.time()
    import ray.train
    import ray.train.torch

    cfg = load_config(spec.config)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    task = cfg.model.task

    # ---- data: this worker's share, streamed in a seeded, resumable order (global batch = all workers' batches)
    y_dtype = torch.int64 if task == "classification" else torch.float32
    claim = STRATEGIES[cfg.sync.strategy].claimer(cfg, spec.services)  # an elastic strategy deals the data itself
    stream = WorkerStream(spec.train, cfg.data, rank=rank, world_size=world, local_batch=t.batch_size // world,
                          seed=t.seed, label_dtype=y_dtype, device=device, claim=claim)
    steps = total_steps(cfg, stream)
    if spec.eval is not None:
        ex_np, ey_np = load_arrays(spec.eval, cfg.data.storage_options)
        ex = torch.from_numpy(ex_np[rank::world]).to(device)  # this rank's rows of the eval split
        ey = torch.from_numpy(ey_np[rank::world]).to(device=device, dtype=y_dtype)

    # ---- model, strategy, optimizer: same seed everywhere, so every replica starts equal
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, spec.train.feature_dim, spec.num_outputs).to(device)
    strategy: Strategy = STRATEGIES[cfg.sync.strategy](cfg, WorkerInfo(rank=rank, world_size=world, device=device), spec.services)
    net = strategy.wrap(model)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    torch.manual_seed(t.seed + 1000 * (rank + 1))  # per-rank dropout streams

    # ---- resume from the newest committed checkpoint, if any
    store = CheckpointStore(spec.checkpoint_uri, cfg.checkpoint.storage_options, cfg.checkpoint.keep_last)
    step, epoch, start = 0, 0, 0
    notes: list[str] = []
    latest = store.latest()
    if latest is not None:
        state = store.load(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if "strategy" in state:
            strategy.load_state_dict(state["strategy"])
        rngs = state["rng"]
        _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        step, epoch, start = latest.meta["step"], latest.meta["epoch"], latest.meta["step_in_epoch"]
        cursor = latest.meta.get("data", {})
        if rank == 0 and cursor.get("world_size", world) != world:
            notes.append(f"resumed with {world} workers, checkpointed with {cursor['world_size']}: the rest of epoch {epoch} "
                         f"is dealt anew (rows may repeat or be missed in it); later epochs are exact")
        if rank == 0 and cursor.get("fingerprint", spec.train.fingerprint()) != spec.train.fingerprint():
            notes.append(f"{spec.train.key} changed since the checkpoint (fingerprint {cursor['fingerprint']} -> "
                         f"{spec.train.fingerprint()}): the data order differs from the interrupted run")

    buffer = M.RecordBuffer(spec.sink if rank == 0 else None)
    if rank == 0:
        buffer.add({"event": "start", M.STEP: step, "total_steps": steps, "resumed_from": latest.uri if latest else None,
                    "notes": notes, "entered": entered, "time": time.time(), **strategy.describe()}, now=True)

    def evaluate() -> dict[str, float]:
        if spec.eval is None:
            return {}
        model.eval()
        with torch.no_grad(), _autocast(t.precision, device):
            out = model(ex).float()
        model.train()
        if task == "classification":
            sums = [F.cross_entropy(out, ey, reduction="sum").item(), (out.argmax(-1) == ey).sum().item(), len(ey)]
            loss_sum, correct, n = _allreduce_sum(sums, device, world)
            result = {f"{M.EVAL_PREFIX}loss": loss_sum / n, f"{M.EVAL_PREFIX}accuracy": correct / n}
            if spec.num_outputs == 2:  # binary: also the ranking quality of the positive-class score
                result[f"{M.EVAL_PREFIX}auc"] = _gathered_auc(out, ey, world)
        else:
            sums = [F.mse_loss(out.squeeze(-1), ey, reduction="sum").item(), len(ey)]
            loss_sum, n = _allreduce_sum(sums, device, world)
            result = {f"{M.EVAL_PREFIX}loss": loss_sum / n, f"{M.EVAL_PREFIX}mse": loss_sum / n}
        return result

    def save(epoch_done: bool) -> str:
        losses.flush()  # every rank: a collective; the records before the checkpoint's record
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        uri = ""
        if rank == 0:
            strategy_state = strategy.state_dict()  # first: a strategy may refresh the local model here
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if strategy_state:
                state["strategy"] = strategy_state
            # the dynamic deal restarts an interrupted epoch (its pieces went to whichever worker was free)
            nxt_epoch, nxt_start = (epoch + 1, 0) if epoch_done else (epoch, 0 if elastic else pos + 1)
            meta = {
                "step": step, "epoch": nxt_epoch, "step_in_epoch": nxt_start, "config": redact_config(spec.config),
                # the data cursor: every worker has consumed step_in_epoch local batches of this epoch's deal
                "data": {"world_size": world, "rows_consumed_per_worker": nxt_start * stream.local_batch,
                         "fingerprint": spec.train.fingerprint(), "deal": "dynamic" if elastic else "fixed"},
                "model_io": {"input_dim": spec.train.feature_dim, "num_outputs": spec.num_outputs,
                             "features": list(spec.train.features), "label": spec.train.label, "task": task},
                "metrics": dict(last_eval),
            }
            uri = store.save(step, state, meta).uri
            buffer.add({"event": "checkpoint", M.STEP: step, "checkpoint": uri}, now=True)
        if world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that may still fail
        return uri

    # ---- train
    # rank 0's own loss when the strategy is not lock-step: a per-step collective would re-synchronise asynchronous workers
    losses = _LossLog(buffer, world, collective=strategy.lockstep)
    last_eval: dict[str, float] = {}
    window = {"loss": torch.zeros((), device=device), "batches": 0, "step": step, "t0": time.perf_counter(), "wait": 0.0}
    micro = t.grad_accum_steps
    pos = start - 1
    unstepped = 0  # batches whose gradients are accumulated but not yet stepped (elastic: while held)
    first_step_logged = False

    def record() -> None:
        """Rank 0's record of the steps since the previous one (train loss per batch, global samples/s)."""
        elapsed = time.perf_counter() - window["t0"]
        waited = stream.stats["wait_s"] - window["wait"]
        losses.add(window["loss"], window["batches"], {
            M.STEP: step, M.EPOCH: epoch, M.LR: scheduler.get_last_lr()[0],
            M.SAMPLES_PER_S: (step - window["step"]) * t.batch_size / elapsed,
            M.DATA_WAIT_FRAC: waited / elapsed, "time": time.time(), **strategy.step_metrics()})
        window["loss"].zero_()
        window.update(batches=0, step=step, t0=time.perf_counter(), wait=stream.stats["wait_s"])

    def evaluate_and_log() -> None:
        nonlocal last_eval
        last_eval = evaluate()
        losses.flush()  # metrics.jsonl stays in step order
        buffer.add({M.STEP: step, M.EPOCH: epoch, **last_eval, "time": time.time()})
        if spec.report_to_ray:
            # a scheduler may stop the run on this report: its records are on disk first
            buffer.flush(wait=True)
            ray.train.report({**last_eval, M.STEP: step, M.EPOCH: epoch})

    def crossed(every: Optional[int], before: int, after: int) -> bool:
        return bool(every) and after // every > before // every

    def elastic_epoch_end(last: bool, epoch_done: bool) -> None:
        """Elastic strategies: evaluation and checkpoints happen only here, when due, with every worker.
        Whether they are due follows the epochs' nominal step counts, the same on every worker."""
        nonlocal step, unstepped
        begin = sum(stream.steps(e) for e in range(epoch))
        end = begin + stream.steps(epoch)
        do_eval = last or t.eval_every_steps is None or crossed(t.eval_every_steps, begin, end)
        do_save = last or crossed(cfg.checkpoint.every_n_steps, begin, end)
        if not (do_eval or do_save):
            return
        step = max(step, strategy.drain(optimizer, unstepped, last=last))
        if unstepped:
            optimizer.zero_grad(set_to_none=True)
            unstepped = 0
        if window["batches"]:
            record()
        if do_eval:
            evaluate_and_log()
        if do_save:
            save(epoch_done)

    def more() -> bool:
        return epoch < t.epochs if (elastic and t.max_steps is None) else step < steps

    elastic = strategy.elastic
    net.train()
    while more():
        for pos, (xb, yb) in enumerate(stream.epoch(epoch, start), start=start):
            # one optimizer step = grad_accum_steps micro-batches; only the last one communicates
            for i, (xm, ym) in enumerate(zip(xb.chunk(micro), yb.chunk(micro))):
                with strategy.no_sync() if i < micro - 1 else contextlib.nullcontext():
                    with _autocast(t.precision, device):
                        loss = loss_fn(task, net(xm), ym) / micro
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                window["loss"] += loss.detach()
            window["batches"] += 1
            unstepped += 1
            if elastic and strategy.held(unstepped):
                continue  # held at the staleness bound: this batch's gradients go into the next step
            strategy.step(optimizer, scaler, unstepped)
            unstepped = 0
            optimizer.zero_grad(set_to_none=True)
            before = step
            if elastic:  # the run's step counts every worker's batches
                step = max(step, strategy.progress())
                scheduler.last_epoch = step - 1
            else:
                step += 1
            scheduler.step()
            if rank == 0 and not first_step_logged:
                buffer.add({"event": "first_step", M.STEP: step, "time": time.time()}, now=True)
                first_step_logged = True

            if (crossed(t.log_every_steps, before, step) or step == steps) and step > window["step"]:
                record()
            if elastic:
                if t.max_steps is not None and step >= steps:
                    break
                continue
            end_of_epoch = pos + 1 == stream.steps(epoch)
            if (t.eval_every_steps and step % t.eval_every_steps == 0) or (t.eval_every_steps is None and end_of_epoch) or step == steps:
                evaluate_and_log()
            if (cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0) or step == steps:
                save(end_of_epoch)
            if step >= steps:
                break
        else:
            if elastic:
                elastic_epoch_end(last=t.max_steps is None and epoch + 1 >= t.epochs, epoch_done=True)
            epoch, start = epoch + 1, 0
            continue
        if elastic:  # max_steps reached inside an epoch
            elastic_epoch_end(last=True, epoch_done=False)
        break

    losses.flush()
    stream.close()
    if rank == 0:
        latest = store.latest()
        buffer.add({"event": "end", M.STEP: step, **last_eval, "checkpoint": latest.uri if latest else None,
                    "data_stats": dict(stream.stats)}, now=True)
        buffer.flush(wait=True)
    strategy.shutdown()
