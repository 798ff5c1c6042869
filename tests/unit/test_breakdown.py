"""The step-time breakdown: exposed phases and residual add up to the step time (an injected clock), the straggler
check, and a real 2-rank run (the training loop in two spawned processes over gloo, no Ray) whose rank 1 computes
slowly on purpose."""

from __future__ import annotations

import json
import socket

import pytest

from harness import _config, _runs
from lepton_ray.train.breakdown import StepTimes, stragglers
from lepton_ray.train.trainer import warn_stragglers


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_exposed_phases_and_residual_add_up_to_the_step_time():
    """Two steps driven as the loop drives them: each phase gets exactly the clock's advance inside it, less the
    synchronisation the strategy reported inside it, which is ``sync``; what no phase covers is the residual."""
    clock, synced = Clock(), [0.0]

    def batches():
        for _ in range(2):
            clock.tick(3.0)  # waiting for the batch
            yield object()

    times = StepTimes(sync_s=lambda: synced[0], clock=clock)
    for _ in times.batches(batches()):
        with times.phase("compute"):
            clock.tick(5.0)
            synced[0] += 2.0  # the all-reduce not hidden behind backward: 2 s of the 5
        with times.phase("optimizer"):
            clock.tick(1.0)
        times.steps += 1
        clock.tick(0.25)  # logging, the loop's own work
    with times.phase("eval"):
        clock.tick(4.0)
    with times.phase("checkpoint"):
        clock.tick(0.5)
        synced[0] += 0.5  # a barrier inside the checkpoint
    record = times.take(rank=1, host="h", epoch=0, step=2)
    assert record == {"event": "breakdown", "rank": 1, "host": "h", "epoch": 0, "step": 2, "steps": 2, "step_s": 23.0,
                      "data_s": 6.0, "compute_s": 6.0, "sync_s": 4.5, "optimizer_s": 2.0, "checkpoint_s": 0.0,
                      "eval_s": 4.0, "residual_s": 0.5}
    assert sum(v for k, v in record.items() if k.endswith("_s") and k != "step_s") == record["step_s"]
    clock.tick(1.0)  # a fresh window after take
    assert times.take()["step_s"] == 1.0 and times.steps == 0


def test_straggler_check_names_the_slow_rank_and_is_quiet_on_an_even_run(capsys):
    even = [{"rank": r, "host": f"n{r}", "epoch": 2, "steps": 10, "compute_s": 1.0 + 0.01 * r} for r in range(4)]
    assert stragglers(even, 1.5) == []
    uneven = [*even[:3], {"rank": 3, "host": "n3", "epoch": 2, "steps": 10, "compute_s": 2.0}]
    (found,) = stragglers(uneven, 1.5)
    assert (found["rank"], found["host"], found["epoch"], found["ratio"]) == (3, "n3", 2, pytest.approx(0.2 / 0.1015))
    assert found["message"] == ("rank 3 on n3 is a straggler in epoch 2: its compute takes 200.0 ms per step, 1.97x the median"
                                " over 4 ranks (101.5 ms; train.straggler_factor 1.5); the other ranks wait for it")
    assert stragglers(uneven[:1], 1.5) == [] and stragglers([{**r, "steps": 0} for r in uneven], 1.5) == []
    warn_stragglers([{"event": "start"}, found])
    assert capsys.readouterr().err == f"lepton_ray: warning: {found['message']}\n"


def test_a_rank_slowed_on_purpose_is_named_a_straggler_and_an_even_run_has_none(tmp_path):
    """Two real ranks: rank 1's forward sleeps 100 ms, rank 0's 10 ms, with DDP over shared memory and with FSDP. Rank 1
    is named, with this host; rank 0's step waits in the all-reduce or in FSDP's collectives (sync), not in compute.
    With 10 ms each, nobody is named."""
    runs = {"slow": ("allreduce", [0.01, 0.1]), "fsdp": ("fsdp", [0.01, 0.1]), "even": ("allreduce", [0.01, 0.01])}
    raws = []
    for name, (strategy, sleep_s) in runs.items():
        raws.append(_config(tmp_path / name, strategy, steps=6))
        raws[-1]["model"] = {"factory": "lr_testing_models:sleepy_mlp", "kwargs": {"sleep_s": sleep_s}}
    _runs(raws, sinks=[str(tmp_path / f"{name}.jsonl") for name in runs])
    for name in ("slow", "fsdp"):
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        rows = {r["rank"]: r for r in records if r.get("event") == "breakdown"}
        assert sorted(rows) == [0, 1] and all(r["steps"] == 6 and r["host"] == socket.gethostname() for r in rows.values())
        for r in rows.values():  # the phases and the residual add up to the step time
            assert sum(r[f"{k}_s"] for k in ("data", "compute", "sync", "optimizer", "checkpoint", "eval", "residual")) == pytest.approx(r["step_s"])
        assert rows[1]["compute_s"] >= 12 * 0.1, name  # 6 steps x 2 micro-batches x 100 ms of sleep
        assert rows[0]["sync_s"] > rows[0]["compute_s"], (name, rows[0])  # rank 0 waited for rank 1 in the collectives
        (straggler,) = [r for r in records if r.get("event") == "straggler"]
        assert (straggler["rank"], straggler["host"], straggler["epoch"]) == (1, socket.gethostname(), 0)
    even = [json.loads(line) for line in (tmp_path / "even.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in even if r.get("event") == "breakdown"] == [0, 1]
    assert [r for r in even if r.get("event") == "straggler"] == []


def test_a_gpt_run_records_its_model_tflops_and_no_mfu_on_cpu(tmp_path):
    """The built-in gpt counts its FLOPs (nanoGPT's 6N + 12LCT per token): every train record's model TFLOP/s is its
    samples/s times that; MFU needs a GPU's peak, so a CPU run has none. One worker in this process, 8 steps."""
    from test_typed_batches import write_tokens
    from lepton_ray import Trainer
    from lepton_ray.models import build_model

    write_tokens(tmp_path / "t.parquet", block=8)
    cfg = {"data": {"train": str(tmp_path / "t.parquet"), "inputs": {"tokens": "input"}, "targets": {"next": "target"}},
           "model": {"name": "gpt", "kwargs": {"n_layer": 1, "n_head": 1, "n_embd": 8}},
           "train": {"batch_size": 8, "max_steps": 8, "log_every_steps": 2}, "scaling": {"num_workers": 1},
           "checkpoint": {"every_n_steps": 0}, "run": {"dir": str(tmp_path / "runs"), "name": "g"}}
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit(local=True)
    per_row = build_model(trainer.config.model, trainer.train_info.schema).flops_per_sample()
    logged = [r for r in result.records if "train_loss" in r]
    assert len(logged) == 4 and per_row > 0
    for r in logged:
        assert r["model_tflops_per_s"] == pytest.approx(r["samples_per_s"] * per_row / 1e12, rel=1e-12) and "mfu" not in r
    assert sorted(r["rank"] for r in result.records if r.get("event") == "breakdown") == [0]
