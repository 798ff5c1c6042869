"""Sweeps on a real Ray cluster (4 logical CPUs): ASHA on digits, one trial at a time, resume after a killed driver."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lepton_ray
from lepton_ray import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _digits(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        f"data.train={tmp_path / 'digits' / 'train.parquet'}",
        f"data.eval={tmp_path / 'digits' / 'eval.parquet'}",
        f"run.dir={tmp_path / 'runs'}",
        f"sweep.dir={tmp_path / 'sweeps'}",
        *overrides,
    ]


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "sweep_results.csv").open() as fh:
        return list(csv.DictReader(fh))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_asha_sweep_on_digits_one_trial_at_a_time(ray_cluster, tmp_path):
    """lr log-uniform 1e-4..1 x batch {32, 128} with ASHA: a best trial >= 0.93, clearly bad trials stopped
    early (fewer evaluations), and with sweep.max_concurrent_trials 1 trials run one after another."""
    cfg = load_config(REPO / "examples" / "digits_sweep.yaml", _digits(
        tmp_path, "train.epochs=3", "sweep.num_samples=3", "sweep.seed=5", "checkpoint.every_n_steps=0", "sweep.max_concurrent_trials=1"))
    result = lepton_ray.sweep(cfg, progress=False)
    sweep_dir = tmp_path / "sweeps" / "digits_sweep"
    assert result.dir == str(sweep_dir) and result.max_concurrent_trials == 1

    rows = {r["trial"]: r for r in result.trials}
    assert len(rows) == 3
    # seeded random search: the first trial (lr 0.166, batch 32) runs to the end and is good
    best = result.best
    assert best["eval_accuracy"] >= 0.93 and best["status"] == "completed"
    assert best["params"]["train.batch_size"] == 32 and 0.1 < best["params"]["train.lr"] < 0.3
    # the checkpoint handed on is the best trial's final, committed one, with its config in the manifest
    manifest = json.loads((Path(best["checkpoint"]) / "MANIFEST.json").read_text())
    assert manifest["meta"]["config"]["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert manifest["meta"]["step"] == 3 * (1438 // 32)
    assert json.loads((sweep_dir / "best.json").read_text()) == json.loads(json.dumps(best))

    # ASHA: every trial with lr < 0.05 is clearly bad (accuracy < 0.5); it was stopped at its first rung
    bad = [r for r in rows.values() if r["lr"] < 0.05]
    assert bad, "the seeded sample has bad learning rates"
    for r in bad:
        assert r["status"] == "stopped early" and r["evaluations"] == 1 and r["eval_accuracy"] < 0.5, r
        # the stop killed the trial's driver, yet its metrics.jsonl holds the evaluation ASHA acted on (first)
        # and any it made before the stop landed (Tune acts on a report asynchronously)
        evals = [x["eval_accuracy"] for x in _records(sweep_dir / "trials" / r["trial"]) if "eval_accuracy" in x]
        assert evals[:1] == [pytest.approx(r["eval_accuracy"])] and len(evals) <= 3, (r, evals)

    # one trial at a time: each trial's driver started after the previous trial's last evaluation
    spans = sorted((r["started_at"], r["last_report_at"]) for r in rows.values())
    assert all(prev_end < start for (_, prev_end), (start, _) in zip(spans, spans[1:])), spans

    # outputs: the csv has every trial, the plot is a PNG
    assert sorted(r["trial"] for r in _rows(sweep_dir)) == sorted(rows)
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_many_concurrent_trials_is_an_error_before_any_trial(ray_cluster, tmp_path):
    cfg = load_config(REPO / "examples" / "digits_sweep.yaml", _digits(tmp_path, "sweep.max_concurrent_trials=3"))
    with pytest.raises(ConfigError) as err:
        lepton_ray.sweep(cfg, progress=False)
    assert str(err.value) == (
        "sweep.max_concurrent_trials: 3 trials at once need 6 CPU (each: 2 workers x 1 CPU); "
        "the Ray cluster has 4 CPU, enough for 2 at a time"
    )
    assert not (tmp_path / "sweeps" / "digits_sweep" / "trials").exists()


def test_killed_sweep_continues_without_rerunning_finished_trials(ray_cluster, tmp_path):
    """SIGKILL the `lepton-ray sweep` driver after a trial finished, while the second one is held past its checkpoints
    (its model waits at its 25th step until the test released it, so the kill never races the trial's end); the same
    command finishes the sweep: finished trials untouched, the interrupted one resumed from its checkpoint, no trial
    trained from scratch twice, every trial in the final table."""
    args = [str(BIN / "lepton-ray"), "sweep", str(REPO / "examples" / "digits_sweep.yaml"), "--json", "--no-progress"]
    trials = tmp_path / "sweeps" / "digits_sweep" / "trials"
    hold = tmp_path / "released"
    model = {"hold_at": 25, "finished_glob": str(trials / "*" / "result.json"), "hold_file": str(hold), "hidden": [128, 64]}
    for item in _digits(tmp_path, "train.epochs=8", "sweep.num_samples=2", "sweep.scheduler=fifo", "sweep.seed=2",
                        "checkpoint.every_n_steps=10", "sweep.max_concurrent_trials=1",
                        "model.factory=lr_testing_models:hold_later_trial_mlp", f"model.kwargs={json.dumps(model)}"):
        args += ["--set", item]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 400
    while not Path(f"{hold}.held").exists():  # the second trial waits at its 25th step: checkpoints 10 and 20 are committed
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the second trial never reached its hold"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    hold.touch()  # the resumed trial passes its 25th step (its new process counts from the step it resumed at)
    finished = {p.parent.name: (p.read_text(), (p.parent / "metrics.jsonl").read_text()) for p in trials.glob("*/result.json")}
    assert not (trials.parent / "sweep_results.csv").exists()  # it really was interrupted

    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "continuing sweep 'digits_sweep'" in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_trials"] == 2

    rows = _rows(trials.parent)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    for trial, (result_json, metrics) in finished.items():  # not rerun: their files are byte-for-byte the same
        assert (trials / trial / "result.json").read_text() == result_json
        assert (trials / trial / "metrics.jsonl").read_text() == metrics
    resumed = []
    for r in rows:  # no trial trained from scratch twice; the interrupted one resumed from its checkpoint
        starts = [x for x in _records(trials / r["trial"]) if x.get("event") == "start"]
        assert sum(x["resumed_from"] is None for x in starts) == 1, (r["trial"], starts)
        resumed += [x["resumed_from"] for x in starts if x["resumed_from"] is not None]
        assert json.loads((trials / r["trial"] / "result.json").read_text())["steps"] == 8 * (1438 // int(r["batch_size"]))
    assert len(finished) == 1 and len(resumed) == 1 and resumed[0].endswith("/step_00000020"), resumed


def _params(checkpoint: str) -> dict:
    from lepton_ray.train.checkpoint import CheckpointStore

    store = CheckpointStore(str(Path(checkpoint).parent))
    return store.load(store.latest(), ["model"])["model"]


def test_warm_trials_equal_standalone_runs_to_the_bit(ray_cluster, tmp_path):
    """Two 2-worker trials run one after another in the same warm trial actor (and its helper rank); the second
    trial's final parameters equal the same config trained alone by the Trainer on Ray Train, to the bit. The model
    reads an environment variable and changes it (tests/lr_testing_models.py:leaky_mlp), so a warm worker that leaked
    the first trial's environment, RNG, model or data cursor into the second would fail here (and one whose loop
    differed from Ray Train's would fail on either trial)."""
    cfg = load_config(REPO / "examples" / "digits_sweep.yaml", _digits(
        tmp_path, "train.epochs=2", "sweep.num_samples=2", "sweep.scheduler=fifo", "sweep.seed=5", "checkpoint.every_n_steps=0",
        "sweep.max_concurrent_trials=1", "model.factory=lr_testing_models:leaky_mlp", "model.kwargs={hidden: [32]}"))
    result = lepton_ray.sweep(cfg, progress=False)
    trials = tmp_path / "sweeps" / "digits_sweep" / "trials"
    infos = [json.loads((trials / r["trial"] / "trial.json").read_text()) for r in result.trials]
    assert len(infos) == 2 and infos[0]["pids"] == infos[1]["pids"], infos  # one warm actor ran both
    info, row = infos[1], result.trials[1]
    raw = {**info["config"], "run": {"dir": str(tmp_path / "alone"), "name": info["trial"]}}
    alone = lepton_ray.Trainer(load_config(raw), progress=False).fit()
    ours, theirs = _params(row["checkpoint"]), _params(alone.checkpoint)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), info["trial"]
    assert row["eval_accuracy"] == alone.metrics["eval_accuracy"]
