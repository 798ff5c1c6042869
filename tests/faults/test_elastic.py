"""Node loss on an elastic run (``scaling.num_workers: [1, 2]``, Ray Train V2's elastic worker group) on a real
2-node cluster: the second node's raylet is killed mid-epoch; the run continues with one worker (from the newest
checkpoint, dealing only the rows of the interrupted epoch not yet read), grows back to two when a node joins
again, and ends. Every worker records the row ids of each batch it trains on: the batches that count (each attempt's,
from the step it resumed at up to the step the next attempt resumed at) hold every row of every epoch exactly once,
across both resizes. The figures: loss -> first step at 1 worker, join -> first step at 2 workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import free_port
from run_configs import ids_table
from test_multinode import BIN, REPO, _loopback_name, _start, _stop, two_nodes  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # ~3 min on 2 cores: CI keeps the resize itself (tests/integration/test_data_pipeline.py)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(what: str, ok, timeout: float, proc: subprocess.Popen) -> float:
    deadline = time.monotonic() + timeout
    while not ok():
        assert proc.poll() is None, f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)
    return time.time()


ROWS, BATCH = 1024, 64  # 16 steps an epoch, at either size


def _counted_batches(log_dir: Path, starts: list[dict], world: int) -> dict[int, list[int]]:
    """step -> the ids all ranks trained on at that step, keeping of each attempt only the steps from the one it resumed
    at up to the one the next attempt resumed at (the later steps were rolled back). A rank's lines carry its process's
    pid: its processes in order of appearance are its attempts (rank 1 exists only in the 2-worker ones)."""
    kept: dict[int, list[int]] = {}
    for rank in range(world):
        lines = [[int(v) for v in line.split()] for line in (log_dir / f"rank{rank}.txt").read_text().splitlines()]
        pids = list(dict.fromkeys(line[0] for line in lines))
        attempts = [i for i, s in enumerate(starts) if s["world_size"] > rank]
        assert len(pids) == len(attempts), (rank, pids, [s["world_size"] for s in starts])
        for pid, a in zip(pids, attempts):
            first, end = starts[a]["step"], starts[a + 1]["step"] if a + 1 < len(starts) else None
            batches = [line[1:] for line in lines if line[0] == pid]
            for step, ids in enumerate(batches, start=first):
                if end is None or step < end:
                    kept.setdefault(step, []).extend(ids)
    return kept


def test_node_lost_mid_epoch_continues_smaller_and_grows_back(two_nodes, tmp_path):  # noqa: F811
    from lepton_ray.data import prepare

    prepare(ids_table(ROWS, 0), str(tmp_path / "ids" / "train"), num_shards=4, row_group_rows=64, seed=0)
    pq.write_table(ids_table(512, 1), tmp_path / "ids" / "eval.parquet")
    run_dir, log = tmp_path / "runs" / "elastic", tmp_path / "log"
    log.mkdir()
    config = {
        "model": {"factory": "faults.fault_models:slow_ids_mlp", "kwargs": {"delay_s": 0.1, "log_dir": str(log)}},
        "data": {"train": str(tmp_path / "ids" / "train"), "eval": str(tmp_path / "ids" / "eval.parquet"),
                 "label": "label", "shuffle_buffer_rows": 200},
        "train": {"epochs": 40, "batch_size": BATCH, "lr": 0.1, "seed": 0, "log_every_steps": 1},
        # one 2-CPU worker per 2-CPU node; every resize is a restart from the newest checkpoint
        "scaling": {"num_workers": [1, 2], "cpus_per_worker": 2, "max_failures": 4, "resize_check_s": 5,
                    "worker_start_timeout_s": 20,
                    "shared_filesystem": True},
        "checkpoint": {"every_n_steps": 10},
        "run": {"dir": str(tmp_path / "runs"), "name": "elastic"},
    }
    (tmp_path / "elastic.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(BIN / "lepton-ray"), "train", str(tmp_path / "elastic.yaml"), "--json", "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=two_nodes.env)
    out: dict = {"stdout": "", "stderr": []}  # stderr: (arrival time, line): when Ray Train's controller decided what
    readers = [threading.Thread(target=lambda: out.update(stdout=proc.stdout.read()), daemon=True),
               threading.Thread(target=lambda: out["stderr"].extend((time.time(), line) for line in proc.stderr), daemon=True)]
    for r in readers:
        r.start()
    try:
        def steps_at(world: int, after: int = 0) -> list[int]:
            recs = _records(run_dir)
            starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
            if not starts or recs[starts[-1]]["world_size"] != world:
                return []
            return [r["step"] for r in recs[starts[-1]:] if "train_loss" in r and r["step"] > after]

        _wait("2-worker steps", lambda: len(steps_at(2)) >= 25, 300, proc)  # past a checkpoint, mid-epoch 1
        gone = two_nodes.nodes.pop()
        os.killpg(gone.pid, signal.SIGKILL)  # the second node vanishes: its raylet, its worker, all at once
        gone.wait(timeout=30)
        lost = time.time()
        one = _wait("a step at 1 worker", lambda: steps_at(1), 300, proc)
        _wait("1-worker progress", lambda: len(steps_at(1)) >= 5, 120, proc)
        join = f"--address={_loopback_name()}:{two_nodes.address.split(':')[1]}"
        args = ["--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats"]
        two_nodes.nodes.append(_start(lambda: [join, *args, f"--dashboard-agent-listen-port={free_port()}",
                                               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                                               f"--metrics-export-port={free_port()}"], two_nodes.tmp / "worker2.log",
                                      {**two_nodes.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}))
        joined = time.time()
        two = _wait("a step at 2 workers again", lambda: steps_at(2, after=max(steps_at(1) or [0])), 300, proc)
        (log / "fast").touch()  # both resizes happened: the rest of the run goes at full speed
        for r in readers:
            r.join(timeout=600)
        proc.wait(timeout=60)
        assert proc.returncode == 0, "".join(line for _, line in out["stderr"][-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
    result = json.loads(out["stdout"].strip().splitlines()[-1])
    starts = [r for r in _records(run_dir) if r.get("event") == "start"]
    sizes = [s["world_size"] for s in starts]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    shrink = next(s for s in starts if s["world_size"] == 1)
    assert shrink["resumed_from"] and any("resumed with 1 workers, checkpointed with 2" in n for n in shrink["notes"]), shrink
    assert result["eval_accuracy"] > 0.9
    kept = _counted_batches(log, starts, 2)
    assert sorted(kept) == list(range(result["steps"])), "a step no attempt trained, or one trained past the end"
    steps_per_epoch = ROWS // BATCH
    for epoch in range(result["steps"] // steps_per_epoch):
        rows = sorted(i for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch) for i in kept[step])
        assert rows == list(range(ROWS)), f"epoch {epoch}: not every row exactly once"
    print(f"\nelastic: node lost -> first step at 1 worker {one - lost:.1f} s; node joined -> first step at 2 workers "
          f"{two - joined:.1f} s; world sizes {sizes}")
    for t, line in out["stderr"]:  # what the controller did after the loss, on the test's clock
        if t >= lost and "TrainController" in line and any(w in line for w in ("fail", "Fail", "Detected", "Deciding", "Started", "Attempting", "resiz")):
            print(f"  +{t - lost:6.1f} s  {line.strip()[:200]}")
