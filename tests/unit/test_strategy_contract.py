"""The strategy contract, without Ray: the training loop under a plain torch.multiprocessing + gloo harness.

Every lock-step strategy that needs no services of its own (no actors) runs the real loop
(:func:`lepton_ray.train.loop.train_loop`) in 2 processes handed a :class:`WorkerContext`, and must end
where one process ends with plain torch on the same global batches (the two workers' batches together).
The parameter-server strategies need their shard actors: tests/integration/test_param_server.py holds
them to the same bar on a real Ray cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port, write_blobs
from lepton_ray import Trainer, load_config
from lepton_ray.data.pipeline import WorkerStream
from lepton_ray.models import build_model
from lepton_ray.sync import STRATEGIES
from lepton_ray.train.checkpoint import CheckpointStore
from lepton_ray.train.context import WorkerContext
from lepton_ray.train.loop import LoopSpec, train_loop

STEPS, BATCH, WORLD = 12, 32, 2


def _config(tmp_path: Path, strategy: str, **sync) -> dict:
    data = write_blobs(tmp_path / "data" / "train.parquet", rows=256)
    return {"model": {"name": "mlp", "hidden": [16]}, "data": {"train": str(data)},
            "train": {"max_steps": STEPS, "batch_size": BATCH, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                      "schedule": "constant", "seed": 3, "grad_accum_steps": 2, "grad_clip_norm": 0.5},
            "scaling": {"num_workers": WORLD}, "sync": {"strategy": strategy, **sync},
            "checkpoint": {"every_n_steps": 0}, "run": {"dir": str(tmp_path / "runs"), "name": "c"}}


def _worker(rank: int, port: int, spec: LoopSpec) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        train_loop(spec, WorkerContext(rank, WORLD))
    finally:
        dist.destroy_process_group()


def _batches(trainer: Trainer, world: int) -> list[dict[str, torch.Tensor]]:
    """The run's first global batches: each step's local batches of the ``world`` workers, together."""
    cfg = trainer.config
    streams = [WorkerStream(trainer.train_info, cfg.data, rank=r, world_size=world, local_batch=BATCH // world, seed=cfg.train.seed)
               for r in range(world)]
    batches, epoch = [], 0
    while len(batches) < STEPS:
        batches += [{k: torch.cat([b[k] for b in parts]) for k in parts[0]} for parts in zip(*(s.epoch(epoch) for s in streams))]
        epoch += 1
    return batches[:STEPS]


def _reference(trainer: Trainer, world: int) -> dict[str, torch.Tensor]:
    """Plain torch in one process: SGD on the global batches, clipped like the run."""
    cfg = trainer.config
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, trainer.train_info.schema)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    for b in _batches(trainer, world):
        opt.zero_grad()
        F.cross_entropy(model(b["x"]), b["label"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
        opt.step()
    return model.state_dict()


LOCKSTEP = [("allreduce", {"allreduce": {"cpu_transport": "shm"}}), ("allreduce", {"allreduce": {"cpu_transport": "gloo"}})]


def test_every_lockstep_strategy_without_services_is_covered():
    """A new lock-step strategy without driver-side services must be added to LOCKSTEP above."""
    from lepton_ray.sync.base import Services

    plain = {name for name, cls in STRATEGIES.items() if cls.Services is Services}
    assert plain == {name for name, _ in LOCKSTEP}


@pytest.mark.parametrize(("strategy", "sync"), LOCKSTEP, ids=[f"{s}-{o['allreduce']['cpu_transport']}" for s, o in LOCKSTEP])
def test_lockstep_strategy_equals_single_process(tmp_path, strategy, sync):
    cfg = load_config(_config(tmp_path, strategy, **sync))
    trainer = Trainer(cfg, progress=False)
    spec = LoopSpec(cfg.to_dict(), trainer.train_info, trainer.eval_info, trainer.checkpoint_uri)
    mp.start_processes(_worker, args=(free_port(), spec), nprocs=WORLD, start_method="spawn", join=True)

    store = CheckpointStore(trainer.checkpoint_uri)
    latest = store.latest()
    assert latest is not None and latest.step == STEPS
    got = store.load(latest, ["model"])["model"]
    torch.manual_seed(cfg.train.seed)
    start = build_model(cfg.model, trainer.train_info.schema).state_dict()
    single = _reference(trainer, WORLD)
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-2  # training moved them: not vacuous
    assert max((got[k] - single[k]).abs().max().item() for k in single) <= 1e-5


def test_a_local_run_trains_in_this_process_and_equals_plain_torch(tmp_path):
    """``Trainer.fit(local=True)``: the same loop as one worker in the calling process, no Ray."""
    cfg = load_config(_config(tmp_path, "allreduce", **{"allreduce": {}}))
    cfg = load_config(cfg, ["scaling.num_workers=1", "train.eval_every_steps=4"])
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit(local=True)
    assert result.metrics["steps"] == STEPS and result.checkpoint.endswith(f"step_{STEPS:08d}")
    records = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert sum('"train_loss"' in r for r in records) == STEPS and (Path(result.run_dir) / "result.json").exists()

    store = CheckpointStore(trainer.checkpoint_uri)
    got = store.load(store.latest(), ["model"])["model"]
    assert max((got[k] - v).abs().max().item() for k, v in _reference(trainer, 1).items()) <= 1e-5


def test_a_local_run_refuses_several_workers(tmp_path):
    from lepton_ray import ConfigError

    with pytest.raises(ConfigError, match=r"^--local: trains one worker in this process, without Ray: needs scaling.num_workers 1 \(got 2\)"):
        Trainer(load_config(_config(tmp_path, "allreduce")), progress=False).fit(local=True)
