#!/usr/bin/env python
"""How much lepton_ray costs on top of what it wraps: training throughput and startup, for an MLP and a gpt.

Everything is measured in ONE run of this script (``--parts mlp,gpt``, the default, runs both parts; a part is
a separate set of runs on its own data), on seeded synthetic data (Parquet files in a temporary directory),
with 2 workers of 1 CPU thread each. Within a part both sides train the same model with the same optimizer,
precision (fp32) and global batch on the same per-step batches: the baselines hold the data in memory and
index each step's rows in lepton_ray's data order (seeded per-epoch deal of row-group units, shuffle-buffer
windows; see ``epoch_plan``), which the script checks batch for batch against
``lepton_ray.data.WorkerStream`` for each data set before timing anything. lepton_ray streams the same rows
from the Parquet file, as it always does.

MLP part: an MLP 512 -> 2048 -> 1024 -> 10 (3.16 M parameters), SGD (momentum 0.9, constant lr), on
fixed-size-list float features and int64 labels.

1. Steady-state throughput (samples/s over steps ``--warmup``..``--steps``):
   lepton_ray ``sync.strategy: allreduce`` (``Trainer(config).fit()``, rates
   derived from the run's per-step records) against plain PyTorch DDP over gloo
   in two ``torch.multiprocessing`` processes (``torch.set_num_threads(1)``).
   Bar: lepton / plain >= 0.95. lepton_ray runs with its defaults, so its two workers on this one
   host average gradients through shared memory (``sync.allreduce.cpu_transport: auto``); the same
   run with ``cpu_transport: gloo`` (DDP's own loopback TCP) is measured too, for information: it
   separates what the transport gains from what the rest of lepton_ray and Ray Train cost.

2. Time to first step: wall time from the moment ``Trainer(config).fit()`` is
   called to rank 0's first optimizer step, against the same for a bare Ray
   Train V2 ``TorchTrainer(...).fit()`` whose loop trains the same model with DDP
   on the same data and writes ``time.time()`` after its first optimizer step.
   Bar: lepton / bare <= 1.10 (lepton_ray adds at most 10 %).

gpt part: lepton_ray's built-in gpt (``lepton_ray.models.gpt.GPT``: 4 blocks, 4 heads, 128 dims, byte vocabulary
256, block size T = 128; ~0.84 M parameters), AdamW (lr 2e-3, weight decay 0.1, constant lr, no clipping,
``fused=True``: lepton_ray uses the fused kernel on CPU, for DTensor shards too), cross entropy of the logits
[B, T, 256] against the next bytes [B, T], global batch 32 rows (``--gpt-batch-size``), on seeded byte text
(words of a small seeded vocabulary, Zipf-distributed) stored as ``input`` / ``target`` columns of
``fixed_size_list<uint8>[T]``, the text builder's layout. Both baselines are ``gpt_train_steps`` below,
written once from torch's documented APIs (not tuned against lepton_ray), in two ``torch.multiprocessing``
processes over gloo with ``torch.set_num_threads(1)``; the model is built by ``GPT(...)`` after
``torch.manual_seed(0)``, as lepton_ray's loop builds it (FSDP: on the meta device, then per-rank initialised
shards; the init values do not matter for throughput, only the architecture).

3. gpt ``sync.strategy: allreduce`` tokens/s (steady state over steps ``--gpt-warmup``..``--gpt-steps``, samples/s
   x T) against plain DDP (``DistributedDataParallel(model)`` with its defaults). Bar: lepton / plain >= 0.95.
   lepton_ray runs with its defaults (shared-memory gradient transport, as in 1.).

4. gpt ``sync.strategy: fsdp`` tokens/s against plain FSDP2: ``fully_shard(block, reshard_after_forward=True)``
   for every ``Block`` of ``model.transformer.h``, then ``fully_shard(model, reshard_after_forward=True)`` (the root:
   embeddings, tied head, final norm), default mixed-precision policy (fp32) and no offload, on a 1-D CPU device
   mesh over the 2 ranks; lepton_ray runs with its defaults (units = the blocks, ``reshard_after_forward: true``).
   Bar: lepton / plain >= 0.95.

   The gpt's first-step training loss is printed for each side (mean over ranks): lepton allreduce and plain DDP
   start from the same weights on the same batches, so theirs agree to float rounding, a check that both sides
   train the same model on the same rows.

start part (``--parts start``): the first ``fit()`` of a fresh driver process, from the call to rank 0's first step,
lepton_ray (``max_failures: 1``) against a bare Ray Train V2 ``TorchTrainer.fit()`` of the MLP loop above, each
in its own fresh process, both on one already-running cluster that the script starts (``ray start --head``,
4 logical CPUs, token authentication on), alternating. Bar: lepton / bare <= 0.5. Then one driver calls
``fit(keep_warm=True)`` twice: the second's first step, bar <= 2 s. Then the README's main job as a whole process
(``lepton-ray train examples/digits.yaml``, its own local Ray), median of 3 after one untimed run: bar <= 15 s.

Ray is started once (``ray.init(num_cpus=4)``), so both sides pay the same
cluster start (i.e. none). Before every run the script waits until the previous
run's processes are gone (``settle``), so no side starts during another's
teardown. Every measurement is repeated ``--repeats`` times, the sides
alternating (and the order flipping every repeat), and the median is reported. An untimed bare TorchTrainer
run first warms the driver's lazy imports (MLP part).
The bare TorchTrainer's steady-state throughput is printed too (for information:
it separates what Ray Train costs from what lepton_ray adds).

    .venv/bin/python benchmarks/train_overhead.py [--parts mlp,gpt] [--steps 300] [--batch-size 256] [--repeats 5]
        [--gpt-steps 120] [--gpt-warmup 20] [--gpt-batch-size 32]
    .venv/bin/python benchmarks/train_overhead.py --parts gpt --repeats 1 --gpt-steps 30 --gpt-warmup 5   # smoke test

On this 2-core machine a single run's samples/s varies by +-5 % from run to run (plain
DDP alone ranged 6225..6880 in one invocation), so the defaults are 300 steps and 5
alternating repeats (12-13 minutes measured for the MLP part); fewer repeats give a ratio that is mostly noise.
The gpt part adds 4 runs per repeat of 120 steps each (not yet timed on an idle machine: expect it to take about
as long as the MLP part).

Exit status 0 whether or not the bars are met (the table says PASS/FAIL);
``--strict`` makes a missed bar exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

FEATURES, HIDDEN, CLASSES = 512, [2048, 1024], 10
WORLD = 2
SEED = 0
LR, MOMENTUM = 0.01, 0.9
THROUGHPUT_BAR, STARTUP_BAR = 0.95, 1.10
FRESH_DRIVER_BAR, MAIN_JOB_BAR_S, SECOND_FIT_BAR_S = 0.5, 15.0, 2.0

GPT_T, GPT_VOCAB = 128, 256
GPT_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128}
GPT_LR, GPT_WEIGHT_DECAY = 2e-3, 0.1

# batch key -> Parquet column, for the baselines; the same names as lepton_ray's data config gives the batch
MLP_COLUMNS = {"x": "x", "label": "label"}
GPT_COLUMNS = {"tokens": "input", "next": "target"}
# lepton_ray's data section (less ``train``) for each data set
MLP_DATA = {"label": "label"}
GPT_DATA = {"inputs": {"tokens": "input"}, "targets": {"next": "target"}}


# --------------------------------------------------------------------------- the data sets, and lepton_ray's order


def write_mlp_data(path: Path, rows: int, row_group_rows: int | None) -> None:
    """Seeded synthetic classification data: one fixed-size-list feature column + int64 labels."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    w = rng.standard_normal((FEATURES, CLASSES), dtype=np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
    pq.write_table(pa.table({"x": col, "label": y}), path, row_group_size=row_group_rows)


