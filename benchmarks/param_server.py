#!/usr/bin/env python
"""Parameter server vs all-reduce: throughput of ``ps`` / ``hybrid`` / ``ssp`` against their baselines.

Every pair is measured in ONE run of this script, on one local Ray instance
(``ray.init(num_cpus=4)``), 2 workers x 1 CPU thread, the same seeded data, the
same global batch and step count. Steady-state samples/s is taken from rank 0's
per-step records (``metrics.jsonl``) between step ``--warmup`` and the last step,
and also from the median step time (more robust on a shared machine).

1. Recommender, one 1M x 32 embedding table (8 categorical fields of 125,000 ids,
   Zipf-distributed, + 4 dense features -> MLP 64-32 -> click): ``hybrid`` (dense
   all-reduced, rows on 2 PS shards) and ``ps`` vs ``allreduce`` (DDP all-reduces
   the full 128 MB dense embedding gradient every step). Bar: hybrid (or ps) /
   allreduce >= 5.
2. Dense MLP 512-2048-1024-10 (3.16 M parameters): ``ps`` (mode sync, 2 shards)
   vs ``allreduce``. Bar: >= 0.7. ``allreduce`` runs with its defaults: its 2 workers
   on this one host average gradients through shared memory; the same ratio against
   ``cpu_transport: gloo`` (DDP's loopback TCP, the default before) is printed too.
3. Stragglers on digits (MLP 64, every worker "computes" ``--step-ms`` per batch,
   a slowed worker twice that, 4 epochs): ``ps`` mode ``ssp`` (staleness 4), with
   ``sync.ps.balance`` static and dynamic, vs mode ``sync``, for (a) rank 1 at half
   speed for the whole run and (b) a moving straggler (one worker at half speed at
   any time, the slow rank changing every 2 batches). Bar: ssp / sync >= 1.3 with
   the final eval accuracy within 1 point. samples/s counts every worker's rows.
   Expectation: with the static deal (a) stays near 1.0: every worker has an equal
   share and the bound lets the fast worker get at most ``s`` steps ahead, so both
   advance at the slow worker's pace, as in sync. The dynamic deal is
   work-conserving: the fast worker takes more pieces of the epoch and, held at the
   bound, adds a second batch to its push, so it trains on 2 batches per slow batch:
   ideally 3 batches per slow step against sync's 2, a ratio of 1.5. Bounded
   staleness alone absorbs *transient* stragglers: in (b) sync pays the slow step
   (2x) every step while with ssp each worker averages 1.5x, ideally 2 / 1.5 = 1.33.

    PYTHONPATH=. .venv/bin/python benchmarks/param_server.py [--parts rec,dense,straggler] [--steps 200]

Exit status 0 whether or not the bars are met (the table says PASS/FAIL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
WORLD = 2


def steady(result: Any, warmup: int, batch: int) -> tuple[float, float]:
    """(samples/s from first-to-last step after warm-up, samples/s from the median step time)."""
    pts = sorted((r["step"], r["time"]) for r in result.records if "samples_per_s" in r)
    pts = [p for p in pts if p[0] >= warmup]
    (s0, t0), (s1, t1) = pts[0], pts[-1]
    per_step = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(pts, pts[1:])]
    return (s1 - s0) * batch / (t1 - t0), batch / statistics.median(per_step)


def fit(config: dict, tmp: Path, name: str) -> Any:
    import lepton_ray

    config = {**config, "run": {"name": name, "dir": str(tmp / "runs")}, "checkpoint": {"every_n_steps": 0, "keep_last": 1}}
    config.setdefault("scaling", {"num_workers": WORLD, "cpus_per_worker": 1})
    t0 = time.monotonic()
    result = lepton_ray.Trainer(config, progress=False).fit()
    print(f"  {name:<28} done in {time.monotonic() - t0:6.1f}s", flush=True)
    return result


def part_recommender(tmp: Path, steps: int, warmup: int, batch: int) -> list[tuple]:
    from lepton_ray.data.builders import write_table
    from lepton_ray.data.synthetic import click_table

    data = tmp / "clicks.parquet"
    write_table(click_table(50_000, num_fields=8, vocab=125_000, num_dense=4), str(data))
    base = {
        "model": {"name": "recommender", "hidden": [64, 32],
                  "kwargs": {"num_embeddings": 1_000_000, "embedding_dim": 32}},
        "data": {"train": str(data), "inputs": {"ids": "ids", "dense": "dense"}, "targets": {"label": "label"}},
        "train": {"max_steps": steps, "batch_size": batch, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
    }
    rates = {}
    for strategy in ("allreduce", "hybrid", "ps"):
        r = fit({**base, "sync": {"strategy": strategy, "ps": {"num_shards": 2}}}, tmp, f"rec-{strategy}")
        rates[strategy] = steady(r, warmup, batch)
        recs = [x for x in r.records if "ps_bytes_pushed" in x and x["step"] >= warmup]
        if recs:
            print(f"    rank 0 per step: {statistics.mean(x['ps_bytes_pushed'] for x in recs) / 1e6:.2f} MB pushed, "
                  f"{statistics.mean(x['ps_bytes_pulled'] for x in recs) / 1e6:.2f} MB pulled, "
                  f"{statistics.mean(x['ps_wait_s'] for x in recs) * 1e3:.1f} ms waiting on the PS", flush=True)
    base_rate = rates["allreduce"]
    return [
        ("rec 1Mx32: hybrid / allreduce", rates["hybrid"], base_rate, 5.0),
        ("rec 1Mx32: ps / allreduce", rates["ps"], base_rate, 5.0),
    ]


def part_dense(tmp: Path, steps: int, warmup: int, batch: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 512), dtype=np.float32)
    y = (x @ rng.standard_normal((512, 10), dtype=np.float32)).argmax(1).astype(np.int64)
    data = tmp / "dense.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 512), "label": y}), data)
    base = {
        "model": {"name": "mlp", "hidden": [2048, 1024]},
        "data": {"train": str(data), "label": "label"},
        "train": {"max_steps": steps, "batch_size": batch, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"},
    }
    ar = steady(fit({**base, "sync": {"strategy": "allreduce"}}, tmp, "dense-allreduce"), warmup, batch)
    ps = steady(fit({**base, "sync": {"strategy": "ps", "ps": {"num_shards": 2, "mode": "sync"}}}, tmp, "dense-ps"), warmup, batch)
    # for information: allreduce with DDP's own gloo transport instead of the default shared memory (2 workers, 1 host)
    gloo = steady(fit({**base, "sync": {"strategy": "allreduce", "allreduce": {"cpu_transport": "gloo"}}}, tmp, "dense-allreduce-gloo"),
                  warmup, batch)
    return [("dense 3.2M: ps sync / allreduce", ps, ar, 0.7), ("  (info) ps sync / allreduce over gloo", ps, gloo, None)]


def part_straggler(tmp: Path, step_ms: float, epochs: int) -> list[tuple]:
    from lepton_ray.data.builders import digits

    train, ev = tmp / "digits" / "train.parquet", tmp / "digits" / "eval.parquet"
    digits(str(train), str(ev))
    batch = 64
    rows = []
    for pattern in ("rank1", "moving"):
        results = {}
        for mode, balance in (("sync", "static"), ("ssp", "static"), ("ssp", "dynamic")):
            cfg = {
                "model": {"factory": "ps_bench_models:straggler_mlp",
                          "kwargs": {"step_s": step_ms / 1000, "pattern": pattern, "phase": 2, "hidden": [64]}},
                "data": {"train": str(train), "eval": str(ev), "label": "label"},
                "train": {"epochs": epochs, "batch_size": batch, "lr": 0.1, "momentum": 0.9, "schedule": "cosine",
                          "eval_every_steps": 10_000},
                "sync": {"strategy": "ps", "ps": {"num_shards": 2, "mode": mode, "staleness": 4, "balance": balance}},
            }
            key = mode if balance == "static" else f"{mode}-{balance}"
            r = fit(cfg, tmp, f"straggler-{pattern}-{key}")
            results[key] = (r, r.metrics["samples_per_s"])
        acc = {m: results[m][0].metrics["eval_accuracy"] for m in results}
        for key in ("ssp", "ssp-dynamic"):
            res = results[key][0]
            gap = max(x.get("ps_max_gap", 0) for x in res.records)
            end = next(x for x in res.records if x.get("event") == "end")
            print(f"    {pattern} {key}: eval accuracy {acc[key]:.4f} (sync {acc['sync']:.4f}), max gap {gap},"
                  f" steps {end['step']}, wall {res.metrics.get('time_to_first_step_s') or 0:.1f}s to first step", flush=True)
            label = "ssp4" if key == "ssp" else "ssp4 dynamic deal"
            rows.append((f"straggler {pattern}: {label} / sync", (results[key][1],) * 2, (results["sync"][1],) * 2, 1.3,
                         abs(acc[key] - acc["sync"]) <= 0.01))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="rec,dense,straggler")
    p.add_argument("--steps", type=int, default=200,
                   help="steps per run (default 200; at 40 the dense ratio read 0.57 vs 0.74 at 200: start-up, not steady state)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--step-ms", type=float, default=30.0, help="artificial compute per step in the straggler part")
    p.add_argument("--epochs", type=int, default=4, help="digits epochs in the straggler part")
    return p


def measure(args: argparse.Namespace) -> tuple[list[tuple], float, float]:
    """Run the parts ``args`` asks for on one local Ray instance: (table rows, start time (monotonic), 1-min load at start)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")]))
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # the straggler model's factory (ps_bench_models) and lepton_ray, here too
    import ray

    load0 = os.getloadavg()[0]
    if load0 > 1.0:
        print(f"warning: 1-min load average is {load0:.2f} before the benchmark starts; figures will be noisy", flush=True)
    wall0 = time.monotonic()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        parts = args.parts.split(",")
        if "rec" in parts:
            rows += part_recommender(tmp, args.steps, args.warmup, args.batch_size)
        if "dense" in parts:
            rows += part_dense(tmp, args.steps, args.warmup, 256)
        if "straggler" in parts:
            rows += part_straggler(tmp, args.step_ms, args.epochs)
    ray.shutdown()
    return rows, wall0, load0


