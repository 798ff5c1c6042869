#!/usr/bin/env python
"""How much lepton_ray costs on top of what it wraps: training throughput and startup.

Everything is measured in ONE run of this script, on the same synthetic data (a
seeded Parquet file in a temporary directory) and the same model: an MLP
512 -> 2048 -> 1024 -> 10 (3.16 M parameters), fp32, SGD (momentum 0.9, constant
lr), 2 workers with 1 CPU thread each, the same global batch, and the same
per-step batches: the baselines hold the data in memory and index each step's
rows in lepton_ray's data order (seeded per-epoch deal of row-group units,
shuffle-buffer windows; see ``epoch_plan``), which the script checks batch for
batch against ``lepton_ray.data.WorkerStream`` before timing anything. lepton_ray
streams the same rows from the Parquet file, as it always does.

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

Ray is started once (``ray.init(num_cpus=4)``), so both sides pay the same
cluster start (i.e. none). Before every run the script waits until the previous
run's processes are gone (``settle``), so no side starts during another's
teardown. Every measurement is repeated ``--repeats`` times, the sides
alternating (and the order flipping every repeat), and the median is reported. An untimed bare TorchTrainer run first warms the driver's lazy imports.
The bare TorchTrainer's steady-state throughput is printed too (for information:
it separates what Ray Train costs from what lepton_ray adds).

    .venv/bin/python benchmarks/train_overhead.py [--steps 300] [--batch-size 256] [--repeats 5]

On this 2-core machine a single run's samples/s varies by +-5 % from run to run (plain
DDP alone ranged 6225..6880 in one invocation), so the defaults are 300 steps and 5
alternating repeats (12-13 minutes measured); fewer repeats give a ratio that is mostly noise.

Exit status 0 whether or not the bars are met (the table says PASS/FAIL);
``--strict`` makes a missed bar exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
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


# --------------------------------------------------------------------------- shared by the baselines


def write_data(path: Path, rows: int, row_group_rows: int | None) -> None:
    """Seeded synthetic classification data: one fixed-size-list feature column + int64 labels."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    w = rng.standard_normal((FEATURES, CLASSES), dtype=np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
    pq.write_table(pa.table({"x": col, "label": y}), path, row_group_size=row_group_rows)


def read_data(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(path, columns=["x", "label"])
    x = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, FEATURES).copy()
    y = table.column("label").to_numpy().copy()
    return torch.from_numpy(x), torch.from_numpy(y)


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


