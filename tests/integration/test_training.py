"""End-to-end training on a real Ray cluster: DDP == single process, resume == uninterrupted, atomic checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lepton_ray import Trainer, load_config
from lepton_ray.data.stream import WorkerStream
from lepton_ray.models import build_model
from lepton_ray.train.checkpoint import CheckpointStore
from run_configs import RUN_ACTORS, BackgroundFit, final_params, small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_allreduce_equals_single_process(tmp_path, blobs):
    """2 Ray Train workers with DDP end where one process ends on the same global batches (max abs diff <= 1e-5).
    With gradient accumulation and clipping the same is held in the unit tier (tests/unit/test_strategy_contract.py:
    every strategy and transport, 2 micro-batches, clip 0.5, the real loop in 2 processes without Ray)."""
    cfg = load_config(small_config(tmp_path, blobs))
    result = Trainer(cfg, progress=False).fit()
    assert result.metrics["steps"] == 20
    ddp = final_params(result)

    # the reference: plain torch, one process, the same 20 global batches (the two workers' batches together)
    trainer = Trainer(cfg, progress=False)
    streams = [WorkerStream(trainer.train_info, cfg.data, rank=r, world_size=2, local_batch=16, seed=7) for r in range(2)]
    batches = []
    for epoch in range(20):
        for b0, b1 in zip(streams[0].epoch(epoch), streams[1].epoch(epoch)):
            batches.append((torch.cat([b0["x"], b1["x"]]), torch.cat([b0["label"], b1["label"]])))
        if len(batches) >= 20:
            break
    torch.manual_seed(7)
    model = build_model(cfg.model, trainer.train_info.schema)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for xb, yb in batches[:20]:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    single = model.state_dict()

    assert _max_diff(single, start) > 1e-2  # training moved the parameters: the comparison is not vacuous
    assert _max_diff(ddp, single) <= 1e-5
    # the default cpu_transport (auto) averaged the gradients through shared memory: both workers share this host.
    # DDP's own gloo transport ends bit for bit where shared memory does (2 workers: a/2 + b/2 either way), held in the
    # unit tier: test_shm_allreduce.py (DDP with either hook, bitwise) and test_strategy_contract.py (the loop with
    # either, against one process)
    assert next(r for r in result.records if r.get("event") == "start")["allreduce_transport"] == "shm"


def test_checkpoint_killed_before_manifest_is_not_used(tmp_path, blobs):
    """A checkpoint write SIGKILLed between its files and its manifest does not exist; resume takes the one before.
    (One worker in this process: the checkpoint store and the resume point are the same as on Ray Train, where a
    worker killed mid-run resumes the same way: tests/faults/test_worker_kill.py.)"""
    cfg = small_config(tmp_path, blobs, train={"max_steps": 20}, scaling={"num_workers": 1})
    first = Trainer(cfg, progress=False).fit(local=True)
    root = first.checkpoint.rsplit("/", 1)[0]
    assert CheckpointStore(root).steps() == [10, 20]

    code = (
        "import os, signal, torch\n"
        "from lepton_ray.train.checkpoint import CheckpointStore\n"
        f"store = CheckpointStore({root!r}, keep_last=5)\n"
        "store.save(30, {'model': {'w': torch.zeros(3)}}, meta={}, before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (Path(root) / "step_00000030" / "model.pt").exists()
    assert not (Path(root) / "step_00000030" / "MANIFEST.json").exists()
    assert CheckpointStore(root).latest().step == 20

    resumed = Trainer(load_config(cfg, ["train.max_steps=40"]), resume=True, progress=False).fit(local=True)
    assert resumed.resumed_from.endswith("step_00000020")
    assert resumed.metrics["steps"] == 40
    assert CheckpointStore(root).steps()[-1] == 40


def test_fresh_run_never_reuses_a_used_run_name(tmp_path, blobs):
    """Running the same config twice keeps the first run's checkpoints: the second becomes 't-1'. (One worker in
    this process: naming and run files are the driver's, the same for a Ray Train run.)"""
    cfg = small_config(tmp_path, blobs, train={"max_steps": 5}, scaling={"num_workers": 1})
    a = Trainer(cfg, progress=False).fit(local=True)
    b = Trainer(cfg, progress=False).fit(local=True)
    assert Path(a.run_dir).name == "t" and Path(b.run_dir).name == "t-1"
    assert CheckpointStore(a.checkpoint.rsplit("/", 1)[0]).steps() == [5]
    lines = [json.loads(l) for l in (Path(b.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == [1, 2, 3, 4, 5]
    result = json.loads((Path(b.run_dir) / "result.json").read_text())
    assert result["steps"] == 5 and result["checkpoint"] == b.checkpoint and np.isfinite(result["train_loss"])


def test_bf16_autocast_on_cpu_trains(tmp_path, blobs):
    """train.precision: bf16 runs under CPU autocast and still learns the blobs (one worker in this process: autocast is
    per process; DDP's gradients stay fp32 like its parameters)."""
    cfg = small_config(tmp_path, blobs, data={"eval": str(blobs)}, train={"max_steps": 40, "precision": "bf16"},
                       scaling={"num_workers": 1})
    result = Trainer(cfg, progress=False).fit(local=True)
    losses = [r["train_loss"] for r in result.records if "train_loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["eval_accuracy"] > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL all-reduce, fp16 GradScaler)")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_nccl_training(tmp_path, blobs, precision):
    """On GPUs: NCCL all-reduce across every visible GPU, each precision learns the blobs."""
    workers = torch.cuda.device_count()
    cfg = small_config(tmp_path, blobs, data={"eval": str(blobs)},
                  train={"max_steps": 40, "precision": precision, "batch_size": 32 * workers},
                  scaling={"num_workers": workers, "use_gpu": True})
    result = Trainer(cfg, progress=False).fit()
    assert result.metrics["eval_accuracy"] > 0.9


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_in_the_background_is_stopped_when_its_test_fails(tmp_path, blobs):
    """What the fault tests rely on: a test that fails mid-run leaves no run going on the session cluster."""
    from ray.util.state import list_actors

    trainer = Trainer(small_config(tmp_path, blobs, train={"max_steps": 1_000_000}, checkpoint={"every_n_steps": 0}), progress=False)
    with pytest.raises(AssertionError, match="^a check failed mid-run$"):
        with BackgroundFit(trainer) as run:
            run.wait_for_step(3)
            raise AssertionError("a check failed mid-run")
    assert not run._thread.is_alive()  # fit() returned (with an error) once its controller and workers were gone
    alive = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000) if a.class_name in RUN_ACTORS]
    assert alive == []
