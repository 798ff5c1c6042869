"""benchmarks/scaling_model.py's pure parts: the cost formulas, their composition and the fitter (no processes, no
timing: the measurements themselves belong to the benchmark)."""

from __future__ import annotations

import doctest
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling_model.py"
_spec = importlib.util.spec_from_file_location("scaling_model", _PATH)
sm = importlib.util.module_from_spec(_spec)
sys.modules["scaling_model"] = sm  # dataclasses look their module up by name
_spec.loader.exec_module(sm)

LINK = sm.Link(alpha_s=1e-5, beta_s_per_byte=1e-9)
REC = sm.Workload("rec", dense_params=1e6, compute_s=0.01, embedding_rows=1e6, embedding_dim=16, sparsity=0.01)


def test_ring_allreduce_cost_for_known_constants():
    # 2(p-1)/p * S * beta + 2(p-1) * alpha = 2*3/4 * 1e6 * 1e-9 + 6 * 1e-5
    assert LINK.seconds(sm.ring_allreduce(1e6, 4)) == pytest.approx(1.5e-3 + 6e-5, rel=1e-12)
    assert LINK.seconds(sm.ring_allreduce(1e6, 4, buckets=3)) == pytest.approx(1.5e-3 + 18e-5, rel=1e-12)
    assert sm.ring_allreduce(1e6, 1) == (0, 0)  # one worker sends nothing
    assert sm.Link.gbit(100).beta_s_per_byte == pytest.approx(1 / 12.5e9, rel=1e-12)  # 100 Gbit/s = 12.5 GB/s


def test_fsdp_moves_three_all_gathers_worth():
    assert sm.fsdp(8e6, 8) == (21, pytest.approx(3 * 7 / 8 * 8e6, rel=1e-12))
    nbytes = sm.comm("fsdp", sm.Workload("m", dense_params=1e6, compute_s=1.0), 8)[1]
    assert nbytes == pytest.approx(1.5 * sm.comm("allreduce", sm.Workload("m", dense_params=1e6, compute_s=1.0), 8)[1], rel=1e-12)


def test_ps_with_sparsity_zero_is_the_dense_push_and_pull():
    dense_only = sm.Workload("rec0", dense_params=1e6, compute_s=0.01, embedding_rows=1e6, embedding_dim=16, sparsity=0.0)
    for p, shards, busiest in ((8, 8, 1.0), (8, 2, 4.0), (2, 4, 1.0)):  # busiest link: a worker's, or a shard's p/shards
        terms = sm.comm("ps", dense_only, p, shards)
        assert terms == sm.ps_push_pull(4e6, 0, p, shards) == (2, 2 * busiest * 4e6)
        assert LINK.seconds(terms) == pytest.approx(2 * 1e-5 + 2 * busiest * 4e6 * 1e-9, rel=1e-12)
    # the table's rows are not pushed when no row is touched; each touched row is its floats plus an int64 id
    assert REC.touched_bytes == 0.01 * 1e6 * (16 * 4 + 8)
    assert sm.comm("ps", REC, 8)[1] - sm.comm("ps", dense_only, 8)[1] == pytest.approx(2 * REC.touched_bytes, rel=1e-12)


def test_hybrid_is_the_dense_all_reduce_plus_the_sparse_ps():
    for p in (2, 16, 256):
        dense = sm.ring_allreduce(REC.dense_bytes, p, REC.buckets(REC.dense_bytes))
        sparse = sm.ps_push_pull(0, REC.touched_bytes, p, p)
        hybrid = LINK.seconds(sm.comm("hybrid", REC, p))
        assert hybrid == pytest.approx(LINK.seconds(dense) + LINK.seconds(sparse), rel=1e-12)
        assert hybrid < LINK.seconds(sm.comm("allreduce", REC, p))  # the table's dense gradient is never all-reduced


@pytest.mark.parametrize("strategy", sm.STRATEGIES)
def test_efficiency_is_monotone_in_bandwidth(strategy):
    for w in sm._table_workloads():
        for p in (2, 32, 256):
            for overlap in (0.0, sm.OVERLAP_MAX):
                eff = [sm.predict(strategy, w, p, sm.Link.gbit(g), overlap)["efficiency"] for g in (1, *sm.BANDWIDTHS_GBIT, 1e4)]
                assert all(a <= b for a, b in zip(eff, eff[1:])), (w.name, p, overlap, eff)
                assert 0 < eff[0] < eff[-1] <= 1.0, (w.name, p, overlap, eff)


