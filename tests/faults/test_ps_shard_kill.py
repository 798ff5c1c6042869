"""A parameter-server shard killed mid-run under sync, ssp and ssp with the dynamic deal: Ray restarts the shard
from the newest checkpoint, the worker group resumes there (replaying the lost steps) and the run reaches the
digits accuracy bar. The figure: the kill -> the first step after the restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lepton_ray import Trainer, load_config
from lepton_ray.data.pipeline import steps_in_epoch
from lepton_ray.train.checkpoint import CheckpointStore
from run_configs import small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")
EPOCHS = 6
MODES = {"sync": {"mode": "sync"}, "ssp": {"mode": "ssp", "staleness": 2}, "ssp-dynamic": {"mode": "ssp", "staleness": 2, "balance": "dynamic"}}


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> dict:
    from lepton_ray.data.builders import digits

    d = tmp_path_factory.mktemp("digits")
    digits(str(d / "train.parquet"), str(d / "eval.parquet"))
    return {"train": str(d / "train.parquet"), "eval": str(d / "eval.parquet"), "label": "label"}


@pytest.mark.parametrize("mode", [pytest.param("sync", marks=pytest.mark.slow), pytest.param("ssp", marks=pytest.mark.slow), "ssp-dynamic"])
def test_killed_shard_restarts_from_checkpoint_and_run_finishes(tmp_path, digits_data, mode):
    marker = tmp_path / "killed"
    cfg = load_config(small_config(
        tmp_path, Path(digits_data["train"]), data=digits_data,
        train={"max_steps": None, "epochs": EPOCHS, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "seed": 0},
        sync={"strategy": "ps", "ps": {"num_shards": 2, **MODES[mode]}}, checkpoint={"every_n_steps": 30, "keep_last": 10},
        scaling={"max_failures": 1},
        model={"factory": "ps_testing_models:kill_shard_once_mlp",
               "kwargs": {"kill_at": 70, "marker": str(marker), "run_name": "t", "hidden": [64]}}))
    result = Trainer(cfg, progress=False).fit()
    assert marker.exists()  # rank 0 killed a shard at its 70th step
    starts = [r["step"] for r in result.records if r.get("event") == "start"]
    saved = [r["step"] for r in result.records if r.get("event") == "checkpoint"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in saved, (starts, saved)
    assert result.resumed_from.endswith(f"step_{starts[1]:08d}")  # the newest committed checkpoint before the kill
    if mode == "ssp-dynamic":  # the dynamic deal resumes at an epoch end (its pieces went to whichever worker was free)
        resumed = CheckpointStore(str(Path(result.checkpoint).parent)).get(starts[1])
        assert resumed.meta["step_in_epoch"] == 0 and resumed.meta["epoch"] >= 1
    else:
        info = Trainer(cfg, progress=False).train_info
        assert result.metrics["steps"] == sum(steps_in_epoch(info, world_size=2, local_batch=32, epoch=e, seed=0) for e in range(EPOCHS))
    assert result.metrics["eval_accuracy"] >= 0.93
    first_after = [r["time"] for r in result.records if r.get("event") == "first_step"][-1]
    print(f"ps {mode}: shard killed at step ~70, resumed from step {starts[1]}; kill -> first step {first_after - os.path.getmtime(marker):.1f} s")