def bench_rows(argv: list[str]) -> list:
    """The suite's entry point: this script run with ``argv``, its table as rows (samples/s; the median-step ratio in
    ``extra``)."""
    from benchmarks.rows import row

    table, _, _ = measure(_parser().parse_args(argv))
    out = []
    for r in table:
        name, (a, a_med), (b, b_med), bar = r[:4]
        also = r[4] if len(r) > 4 else None
        name = name.strip().removeprefix("(info) ")
        out.append(row("param_server", name, a, "samples/s", name.rsplit(" / ", 1)[1], b, bar=None if bar is None else f">= {bar:g}",
                       also=also, note="" if also is None else "and eval accuracy within 1 point of sync",
                       extra={"ratio_median_step": a_med / b_med}))
    return out


def main() -> int:
    args = _parser().parse_args()
    rows, wall0, load0 = measure(args)
    print()
    print(f"{'measure':<36}{'samples/s':>11}{'baseline':>11}{'ratio':>8}{'(median)':>10}{'bar':>8}  result")
    for row in rows:
        name, (a, a_med), (b, b_med), bar = row[:4]
        extra_ok = row[4] if len(row) > 4 else True
        ratio, ratio_med = a / b, a_med / b_med
        ok = bar is None or (ratio >= bar and extra_ok)
        note = "" if extra_ok else " (accuracy differs by > 1 point)"
        verdict = "info" if bar is None else ("PASS" if ok else "FAIL")
        print(f"{name:<36}{a:>11.1f}{b:>11.1f}{ratio:>8.2f}{ratio_med:>10.2f}{'' if bar is None else '>= ' + str(bar):>8}  {verdict}{note}")
    print(f"total wall time {time.monotonic() - wall0:.1f}s; 1-min load average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
