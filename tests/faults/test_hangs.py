"""A worker frozen mid-run (SIGSTOP) does not hang the run: the watchdog dumps the live ranks' stacks, kills the
frozen process, and Ray Train restarts the group or the run fails naming it (train.collective_timeout_s). Nor does a
collective that never completes (every rank alive, none advancing: the deadlock rule)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from lepton_ray import Trainer, TrainingError, load_config
from run_configs import small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

TIMEOUT_S = 10


def _config(tmp_path: Path, blobs: Path, marker: Path, hang: bool = False, timeout_s: float = TIMEOUT_S, **extra) -> dict:
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    return small_config(
        tmp_path, blobs,
        model={"factory": "faults.fault_models:faulty_mlp",
               "kwargs": {"pid_dir": str(pids), "stop_rank": 1, "stop_at": 15, "marker": str(marker), "hang": hang}},
        train={"max_steps": 30, "collective_timeout_s": timeout_s},
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


DEADLOCK_TIMEOUT_S = 20
"""The deadlock test's collective_timeout_s: a live rank counts as silent only after 10 s without a heartbeat (once a
second), a margin a machine several times slower than the 2-core one still keeps."""

GUARD_S = 150
"""How long after the hang the test itself gives up on the watchdog (it acts ~10-20 s after it) and kills the ranks."""


def _guard(run_dir: Path, marker: Path, pids: Path, done: threading.Event, fired: list) -> None:
    """The test's own bound: once the hang began, wait for the watchdog's ``stalled`` record; if none comes within
    ``GUARD_S`` (a watchdog that does not act: the run would wait forever), SIGKILL the ranks so fit() returns."""
    while not marker.exists():
        if done.wait(0.5):
            return
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        if done.wait(1.0) or ((run_dir / "metrics.jsonl").exists() and _stalled(run_dir)):
            return
    fired.append(time.time())
    for path in [marker, *pids.glob("rank*.pid")]:
        try:
            os.kill(int(path.read_text().split()[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_a_collective_that_never_completes_is_a_deadlock_whose_ranks_are_killed_and_restarted(tmp_path, blobs, capfd):
    """Rank 1 blocks in Python at its 15th training forward while its heartbeat thread beats on; rank 0 waits for it in
    that step's all-reduce (the shm transport's barrier, a gloo group with torch's 30-min default timeout: nothing but
    the watchdog ends the wait). Every heartbeat alive, no rank advancing for collective_timeout_s: the deadlock rule.
    Lock-step ranks are at the same step, so both are the lowest and both are killed, after both dumped their stacks
    (both beat: both are live); max_failures 1: the group restarts from the step-10 checkpoint and finishes. The console
    shows the diagnosis once, and the restart with its cause."""
    marker, pids = tmp_path / "hung", tmp_path / "pids"
    run_dir = tmp_path / "runs" / "t"
    cfg = load_config(_config(tmp_path, blobs, marker, hang=True, timeout_s=DEADLOCK_TIMEOUT_S, scaling={"max_failures": 1},
                              sync={"allreduce": {"cpu_transport": "shm"}}))
    done, fired = threading.Event(), []
    guard = threading.Thread(target=_guard, args=(run_dir, marker, pids, done, fired), daemon=True)
    guard.start()
    try:
        result = Trainer(cfg, progress=False).fit()
    finally:
        done.set()
        guard.join()
        _reap(marker)
    assert marker.exists(), "the model never hung"
    assert not fired, f"the watchdog did not act within {GUARD_S} s of the hang; the test killed the ranks"
    hung_pid, hung_at = marker.read_text().split()
    stalled = _stalled(run_dir)
    assert len(stalled) == 1, stalled
    record = stalled[0]
    assert record["ranks"] == [0, 1]  # both at the lowest step
    assert record["steps"] == {"0": 14, "1": 14}  # rank 1 hung in its 15th step; rank 0 waited in it
    # no rank advanced for the whole timeout (the board saw step 14 at most milliseconds before rank 1 hung)
    assert record["time"] - float(hung_at) >= DEADLOCK_TIMEOUT_S - 0.5
    host = re.escape(socket.gethostname())
    found = re.findall(rf"rank (\d) \(host {host}, pid (\d+), after step 14: no progress for (\d+) s\)", record["diagnosis"])
    assert [r for r, _, _ in found] == ["0", "1"], record["diagnosis"]
    assert found[1][1] == hung_pid
    assert all(int(s) >= DEADLOCK_TIMEOUT_S for _, _, s in found), record["diagnosis"]
    assert "no heartbeat" not in record["diagnosis"]  # the deadlock branch, not the silent one
    assert f"train.collective_timeout_s {DEADLOCK_TIMEOUT_S}" in record["diagnosis"]
    for rank, pid, _ in found:
        assert not _alive(int(pid))
    dumps = {rank: run_dir / "stacks" / f"rank{rank}-{pid}.txt" for rank, pid, _ in found}
    assert f"Stack dumps of the live ranks: {run_dir / 'stacks'} ({dumps['0'].name}, {dumps['1'].name})" in record["diagnosis"]
    assert "hang_in_python" in dumps["1"].read_text()  # where rank 1 is stuck
    assert "train_loop" in dumps["0"].read_text() and "hang_in_python" not in dumps["0"].read_text()
    assert result.metrics["steps"] == 30
    starts = [r for r in result.records if r.get("event") == "start"]
    assert [r["step"] for r in starts] == [0, 10]
    assert starts[1]["resumed_from"].endswith("step_00000010")
    err = capfd.readouterr().err
    assert err.count(record["diagnosis"]) == 1 and f"lepton_ray: run 't': {record['diagnosis']}\n" in err
    assert (f"lepton_ray: run 't': worker group restarted (attempt 2, 2 workers) from step 10 ({starts[1]['resumed_from']}); "
            "the previous attempt ended: the hang guard killed stuck ranks 0, 1 (diagnosis above)\n") in err
    assert err.index(record["diagnosis"]) < err.index("worker group restarted")
    print(f"\ndetected {record['time'] - float(hung_at):.1f} s after the hang (collective_timeout_s {DEADLOCK_TIMEOUT_S})")