def write_gpt_data(path: Path, rows: int, row_group_rows: int | None) -> None:
    """Seeded byte text with some structure (Zipf-distributed words of a 512-word seeded vocabulary, space-separated),
    cut like the text builder's rows: ``input`` bytes 0..T-1 and ``target`` bytes 1..T, both ``fixed_size_list<uint8>[T]``."""
    rng = np.random.default_rng(SEED)
    words = [bytes(rng.integers(97, 123, int(rng.integers(2, 9))).astype(np.uint8)) for _ in range(512)]
    need = rows * (GPT_T + 1)
    text = b""
    while len(text) < need:
        text += b" ".join(words[i] for i in (rng.zipf(1.3, need // 4) - 1) % len(words)) + b". "
    arr = np.frombuffer(text, np.uint8, count=need).reshape(rows, GPT_T + 1)

    def col(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).ravel(), pa.uint8()), GPT_T)

    pq.write_table(pa.table({"input": col(arr[:, :-1]), "target": col(arr[:, 1:])}), path, row_group_size=row_group_rows)


def read_data(path: str, columns: dict[str, str]) -> dict[str, torch.Tensor]:
    """The whole file in memory, one tensor per batch key (a fixed-size list of n values is [N, n]), dtypes as stored."""
    table = pq.read_table(path, columns=list(columns.values()))
    out = {}
    for key, name in columns.items():
        a = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(a.type):
            v = a.flatten().to_numpy(zero_copy_only=False).reshape(len(a), a.type.list_size).copy()
        else:
            v = a.to_numpy(zero_copy_only=False).copy()
        out[key] = torch.from_numpy(v)
    return out


def epoch_plan(row_groups: list[int], *, rank: int, world: int, local_batch: int, epoch: int,
               buffer_rows: int = 65536) -> np.ndarray:
    """Row ids [steps, local_batch] rank ``rank`` trains on in ``epoch``, in lepton_ray's order (one file).

    Written out independently of lepton_ray (checked against its WorkerStream by :func:`check_order`):
    row groups are the units (cut into equal pieces when fewer than max(16, 4 x world)); each epoch the
    units are permuted with (seed, epoch) and dealt round-robin; a rank's units are grouped into
    windows of >= ``buffer_rows`` rows, each window's rows permuted with (seed, epoch, rank, window);
    every rank takes the shortest share's number of whole batches.
    """
    offsets = np.concatenate([[0], np.cumsum(row_groups)])
    groups = [(g, n) for g, n in enumerate(row_groups) if n > 0]
    target = max(16, 4 * world)
    pieces = -(-target // len(groups)) if len(groups) < target else 1
    units = []
    for g, n in groups:
        cuts = np.linspace(0, n, min(pieces, n) + 1).astype(int)
        units += [(offsets[g] + a, offsets[g] + b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    order = np.random.default_rng([SEED, epoch]).permutation(len(units))
    shares = [[units[i] for i in order[r::world]] for r in range(world)]
    steps = min(sum(b - a for a, b in share) // local_batch for share in shares)
    rows, window, held = [], [], 0
    for a, b in shares[rank]:
        window.append(np.arange(a, b))
        held += b - a
        if held >= buffer_rows:
            rows.append(window)
            window, held = [], 0
    if window:
        rows.append(window)
    out = [np.concatenate(w)[np.random.default_rng([SEED, epoch, rank, i]).permutation(sum(map(len, w)))] for i, w in enumerate(rows)]
    return np.concatenate(out)[: steps * local_batch].reshape(steps, local_batch)


def batches(cols: dict[str, torch.Tensor], row_groups: list[int], global_batch: int, rank: int, world: int):
    """This rank's batches ({key: rows}), epoch after epoch, forever, in lepton_ray's order."""
    epoch = 0
    while True:
        for idx in torch.from_numpy(epoch_plan(row_groups, rank=rank, world=world, local_batch=global_batch // world, epoch=epoch)):
            yield {k: v[idx] for k, v in cols.items()}
        epoch += 1


def check_order(data: str, columns: dict[str, str], data_cfg: dict[str, Any], global_batch: int, epochs: int = 2) -> None:
    """Fail loudly unless the baselines' batches are exactly lepton_ray's (WorkerStream, every rank, ``epochs`` epochs):
    the same keys, dtypes, shapes and rows. ``data_cfg``: lepton_ray's data section for the file, less ``train``."""
    from lepton_ray.config import DataConfig
    from lepton_ray.data.stream import WorkerStream
    from lepton_ray.data.table import describe

    cfg = DataConfig(train=data, **data_cfg)
    info = describe("data.train", data, cfg)
    cols = read_data(data, columns)
    row_groups = row_groups_of(data)
    for rank in range(WORLD):
        stream = WorkerStream(info, cfg, rank=rank, world_size=WORLD, local_batch=global_batch // WORLD, seed=SEED)
        for epoch in range(epochs):
            plan = epoch_plan(row_groups, rank=rank, world=WORLD, local_batch=global_batch // WORLD, epoch=epoch)
            got = list(stream.epoch(epoch))
            same = len(got) == len(plan) and all(
                b.keys() == cols.keys() and all(b[k].dtype == v.dtype and torch.equal(b[k], v[idx]) for k, v in cols.items())
                for b, idx in zip(got, torch.from_numpy(plan)))
            if not same:
                raise SystemExit(f"benchmark out of date: the baselines' batches of {Path(data).name} differ from lepton_ray's "
                                 f"WorkerStream (rank {rank}, epoch {epoch}); update epoch_plan() or read_data() in {__file__} "
                                 f"to lepton_ray's current data order and batch layout")
        stream.close()


def row_groups_of(data: str) -> list[int]:
    meta = pq.read_metadata(data)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


# --------------------------------------------------------------------------- the baselines' training loops


def build_mlp() -> nn.Module:
    """The same layers, in the same order, with the same seed as lepton_ray's built-in ``mlp``."""
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    width = FEATURES
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


def train_steps(rank: int, world: int, data: str, steps: int, global_batch: int, stamp: str | None) -> list[float]:
    """The plain DDP MLP loop (plain DDP and the bare TorchTrainer); returns time.time() after every optimizer step."""
    torch.set_num_threads(1)
    cols = read_data(data, MLP_COLUMNS)
    row_groups = row_groups_of(data)
    model = build_mlp()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ddp.train()
    times: list[float] = []
    for step, b in zip(range(steps), batches(cols, row_groups, global_batch, rank, world)):
        loss = F.cross_entropy(ddp(b["x"]), b["label"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time())
        if step == 0 and stamp and rank == 0:
            Path(stamp).write_text(repr(times[0]))
    return times


def gpt_train_steps(rank: int, world: int, data: str, steps: int, global_batch: int, kind: str) -> tuple[list[float], list[float]]:
    """The plain gpt loops, ``kind`` "ddp" (DistributedDataParallel with its defaults) or "fsdp" (FSDP2: ``fully_shard``
    each Block, then the root, ``reshard_after_forward=True``); fp32, fused AdamW, constant lr, no clipping.
    Returns (time.time() after every optimizer step, every step's loss averaged over the ranks, gathered after timing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lepton_ray.models.gpt import GPT

    torch.set_num_threads(1)
    cols = read_data(data, GPT_COLUMNS)
    row_groups = row_groups_of(data)
    torch.manual_seed(SEED)
    if kind == "ddp":
        model = GPT(GPT_T, GPT_VOCAB, **GPT_SHAPE)
        net: nn.Module = DistributedDataParallel(model)
    elif kind == "fsdp":
        with torch.device("meta"):
            model = GPT(GPT_T, GPT_VOCAB, **GPT_SHAPE)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        model.to_empty(device="cpu")
        torch.manual_seed(SEED + rank)  # each rank draws its own shards
        with warnings.catch_warnings():  # "DTensor random operators may not have complete support on cpu device mesh"
            warnings.filterwarnings("ignore", message="DTensor random operators")
            model.init_weights()
        net = model
    else:
        raise ValueError(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=GPT_LR, weight_decay=GPT_WEIGHT_DECAY, fused=True)
    net.train()
    times: list[float] = []
    losses: list[torch.Tensor] = []
    for _, b in zip(range(steps), batches(cols, row_groups, global_batch, rank, world)):
        logits = net(b["tokens"])
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), b["next"].view(-1).long())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time())
        losses.append(loss.detach())
    mean = torch.stack(losses)
    dist.all_reduce(mean)  # after the timed steps
    return times, (mean / world).tolist()


# --------------------------------------------------------------------------- measuring


def _cpu_busy(interval: float = 1.0) -> float:
    """Fraction of the machine's CPU time spent busy over ``interval`` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    (t0, i0) = sample()
    time.sleep(interval)
    (t1, i1) = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def settle(limit_s: float = 20.0) -> float:
    """Wait until the previous run's processes are gone (every Ray CPU free, the machine < 15 % busy over 1 s),
    at most ``limit_s``; returns the seconds waited. Without it, a side that starts right after a Ray Train
    run shares the cores with that run's teardown, and which side does depends on the order."""
    import ray

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        free = ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0)
        if free and _cpu_busy() < 0.15:
            break
    return time.monotonic() - t0


def steady_rate(points: list[tuple[int, float]], warmup: int, global_batch: int) -> float:
    """samples/s between the first point at step >= warmup and the last point."""
    pts = sorted(p for p in points if p[0] >= warmup)
    (s0, t0), (s1, t1) = pts[0], pts[-1]
    if s1 <= s0 or t1 <= t0:
        raise RuntimeError(f"too few steps after warm-up ({pts[:1]} .. {pts[-1:]}); raise --steps")
    return (s1 - s0) * global_batch / (t1 - t0)


def median_step_rate(points: list[tuple[int, float]], warmup: int, global_batch: int) -> float:
    """samples/s from the median step time after warm-up: robust to other processes' bursts on a shared machine."""
    pts = sorted(p for p in points if p[0] >= warmup)
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:]) if s1 > s0]
    return global_batch / statistics.median(per_step)


# --------------------------------------------------------------------------- plain PyTorch (torch.multiprocessing)


def _plain_worker(rank: int, world: int, port: int, kind: str, data: str, steps: int, global_batch: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if kind == "mlp":
            times, losses = train_steps(rank, world, data, steps, global_batch, None), []
        else:  # "gpt_ddp" | "gpt_fsdp"
            times, losses = gpt_train_steps(rank, world, data, steps, global_batch, kind.removeprefix("gpt_"))
        if rank == 0:
            Path(out).write_text(json.dumps({"times": times, "losses": losses}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plain(kind: str, data: str, steps: int, global_batch: int, warmup: int, tmp: Path) -> dict[str, Any]:
    """One plain run (``kind``: "mlp", "gpt_ddp" or "gpt_fsdp"): steady and median-step samples/s, per-step losses."""
    out = tmp / f"plain_{kind}_{time.monotonic_ns()}.json"
    mp.spawn(_plain_worker, args=(WORLD, _free_port(), kind, data, steps, global_batch, str(out)), nprocs=WORLD, join=True)
    got = json.loads(out.read_text())
    points = [(i + 1, t) for i, t in enumerate(got["times"])]
    return {"rate": steady_rate(points, warmup, global_batch), "rate_med": median_step_rate(points, warmup, global_batch),
            "losses": got["losses"]}


# --------------------------------------------------------------------------- bare Ray Train V2 TorchTrainer


def _bare_loop(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    times = train_steps(rank, world, config["data"], config["steps"], config["global_batch"], config["stamp"])
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(times))


def run_bare(data: str, steps: int, global_batch: int, warmup: int, tmp: Path) -> tuple[float, float | None]:
    """(time to first step, steady samples/s or None when too few steps)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tag = f"bare_{time.monotonic_ns()}"
    stamp, out = tmp / f"{tag}.stamp", tmp / f"{tag}.json"
    cfg = {"data": data, "steps": steps, "global_batch": global_batch, "stamp": str(stamp), "out": str(out)}
    t0 = time.time()
    TorchTrainer(
        _bare_loop,
        train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=tag, storage_path=str(tmp / "ray_bare")),
    ).fit()
    ttfs = float(stamp.read_text()) - t0
    times = json.loads(out.read_text())
    rate = steady_rate([(i + 1, t) for i, t in enumerate(times)], warmup, global_batch) if steps > warmup + 1 else None
    return ttfs, rate


# --------------------------------------------------------------------------- lepton_ray


def mlp_config(data: str, steps: int, global_batch: int) -> dict[str, Any]:
    return {
        "model": {"name": "mlp", "hidden": HIDDEN},
        "data": {"train": data, **MLP_DATA},
        "train": {"max_steps": steps, "batch_size": global_batch, "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM,
                  "schedule": "constant", "precision": "fp32", "seed": SEED},
    }


def gpt_config(data: str, steps: int, global_batch: int) -> dict[str, Any]:
    return {
        "model": {"name": "gpt", "kwargs": {**GPT_SHAPE, "dropout": 0.0, "vocab_size": GPT_VOCAB}, "loss": "cross_entropy"},
        "data": {"train": data, **GPT_DATA},
        "train": {"max_steps": steps, "batch_size": global_batch, "optimizer": "adamw", "lr": GPT_LR,
                  "weight_decay": GPT_WEIGHT_DECAY, "schedule": "constant", "precision": "fp32", "seed": SEED},
    }


def run_lepton(base: dict[str, Any], sync: dict[str, Any], name: str, global_batch: int, warmup: int, tmp: Path) -> dict[str, Any]:
    """One ``Trainer(config).fit()`` of ``base`` (model, data, train) with ``sync``, 2 workers x 1 CPU, no checkpoints."""
    import lepton_ray

    config = {
        **base,
        "scaling": {"num_workers": WORLD, "cpus_per_worker": 1},
        "sync": sync,
        "checkpoint": {"every_n_steps": 0, "keep_last": 1},
        "run": {"name": name, "dir": str(tmp / "lepton_runs")},
    }
    t0 = time.time()
    result = lepton_ray.Trainer(config, progress=False).fit()
    first = next(r for r in result.records if r.get("event") == "first_step")
    start = next(r for r in result.records if r.get("event") == "start")
    steps = [r for r in result.records if "samples_per_s" in r and "time" in r]
    points = [(r["step"], r["time"]) for r in steps]
    return {
        "ttfs": first["time"] - t0,
        "ttfs_own": result.metrics["time_to_first_step_s"],
        "rate": steady_rate(points, warmup, global_batch),
        "rate_med": median_step_rate(points, warmup, global_batch),
        "data_wait": statistics.fmean(r.get("data_wait_frac", 0.0) for r in steps if r["step"] > warmup),
        "rate_first_to_last": result.metrics["samples_per_s"],
        "transport": start.get("allreduce_transport", "?"),
        "start": start,
        "first_loss": next((r["train_loss"] for r in steps if r["step"] == 1 and "train_loss" in r), float("nan")),
    }


# --------------------------------------------------------------------------- fresh drivers on a running cluster


def _driver(side: str, data: str, steps: int, global_batch: int, out: str) -> None:
    """``--driver SIDE``: one fresh driver process on the cluster in ``RAY_ADDRESS``: the first ``fit()`` of ``side``
    (``lepton`` or ``bare``) with ``max_failures: 1``; writes its time from the ``fit()`` call to the first step."""
    if side == "bare":
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="error")
        stamp = Path(out).with_suffix(".stamp")
        cfg = {"data": data, "steps": steps, "global_batch": global_batch, "stamp": str(stamp), "out": str(Path(out).with_suffix(".times"))}
        t0 = time.time()
        TorchTrainer(_bare_loop, train_loop_config=cfg,
                     scaling_config=ray.train.ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 1}),
                     run_config=ray.train.RunConfig(name=f"bare_{time.time_ns()}", storage_path=str(Path(out).parent / "ray_bare"),
                                                    failure_config=ray.train.FailureConfig(max_failures=1))).fit()
        Path(out).write_text(json.dumps({"ttfs": float(stamp.read_text()) - t0}))
        return
    import lepton_ray

    config = {**mlp_config(data, steps, global_batch), "scaling": {"num_workers": WORLD, "cpus_per_worker": 1, "max_failures": 1},
              "checkpoint": {"every_n_steps": 0, "keep_last": 1}, "run": {"name": "fresh", "dir": str(Path(out).parent / "lepton_runs")}}
    result = lepton_ray.Trainer(config, progress=False).fit(keep_warm=side == "twice")
    start = next(r for r in result.records if r.get("event") == "start")
    got = {"ttfs": result.metrics["time_to_first_step_s"], "phases": start["phases_s"]}
    if side == "twice":  # a second fit() in the same process, as a notebook or a script over configs makes it
        second = lepton_ray.Trainer({**config, "run": {**config["run"], "name": "second"}}, progress=False).fit(keep_warm=True)
        got["second_ttfs"] = second.metrics["time_to_first_step_s"]
    Path(out).write_text(json.dumps(got))


def _start_cluster(tmp: Path, env: dict[str, str]) -> tuple[Any, str]:
    """``ray start --head --block`` (4 logical CPUs, token authentication on) in its own process group; (process, address)."""
    port = _free_port()
    log = tmp / "head.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", "--head", f"--port={port}",
                                 "--num-cpus=4", f"--temp-dir={tmp / 'ray'}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}"],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_cluster(proc)
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


def _stop_cluster(proc: Any) -> None:
    """Stop the cluster by its process group (nobody else's Ray), killing what is left after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(cmd: list[str], env: dict[str, str], cwd: Any = None) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def _quiet(limit_s: float = 20.0) -> float:
    """Wait (at most ``limit_s``) until the machine is < 15 % busy over 1 s; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s and _cpu_busy() >= 0.15:
        pass
    return time.monotonic() - t0


def bench_start(args: argparse.Namespace, tmp: Path, data: str) -> tuple[list[tuple], list[str], list[float]]:
    """Part ``start``: the first ``fit()`` of a fresh driver process, lepton_ray against a bare Ray Train V2 TorchTrainer,
    both on one already-running cluster (``ray start --head``, token authentication on), alternating; one driver that
    calls ``fit(keep_warm=True)`` twice (the second in the warm group the first left); then the README's main job as a
    whole process (``lepton-ray train examples/digits.yaml``, its own local Ray), after one untimed run."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    proc, address = _start_cluster(tmp, env)
    runs: dict[str, list[dict[str, Any]]] = {"lepton": [], "bare": []}
    settled: list[float] = []

    def drive(side: str, name: str) -> dict[str, Any]:
        """One fresh driver process of ``side`` on the cluster, after the machine settled; what it wrote, and its wall time."""
        settled.append(_quiet())
        out, t0 = tmp / f"driver_{name}.json", time.monotonic()
        _run([sys.executable, __file__, "--driver", side, "--driver-data", data, "--driver-out", str(out),
              "--steps", str(args.start_steps), "--batch-size", str(args.batch_size)], env={**env, "RAY_ADDRESS": address})
        return {**json.loads(out.read_text()), "wall": time.monotonic() - t0}

    try:
        for rep in range(args.repeats):
            for side in (["lepton", "bare"] if rep % 2 == 0 else ["bare", "lepton"]):
                runs[side].append(drive(side, f"{side}_{rep}"))
                print(f"  [{rep}] fresh driver, {side:<6}: first step {runs[side][-1]['ttfs']:6.2f}s after fit()"
                      f" (process {runs[side][-1]['wall']:.1f}s)", flush=True)
        twice = drive("twice", "twice")
        print(f"  one driver, two fit(keep_warm=True): first step {twice['ttfs']:.2f}s, then {twice['second_ttfs']:.2f}s after fit()",
              flush=True)
    finally:
        _stop_cluster(proc)

    import lepton_ray  # its repository: examples/digits.yaml, and the code every process of the main job imports

    main: list[float] = []
    local_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for i in range(args.main_runs + 1):  # the first untimed: it builds examples/digits.yaml's data and warms the page cache
        settled.append(_quiet())
        t0 = time.monotonic()
        _run([str(Path(sys.executable).parent / "lepton-ray"), "train", "examples/digits.yaml", "--no-progress",
              "--set", f"run.dir={tmp / 'main_runs'}"], env=local_env, cwd=Path(lepton_ray.__file__).resolve().parent.parent)
        if i:
            main.append(time.monotonic() - t0)
            print(f"  [{i - 1}] lepton-ray train examples/digits.yaml: {main[-1]:.1f}s", flush=True)

    med = statistics.median
    lep, bare = med(r["ttfs"] for r in runs["lepton"]), med(r["ttfs"] for r in runs["bare"])
    phases = {k: med(r["phases"][k] for r in runs["lepton"]) for k in runs["lepton"][0]["phases"]}
    rows = [("fresh driver first step s (vs bare Ray)", lep, bare, "<=", FRESH_DRIVER_BAR, "{:.2f}", "s", "bare Ray TorchTrainer"),
            ("second fit() first step s (vs the 2 s bar)", twice["second_ttfs"], SECOND_FIT_BAR_S, "<=", 1.0, "{:.2f}", "s",
             "the 2 s bar"),
            ("main job s (vs the 15 s bar)", med(main), MAIN_JOB_BAR_S, "<=", 1.0, "{:.1f}", "s", "the 15 s bar")]
    info = [f"start: fresh driver processes on one running cluster, MLP, {args.start_steps} steps, max_failures 1;"
            f" lepton_ray's phases (median s after fit()): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items(), key=lambda kv: kv[1])),
            f"  runs: lepton {[round(r['ttfs'], 2) for r in runs['lepton']]} s, bare {[round(r['ttfs'], 2) for r in runs['bare']]} s;"
            f" main job {[round(t, 1) for t in main]} s"]
    return rows, info, settled


# --------------------------------------------------------------------------- the parts


def _alternate(order: list[str], repeats: int):
    """(repeat, side) in alternating order, flipped every repeat, each after :func:`settle`."""
    settled: list[float] = []
    for rep in range(repeats):
        for side in (order if rep % 2 == 0 else order[::-1]):
            settled.append(settle())
            yield rep, side, settled


def prepare(part: str, args: argparse.Namespace, tmp: Path) -> str:
    """Write ``part``'s data set and check that the baselines' batches are exactly lepton_ray's; returns its path."""
    data = str(tmp / f"{part}.parquet")
    if part == "mlp":
        write_mlp_data(Path(data), args.rows, args.row_group_rows)
        check_order(data, MLP_COLUMNS, MLP_DATA, args.batch_size)
    else:
        write_gpt_data(Path(data), args.gpt_rows, args.row_group_rows)
        check_order(data, GPT_COLUMNS, GPT_DATA, args.gpt_batch_size)
    return data


def bench_mlp(args: argparse.Namespace, tmp: Path, data: str) -> tuple[list[tuple], list[str], list[float]]:
    """The MLP part on ``data`` (from :func:`prepare`): (table rows, info lines, settle times)."""
    row_groups = row_groups_of(data)
    bare_steps = args.bare_steps if args.bare_steps is not None else args.steps
    print("MLP: warming the driver with one untimed bare TorchTrainer run", flush=True)
    run_bare(data, 2, args.batch_size, args.warmup, tmp)
    base = mlp_config(data, args.steps, args.batch_size)

    lep: list[dict[str, Any]] = []
    lep_gloo: list[dict[str, Any]] = []
    bare: list[tuple[float, float | None]] = []
    plain: list[dict[str, Any]] = []
    settled: list[float] = []
    for rep, side, settled in _alternate(["lepton", "lepton_gloo", "bare", "plain"], args.repeats):
        if side == "lepton":
            lep.append(run_lepton(base, {"strategy": "allreduce", "allreduce": {"cpu_transport": "auto"}}, f"bench{rep}_auto",
                                  args.batch_size, args.warmup, tmp))
            r = lep[-1]
            print(f"  [{rep}] lepton_ray : first step {r['ttfs']:6.2f}s  steady {r['rate']:8.1f} samples/s"
                  f"  (gradients via {r['transport']})", flush=True)
        elif side == "lepton_gloo":
            lep_gloo.append(run_lepton(base, {"strategy": "allreduce", "allreduce": {"cpu_transport": "gloo"}}, f"bench{rep}_gloo",
                                       args.batch_size, args.warmup, tmp))
            print(f"  [{rep}] lepton_ray, cpu_transport gloo: steady {lep_gloo[-1]['rate']:8.1f} samples/s", flush=True)
        elif side == "bare":
            bare.append(run_bare(data, bare_steps, args.batch_size, args.warmup, tmp))
            ttfs, rate = bare[-1]
            print(f"  [{rep}] bare Ray   : first step {ttfs:6.2f}s  steady {rate or float('nan'):8.1f} samples/s", flush=True)
        else:
            plain.append(run_plain("mlp", data, args.steps, args.batch_size, args.warmup, tmp))
            print(f"  [{rep}] plain DDP  :                     steady {plain[-1]['rate']:8.1f} samples/s", flush=True)

    med = statistics.median
    lep_rate, plain_rate = med(r["rate"] for r in lep), med(p["rate"] for p in plain)
    lep_med, plain_med = med(r["rate_med"] for r in lep), med(p["rate_med"] for p in plain)
    lep_ttfs, bare_ttfs = med(r["ttfs"] for r in lep), med(b[0] for b in bare)
    bare_rates = [b[1] for b in bare if b[1] is not None]
    rows = [("MLP samples/s (vs plain DDP)", lep_rate, plain_rate, ">=", THROUGHPUT_BAR, "{:.1f}", "samples/s", "plain DDP"),
            ("MLP first step s (vs bare Ray)", lep_ttfs, bare_ttfs, "<=", STARTUP_BAR, "{:.2f}", "s", "bare Ray TorchTrainer")]
    info = [f"MLP {FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES}, SGD, global batch {args.batch_size}, {args.steps} steps "
            f"(steady state = steps {args.warmup}..{args.steps}); data: {args.rows} rows in {len(row_groups)} Parquet row "
            f"group(s) of {max(row_groups)} rows at most",
            f"  lepton_ray's own time_to_first_step_s (from TorchTrainer.fit): {med(r['ttfs_own'] for r in lep):.2f}s;"
            f" its first-to-last samples_per_s: {med(r['rate_first_to_last'] for r in lep):.1f}"]
    gloo_rate = med(r["rate"] for r in lep_gloo)
    info.append(f"  gradients via {'/'.join(sorted({r['transport'] for r in lep}))} (sync.allreduce.cpu_transport: auto); with"
                f" cpu_transport: gloo, as DDP does (info): {gloo_rate:.1f} samples/s, ratio to plain DDP {gloo_rate / plain_rate:.3f}")
    if bare_rates:
        info.append(f"  bare Ray TorchTrainer steady samples/s (info): {med(bare_rates):.1f}"
                    f" (bare/plain {med(bare_rates) / plain_rate:.3f}, lepton/bare {lep_rate / med(bare_rates):.3f})")
    info += [f"  lepton_ray's loop waited for data {100 * med(r['data_wait'] for r in lep):.1f}% of the steady-state time (data_wait_frac)",
             f"  from the median step time instead (robust to other load): lepton {lep_med:.1f}, plain {plain_med:.1f},"
             f" ratio {lep_med / plain_med:.3f}",
             f"  runs: lepton {[round(r['rate'], 1) for r in lep]}, lepton gloo {[round(r['rate'], 1) for r in lep_gloo]},"
             f" plain {[round(p['rate'], 1) for p in plain]} samples/s;"
             f" first step lepton {[round(r['ttfs'], 2) for r in lep]} s, bare {[round(b[0], 2) for b in bare]} s"]
    return rows, info, settled


def bench_gpt(args: argparse.Namespace, tmp: Path, data: str) -> tuple[list[tuple], list[str], list[float]]:
    """The gpt part on ``data`` (from :func:`prepare`): (table rows, info lines, settle times)."""
    row_groups = row_groups_of(data)
    base = gpt_config(data, args.gpt_steps, args.gpt_batch_size)
    steps, batch, warmup = args.gpt_steps, args.gpt_batch_size, args.gpt_warmup
    sync = {"lepton_ddp": {"strategy": "allreduce"}, "lepton_fsdp": {"strategy": "fsdp", "fsdp": {"reshard_after_forward": True}}}
    label = {"lepton_ddp": "lepton_ray allreduce", "plain_ddp": "plain DDP", "lepton_fsdp": "lepton_ray fsdp", "plain_fsdp": "plain FSDP2"}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in label}
    settled: list[float] = []
    for rep, side, settled in _alternate(list(label), args.repeats):
        if side.startswith("lepton"):
            r = run_lepton(base, sync[side], f"gpt{rep}_{side}", batch, warmup, tmp)
        else:
            r = run_plain(side.replace("plain", "gpt"), data, steps, batch, warmup, tmp)
            r["first_loss"] = r["losses"][0]
        runs[side].append(r)
        how = f"  (gradients via {r['transport']})" if side == "lepton_ddp" else ""
        how = f"  ({r['start'].get('fsdp_units', '?')} FSDP units + root)" if side == "lepton_fsdp" else how
        print(f"  [{rep}] gpt {label[side]:<21}: steady {r['rate'] * GPT_T:9.0f} tokens/s, first-step loss {r['first_loss']:.4f}{how}",
              flush=True)

    med = statistics.median
    tok = {side: med(r["rate"] for r in rs) * GPT_T for side, rs in runs.items()}
    tok_med = {side: med(r["rate_med"] for r in rs) * GPT_T for side, rs in runs.items()}
    loss1 = {side: med(r["first_loss"] for r in rs) for side, rs in runs.items()}
    rows = [("gpt tokens/s allreduce (vs plain DDP)", tok["lepton_ddp"], tok["plain_ddp"], ">=", THROUGHPUT_BAR, "{:.0f}",
             "tokens/s", "plain DDP"),
            ("gpt tokens/s fsdp (vs plain FSDP2)", tok["lepton_fsdp"], tok["plain_fsdp"], ">=", THROUGHPUT_BAR, "{:.0f}",
             "tokens/s", "plain FSDP2")]
    units = sorted({r["start"].get("fsdp_units", "?") for r in runs["lepton_fsdp"]}, key=str)
    info = [f"gpt {GPT_SHAPE['n_layer']}x{GPT_SHAPE['n_head']}x{GPT_SHAPE['n_embd']} (T {GPT_T}, vocab {GPT_VOCAB}), fused AdamW,"
            f" global batch {batch} rows = {batch * GPT_T} tokens, {steps} steps (steady state = steps {warmup}..{steps});"
            f" data: {args.gpt_rows} rows in {len(row_groups)} Parquet row group(s) of {max(row_groups)} rows at most",
            f"  lepton_ray allreduce gradients via {'/'.join(sorted({r['transport'] for r in runs['lepton_ddp']}))};"
            f" fsdp units {units} + the root (the plain FSDP2 shards the {GPT_SHAPE['n_layer']} Blocks + the root)",
            f"  first-step loss (mean over ranks): lepton allreduce {loss1['lepton_ddp']:.5f}, plain DDP {loss1['plain_ddp']:.5f}"
            f" (same weights and batches: equal up to rounding); lepton fsdp {loss1['lepton_fsdp']:.5f}, plain FSDP2"
            f" {loss1['plain_fsdp']:.5f} (per-rank shard init: close, not equal)",
            f"  lepton_ray's loop waited for data {100 * med(r['data_wait'] for r in runs['lepton_ddp']):.1f}% (allreduce),"
            f" {100 * med(r['data_wait'] for r in runs['lepton_fsdp']):.1f}% (fsdp) of the steady-state time",
            f"  from the median step time instead (robust to other load): allreduce {tok_med['lepton_ddp']:.0f} vs DDP"
            f" {tok_med['plain_ddp']:.0f} (ratio {tok_med['lepton_ddp'] / tok_med['plain_ddp']:.3f}); fsdp {tok_med['lepton_fsdp']:.0f}"
            f" vs FSDP2 {tok_med['plain_fsdp']:.0f} (ratio {tok_med['lepton_fsdp'] / tok_med['plain_fsdp']:.3f}) tokens/s",
            "  runs (tokens/s): " + ", ".join(f"{label[s]} {[round(r['rate'] * GPT_T) for r in rs]}" for s, rs in runs.items())]
    if abs(loss1["lepton_ddp"] - loss1["plain_ddp"]) > 1e-3:
        info.append("  WARNING: lepton allreduce's and plain DDP's first-step losses differ: the two sides do not train the same"
                    " model on the same batches; the comparison is not like for like")
    return rows, info, settled


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="mlp,gpt", help="comma-separated parts to run: mlp, gpt (default both)")
    ap.add_argument("--steps", type=int, default=300, help="MLP: optimizer steps per throughput run (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="MLP: steps excluded from steady state (default 20)")
    ap.add_argument("--batch-size", type=int, default=256, help="MLP: global batch (default 256)")
    ap.add_argument("--rows", type=int, default=16384, help="MLP: rows of synthetic training data (default 16384)")
    ap.add_argument("--bare-steps", type=int, default=None,
                    help="MLP: steps of each bare TorchTrainer run (default: --steps, which also gives its throughput)")
    ap.add_argument("--gpt-steps", type=int, default=120, help="gpt: optimizer steps per throughput run (default 120)")
    ap.add_argument("--gpt-warmup", type=int, default=20, help="gpt: steps excluded from steady state (default 20)")
    ap.add_argument("--gpt-batch-size", type=int, default=32, help=f"gpt: global batch in rows of {GPT_T} tokens (default 32)")
    ap.add_argument("--gpt-rows", type=int, default=8192, help=f"gpt: rows of {GPT_T + 1} bytes of synthetic text (default 8192)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per side, alternating; medians are reported (default 5)")
    ap.add_argument("--row-group-rows", type=int, default=None,
                    help="Parquet row-group size of the data files (default: pyarrow's, i.e. one row group at these sizes)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="first wait up to S seconds for the 1-min load average to fall below 0.3 (shared machines)")
    ap.add_argument("--start-steps", type=int, default=20, help="start: steps of each fresh driver's run (default 20)")
    ap.add_argument("--main-runs", type=int, default=3,
                    help="start: timed runs of the main job (lepton-ray train examples/digits.yaml), after one untimed (default 3)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    ap.add_argument("--driver", choices=["lepton", "bare", "twice"], help=argparse.SUPPRESS)  # one fresh driver of the start part
    ap.add_argument("--driver-data", help=argparse.SUPPRESS)
    ap.add_argument("--driver-out", help=argparse.SUPPRESS)
    return ap


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The parts ``args`` asks for; exits through ``ap.error`` on arguments that cannot work."""
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"mlp", "gpt", "start"}:
        ap.error(f"--parts: a comma-separated subset of mlp, gpt, start; got {args.parts!r}")
    if "mlp" in parts or "start" in parts:
        if args.steps <= args.warmup + 1:
            ap.error(f"--steps must exceed --warmup + 1 ({args.warmup + 1})")
        if args.batch_size % WORLD or args.batch_size > args.rows:
            ap.error(f"--batch-size must be divisible by {WORLD} and <= --rows")
    if "gpt" in parts:
        if args.gpt_steps <= args.gpt_warmup + 1:
            ap.error(f"--gpt-steps must exceed --gpt-warmup + 1 ({args.gpt_warmup + 1})")
        if args.gpt_batch_size % WORLD or args.gpt_batch_size > args.gpt_rows:
            ap.error(f"--gpt-batch-size must be divisible by {WORLD} and <= --gpt-rows")
    return parts


def measure(args: argparse.Namespace, parts: list[str]) -> tuple[list[tuple], list[str], list[float], float, float]:
    """Run ``parts``: (table rows, info lines, settle times, start time (monotonic), 1-min load average at start)."""
    import ray

    deadline = time.monotonic() + args.wait_idle
    while os.getloadavg()[0] >= 0.3 and time.monotonic() < deadline:
        time.sleep(5)
    wall0, load0 = time.monotonic(), os.getloadavg()[0]
    if load0 > 0.5:
        print(f"warning: 1-min load average is {load0:.2f} before the benchmark starts; figures will be noisy", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="lepton_bench_"))
    rows: list[tuple] = []
    info: list[str] = []
    settled: list[float] = []
    try:
        data = {part: prepare("mlp" if part == "start" else part, args, tmp) for part in parts}  # every data set checked first
        if "start" in parts:  # fresh drivers on a cluster of its own, before this process starts a Ray
            r, i, s = bench_start(args, tmp, data["start"])
            rows, info, settled = rows + r, info + i, settled + s
        if set(parts) - {"start"}:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # "local": never join a cluster someone else started
            print(f"ray up ({time.monotonic() - wall0:.1f}s)", flush=True)
        for part in [p for p in parts if p != "start"]:
            r, i, s = (bench_mlp if part == "mlp" else bench_gpt)(args, tmp, data[part])
            rows, info, settled = rows + r, info + i, settled + s
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return rows, info, settled, wall0, load0


def bench_rows(argv: list[str]) -> list:
    """The suite's entry point: this script run with ``argv``, its table as :class:`benchmarks.rows.Row` s."""
    from benchmarks.rows import row

    ap = _parser()
    args = ap.parse_args(argv)
    table, info, _, _, _ = measure(args, _check(ap, args))
    for line in info:
        print(line)
    out = []
    for name, lep, baseline, cmp, bar, _fmt, unit, base_name in table:
        fixed = base_name.startswith("the ")  # a fixed bar, not a measured baseline: the bar is on the figure itself
        out.append(row("train_overhead", name.split(" (vs ")[0], lep, unit, None if fixed else base_name,
                       None if fixed else baseline, bar=f"{cmp} {baseline * bar if fixed else bar:g}",
                       bar_on="figure" if fixed else "ratio"))
    return out


def main() -> int:
    ap = _parser()
    args = ap.parse_args()
    if args.driver:
        _driver(args.driver, args.driver_data, args.steps, args.batch_size, args.driver_out)
        return 0
    rows, info, settled, wall0, load0 = measure(args, _check(ap, args))
    print()
    print(f"{WORLD} workers x 1 CPU thread, fp32, median of {args.repeats} alternating run(s) per side")
    print(f"{'measure':<40}{'lepton_ray':>12}{'baseline':>12}{'ratio':>8}{'bar':>9}  result")
    ok = True
    for name, lep, baseline, cmp, bar, fmt, *_ in rows:
        ratio = lep / baseline
        passed = ratio >= bar if cmp == ">=" else ratio <= bar
        ok = ok and passed
        print(f"{name:<40}{fmt.format(lep):>12}{fmt.format(baseline):>12}{ratio:>8.3f}{cmp + ' ' + str(bar):>9}  {'PASS' if passed else 'FAIL'}")
    for line in info:
        print(line)
    print(f"before each run the machine settled (previous run's processes gone, < 15 % busy) for {statistics.fmean(settled):.1f}s"
          f" on average, {max(settled):.1f}s at most (limit 20 s)")
    print(f"total wall time {time.monotonic() - wall0:.1f}s; 1-min load average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}"
          " (this machine has {} cores: a start value well above 0 means other processes shared them)".format(os.cpu_count()))
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
