"""The strategy contract, without Ray: the training loop under a plain torch.multiprocessing + gloo harness.

Every registered strategy that starts no actors of its own runs the real loop
(:func:`lepton_ray.train.loop.train_loop`) in 2 processes handed a :class:`WorkerContext`, and must end
where one process ends with plain torch on the same global batches (the two workers' batches together),
from the same initial weights (a seed checkpoint, ``train.init_from``): 1e-5 after 20 steps. A new
strategy is held to this by its registry line alone. The strategies with services (parameter-server
actors) are held to the same bar on a real Ray cluster: tests/integration/test_param_server.py.

The sharded checkpoints (resume, resharding, serving) are checked in tests/integration/test_sharded_checkpoints.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness import BATCH, STEPS, WORLD, _config, _gap, _run, _saved, _seeded
from lepton_ray import Trainer, load_config
from lepton_ray.data.stream import WorkerStream
from lepton_ray.models import build_model
from lepton_ray.sync import STRATEGIES
from lepton_ray.train.checkpoint import CheckpointStore

# option sets a strategy is also held to; a registered strategy not named here runs with its defaults
VARIANTS = {
    "allreduce": {"shm": {"allreduce": {"cpu_transport": "shm"}}, "gloo": {"allreduce": {"cpu_transport": "gloo"}},
                  "zero1": {"allreduce": {"shard_optimizer": True}}},
    "fsdp": {"units": {"fsdp": {"units": ["Linear"]}}, "gathered": {"fsdp": {"units": ["Linear"], "reshard_after_forward": False}}},
}
OPTIMIZERS = {"zero1": ["sgd", "adamw"], "units": ["sgd", "adamw"]}  # the sharded optimizer states, with both optimizers
CASES = [(name, label, opts, optimizer) for name, cls in STRATEGIES.items() if not cls.Services.starts_actors()
         for label, opts in VARIANTS.get(name, {"defaults": {}}).items() for optimizer in OPTIMIZERS.get(label, ["sgd"])]
WITH_SERVICES = {"ps", "hybrid"}  # held to the same bar on Ray: tests/integration/test_param_server.py


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


def _reference(trainer: Trainer, world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain torch in one process on the global batches, clipped like the run: (start, end) state dicts."""
    t = trainer.config.train
    torch.manual_seed(t.seed)
    model = build_model(trainer.config.model, trainer.train_info.schema)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    for b in _batches(trainer, world):
        opt.zero_grad()
        F.cross_entropy(model(b["x"]), b["label"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        opt.step()
    return start, model.state_dict()


def test_every_strategy_is_held_to_single_process_training():
    """Every registered strategy is in the parametrization below or, with services, in the integration tier."""
    plain = {name for name, cls in STRATEGIES.items() if not cls.Services.starts_actors()}
    assert {name for name, *_ in CASES} == plain and set(STRATEGIES) == plain | WITH_SERVICES


@pytest.mark.parametrize(("strategy", "label", "sync", "optimizer"), CASES, ids=[f"{s}-{lab}-{o}" for s, lab, _, o in CASES])
def test_strategy_equals_single_process(tmp_path, strategy, label, sync, optimizer):
    trainer = _run(_seeded(tmp_path, _config(tmp_path, strategy, optimizer, **sync)))
    store = CheckpointStore(trainer.checkpoint_uri)
    assert store.latest().step == STEPS
    start, single = _reference(trainer, WORLD)
    assert _gap(single, start) > 1e-2  # training moved them: not vacuous
    assert _gap(_saved(trainer.checkpoint_uri), single) <= 1e-5


def test_a_local_run_trains_in_this_process_and_equals_plain_torch(tmp_path):
    """``Trainer.fit(local=True)``: the same loop as one worker in the calling process, no Ray."""
    raw = _seeded(tmp_path, _config(tmp_path, "allreduce", world=1))
    cfg = load_config(raw, ["train.eval_every_steps=4"])
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit(local=True)
    assert result.metrics["steps"] == STEPS and result.checkpoint.endswith(f"step_{STEPS:08d}")
    records = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert sum('"train_loss"' in r for r in records) == STEPS and (Path(result.run_dir) / "result.json").exists()
    assert _gap(_saved(trainer.checkpoint_uri), _reference(trainer, 1)[1]) <= 1e-5


def test_a_local_run_refuses_several_workers(tmp_path):
    from lepton_ray import ConfigError

    with pytest.raises(ConfigError, match=r"^--local: trains one worker in this process, without Ray: needs scaling.num_workers 1 \(got 2\)"):
        Trainer(load_config(_config(tmp_path, "allreduce")), progress=False).fit(local=True)


def test_fsdp_units_are_checked_on_the_driver_before_any_worker_starts(tmp_path):
    from lepton_ray import ConfigError

    with pytest.raises(ConfigError, match=r"^sync.fsdp.units: 'Blok' is not a module class of the model; its classes are: Linear, MLP, ReLU$"):
        Trainer(load_config(_config(tmp_path, "fsdp", fsdp={"units": ["Blok"]})), progress=False).fit()


def test_fsdp_cpu_offload_needs_gpu_workers(tmp_path):
    from lepton_ray import ConfigError

    with pytest.raises(ConfigError, match=r"^sync.fsdp.cpu_offload: keeps GPU workers' shards in host memory; these workers are CPU"):
        Trainer(load_config(_config(tmp_path, "fsdp", fsdp={"cpu_offload": True})), progress=False).fit()