def test_step_hides_communication_behind_the_overlapped_share_of_compute():
    assert sm.step_s(1.0, 0.5, 0.0) == 1.5
    assert sm.step_s(1.0, 0.5, 0.4) == pytest.approx(1.1, rel=1e-12)
    assert sm.step_s(1.0, 0.5, 2 / 3) == 1.0  # all of it hidden: never less than the compute


def test_fitter_recovers_known_constants():
    truth = sm.Link(alpha_s=7e-5, beta_s_per_byte=3e-10)
    points = [(sm.ring_allreduce(4 * n, 2), truth.seconds(sm.ring_allreduce(4 * n, 2))) for n in sm.FIT_SIZES]
    fitted = sm.fit_link(points)
    assert fitted.alpha_s == pytest.approx(7e-5, rel=1e-9) and fitted.beta_s_per_byte == pytest.approx(3e-10, rel=1e-9)
    shm_points = [(t := sm.shm_allreduce(4 * n, 2, 2**24), truth.seconds(t)) for n in sm.FIT_SIZES]
    shm = sm.fit_link(shm_points)
    assert shm.alpha_s == pytest.approx(7e-5, rel=1e-9) and shm.beta_s_per_byte == pytest.approx(3e-10, rel=1e-9)
    # a few percent of seeded noise on each point moves the constants by about as much, not by orders of magnitude
    noise = np.random.default_rng(0).uniform(0.95, 1.05, len(points))
    noisy = sm.fit_link([(terms, t * k) for (terms, t), k in zip(points, noise)])
    assert noisy.alpha_s == pytest.approx(7e-5, rel=0.1) and noisy.beta_s_per_byte == pytest.approx(3e-10, rel=0.1)
    overhead, per_sample = sm.fit_nonneg([(1, b) for b in (8, 32, 128)], [0.004 + 2e-4 * b for b in (8, 32, 128)])
    assert overhead == pytest.approx(0.004, rel=1e-9) and per_sample == pytest.approx(2e-4, rel=1e-9)


def test_fitter_keeps_constants_non_negative():
    # times that fall with size would need a negative beta: the fit clamps it at 0 instead
    alpha, beta = sm.fit_nonneg([(2, 1e3), (2, 1e6)], [2e-3, 1e-3])
    assert beta == 0.0 and alpha > 0


def test_bad_input_is_named():
    w = sm.Workload("m", dense_params=1e6, compute_s=1.0)
    with pytest.raises(ValueError, match=r"unknown strategy 'dp'; valid: allreduce, ps, hybrid, fsdp"):
        sm.comm("dp", w, 4)
    with pytest.raises(ValueError, match=r"overlap is the share of compute .* in \[0, 1\]; got 1.5"):
        sm.step_s(1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"m: sparsity is a fraction of the embedding rows, in \[0, 1\]; got 2"):
        sm.Workload("m", dense_params=1e6, compute_s=1.0, sparsity=2)
    with pytest.raises(ValueError, match=r"workers must be an integer >= 1, got 0"):
        sm.ring_allreduce(1e6, 0)
    with pytest.raises(ValueError, match=r"shards must be an integer >= 1, got 0"):
        sm.ps_push_pull(1e6, 0, 4, 0)
    with pytest.raises(ValueError, match=r"bandwidth must be > 0 Gbit/s, got 0"):
        sm.Link.gbit(0)
    with pytest.raises(ValueError, match=r"need at least 2 points with one time each; got 1 design rows, 1 times"):
        sm.fit_nonneg([(1, 2)], [1.0])


def test_tables_are_complete_and_json_ready():
    import json

    rows = sm.table()
    assert len(rows) == len(sm._table_workloads()) * len(sm.STRATEGIES) * len(sm.TABLE_WORKERS)
    assert {k for k in rows[0] if k.startswith("eff_")} == {f"eff_{g}G" for g in sm.BANDWIDTHS_GBIT}
    assert all(0 < r[f"eff_{g}G"] <= 1 for r in rows for g in sm.BANDWIDTHS_GBIT)
    anchors = sm.anchors()
    assert [a["published_efficiency"] for a in anchors] == [0.90, 0.90, 0.68, 0.90, 0.70]
    assert all(0 < a["predicted_no_overlap"] <= a["predicted_overlap_2_3"] <= 1 for a in anchors)
    json.dumps({"table": rows, "anchors": anchors})
    assert not math.isnan(sum(r["eff_400G"] for r in rows))


def test_docstring_examples():
    result = doctest.testmod(sm)
    assert result.failed == 0 and result.attempted >= 2
