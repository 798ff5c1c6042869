"""ASHA against FIFO on the same sweep: same search space, same trials (same seed), same run.

    python benchmarks/sweep.py [--samples 6] [--epochs 100]

Prints the wall time and the best metric of each, the ratio ASHA / FIFO (the bar: ASHA's
best within 1 point of FIFO's in <= 50% of FIFO's wall time), where each wall time went
(trial launches, training, between trials), and the per-trial launch overhead (the trial
function starting -> the first optimizer step), split into what is lepton_ray's (the
Trainer's checks before Ray Train starts) and the rest (Ray Train starting the controller
and the worker processes, the workers loading data and model).

Trial length: every trial is a Ray Train run, and its start and end cost ~12 s on a 2-core
machine whether ASHA stops it or not. The default (100 epochs of digits, ~50 s of training
per full trial, ~10 min in all) makes training, which ASHA can cut, the larger part of a
trial, as in real sweeps; with short trials the wall ratio is bounded by that fixed cost
(measured on this machine: 10 epochs 0.76, 30 epochs 0.65, 100 epochs 0.46).

Connects to the cluster in RAY_ADDRESS, else starts a local one with 4 logical CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

import lepton_ray  # noqa: E402
from lepton_ray.train import Trainer  # noqa: E402
from lepton_ray.tune.results import read_records  # noqa: E402
from lepton_ray.tune.space import trial_config  # noqa: E402


def run(scheduler: str, root: Path, samples: int, epochs: int) -> dict:
    cfg = lepton_ray.load_config(REPO / "examples" / "digits_sweep.yaml", [
        f"data.train={root / 'digits' / 'train.parquet'}", f"data.eval={root / 'digits' / 'eval.parquet'}",
        f"run.dir={root / 'runs'}", f"sweep.dir={root / 'sweeps'}", f"sweep.name={scheduler}",
        f"sweep.scheduler={scheduler}", f"sweep.num_samples={samples}", f"train.epochs={epochs}", "sweep.seed=0",
        "checkpoint.every_n_steps=0",
    ])
    t0 = time.perf_counter()
    result = lepton_ray.sweep(cfg, progress=False)
    wall = time.perf_counter() - t0
    launch = [t["launch_s"] for t in result.trials if isinstance(t.get("launch_s"), float)]
    # where the wall time went: each trial's launch (trial start -> first step) and training (first step ->
    # its last record); the rest is Ray Train/Tune between trials (worker shutdown, the next trial's start)
    training = 0.0
    for t in result.trials:
        records = read_records(Path(result.dir) / "trials" / t["trial"])
        first = next((r["time"] for r in records if r.get("event") == "first_step"), None)
        last = max((r["time"] for r in records if "time" in r), default=None)
        training += (last - first) if first is not None and last is not None else 0.0
    return {"wall_s": wall, "best": result.best[result.metric], "trials": result.trials, "launch_s": launch,
            "training_s": training, "stopped": sum(t["status"] == "stopped early" for t in result.trials), "cfg": cfg}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=100)
    args = p.parse_args()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        from lepton_ray.train.trainer import start_local_ray

        start_local_ray(num_cpus=4)  # what `lepton-ray sweep` does without RAY_ADDRESS
    root = Path(tempfile.mkdtemp(prefix="lepton-sweep-bench-"))
    fifo = run("fifo", root, args.samples, args.epochs)
    asha = run("asha", root, args.samples, args.epochs)

    # what is ours in a launch: the Trainer's checks (config, data description, label scan) before Ray Train
    cfg = fifo["cfg"]
    raw = trial_config(cfg.to_dict(), {}, cfg.sweep)
    raw["run"]["dir"] = str(root / "probe")
    t = time.perf_counter()
    for _ in range(5):
        Trainer(lepton_ray.load_config(raw), progress=False)
    ours = (time.perf_counter() - t) / 5

    print(f"\nsweep benchmark: digits, {args.samples} trials, {args.epochs} epochs each (one evaluation per epoch), "
          f"lr loguniform 1e-4..1 x batch {{32, 128}}, seed 0, {ray.cluster_resources().get('CPU', 0):g} CPUs")
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        print(f"  {name}: wall {r['wall_s']:7.1f} s   best eval_accuracy {r['best']:.4f}   stopped early {r['stopped']}/{len(r['trials'])}")
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        other = r["wall_s"] - sum(r["launch_s"]) - r["training_s"]
        print(f"    {name} wall = launches {sum(r['launch_s']):6.1f} s + training {r['training_s']:6.1f} s + between trials {other:6.1f} s")
    ratio = asha["wall_s"] / fifo["wall_s"]
    gap = (fifo["best"] - asha["best"]) * 100
    print(f"  ASHA / FIFO wall time: {ratio:.2f}  (bar: <= 0.50)   best-metric gap: {gap:+.2f} points (bar: <= 1)")
    print(f"  bar {'MET' if ratio <= 0.5 and gap <= 1.0 else 'NOT MET'}")
    print(f"  (training time alone, ASHA / FIFO: {asha['training_s'] / fifo['training_s']:.2f}; the launches are a fixed cost per "
          f"trial that early stopping cannot remove, so the wall ratio falls towards it as trials get longer: --epochs)")
    launch = fifo["launch_s"] + asha["launch_s"]
    if launch:
        print(f"  launch overhead (trial start -> first step), {len(launch)} launches: median {statistics.median(launch):.1f} s, "
              f"min {min(launch):.1f} s, max {max(launch):.1f} s")
    print(f"    of which lepton_ray's Trainer checks before Ray Train starts: {ours:.2f} s "
          f"({ours / statistics.median(launch) * 100 if launch else 0:.0f}% of the median)")
    print(json.dumps({"fifo_wall_s": fifo["wall_s"], "asha_wall_s": asha["wall_s"], "ratio": ratio,
                      "fifo_training_s": fifo["training_s"], "asha_training_s": asha["training_s"],
                      "fifo_best": fifo["best"], "asha_best": asha["best"],
                      "launch_median_s": statistics.median(launch) if launch else None, "trainer_checks_s": ours}))


if __name__ == "__main__":
    main()
