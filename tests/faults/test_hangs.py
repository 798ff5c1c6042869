"""A worker frozen mid-run (SIGSTOP) does not hang the run: the watchdog dumps the live ranks' stacks, kills the
frozen process, and Ray Train restarts the group or the run fails naming it (train.collective_timeout_s)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from lepton_ray import Trainer, TrainingError, load_config
from run_configs import small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

TIMEOUT_S = 10


def _config(tmp_path: Path, blobs: Path, marker: Path, **extra) -> dict:
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    return small_config(
        tmp_path, blobs,
        model={"factory": "faults.fault_models:faulty_mlp",
               "kwargs": {"pid_dir": str(pids), "stop_rank": 1, "stop_at": 15, "marker": str(marker)}},
        train={"max_steps": 30, "collective_timeout_s": TIMEOUT_S},
        **extra,
    )


def _reap(marker: Path) -> None:
    """SIGKILL the process the test froze, if it is still there (SIGCONT first: it is stopped)."""
    if not marker.exists():
        return
    pid = int(marker.read_text().split()[0])
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def _alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped by its raylet) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stalled(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "stalled"]


def test_frozen_worker_fails_the_run_naming_it(tmp_path, blobs):
    """max_failures 0: the run fails with the stuck rank's host, pid and time stuck, and the live rank's stacks."""
    marker = tmp_path / "stopped"
    cfg = load_config(_config(tmp_path, blobs, marker))
    try:
        t0 = time.time()
        with pytest.raises(TrainingError) as err:
            Trainer(cfg, progress=False).fit()
        ended = time.time()
        assert marker.exists(), "the model never froze its process"
        pid, stopped_at = marker.read_text().split()
        message = str(err.value)
        assert re.search(rf"rank 1 \(host {re.escape(socket.gethostname())}, pid {pid}, (after step \d+|before its first step): no heartbeat for \d+ s\)", message), message
        assert f"train.collective_timeout_s {TIMEOUT_S}" in message
        run_dir = tmp_path / "runs" / "t"
        live_pid = (tmp_path / "pids" / "rank0.pid").read_text()
        dump = run_dir / "stacks" / f"rank0-{live_pid}.txt"
        assert f"Stack dumps of the live ranks: {run_dir / 'stacks'} (rank0-{live_pid}.txt)" in message
        assert "train_loop" in dump.read_text()  # the loop's thread, stuck in a collective
        assert not list((run_dir / "stacks").glob("rank1-*"))  # a frozen process dumps nothing
        assert not _alive(int(pid))
        stalled = _stalled(run_dir)
        assert [s["ranks"] for s in stalled] == [[1]]
        print(f"\nfrozen at +{float(stopped_at) - t0:.1f} s; detected {stalled[0]['time'] - float(stopped_at):.1f} s later "
              f"(collective_timeout_s {TIMEOUT_S}); run failed {ended - float(stopped_at):.1f} s after the freeze")
    finally:
        _reap(marker)


@pytest.mark.slow  # CI keeps the frozen worker that fails the run
def test_frozen_worker_is_restarted_under_max_failures(tmp_path, blobs):
    """max_failures 1: the frozen rank is killed, the group restarts from the step-10 checkpoint and finishes."""
    marker = tmp_path / "stopped"
    cfg = load_config(_config(tmp_path, blobs, marker, scaling={"max_failures": 1}))
    try:
        result = Trainer(cfg, progress=False).fit()
        assert marker.exists()
        assert result.metrics["steps"] == 30
        assert [r["step"] for r in result.records if r.get("event") == "start"] == [0, 10]
        stalled = [r for r in result.records if r.get("event") == "stalled"]
        assert [s["ranks"] for s in stalled] == [[1]]
        pid, stopped_at = marker.read_text().split()
        assert not _alive(int(pid))
        print(f"\ndetected {stalled[0]['time'] - float(stopped_at):.1f} s after the freeze (collective_timeout_s {TIMEOUT_S})")
    finally:
        _reap(marker)