def batches(x: torch.Tensor, y: torch.Tensor, row_groups: list[int], global_batch: int, rank: int, world: int):
    """This rank's batches, epoch after epoch, forever, in lepton_ray's order."""
    epoch = 0
    while True:
        for idx in torch.from_numpy(epoch_plan(row_groups, rank=rank, world=world, local_batch=global_batch // world, epoch=epoch)):
            yield x[idx], y[idx]
        epoch += 1


def check_order(data: str, global_batch: int, epochs: int = 2) -> None:
    """Fail loudly unless the baselines' batches are exactly lepton_ray's (WorkerStream, every rank, ``epochs`` epochs)."""
    import lepton_ray.data.pipeline as P
    from lepton_ray.config import DataConfig

    cfg = DataConfig(train=data, label="label")
    info = P.describe("data.train", data, cfg)
    x, y = read_data(data)
    row_groups = row_groups_of(data)
    for rank in range(WORLD):
        stream = P.WorkerStream(info, cfg, rank=rank, world_size=WORLD, local_batch=global_batch // WORLD, seed=SEED)
        for epoch in range(epochs):
            plan = epoch_plan(row_groups, rank=rank, world=WORLD, local_batch=global_batch // WORLD, epoch=epoch)
            got = list(stream.epoch(epoch))
            same = len(got) == len(plan) and all(torch.equal(b["x"], x[idx]) and torch.equal(b["label"], y[idx]) for b, idx in zip(got, torch.from_numpy(plan)))
            if not same:
                raise SystemExit(f"benchmark out of date: the baselines' batches differ from lepton_ray's WorkerStream (rank {rank}, "
                                 f"epoch {epoch}); update epoch_plan() in {__file__} to lepton_ray's current data order")


def row_groups_of(data: str) -> list[int]:
    meta = pq.read_metadata(data)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def train_steps(rank: int, world: int, data: str, steps: int, global_batch: int, stamp: str | None) -> list[float]:
    """The plain DDP loop both baselines run; returns time.time() after every optimizer step."""
    torch.set_num_threads(1)
    x, y = read_data(data)
    row_groups = row_groups_of(data)
    model = build_mlp()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ddp.train()
    times: list[float] = []
    for step, (xb, yb) in zip(range(steps), batches(x, y, row_groups, global_batch, rank, world)):
        loss = F.cross_entropy(ddp(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time())
        if step == 0 and stamp and rank == 0:
            Path(stamp).write_text(repr(times[0]))
    return times


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


# --------------------------------------------------------------------------- plain DDP (torch.multiprocessing)


def _plain_worker(rank: int, world: int, port: int, data: str, steps: int, global_batch: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        times = train_steps(rank, world, data, steps, global_batch, None)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plain(data: str, steps: int, global_batch: int, warmup: int, tmp: Path) -> tuple[float, float]:
    out = tmp / f"plain_{time.monotonic_ns()}.json"
    mp.spawn(_plain_worker, args=(WORLD, _free_port(), data, steps, global_batch, str(out)), nprocs=WORLD, join=True)
    points = [(i + 1, t) for i, t in enumerate(json.loads(out.read_text()))]
    return steady_rate(points, warmup, global_batch), median_step_rate(points, warmup, global_batch)


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


def run_lepton(data: str, steps: int, global_batch: int, warmup: int, tmp: Path, n: int, transport: str = "auto") -> dict[str, Any]:
    import lepton_ray

    config = {
        "model": {"name": "mlp", "hidden": HIDDEN},
        "data": {"train": data, "label": "label"},
        "train": {"max_steps": steps, "batch_size": global_batch, "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM,
                  "schedule": "constant", "precision": "fp32", "seed": SEED},
        "scaling": {"num_workers": WORLD, "cpus_per_worker": 1},
        "sync": {"strategy": "allreduce", "allreduce": {"cpu_transport": transport}},
        "checkpoint": {"every_n_steps": 0, "keep_last": 1},
        "run": {"name": f"bench{n}_{transport}", "dir": str(tmp / "lepton_runs")},
    }
    t0 = time.time()
    result = lepton_ray.Trainer(config, progress=False).fit()
    first = next(r for r in result.records if r.get("event") == "first_step")
    start = next(r for r in result.records if r.get("event") == "start")
    points = [(r["step"], r["time"]) for r in result.records if "samples_per_s" in r and "time" in r]
    return {
        "ttfs": first["time"] - t0,
        "ttfs_own": result.metrics["time_to_first_step_s"],
        "rate": steady_rate(points, warmup, global_batch),
        "rate_med": median_step_rate(points, warmup, global_batch),
        "data_wait": statistics.fmean(r.get("data_wait_frac", 0.0) for r in result.records if "samples_per_s" in r and r["step"] > warmup),
        "rate_first_to_last": result.metrics["samples_per_s"],
        "transport": start.get("allreduce_transport", "?"),
    }


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per throughput run (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="steps excluded from steady state (default 20)")
    ap.add_argument("--batch-size", type=int, default=256, help="global batch (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per side, alternating; medians are reported (default 5)")
    ap.add_argument("--rows", type=int, default=16384, help="rows of synthetic training data (default 16384)")
    ap.add_argument("--row-group-rows", type=int, default=None,
                    help="Parquet row-group size of the data file (default: pyarrow's, i.e. one row group at this size)")
    ap.add_argument("--bare-steps", type=int, default=None,
                    help="steps of each bare TorchTrainer run (default: --steps, which also gives its throughput)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="first wait up to S seconds for the 1-min load average to fall below 0.3 (shared machines)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    args = ap.parse_args()
    if args.steps <= args.warmup + 1:
        ap.error(f"--steps must exceed --warmup + 1 ({args.warmup + 1})")
    if args.batch_size % WORLD or args.batch_size > args.rows:
        ap.error(f"--batch-size must be divisible by {WORLD} and <= --rows")
    bare_steps = args.bare_steps if args.bare_steps is not None else args.steps

    import ray

    deadline = time.monotonic() + args.wait_idle
    while os.getloadavg()[0] >= 0.3 and time.monotonic() < deadline:
        time.sleep(5)
    wall0, load0 = time.monotonic(), os.getloadavg()[0]
    if load0 > 0.5:
        print(f"warning: 1-min load average is {load0:.2f} before the benchmark starts; figures will be noisy", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="lepton_bench_"))
    try:
        data = str(tmp / "train.parquet")
        write_data(Path(data), args.rows, args.row_group_rows)
        check_order(data, args.batch_size)  # the baselines train on exactly lepton_ray's batches
        row_groups = row_groups_of(data)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # "local": never join a cluster someone else started
        print(f"ray up ({time.monotonic() - wall0:.1f}s); warming the driver with one untimed bare TorchTrainer run", flush=True)
        run_bare(data, 2, args.batch_size, args.warmup, tmp)

        lep: list[dict[str, Any]] = []
        lep_gloo: list[dict[str, Any]] = []
        settled: list[float] = []
        bare: list[tuple[float, float | None]] = []
        plain: list[tuple[float, float]] = []
        order = ["lepton", "lepton_gloo", "bare", "plain"]
        for rep in range(args.repeats):
            for side in (order if rep % 2 == 0 else order[::-1]):
                settled.append(settle())
                if side == "lepton":
                    lep.append(run_lepton(data, args.steps, args.batch_size, args.warmup, tmp, rep))
                    r = lep[-1]
                    print(f"  [{rep}] lepton_ray : first step {r['ttfs']:6.2f}s  steady {r['rate']:8.1f} samples/s"
                          f"  (gradients via {r['transport']})", flush=True)
                elif side == "lepton_gloo":
                    lep_gloo.append(run_lepton(data, args.steps, args.batch_size, args.warmup, tmp, rep, transport="gloo"))
                    r = lep_gloo[-1]
                    print(f"  [{rep}] lepton_ray, cpu_transport gloo: steady {r['rate']:8.1f} samples/s", flush=True)
                elif side == "bare":
                    bare.append(run_bare(data, bare_steps, args.batch_size, args.warmup, tmp))
                    ttfs, rate = bare[-1]
                    print(f"  [{rep}] bare Ray   : first step {ttfs:6.2f}s  steady {rate or float('nan'):8.1f} samples/s", flush=True)
                else:
                    plain.append(run_plain(data, args.steps, args.batch_size, args.warmup, tmp))
                    print(f"  [{rep}] plain DDP  :                     steady {plain[-1][0]:8.1f} samples/s", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    lep_rate, plain_rate = med(r["rate"] for r in lep), med(p[0] for p in plain)
    lep_med, plain_med = med(r["rate_med"] for r in lep), med(p[1] for p in plain)
    lep_ttfs, bare_ttfs = med(r["ttfs"] for r in lep), med(b[0] for b in bare)
    bare_rates = [b[1] for b in bare if b[1] is not None]
    tp_ratio, st_ratio = lep_rate / plain_rate, lep_ttfs / bare_ttfs
    tp_ok, st_ok = tp_ratio >= THROUGHPUT_BAR, st_ratio <= STARTUP_BAR

    print()
    print(f"MLP {FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES}, {WORLD} workers x 1 thread, global batch {args.batch_size}, "
          f"{args.steps} steps (steady state = steps {args.warmup}..{args.steps}), median of {args.repeats}")
    print(f"data: {args.rows} rows in {len(row_groups)} Parquet row group(s) of {max(row_groups)} rows at most")
    print(f"{'measure':<34}{'lepton_ray':>12}{'baseline':>12}{'ratio':>8}{'bar':>9}  result")
    print(f"{'steady samples/s (vs plain DDP)':<34}{lep_rate:>12.1f}{plain_rate:>12.1f}{tp_ratio:>8.3f}{'>= ' + str(THROUGHPUT_BAR):>9}  {'PASS' if tp_ok else 'FAIL'}")
    print(f"{'time to first step s (vs bare Ray)':<34}{lep_ttfs:>12.2f}{bare_ttfs:>12.2f}{st_ratio:>8.3f}{'<= ' + str(STARTUP_BAR):>9}  {'PASS' if st_ok else 'FAIL'}")
    print(f"  lepton_ray's own time_to_first_step_s (from TorchTrainer.fit): {med(r['ttfs_own'] for r in lep):.2f}s;"
          f" its first-to-last samples_per_s: {med(r['rate_first_to_last'] for r in lep):.1f}")
    gloo_rate = med(r["rate"] for r in lep_gloo)
    print(f"  gradients via {'/'.join(sorted({r['transport'] for r in lep}))} (sync.allreduce.cpu_transport: auto); with"
          f" cpu_transport: gloo, as DDP does (info): {gloo_rate:.1f} samples/s, ratio to plain DDP {gloo_rate / plain_rate:.3f}")
    if bare_rates:
        print(f"  bare Ray TorchTrainer steady samples/s (info): {med(bare_rates):.1f}"
              f" (bare/plain {med(bare_rates) / plain_rate:.3f}, lepton/bare {lep_rate / med(bare_rates):.3f})")
    print(f"  lepton_ray's loop waited for data {100 * med(r['data_wait'] for r in lep):.1f}% of the steady-state time (data_wait_frac)")
    print(f"  from the median step time instead (robust to other load): lepton {lep_med:.1f}, plain {plain_med:.1f},"
          f" ratio {lep_med / plain_med:.3f}")
    print(f"  runs: lepton {[round(r['rate'], 1) for r in lep]}, lepton gloo {[round(r['rate'], 1) for r in lep_gloo]}, plain {[round(p[0], 1) for p in plain]} samples/s;"
          f" first step lepton {[round(r['ttfs'], 2) for r in lep]} s, bare {[round(b[0], 2) for b in bare]} s")
    print(f"  before each run the machine settled (previous run's processes gone, < 15 % busy) for {statistics.fmean(settled):.1f}s"
          f" on average, {max(settled):.1f}s at most (limit 20 s)")
    print(f"total wall time {time.monotonic() - wall0:.1f}s; 1-min load average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}"
          " (this machine has {} cores: a start value well above 0 means other processes shared them)".format(os.cpu_count()))
    return 1 if args.strict and not (tp_ok and st_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
