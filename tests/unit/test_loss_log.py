"""Unit tests for the loop's per-step loss records (_LossLog) on a real 2-process gloo group."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from lepton_ray.train.metrics import LossLog as _LossLog


class _ListBuffer:
    def __init__(self):
        self.records = []

    def add(self, record, *, now=False):
        self.records.append(record)


def _rank(rank: int, port: int, out: str, records: int, sleep_s: float, target_s: float) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        buf = _ListBuffer()
        log = _LossLog(buf, 2, collective=True, target_s=target_s)
        seen_every, pending_at = [], []
        for step in range(1, records + 1):
            # window of 2 steps whose loss sum differs per rank: rank r logs (step + 10 r) * 2
            log.add(torch.tensor((step + 10.0 * rank) * 2), 2, {"step": step})
            seen_every.append(log.every)
            pending_at.append(len(buf.records))
            if step == 30:
                log.flush()  # what an evaluation does: every pending record is reduced now
                pending_at[-1] = len(buf.records)
            time.sleep(sleep_s)
        log.flush()
        with open(f"{out}.{rank}", "w") as fh:
            json.dump({"records": buf.records, "every": seen_every, "emitted": pending_at}, fh)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, records: int, sleep_s: float, target_s: float):
    out = str(tmp_path / "log")
    mp.spawn(_rank, args=(free_port(), out, records, sleep_s, target_s), nprocs=2, join=True)
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


def test_fast_steps_are_reduced_in_batches_with_the_mean_over_ranks(tmp_path):
    # target 10 s of records: "fast" holds below 156 ms per record, so a loaded machine cannot flip the batch size
    r0, r1 = _run(tmp_path, records=100, sleep_s=0.0, target_s=10.0)
    steps = [r["step"] for r in r0["records"]]
    assert steps == list(range(1, 101))  # every record, once, in order
    # mean over both ranks of the per-step loss: ((s) + (s + 10)) / 2 = s + 5
    assert [r["train_loss"] for r in r0["records"]] == [s + 5.0 for s in steps]
    assert r0["every"] == r1["every"]  # both ranks batch alike: the collectives pair up
    assert r0["every"][:7] == [1] * 7  # one collective per record until calibrated after 8
    assert r0["every"][-1] == 64  # far below the target per record: the largest batch
    assert r0["emitted"][29] == 30  # the flush at record 30 emitted everything pending


def test_slow_steps_keep_one_collective_per_record(tmp_path):
    r0, r1 = _run(tmp_path, records=12, sleep_s=0.02, target_s=0.01)
    assert r0["every"] == r1["every"] == [1] * 12
    assert r0["emitted"] == list(range(1, 13))  # each record reaches the buffer as it is logged
    assert [r["train_loss"] for r in r0["records"]] == [s + 5.0 for s in range(1, 13)]
