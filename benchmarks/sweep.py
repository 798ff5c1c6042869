"""ASHA against FIFO on the same sweep: same search space, same trials (same seed), same run.

    python benchmarks/sweep.py [--samples 6] [--epochs 10] [--workers 2 1]

For each worker count (2-worker trials, the example's, are the headline; then 1-worker trials) prints
the wall time and the best metric of FIFO and ASHA, the ratio ASHA / FIFO (the bar: ASHA's best
within 1 point of FIFO's in <= 50% of FIFO's wall time, at 10 epochs per trial), where each wall
time went (trial launches, training, between trials), and each launch's phases (the bar: median
trial start -> first optimizer step <= 3 s for 1-worker and <= 6 s for 2-worker trials):

- checks: the trial function starting -> the training loop entered on rank 0 (the trial's config,
  the Trainer's checks, the warm worker group: built by a trial actor's first trial only);
- build: the loop entered -> ready to train (model, DDP, optimizer, eval rows, checkpoint lookup);
- first step: ready -> the first optimizer step.

Before trials ran in warm worker groups (each trial a Ray Train run), this machine measured, at 10
epochs x 6 trials of 2 workers: median launch 18.2 s (14.95 s Ray Train starting its controller and
workers, 3.61 s build, 0.07 s to the first step), ~7 s between trials, FIFO 186 s of which 24.5 s
training.

Connects to the cluster in RAY_ADDRESS, else starts a local one with as many logical CPUs as the
machine has cores (what `lepton-ray sweep` does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

import lepton_ray  # noqa: E402
from lepton_ray.tune.results import read_records  # noqa: E402


def _launches(trial_dir: Path) -> list[dict[str, float]]:
    """Each launch of a trial, in phases (seconds), from trial.json and the run's records."""
    info = json.loads((trial_dir / "trial.json").read_text())
    records = read_records(trial_dir)
    starts = [r for r in records if r.get("event") == "start"]
    firsts = [r for r in records if r.get("event") == "first_step"]
    return [{"checks": s["entered"] - t, "build": s["time"] - s["entered"], "first_step": f["time"] - s["time"], "total": f["time"] - t}
            for t, s, f in zip(info["launches"], starts, firsts)]


