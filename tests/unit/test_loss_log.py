"""Unit tests for the loop's per-step loss records (_LossLog) on a real 2-process gloo group."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from conftest import rendezvous, spawn

from lepton_ray.train.metrics import LossLog as _LossLog


class _ListBuffer:
    def __init__(self):
        self.records = []

    def add(self, record, *, now=False):
        self.records.append(record)


class _Clock:
    """A clock on which the first ``calibrate`` records took ``per_record[rank]`` seconds each: the calibration
    reads it twice (at the start and after those records), whatever the machine's speed."""

    def __init__(self, per_record: float, calibrate: int = 8):
        self.readings = iter([0.0, per_record * calibrate])

    def __call__(self) -> float:
        return next(self.readings)


def _rank(rank: int, init: str, out: str, records: int, per_record: tuple[float, float], target_s: float) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        buf = _ListBuffer()
        log = _LossLog(buf, 2, collective=True, target_s=target_s, clock=_Clock(per_record[rank]))
        seen_every, pending_at = [], []
        for step in range(1, records + 1):
            # window of 2 steps whose loss sum differs per rank: rank r logs (step + 10 r) * 2
            log.add(torch.tensor((step + 10.0 * rank) * 2), 2, {"step": step})
            seen_every.append(log.every)
            pending_at.append(len(buf.records))
            if step == 30:
                log.flush()  # what an evaluation does: every pending record is reduced now
                pending_at[-1] = len(buf.records)
        log.flush()
        with open(f"{out}.{rank}", "w") as fh:
            json.dump({"records": buf.records, "every": seen_every, "emitted": pending_at}, fh)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, records: int, per_record: tuple[float, float], target_s: float):
    out = str(tmp_path / "log")
    spawn(_rank, (rendezvous(), out, records, per_record, target_s), 2)
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


def test_fast_steps_are_reduced_in_batches_with_the_mean_over_ranks(tmp_path):
    # 1 ms per record on one rank, 2 ms on the other: the slower rank's 2 ms sets the batch, 0.1 s / 2 ms = 50 records
    r0, r1 = _run(tmp_path, records=100, per_record=(0.001, 0.002), target_s=0.1)
    steps = [r["step"] for r in r0["records"]]
    assert steps == list(range(1, 101))  # every record, once, in order
    # mean over both ranks of the per-step loss: ((s) + (s + 10)) / 2 = s + 5
    assert [r["train_loss"] for r in r0["records"]] == [s + 5.0 for s in steps]
    assert r0["every"] == r1["every"]  # both ranks batch alike: the collectives pair up
    assert r0["every"][:7] == [1] * 7  # one collective per record until calibrated after 8
    assert r0["every"][7:] == [50] * 93  # calibrated after 8 records, on the slowest rank's interval
    assert r0["emitted"][29] == 30  # the flush at record 30 emitted everything pending


def test_slow_steps_keep_one_collective_per_record(tmp_path):
    r0, r1 = _run(tmp_path, records=12, per_record=(0.02, 0.005), target_s=0.01)  # the slower rank above the target
    assert r0["every"] == r1["every"] == [1] * 12
    assert r0["emitted"] == list(range(1, 13))  # each record reaches the buffer as it is logged
    assert [r["train_loss"] for r in r0["records"]] == [s + 5.0 for s in range(1, 13)]
