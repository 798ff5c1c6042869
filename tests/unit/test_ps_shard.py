"""Unit tests of the parameter server without a cluster: shard plan, update rules, SSP gate, config errors."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray import ConfigError, Trainer, load_config
from lepton_ray.checks import check_config
from lepton_ray.data.synthetic import click_table
from lepton_ray.sync.ps_shard import PSStateError, ShardServer, plan_shards
from lepton_ray.train.metrics import binary_auc

SGD = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "embedding_optimizer": "adagrad", "embedding_lr": None}


def raises(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


# --------------------------------------------------------------------------- plan


def test_plan_balances_bytes_and_splits_tables_by_rows():
    params = [("emb", (1000, 8), True), ("w1", (64, 32), False), ("w2", (32, 16), False), ("b1", (32,), False), ("b2", (16,), False)]
    plan = plan_shards(params, 3)
    rows = sorted((p.row_start, p.shape[0]) for s in plan for p in s if p.sparse)
    assert rows == [(0, 333), (333, 334), (667, 333)]  # every row exactly once, contiguous
    dense = sorted(p.name for s in plan for p in s if not p.sparse)
    assert dense == ["b1", "b2", "w1", "w2"]
    loads = [sum(p.nbytes for p in s) for s in plan]
    assert max(loads) - min(loads) <= 64 * 32 * 4  # within the largest dense tensor


def test_plan_refuses_more_shards_than_parameters():
    with pytest.raises(ValueError, match=re.escape("3 is more than the model's parameters allow: 2 dense tensor(s) and embedding tables of at most 0 rows fill only 2 shard(s)")):
        plan_shards([("w", (4, 4), False), ("b", (4,), False)], 3)


# --------------------------------------------------------------------------- shard update rules


def _shard(mode: str, staleness: int = 0, world: int = 2, train=SGD) -> ShardServer:
    init = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "emb": np.ones((5, 2), np.float32)}
    pieces = [p for s in plan_shards([("w", (2, 3), False), ("emb", (5, 2), True)], 1) for p in s]
    return ShardServer(0, pieces, init, world_size=world, mode=mode, staleness=staleness, train=train, timeout_s=5)


@pytest.mark.parametrize(("mode", "momentum"), [("sync", 0.9), ("ssp", 0.0)], ids=["sync", "ssp-staleness0"])
def test_shard_applies_the_mean_gradient_like_torch_sgd(mode, momentum):
    """sync: the mean gradient, applied once everyone pushed. ssp with ``staleness: 0`` applies each worker's
    half-gradient as it arrives but releases nobody before everyone pushed: with plain SGD (no momentum) every worker
    then pulls exactly the synchronous update (sync is held to one process end to end on Ray:
    tests/integration/test_param_server.py)."""
    shard = _shard(mode, staleness=0, train={**SGD, "momentum": momentum})
    g0, g1 = np.full(6, 1.0, np.float32), np.full(6, 3.0, np.float32)

    w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)

    async def rounds():
        for step in range(3):
            replies = await asyncio.gather(shard.push(0, step, 0.1, g0, {}), shard.push(1, step, 0.1, g1, {}))
            w.grad = torch.full((2, 3), 2.0)
            opt.step()
            assert np.allclose(replies[0]["dense"], w.detach().numpy().ravel())
            assert np.array_equal(replies[0]["dense"], replies[1]["dense"])

    asyncio.run(rounds())
    assert shard.clocks == [3, 3]


def test_sparse_rows_from_several_workers_are_summed_then_averaged():
    shard = _shard("sync", train={**SGD, "embedding_optimizer": "sgd"})
    dense = np.zeros(6, np.float32)

    async def both():
        return await asyncio.gather(
            shard.push(0, 0, 0.5, dense, {"emb": (np.array([0, 3]), np.ones((2, 2), np.float32))}),
            shard.push(1, 0, 0.5, dense, {"emb": (np.array([3]), np.full((1, 2), 3.0, np.float32))}),
        )

    asyncio.run(both())
    rows = shard.pull_rows("emb", np.arange(5))
    # row 0: 1 - 0.5 * (1/2); row 3: 1 - 0.5 * (1 + 3)/2; untouched rows stay 1
    assert np.allclose(rows[:, 0], [0.75, 1.0, 1.0, 0.0, 1.0])


def test_ssp_holds_a_worker_that_is_staleness_steps_ahead():
    async def scenario():
        shard = _shard("ssp", staleness=1)
        g = np.zeros(6, np.float32)
        r = await shard.push(0, 0, 0.1, g, {})  # worker 0 finished step 0: 1 ahead, allowed
        assert r["gap"] == 1
        ahead = asyncio.ensure_future(shard.push(0, 1, 0.1, g, {}))  # would be 2 ahead: held
        await asyncio.sleep(0.2)
        assert not ahead.done() and shard.clocks == [2, 0]
        await shard.push(1, 0, 0.1, g, {})  # the straggler catches up one step: worker 0 is released
        r = await asyncio.wait_for(ahead, 2)
        assert r["gap"] == 1 and r["max_gap"] == 1

    asyncio.run(scenario())


def test_async_never_waits_and_records_the_gap():
    async def scenario():
        shard = _shard("async")
        g = np.zeros(6, np.float32)
        for step in range(5):
            r = await asyncio.wait_for(shard.push(0, step, 0.1, g, {}), 1)
        assert r["gap"] == 5 and r["max_gap"] == 5

    asyncio.run(scenario())


def test_ssp_without_hold_answers_at_once_and_release_waits_for_the_bound():
    """balance: dynamic: a push past the bound is applied and answered ``held`` at once (with the freshest
    parameters, to compute on while held); ``release`` answers when the straggler is within the bound again."""
    async def scenario():
        shard = _shard("ssp", staleness=1)
        g = np.ones(6, np.float32)
        r = await asyncio.wait_for(shard.push(0, 0, 0.1, g, {}, hold=False), 1)
        assert not r["held"] and r["gap"] == 1 and r["dense"] is not None
        r = await asyncio.wait_for(shard.push(0, 1, 0.1, g, {}, batches=3, hold=False), 1)  # now 2 ahead
        assert r["held"] and r["batches"] == 4 and shard.clocks == [2, 0] and r["max_gap"] == 1
        assert np.array_equal(r["dense"], shard.pull_dense())  # both pushes applied
        released = asyncio.ensure_future(shard.release(0, 2))
        await asyncio.sleep(0.2)
        assert not released.done()
        await shard.push(1, 0, 0.1, g, {})
        r = await asyncio.wait_for(released, 2)
        assert not r["held"] and r["gap"] == 1 and r["max_gap"] == 1 and r["batches"] == 5
        assert np.array_equal(r["dense"], shard.pull_dense())

    asyncio.run(scenario())


def test_a_finished_worker_no_longer_holds_the_others_and_extra_pushes_do_not_count_a_step():
    async def scenario():
        shard = _shard("ssp", staleness=0)
        g = np.ones(6, np.float32)
        r = await shard.push(0, 0, 0.1, g, {}, hold=False)
        assert r["held"]
        released = asyncio.ensure_future(shard.release(0, 1))
        # the straggler's batches computed while it was held: applied, no step counted, never held
        r = await asyncio.wait_for(shard.push(1, 0, 0.1, g, {}, batches=2, hold=False, advance=False), 1)
        assert not r["held"] and shard.clocks == [1, 0] and r["batches"] == 3
        await asyncio.sleep(0.1)
        assert not released.done()
        await shard.finish(1)
        r = await asyncio.wait_for(released, 2)
        assert r["gap"] == 0 and r["max_gap"] == 0

    asyncio.run(scenario())


def test_claims_deal_every_piece_once_per_epoch_and_restore_deals_anew():
    shard = _shard("ssp")
    assert [shard.claim(0, 3) for _ in range(4)] == [0, 1, 2, None]
    assert shard.claim(1, 3) == 0  # every epoch has its own deal
    saved = shard.state()
    assert saved["batches"] == 0
    asyncio.run(shard.restore(saved))
    assert shard.claim(0, 3) == 0


def test_a_restored_shard_refuses_pushes_from_the_future():
    async def scenario():
        shard = _shard("async")
        g = np.ones(6, np.float32)
        await shard.push(0, 0, 0.1, g, {})
        saved = shard.state()
        await shard.push(0, 1, 0.1, g, {})
        await shard.restore(saved)  # like a Ray restart that reloads the checkpoint
        assert shard.clocks == [0, 0]  # the checkpoint was taken with every worker at one step (the min)
        with pytest.raises(PSStateError, match="PS shard 0 is at step 0 for worker 0, which pushed step 2"):
            await shard.push(0, 2, 0.1, g, {})
        assert np.array_equal(shard.pull_dense(), saved["dense"]["w"].numpy().ravel())

    asyncio.run(scenario())


# --------------------------------------------------------------------------- config errors (before Ray starts)


@pytest.mark.parametrize(
    ("ps", "message"),
    [
        ({"mode": "bsp"}, "sync.ps.mode: 'bsp' is not one of sync, async, ssp"),
        ({"staleness": -1}, "sync.ps.staleness: must be >= 0, got -1"),
        ({"num_shards": 0}, "sync.ps.num_shards: must be >= 1, got 0"),
        ({"embedding_lr": 0}, "sync.ps.embedding_lr: must be > 0, got 0.0"),
    ],
)
def test_invalid_ps_options(ps, message):
    with raises(message):
        check_config(load_config({"data": {"train": "x"}, "sync": {"strategy": "ps", "ps": ps}}))


def _cfg(blobs, **sync) -> dict:
    return {"data": {"train": str(blobs)}, "model": {"hidden": [8]}, "train": {"batch_size": 32},
            "sync": sync, "run": {"dir": str(blobs.parent / "runs")}}


def test_hybrid_needs_an_embedding(blobs):
    with raises("sync.strategy: 'hybrid' needs a model with nn.Embedding or nn.EmbeddingBag tables for the parameter"
                " servers; model 'mlp' has none (use 'allreduce' or 'ps')"):
        Trainer(_cfg(blobs, strategy="hybrid"), progress=False).fit()


def test_more_shards_than_parameters(blobs):
    with raises("sync.ps.num_shards: 5 is more than the model's parameters allow: 4 dense tensor(s) and embedding"
                " tables of at most 0 rows fill only 4 shard(s)"):
        Trainer(_cfg(blobs, strategy="ps", ps={"num_shards": 5}), progress=False).fit()


def test_grad_clip_with_ps_is_refused(blobs):
    cfg = _cfg(blobs, strategy="ps")
    cfg["train"]["grad_clip_norm"] = 1.0
    with raises("train.grad_clip_norm: not supported with sync.strategy 'ps' (gradients are combined on the parameter"
                " servers, no worker sees the global gradient), got 1"):
        Trainer(cfg, progress=False).fit()


@pytest.mark.parametrize(("strategy", "mode", "why"), [
    ("ps", "sync", "sync.ps.mode 'sync' steps in lock step"),
    ("hybrid", "ssp", "sync.strategy 'hybrid' all-reduces every step"),
])
def test_dynamic_balance_needs_ps_with_async_or_ssp(tmp_path, strategy, mode, why):
    data = tmp_path / "clicks.parquet"
    pq.write_table(click_table(512, num_fields=2, vocab=10, num_dense=1), data)
    cfg = _cfg(data, strategy=strategy, ps={"mode": mode, "balance": "dynamic"})
    cfg["data"].update(inputs={"ids": "ids", "dense": "dense"}, targets={"label": "label"})
    cfg["model"] = {"name": "recommender", "hidden": [8], "kwargs": {"num_embeddings": 10, "embedding_dim": 2}}
    with raises(f"sync.ps.balance: 'dynamic' needs sync.strategy 'ps' with sync.ps.mode 'async' or 'ssp' ({why}); use balance 'static'"):
        Trainer(cfg, progress=False).fit()


def test_balance_must_be_static_or_dynamic():
    with raises("sync.ps.balance: 'even' is not one of static, dynamic"):
        check_config(load_config({"data": {"train": "x"}, "sync": {"strategy": "ps", "ps": {"balance": "even"}}}))


# --------------------------------------------------------------------------- recommender, click data, AUC


def test_binary_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(y + rng.normal(0, 1.5, 500), 1)  # rounded: many ties
    assert binary_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_click_data_is_seeded_and_learnable():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    a, b = click_table(3000, seed=0), click_table(3000, seed=0)
    assert a.equals(b)
    tr, ev = click_table(20_000, seed=0), click_table(5_000, seed=1)
    ids = lambda t: t.column("ids").combine_chunks().flatten().to_numpy().reshape(-1, 8)  # noqa: E731
    enc = OneHotEncoder(handle_unknown="ignore").fit(ids(tr))
    clf = LogisticRegression(max_iter=200).fit(enc.transform(ids(tr)), tr.column("label").to_numpy())
    auc = roc_auc_score(ev.column("label").to_numpy(), clf.predict_proba(enc.transform(ids(ev)))[:, 1])
    assert auc > 0.75  # the ids carry the click signal (labels of pure noise would give ~0.5)
    assert max(len(np.unique(ids(tr)[i : i + 128])) for i in range(0, 20_000, 128)) < 8000 / 10  # Zipf: few rows per batch


def test_a_shard_started_over_a_checkpoint_restores_its_part(tmp_path):
    """What a shard restarted by Ray does: its constructor loads its piece of the newest checkpoint."""
    from lepton_ray.train.checkpoint import CheckpointStore

    async def advance(shard):
        for step in range(3):
            await shard.push(0, step, 0.1, np.ones(6, np.float32), {"emb": (np.array([1]), np.ones((1, 2), np.float32))})

    trained = _shard("async")
    asyncio.run(advance(trained))
    saved = trained.state()
    CheckpointStore(str(tmp_path)).save(30, {"strategy": {"shards": [saved]}}, meta={})

    init = {"w": np.zeros((2, 3), np.float32), "emb": np.zeros((5, 2), np.float32)}
    pieces = [p for s in plan_shards([("w", (2, 3), False), ("emb", (5, 2), True)], 1) for p in s]
    fresh = ShardServer(0, pieces, init, world_size=2, mode="async", staleness=0, train=SGD, checkpoint_uri=str(tmp_path))
    assert fresh.restored_from.endswith("step_00000030")
    assert np.array_equal(fresh.pull_dense(), trained.pull_dense())
    assert np.array_equal(fresh.pull_rows("emb", np.arange(5)), trained.pull_rows("emb", np.arange(5)))
    assert fresh.clocks == [0, 0]  # min of the saved clocks [3, 0]: every worker restarts at one step
    assert fresh.state()["dense_opt"]["state"][0]["momentum_buffer"].equal(saved["dense_opt"]["state"][0]["momentum_buffer"])
