"""The ps and hybrid strategies on a real Ray cluster: sync PS == single process, hybrid == single process, the SSP bound,
sparse row traffic and convergence (digits, recommender); a killed PS shard: tests/faults/test_ps_shard_kill.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lepton_ray import Trainer, load_config
from lepton_ray.data.stream import WorkerStream
from lepton_ray.models import build_model
from lepton_ray.models.recommender import hash_rows
from run_configs import final_params, merge_sections, small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(tmp_path: Path, data_path: Path, **sections) -> dict:
    """:func:`small_config` on 2 sync PS shards."""
    ps = small_config(tmp_path, data_path, sync={"strategy": "ps", "ps": {"num_shards": 2, "mode": "sync"}})
    return merge_sections(ps, **sections)


def _steps(result) -> list[dict]:
    return [r for r in result.records if "train_loss" in r]


def _local_batches(trainer, cfg, rank: int, world: int, local_batch: int, n: int) -> list:
    """The first ``n`` batches worker ``rank`` of ``world`` trains on (the same stream the loop uses)."""
    stream = WorkerStream(trainer.train_info, cfg.data, rank=rank, world_size=world, local_batch=local_batch, seed=cfg.train.seed)
    out, epoch = [], 0
    while len(out) < n:
        out += list(stream.epoch(epoch))
        epoch += 1
    return out[:n]


def test_ps_equals_single_process(tmp_path, blobs):
    """2 workers, 2 shards, 20 SGD steps (momentum 0.9) on the same global batches end where one process ends (1e-5).
    ``ssp`` at ``staleness: 0`` with plain SGD is the same update, held at the shard (tests/unit/test_ps_shard.py)."""
    momentum = 0.9
    cfg = load_config(_config(tmp_path, blobs, train={"momentum": momentum}, sync={"ps": {"mode": "sync"}}))
    result = Trainer(cfg, progress=False).fit()
    assert result.metrics["steps"] == 20
    got = final_params(result)

    trainer = Trainer(cfg, progress=False)
    global_batches = [(torch.cat([b0["x"], b1["x"]]), torch.cat([b0["label"], b1["label"]]))
                      for b0, b1 in zip(*(_local_batches(trainer, cfg, rank, 2, 16, 20) for rank in range(2)))]
    torch.manual_seed(7)
    model = build_model(cfg.model, trainer.train_info.schema)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    for xb, yb in global_batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    single = model.state_dict()
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-2  # not vacuous
    assert max((got[k] - single[k]).abs().max().item() for k in single) <= 1e-5

    steps = _steps(result)
    assert [r["step"] for r in steps] == list(range(1, 21))
    n_params = sum(v.numel() for v in single.values())
    # every step rank 0 pushes its whole dense gradient and pulls the fresh parameters, 4 bytes each
    # (step 1 also counts the initial pull)
    assert all(r["ps_bytes_pushed"] == 4 * n_params for r in steps)
    assert [r["ps_bytes_pulled"] for r in steps] == [8 * n_params] + [4 * n_params] * 19
    assert all(r["ps_wait_s"] > 0 and r["ps_max_gap"] == 0 for r in steps)


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> dict:
    from lepton_ray.data.builders import digits

    d = tmp_path_factory.mktemp("digits")
    digits(str(d / "train.parquet"), str(d / "eval.parquet"))
    return {"train": str(d / "train.parquet"), "eval": str(d / "eval.parquet"), "label": "label"}


DIGITS_EPOCHS = 6


def _digits_config(tmp_path, digits_data, **sections) -> dict:
    base = {
        "model": {"name": "mlp", "hidden": [64]},
        "data": digits_data,
        "train": {"max_steps": None, "epochs": DIGITS_EPOCHS, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "seed": 0},
        "checkpoint": {"every_n_steps": 0},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return _config(tmp_path, Path(digits_data["train"]), **base)


@pytest.mark.parametrize("mode,bound", [("ssp", 2), pytest.param("async", None, marks=pytest.mark.slow)])  # CI: ssp
def test_async_and_ssp_with_a_straggler_converge_on_digits(tmp_path, digits_data, mode, bound):
    """Rank 1 sleeps 60 ms per step (a straggler, slow enough to stay one on a loaded machine). ssp (staleness 2): the recorded gap between the fastest
    and the slowest worker reaches 2 and never exceeds it; async (no bound): the fast worker runs further
    ahead. Both reach >= 0.93 held-out accuracy on digits."""
    cfg = _digits_config(
        tmp_path, digits_data,
        model={"factory": "ps_testing_models:slow_mlp", "kwargs": {"slow_rank": 1, "delay_s": 0.06, "hidden": [64]}},
        sync={"ps": {"mode": mode, "staleness": bound or 0}},
    )
    result = Trainer(load_config(cfg), progress=False).fit()
    assert result.metrics["eval_accuracy"] >= 0.93
    gaps = [r["ps_max_gap"] for r in _steps(result)]
    if bound is not None:
        assert max(gaps) == bound
    else:
        assert max(gaps) > 2


@pytest.fixture(scope="module")
def click_data(tmp_path_factory) -> dict:
    from lepton_ray.data.synthetic import clicks

    d = tmp_path_factory.mktemp("clicks")
    clicks(str(d / "train.parquet"), str(d / "eval.parquet"), train_rows=20_000, eval_rows=4_000)
    return {"train": str(d / "train.parquet"), "eval": str(d / "eval.parquet"),
            "inputs": {"ids": "ids", "dense": "dense"}, "targets": {"label": "label"}}


REC_ROWS, REC_DIM = 8000, 16


def test_hybrid_equals_single_process(tmp_path, click_data):
    """hybrid: the dense layers all-reduced by DDP, the embedding table on 2 PS shards updated row-wise with plain SGD;
    20 steps on the same global batches end where one process ends with plain SGD over every parameter (1e-5)."""
    from lepton_ray.train.losses import make_loss, model_inputs

    cfg = load_config(_config(
        tmp_path, Path(click_data["train"]),
        model={"name": "recommender", "hidden": [32], "kwargs": {"num_embeddings": 1000, "embedding_dim": 8}},
        data=click_data, train={"batch_size": 64, "momentum": 0.0},
        sync={"strategy": "hybrid", "ps": {"embedding_optimizer": "sgd"}}, checkpoint={"every_n_steps": 0},
    ))
    result = Trainer(cfg, progress=False).fit()
    got = final_params(result)

    trainer = Trainer(cfg, progress=False)
    schema = trainer.train_info.schema
    parts = zip(*(_local_batches(trainer, cfg, rank, 2, 32, 20) for rank in range(2)))
    global_batches = [{k: torch.cat([b0[k], b1[k]]) for k in b0} for b0, b1 in parts]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, schema)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loss = make_loss(cfg.model, schema)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    for b in global_batches:
        opt.zero_grad()
        loss(model(model_inputs(b, tuple(c.name for c in schema.inputs), loss.name)), b)[0].backward()
        opt.step()
    single = model.state_dict()
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-3  # not vacuous
    assert max((got[k] - single[k]).abs().max().item() for k in single) <= 1e-5


@pytest.mark.parametrize("strategy", ["ps", "hybrid"])
def test_recommender_learns_and_pushes_only_touched_rows(tmp_path, click_data, strategy):
    """AUC >= 0.75 on the held-out clicks; per step, rank 0 pushes exactly the k distinct rows its batch
    touched (k ids of 8 bytes + k rows of 16 float32), never the 8,000-row table."""
    cfg = load_config(_config(
        tmp_path, Path(click_data["train"]),
        model={"name": "recommender", "hidden": [32],
               "kwargs": {"num_embeddings": REC_ROWS, "embedding_dim": REC_DIM}},
        data=click_data,
        train={"max_steps": 60, "batch_size": 256, "lr": 0.1, "seed": 0},
        sync={"strategy": strategy},
        checkpoint={"every_n_steps": 0},
    ))
    result = Trainer(cfg, progress=False).fit()
    assert result.metrics["eval_auc"] >= 0.75

    rank0 = _local_batches(Trainer(cfg, progress=False), cfg, 0, 2, 128, 60)
    expected = [len(np.unique(hash_rows(b["ids"], REC_ROWS).numpy())) for b in rank0]  # the int64 ids' hashed rows
    steps = _steps(result)
    assert [r["ps_emb_rows_pushed"] for r in steps] == expected
    assert [r["ps_emb_bytes_pushed"] for r in steps] == [k * (8 + 4 * REC_DIM) for k in expected]
    assert max(expected) * 10 < REC_ROWS  # a batch touches a small fraction: the counts follow k, not R


def test_dynamic_balance_keeps_the_fast_worker_busy_within_the_bound(tmp_path, digits_data):
    """``balance: dynamic`` with a straggler (rank 1 sleeps 60 ms per batch), ssp staleness 2: the fast
    worker takes more than its half of every epoch (it keeps computing while held at the bound), the
    recorded gap never exceeds 2, checkpoints are committed at epoch ends only, and digits reaches 0.93."""
    cfg = load_config(_digits_config(
        tmp_path, digits_data, checkpoint={"every_n_steps": 40},
        model={"factory": "ps_testing_models:slow_mlp", "kwargs": {"slow_rank": 1, "delay_s": 0.06, "hidden": [64]}},
        sync={"ps": {"mode": "ssp", "staleness": 2, "balance": "dynamic"}},
    ))
    result = Trainer(cfg, progress=False).fit()
    assert result.metrics["eval_accuracy"] >= 0.93
    steps = _steps(result)
    assert max(r["ps_max_gap"] for r in steps) <= 2
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps})  # the run's step only moves forward

    rows = Trainer(cfg, progress=False).train_info.num_rows
    end = next(r for r in result.records if r.get("event") == "end")
    fast = end["data_stats"]["rows"]  # rank 0's rows over the run
    assert fast > 0.6 * rows * DIGITS_EPOCHS  # an equal deal would give it half
    # the run's step counts both workers' batches: at least the fast worker's share of them
    assert result.metrics["steps"] >= fast // 32 // 2 and result.metrics["steps"] <= rows * DIGITS_EPOCHS // 64

    nominal = rows // 64  # steps of one epoch, as the deal counts them
    due = [e for e in range(DIGITS_EPOCHS) if e == DIGITS_EPOCHS - 1 or nominal * (e + 1) // 40 > nominal * e // 40]
    saved = [r for r in result.records if r.get("event") == "checkpoint"]
    assert len(saved) == len(due) < DIGITS_EPOCHS  # at the ends of the epochs in which a multiple of 40 falls
    assert [r["step"] for r in saved] == sorted({r["step"] for r in saved})
    from lepton_ray.train.checkpoint import CheckpointStore

    latest = CheckpointStore(str(Path(result.checkpoint).parent)).latest()
    assert latest.meta["epoch"] == DIGITS_EPOCHS and latest.meta["step_in_epoch"] == 0
    assert latest.meta["data"]["deal"] == "dynamic"
