"""Sharded checkpoints under the real loop, without Ray (a torch.multiprocessing + gloo harness, as the contract test).

``fsdp`` writes every rank's shards with DCP; ZeRO-1 consolidates its optimizer state on rank 0. Resume equals
the uninterrupted run; an ``fsdp`` checkpoint saved by 2 workers loads on 1 and on 3 with the saved parameters
and the next step's loss; a serving bundle made from it predicts what the sharded model predicted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import rendezvous, spawn
from lepton_ray import Trainer, load_config
from lepton_ray.models import build_model
from lepton_ray.sync import STRATEGIES, WorkerInfo
from lepton_ray.train.checkpoint import CheckpointStore, model_state
from harness import _config, _gap, _run, _saved


def test_resume_of_a_zero1_run_equals_the_uninterrupted_run(tmp_path):
    """ZeRO-1 (each rank's optimizer shard in the checkpoint): a resume from step 3 ends where the uninterrupted run
    ends. The same for fsdp, on S3: ``test_fsdp_checkpoints_on_s3_resume_to_the_uninterrupted_run``."""
    raw = _config(tmp_path, "allreduce", "adamw", steps=6, every=3, allreduce={"shard_optimizer": True})
    whole = _run(raw)
    cut = tmp_path / "cut"
    shutil.copytree(Path(whole.checkpoint_uri) / "step_00000003", cut / "step_00000003")  # as if killed after step 3
    _run(raw, checkpoint_uri=str(cut))
    assert CheckpointStore(str(cut)).latest().step == 6
    assert _gap(_saved(str(cut)), _saved(whole.checkpoint_uri)) <= 1e-6


ROWS = torch.linspace(-3, 3, 24 * 16).reshape(24, 16)  # fixed rows: predictions and one step on them
LABELS = torch.arange(24) % 4


def _load_and_step(rank: int, init: str, world: int, raw: dict, uri: str, out: str) -> None:
    """Build ``fsdp`` at ``world`` workers and load the newest checkpoint under ``uri``. Rank 0 writes the gap between
    the loaded (gathered) parameters and the saved ones, the sharded model's predictions on fixed rows, and the loss
    on them after one AdamW step on them from the loaded state (the optimizer state, resharded, decides that step)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = load_config(raw)
        trainer = Trainer(cfg, progress=False)
        strategy = STRATEGIES["fsdp"](cfg, WorkerInfo(rank, world, torch.device("cpu")))
        model = strategy.build(lambda: build_model(cfg.model, trainer.train_info.schema))
        optimizer = strategy.optimizer()
        reader, _ = CheckpointStore(uri).open_latest(rank, world)
        strategy.load(reader, optimizer)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        gap = _gap(full, model_state(reader)) if rank == 0 else None  # now: one worker's ``full`` is the live parameters
        with torch.no_grad():
            pred = model.eval()(ROWS[:5])
        model.train()
        F.cross_entropy(model(ROWS[rank::world]), LABELS[rank::world]).backward()  # equal shares: FSDP's mean is the batch's
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            loss = F.cross_entropy(model(ROWS[rank::world]), LABELS[rank::world]).reshape(1) / world
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"gap": gap, "pred": pred, "loss": loss.item(), "step": reader.checkpoint.step}, out)
    finally:
        dist.destroy_process_group()


def test_an_fsdp_checkpoint_of_2_workers_resumes_on_1_and_on_3(tmp_path):
    """Saved by 2 workers: loads on 1 and 3 with the saved parameters (1e-6), the next step from it (on the same rows)
    gives the 2-worker loss (1e-4), a bundle made from the sharded checkpoint predicts what the sharded model does (1e-5),
    and the loop resumes there at 1 and 3 workers."""
    from lepton_ray.serve.bundle import load_checkpoint

    raw = _config(tmp_path, "fsdp", "adamw", steps=4, batch=24, every=3, fsdp={"units": ["Linear"]})
    whole = _run(raw)
    loaded = {}
    for world in (2, 1, 3):
        cut = tmp_path / f"cut{world}"
        shutil.copytree(Path(whole.checkpoint_uri) / "step_00000003", cut / "step_00000003")
        out = tmp_path / f"loaded{world}.pt"
        at = {**raw, "scaling": {"num_workers": world}}
        spawn(_load_and_step, (rendezvous(), world, at, str(cut), str(out)), world)
        loaded[world] = torch.load(out)
        assert loaded[world]["step"] == 3 and loaded[world]["gap"] <= 1e-6
        assert abs(loaded[world]["loss"] - loaded[2]["loss"]) <= 1e-4
        with torch.no_grad():
            served = load_checkpoint(str(cut / "step_00000003")).build_fp32()(ROWS[:5])
        assert (served - loaded[world]["pred"]).abs().max().item() <= 1e-5
        if world != 2:
            log = tmp_path / f"resumed{world}.jsonl"
            _run(at, world=world, checkpoint_uri=str(cut), sink=str(log))
            records = [json.loads(r) for r in log.read_text().splitlines()]
            assert [r["step"] for r in records if "train_loss" in r] == [4]
            start = next(r for r in records if r.get("event") == "start")
            assert start["world_size"] == world and start["resumed_from"].endswith("step_00000003")


