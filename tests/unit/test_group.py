"""Runs in the calling process (a sweep trial's worker group, ``fit(local=True)``): no state leaks between runs,
and a report that raises stops the run cleanly. The warm multi-worker group is tested on a real cluster in
tests/integration/test_sweep.py."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_blobs
from lepton_ray import Trainer, load_config
from lepton_ray.train.checkpoint import CheckpointStore
from lepton_ray.data.stream import READ_AHEAD
from lepton_ray.train.context import isolated


def test_isolated_restores_rngs_environment_threads_and_cwd(tmp_path):
    os.environ["LEPTON_TEST_KEEP"] = "kept"
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), dict(os.environ), torch.get_num_threads(), os.getcwd())
    with isolated():
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        torch.rand(3), np.random.rand(3), random.random()
        os.environ["LEPTON_TEST_NEW"] = "1"
        os.environ["LEPTON_TEST_KEEP"] = "changed"
        del os.environ["PATH"]
        torch.set_num_threads(before[4] + 1)
        os.chdir(tmp_path)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate(), dict(os.environ), torch.get_num_threads(), os.getcwd())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert before[3] == after[3] and before[4:] == after[4:]
    del os.environ["LEPTON_TEST_KEEP"]


def _config(tmp_path: Path, name: str, **train) -> dict:
    data = write_blobs(tmp_path / "data" / "train.parquet", rows=256)
    return {"model": {"factory": "lr_testing_models:leaky_mlp", "kwargs": {"hidden": [16]}},
            "data": {"train": str(data), "eval": str(data)},
            "train": {"epochs": 3, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "seed": 3, **train},
            "scaling": {"num_workers": 1}, "checkpoint": {"every_n_steps": 0}, "run": {"dir": str(tmp_path / "runs"), "name": name}}


def _final_params(result) -> dict[str, torch.Tensor]:
    store = CheckpointStore(str(Path(result.checkpoint).parent))
    return store.load(store.latest(), ["model"])["model"]


def test_runs_in_one_process_leak_nothing_into_the_next(tmp_path):
    """The model reads LEPTON_TEST_LEAK and increments it (so does the driver's own check build): run A, then B, then A
    again in this process. A's two runs are equal to the bit, and the process's environment is as before."""
    env = dict(os.environ)
    first = Trainer(load_config(_config(tmp_path, "a")), progress=False).fit(local=True)
    Trainer(load_config(_config(tmp_path, "b", lr=0.2, seed=4)), progress=False).fit(local=True)
    again = Trainer(load_config(_config(tmp_path, "a")), progress=False).fit(local=True)
    assert dict(os.environ) == env
    a, b = _final_params(first), _final_params(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the model was built with no leaked shift: its output bias started at the plain initialisation
    assert first.metrics["eval_accuracy"] > 0.9


class _Stop(Exception):
    pass


def test_a_report_that_raises_stops_the_run_and_leaves_nothing_running(tmp_path):
    """A sweep trial's report stops it by raising (Tune's SystemExit): the run ends at that evaluation, its records
    up to it are on disk, and no read-ahead thread is left behind."""
    seen = []

    def report(metrics):
        seen.append(metrics)
        if len(seen) == 2:
            raise _Stop

    before = set(threading.enumerate())  # an earlier test in this process may have left threads of its own
    config = _config(tmp_path, "s", epochs=5)
    config["data"].update(shuffle_buffer_rows=32, prefetch_windows=1)  # a read-ahead left running would block, not end
    trainer = Trainer(load_config(config), progress=False)
    with pytest.raises(_Stop):
        trainer.fit(local=True, report=report)
    assert [m["epoch"] for m in seen] == [0, 1] and all("eval_accuracy" in m for m in seen)
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_accuracy"] for r in records if "eval_accuracy" in r] == [m["eval_accuracy"] for m in seen]
    left = [t.name for t in threading.enumerate() if t not in before and t.name in (READ_AHEAD, "lepton-heartbeat")]
    assert not left, left


def test_the_start_record_times_each_start_up_phase_from_fit(tmp_path):
    """A run's start record has its start-up phases in seconds after ``fit()``: the driver's before it, the loop's after."""
    result = Trainer(load_config(_config(tmp_path, "phases")), progress=False).fit(local=True)
    phases = next(r for r in result.records if r.get("event") == "start")["phases_s"]
    assert sorted(phases, key=phases.get) == ["driver_process", "trainer", "planned", "loop_entered", "ready"], phases
    assert phases["trainer"] <= 0 <= phases["loop_entered"]
    assert result.metrics["time_to_first_step_s"] >= phases["ready"]
