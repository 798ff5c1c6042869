"""A parameter-server shard's process SIGKILLed from outside, mid-run, under sync (the static deal's mid-epoch resume,
which ssp's static deal shares) and ssp with the dynamic deal:
Ray restarts the shard from the newest checkpoint, the worker group resumes there (replaying the lost steps) and the
run reaches the digits accuracy bar; under sync it ends with the parameters of an uninterrupted run. The figure: the
kill -> the first step after the restart."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from lepton_ray import Trainer, load_config
from lepton_ray.data.plan import steps_in_epoch
from lepton_ray.sync.param_server import SHARD_PREFIX
from lepton_ray.train.checkpoint import CheckpointStore
from run_configs import BackgroundFit, final_params, small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")
EPOCHS = 6
MODES = {"sync": {"mode": "sync"}, "ssp-dynamic": {"mode": "ssp", "staleness": 2, "balance": "dynamic"}}


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> dict:
    from lepton_ray.data.builders import digits

    d = tmp_path_factory.mktemp("digits")
    digits(str(d / "train.parquet"), str(d / "eval.parquet"))
    return {"train": str(d / "train.parquet"), "eval": str(d / "eval.parquet"), "label": "label"}


def _config(tmp_path: Path, digits_data: dict, mode: str, name: str):
    return load_config(small_config(
        tmp_path, Path(digits_data["train"]), data=digits_data, run={"name": name},
        train={"max_steps": None, "epochs": EPOCHS, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "seed": 0},
        sync={"strategy": "ps", "ps": {"num_shards": 2, **MODES[mode]}}, checkpoint={"every_n_steps": 30, "keep_last": 10},
        scaling={"max_failures": 1}, model={"hidden": [64]}))


@pytest.mark.parametrize("mode", [pytest.param("sync", marks=pytest.mark.slow), "ssp-dynamic"])
def test_killed_shard_restarts_from_checkpoint_and_run_finishes(tmp_path, digits_data, mode):
    from ray.util.state import list_actors

    cfg = _config(tmp_path, digits_data, mode, "killed")
    trainer = Trainer(cfg, progress=False)
    with BackgroundFit(trainer) as run:
        run.wait_for_step(70)  # past the step-60 checkpoint
        shards = [a for a in list_actors(filters=[("class_name", "=", "_RayShardServer"), ("state", "=", "ALIVE")], detail=True)
                  if a.name.startswith(f"{SHARD_PREFIX}{trainer.run_name}:")]
        assert len(shards) == 2, shards
        store = CheckpointStore(trainer.checkpoint_uri)
        killed_at = time.time()
        os.kill(max(shards, key=lambda a: a.name).pid, signal.SIGKILL)  # the OS kills the process: no Ray call involved
        committed = store.steps()
        result = run.result(timeout_s=600)

    starts = [r["step"] for r in result.records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] == committed[-1] >= 60, (starts, committed)
    assert result.resumed_from.endswith(f"step_{starts[1]:08d}")  # the newest committed checkpoint before the kill
    if mode == "ssp-dynamic":  # the dynamic deal resumes at an epoch end (its pieces went to whichever worker was free)
        resumed = store.get(starts[1])
        assert resumed.meta["step_in_epoch"] == 0 and resumed.meta["epoch"] >= 1
    else:
        assert result.metrics["steps"] == sum(steps_in_epoch(trainer.train_info, world_size=2, local_batch=32, epoch=e, seed=0)
                                              for e in range(EPOCHS))
    assert result.metrics["eval_accuracy"] >= 0.93
    first_after = [r["time"] for r in result.records if r.get("event") == "first_step"][-1]
    print(f"ps {mode}: shard SIGKILLed at step >= 70, resumed from step {starts[1]}; kill -> first step {first_after - killed_at:.1f} s")
    if mode == "sync":  # lock step: the replayed steps are the same steps, so the end is the uninterrupted run's
        reference = Trainer(_config(tmp_path, digits_data, mode, "uninterrupted"), progress=False).fit()
        got, want = final_params(result), final_params(reference)
        assert got.keys() == want.keys() and max((got[k] - want[k]).abs().max().item() for k in got) <= 1e-6
