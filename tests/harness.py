"""The multi-process harness of the strategy contract: the real training loop in spawned processes over gloo, no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from conftest import rendezvous, spawn, write_blobs
from lepton_ray import Trainer, load_config
from lepton_ray.models import build_model
from lepton_ray.train.checkpoint import CheckpointStore, model_state
from lepton_ray.train.context import WorkerContext
from lepton_ray.train.loop import LoopSpec, train_loop
from lepton_ray.train.metrics import Sink

STEPS, BATCH, WORLD = 20, 32, 2


def _config(tmp_path: Path, strategy: str, optimizer: str = "sgd", *, steps: int = STEPS, batch: int = BATCH, world: int = WORLD,
            every: int = 0, **sync) -> dict:
    data = write_blobs(tmp_path / "data" / "train.parquet", rows=256)
    opt = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.01}
    return {"model": {"name": "mlp", "hidden": [16]}, "data": {"train": str(data)},
            "train": {"max_steps": steps, "batch_size": batch, **opt, "schedule": "constant", "seed": 3, "grad_accum_steps": 2,
                      "grad_clip_norm": 0.5},
            "scaling": {"num_workers": world}, "sync": {"strategy": strategy, **sync},
            "checkpoint": {"every_n_steps": every}, "run": {"dir": str(tmp_path / "runs"), "name": "c"}}


def _seeded(tmp_path: Path, raw: dict) -> dict:
    """``raw`` starting from a seed checkpoint of the model's own initialisation (what the reference starts from)."""
    trainer = Trainer(load_config(raw), progress=False)
    torch.manual_seed(trainer.config.train.seed)
    model = build_model(trainer.config.model, trainer.train_info.schema)
    seed = CheckpointStore(str(tmp_path / "seed")).save(0, {"model": model.state_dict()}, meta={})
    return {**raw, "train": {**raw["train"], "init_from": seed.uri}}


def _worker(rank: int, init: str, world: int, specs: list[LoopSpec]) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for spec in specs:
            train_loop(spec, WorkerContext(rank, world))
    finally:
        dist.destroy_process_group()


def _run(raw: dict, world: int = WORLD, checkpoint_uri: str = "", sink: str = "") -> Trainer:
    """The real loop in ``world`` spawned processes over gloo; returns the driver-side Trainer (its checkpoint URI)."""
    return _runs([raw], world, [checkpoint_uri], [sink])[0]


def _runs(raws: list[dict], world: int = WORLD, checkpoint_uris: Optional[list[str]] = None, sinks: Optional[list[str]] = None) -> list[Trainer]:
    """Several runs, one after the other, in the same ``world`` spawned processes (one start-up: ~5-10 s each);
    ``sinks``: each run's metrics.jsonl path (rank 0's records), or "" for none."""
    trainers, specs = [], []
    for raw, uri, sink in zip(raws, checkpoint_uris or [""] * len(raws), sinks or [""] * len(raws)):
        cfg = load_config(raw)
        trainers.append(Trainer(cfg, progress=False))
        specs.append(LoopSpec(cfg.to_dict(), trainers[-1].train_info, trainers[-1].eval_info, uri or trainers[-1].checkpoint_uri,
                              sink=Sink(sink) if sink else None))
    spawn(_worker, (rendezvous(), world, specs), world)
    return trainers


def _saved(uri: str) -> dict[str, torch.Tensor]:
    """The newest checkpoint's model, consolidated on this process whatever the strategy saved."""
    store = CheckpointStore(uri)
    return model_state(store.open(store.latest()))


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