def test_a_zero1_checkpoint_holds_every_parameters_state_and_loads_without_zero(tmp_path):
    """ZeRO-1 writes each rank's optimizer shard (no gather on one rank); loaded into one worker's plain AdamW, the state
    is the one an unsharded 2-worker run holds after the same steps (1e-5), parameter by parameter."""
    from lepton_ray.sync import WorkerInfo

    plain = _run(_config(tmp_path / "plain", "allreduce", "adamw", steps=3, every=3))
    zero = _run(_config(tmp_path / "zero", "allreduce", "adamw", steps=3, every=3, allreduce={"shard_optimizer": True}))
    reader = CheckpointStore(zero.checkpoint_uri).open(CheckpointStore(zero.checkpoint_uri).latest())
    assert {"optimizer-0", "optimizer-1"} <= reader.names() and not reader.has("optimizer")
    cfg = load_config(_config(tmp_path / "one", "allreduce", "adamw", world=1))
    strategy = STRATEGIES["allreduce"](cfg, WorkerInfo(0, 1, torch.device("cpu")))
    strategy.build(lambda: build_model(cfg.model, zero.train_info.schema))
    optimizer = strategy.optimizer()
    strategy.load(reader, optimizer)
    got = optimizer.state_dict()["state"]
    store = CheckpointStore(plain.checkpoint_uri)
    want = store.load(store.latest(), ["optimizer"])["optimizer"]["state"]
    assert sorted(got) == sorted(want) == list(range(len(list(strategy.model.parameters()))))
    for i in want:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert (got[i][key] - want[i][key]).abs().max().item() <= 1e-5, (i, key)
    assert max(v["exp_avg"].abs().max().item() for v in want.values()) > 0  # not vacuous


def test_fsdp_checkpoints_on_s3_resume_to_the_uninterrupted_run(tmp_path, bucket):
    """On S3 (a moto server): every rank streams its DCP shards to the bucket through lepton_ray's filesystem layer, one
    manifest commits them, and a resume from there ends where the uninterrupted run ends (1e-6)."""
    from lepton_ray.storage import filesystem

    raw = _config(tmp_path, "fsdp", "adamw", steps=6, every=3, fsdp={"units": ["Linear"]})
    raw["checkpoint"] = {**raw["checkpoint"], "dir": f"s3://{bucket}/runs"}
    whole = _run(raw)
    assert whole.checkpoint_uri.startswith(f"s3://{bucket}/runs/")
    step3 = CheckpointStore(whole.checkpoint_uri).open(CheckpointStore(whole.checkpoint_uri).get(3))
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "model/.metadata", "optimizer/.metadata"} <= set(step3.files)
    fs, path = filesystem(whole.checkpoint_uri)
    fs.copy(f"{path}/step_00000003", f"{bucket}/cut/step_00000003", recursive=True)  # as if killed after step 3
    _run(raw, checkpoint_uri=f"s3://{bucket}/cut")
    assert CheckpointStore(f"s3://{bucket}/cut").latest().step == 6
    assert _gap(_saved(f"s3://{bucket}/cut"), _saved(whole.checkpoint_uri)) <= 1e-6


def test_fsdp_bf16_is_its_mixed_precision_policy(tmp_path):
    """train.precision: bf16 under fsdp computes with bf16 parameters (FSDP's MixedPrecisionPolicy, fp32 reductions and
    fp32 master shards): it trains to within bf16's rounding of the fp32 run, and not to the same bits."""
    fp32 = _run(_config(tmp_path / "fp32", "fsdp", "adamw", steps=10, fsdp={"units": ["Linear"]}))
    raw = _config(tmp_path / "bf16", "fsdp", "adamw", steps=10, fsdp={"units": ["Linear"]})
    bf16 = _run({**raw, "train": {**raw["train"], "precision": "bf16"}})
    a, b = _saved(fp32.checkpoint_uri), _saved(bf16.checkpoint_uri)
    assert all(v.dtype == torch.float32 for v in b.values())  # the checkpoint holds the fp32 shards
    assert 0 < _gap(a, b) <= 5e-2