def run(scheduler: str, root: Path, samples: int, epochs: int, workers: int) -> dict:
    name = f"{scheduler}-{workers}w"
    cfg = lepton_ray.load_config(REPO / "examples" / "digits_sweep.yaml", [
        f"data.train={root / 'digits' / 'train.parquet'}", f"data.eval={root / 'digits' / 'eval.parquet'}",
        f"run.dir={root / 'runs'}", f"sweep.dir={root / 'sweeps'}", f"sweep.name={name}",
        f"sweep.scheduler={scheduler}", f"sweep.num_samples={samples}", f"train.epochs={epochs}", "sweep.seed=0",
        "checkpoint.every_n_steps=0", f"scaling.num_workers={workers}",
    ])
    t0 = time.perf_counter()
    result = lepton_ray.sweep(cfg, progress=False)
    wall = time.perf_counter() - t0
    # where the wall time went: each trial's launches and its training (first step -> its last record); the
    # rest is Tune between trials (scheduling, the next trial's start)
    launches, training = [], 0.0
    for t in result.trials:
        trial_dir = Path(result.dir) / "trials" / t["trial"]
        launches += _launches(trial_dir)
        records = read_records(trial_dir)
        first = next((r["time"] for r in records if r.get("event") == "first_step"), None)
        last = max((r["time"] for r in records if "time" in r), default=None)
        training += (last - first) if first is not None and last is not None else 0.0
    return {"wall_s": wall, "best": result.best[result.metric], "trials": result.trials, "launches": launches,
            "training_s": training, "stopped": sum(t["status"] == "stopped early" for t in result.trials)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    return p


def measure(args: argparse.Namespace) -> dict:
    """FIFO then ASHA for each worker count; prints where the time went; returns the figures per worker count."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        from lepton_ray.train.trainer import start_local_ray

        start_local_ray(num_cpus=os.cpu_count())  # what `lepton-ray sweep` does without RAY_ADDRESS
    root = Path(tempfile.mkdtemp(prefix="lepton-sweep-bench-"))
    print(f"\nsweep benchmark: digits, {args.samples} trials, {args.epochs} epochs each (one evaluation per epoch), "
          f"lr loguniform 1e-4..1 x batch {{32, 128}}, seed 0, {ray.cluster_resources().get('CPU', 0):g} CPUs", flush=True)
    out = {}
    for w in args.workers:
        fifo = run("fifo", root, args.samples, args.epochs, w)
        asha = run("asha", root, args.samples, args.epochs, w)
        ratio, gap = asha["wall_s"] / fifo["wall_s"], (fifo["best"] - asha["best"]) * 100
        launches = fifo["launches"] + asha["launches"]
        median = {k: statistics.median(x[k] for x in launches) for k in ("checks", "build", "first_step", "total")}
        bar = 3.0 if w == 1 else 6.0
        print(f"\n{w}-worker trials:")
        for label, r in (("FIFO", fifo), ("ASHA", asha)):
            other = r["wall_s"] - sum(x["total"] for x in r["launches"]) - r["training_s"]
            print(f"  {label}: wall {r['wall_s']:6.1f} s = launches {sum(x['total'] for x in r['launches']):5.1f} s + training "
                  f"{r['training_s']:5.1f} s + between trials {other:5.1f} s   best eval_accuracy {r['best']:.4f}   "
                  f"stopped early {r['stopped']}/{len(r['trials'])}")
        print(f"  ASHA / FIFO wall time: {ratio:.2f} (bar: <= 0.50)   best-metric gap: {gap:+.2f} points (bar: <= 1)   "
              f"training alone: {asha['training_s'] / fifo['training_s']:.2f}")
        print(f"  launch (trial start -> first step), {len(launches)} launches: median {median['total']:.2f} s (bar: <= {bar:g} s), "
              f"min {min(x['total'] for x in launches):.2f} s, max {max(x['total'] for x in launches):.2f} s; median phases: "
              f"checks {median['checks']:.2f} s, build {median['build']:.2f} s, first step {median['first_step']:.2f} s")
        met = ratio <= 0.5 and gap <= 1.0 and median["total"] <= bar
        print(f"  bars {'MET' if met else 'NOT MET'}", flush=True)
        out[f"{w}w"] = {"fifo_wall_s": fifo["wall_s"], "asha_wall_s": asha["wall_s"], "ratio": ratio, "fifo_best": fifo["best"],
                        "asha_best": asha["best"], "fifo_training_s": fifo["training_s"], "asha_training_s": asha["training_s"],
                        "launch_median_s": median, "best_gap_points": gap, "launch_bar_s": bar}
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    return out


def bench_rows(argv: list[str]) -> list:
    """The suite's entry point: this script run with ``argv``, as rows."""
    from benchmarks.rows import row

    out = []
    for key, r in measure(_parser().parse_args(argv)).items():
        out += [row("sweep", f"ASHA wall time, {key} trials", r["asha_wall_s"], "s", "FIFO", r["fifo_wall_s"], bar="<= 0.5",
                    also=r["best_gap_points"] <= 1.0, note="and ASHA's best within 1 point of FIFO's",
                    extra={"asha_training_s": r["asha_training_s"], "fifo_training_s": r["fifo_training_s"]}),
                row("sweep", f"ASHA best eval_accuracy, {key} trials", r["asha_best"], "accuracy", "FIFO", r["fifo_best"]),
                row("sweep", f"median trial launch (start -> first step), {key} trials", r["launch_median_s"]["total"], "s",
                    bar=f"<= {r['launch_bar_s']:g}", bar_on="figure", extra={"phases_s": r["launch_median_s"]})]
    return out


def main() -> None:
    print(json.dumps(measure(_parser().parse_args())))


if __name__ == "__main__":
    main()
