"""A training worker SIGKILLed from outside, mid-epoch: Ray Train restarts the group under scaling.max_failures,
the loop resumes from the newest committed checkpoint (data cursor included), and the run ends with the
parameters of an uninterrupted run (fp32, CPU, same seed: 1e-6). The figure: detection-to-first-step recovery."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from lepton_ray import Trainer, load_config
from lepton_ray.train.checkpoint import CheckpointStore
from run_configs import BackgroundFit, data_digest, final_params, once, small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

STRATEGIES = {"allreduce": {"strategy": "allreduce"}, "ps": {"strategy": "ps", "ps": {"num_shards": 2, "mode": "sync"}}}


def _config(tmp_path: Path, blobs: Path, strategy: str, name: str, delay_s: float) -> dict:
    return small_config(tmp_path, blobs, train={"max_steps": 40}, scaling={"max_failures": 1}, sync=STRATEGIES[strategy],
                        run={"name": name},
                        model={"factory": "faults.fault_models:slow_mlp",
                               "kwargs": {"delay_s": delay_s, "pid_dir": str(tmp_path / f"pids-{name}"), "hidden": [32]}})


def _reference(blobs: Path, strategy: str) -> str:
    """The key of ``_config(..., delay_s=0.0)``'s final parameters in :func:`run_configs.once`: one uninterrupted run per
    strategy, data and session (the warm group's test below makes the allreduce one as its first fit)."""
    return f"worker-kill:{strategy}:{data_digest(blobs)}"


def test_a_second_fit_runs_in_the_warm_group_and_a_sigkilled_worker_is_replaced(tmp_path, blobs):
    """fit(keep_warm=True) twice in one process: the first through Ray Train, the second in the warm group it left
    (this process rank 0). Its other rank SIGKILLed mid-run: a fresh group resumes from the newest committed
    checkpoint (max_failures 1) and the run ends with the first run's parameters (same config, same seed: 1e-6)."""
    from lepton_ray.train import group as G

    first = Trainer(load_config(_config(tmp_path, blobs, "allreduce", "first", delay_s=0.0)), progress=False).fit(keep_warm=True)
    want = once(_reference(blobs, "allreduce"), lambda: final_params(first))  # the kill test's uninterrupted run too
    assert "worker_process" in next(r for r in first.records if r.get("event") == "start")["phases_s"]  # through Ray Train
    assert G._CACHE["group"].world == 2  # the warm group it left behind

    trainer = Trainer(load_config(_config(tmp_path, blobs, "allreduce", "warm", delay_s=0.1)), progress=False)
    with contextlib.ExitStack() as cleanup, BackgroundFit(trainer, keep_warm=True) as run:  # the run stopped, then its group
        cleanup.callback(lambda: G._CACHE["group"].close() if "group" in G._CACHE else None)  # nothing left running
        run.wait_for_step(13)
        pid = int((tmp_path / "pids-warm" / "rank1").read_text())
        assert pid != os.getpid() and pid in G._CACHE["group"].pids  # rank 1 is the warm group's helper
        store = CheckpointStore(trainer.checkpoint_uri)
        os.kill(pid, signal.SIGKILL)
        committed = store.steps()
        result = run.result(timeout_s=300)
    starts = [r for r in result.records if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, committed[-1]] and committed[-1] >= 10, (starts, committed)
    assert "worker_process" not in starts[0]["phases_s"]  # the warm group, not a Ray Train start-up
    assert result.resumed_from.endswith(f"step_{committed[-1]:08d}") and result.metrics["steps"] == 40
    got = final_params(result)
    assert max((got[k] - want[k]).abs().max().item() for k in got) <= 1e-6


@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_worker_sigkilled_mid_epoch_resumes_and_ends_like_an_uninterrupted_run(tmp_path, blobs, strategy):
    cfg = load_config(_config(tmp_path, blobs, strategy, "killed", delay_s=0.1))
    trainer = Trainer(cfg, progress=False)
    with BackgroundFit(trainer) as run:
        run.wait_for_step(13)  # past the step-10 checkpoint
        pid = int((tmp_path / "pids-killed" / "rank1").read_text())
        store = CheckpointStore(trainer.checkpoint_uri)
        before = store.steps()
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        committed = store.steps()  # the dead group commits nothing more; the restarted one needs seconds to start
        result = run.result()

    starts = [r for r in result.records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0, starts
    resumed = starts[1]["step"]
    assert before and before[-1] >= 10  # the kill came after a checkpoint: a resume from scratch would be wrong
    assert resumed == committed[-1] and result.resumed_from.endswith(f"step_{resumed:08d}")  # the newest committed one
    assert result.metrics["steps"] == 40
    # the start-up phases, in seconds after fit(): each after the one before, the restarted group's later still
    order = ["driver_process", "trainer", "planned", "ray", "ray_train", "worker_process", "worker_entry", "loop_entered", "ready"]
    for start in starts:
        phases = start["phases_s"]
        assert sorted(phases, key=phases.get) == order and phases["trainer"] <= 0 <= phases["ray"], phases
    assert starts[1]["phases_s"]["worker_entry"] > starts[0]["phases_s"]["ready"]  # the restarted group's, after the kill
    # (its worker_process may be older: Ray can hand the new group a worker process it started, and kept idle, before)
    assert result.metrics["time_to_first_step_s"] > starts[1]["phases_s"]["ready"]  # timed from fit(), as the phases are
    firsts = [r for r in result.records if r.get("event") == "first_step"]
    recovery = firsts[-1]["time"] - killed_at
    print(f"{strategy}: worker killed at step >= 13, resumed from step {resumed}; kill -> first step after restart {recovery:.1f} s")

    reference = lambda: final_params(Trainer(load_config(_config(tmp_path, blobs, strategy, "uninterrupted", delay_s=0.0)),
                                             progress=False).fit())
    got, want = final_params(result), once(_reference(blobs, strategy), reference)
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) <= 1e-6
    assert max((got[k] - _initial(cfg, trainer)[k]).abs().max().item() for k in got) > 1e-3  # it trained: not vacuous


def _initial(cfg, trainer) -> dict[str, torch.Tensor]:
    from lepton_ray.models import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, trainer.train_info.schema).state_dict()
