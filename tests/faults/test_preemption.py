"""Preemption: SIGTERM to one training worker makes every rank checkpoint the step it reached and stop, and
``--resume`` loses nothing. SIGKILL of the ``lepton-ray train`` driver leaves no process of its run behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from lepton_ray import Trainer, TrainingError, load_config
from lepton_ray.train.checkpoint import CheckpointStore
from run_configs import final_params, merge_sections, small_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(tmp_path: Path, blobs: Path, name: str, delay_s: float, hold: dict | None = None, **extra) -> dict:
    pids = tmp_path / f"pids-{name}"
    pids.mkdir(exist_ok=True)
    cfg = small_config(
        tmp_path, blobs,
        model={"factory": "faults.fault_models:faulty_mlp", "kwargs": {"pid_dir": str(pids), "delay_s": delay_s, **(hold or {})}},
        train={"max_steps": 40, "schedule": "cosine", "warmup_steps": 5},
        run={"name": name},
    )
    return merge_sections(cfg, **extra)


def _wait_for(what: str, ok, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped by its raylet) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sigterm_to_a_worker_checkpoints_and_resume_loses_nothing(tmp_path, blobs):
    """SIGTERM to rank 1 mid-run: the run fails with a just-in-time checkpoint of the step it stopped at; a resume
    from it ends with the parameters of an uninterrupted run (1e-6). The ranks hold at their 15th step until the signal
    is sent, so it always lands mid-run, however slow the machine."""
    sent_file = tmp_path / "sigterm-sent"
    cfg = load_config(_config(tmp_path, blobs, "t", delay_s=0.1, hold={"hold_at": 15, "hold_file": str(sent_file)}))
    run_dir, pid_file = tmp_path / "runs" / "t", tmp_path / "pids-t" / "rank1.pid"
    sent: dict[str, float] = {}

    def preempt() -> None:
        _wait_for("the ranks held at their 15th step", lambda: Path(f"{sent_file}.held").exists())
        sent["pid"], sent["time"], sent["step"] = int(pid_file.read_text()), time.time(), 14  # 14 steps done
        os.kill(int(sent["pid"]), signal.SIGTERM)
        sent_file.touch()

    sender = threading.Thread(target=preempt, daemon=True)
    sender.start()
    with pytest.raises(TrainingError) as err:
        Trainer(cfg, progress=False).fit()
    ended = time.time()
    sender.join(timeout=10)
    assert "pid" in sent, "the test never sent SIGTERM"
    found = re.search(r"rank 1 got SIGTERM: every rank checkpointed step (\d+) \((.*?)\) and stopped; --resume continues from it",
                      str(err.value))
    assert found, str(err.value)[-3000:]
    step = int(found.group(1))
    store = CheckpointStore(str(run_dir / "checkpoints"))
    assert sent["step"] <= step < 40 and store.latest().step == step and found.group(2) == store.latest().uri
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "preempted"] == [step]
    _wait_for("the SIGTERMed worker to be gone", lambda: not _alive(int(sent["pid"])), timeout=60)  # Ray Train tore the group down
    print(f"\nSIGTERM after step >= {sent['step']}; checkpointed step {step}; run ended {ended - sent['time']:.1f} s after the signal")

    resumed = Trainer(cfg, resume=True, progress=False).fit()
    assert resumed.resumed_from == store.uri + f"/step_{step:08d}"
    assert resumed.metrics["steps"] == 40
    straight = Trainer(load_config(_config(tmp_path, blobs, "straight", delay_s=0.0)), progress=False).fit()
    assert _max_diff(final_params(resumed), final_params(straight)) <= 1e-6


def _run_pids() -> dict[str, list[int]]:
    """The pids of the live actors another driver's run started besides its workers: the metrics sink, PS shards,
    Ray Train's controller (this test process is a driver of the same cluster too)."""
    import ray
    from ray.util.state import list_actors

    names = {"_RunSink": "sink", "_RayShardServer": "ps shard", "TrainController": "controller"}
    found: dict[str, list[int]] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False):
        if a.class_name in names and a.job_id != ray.get_runtime_context().get_job_id():
            found.setdefault(names[a.class_name], []).append(a.pid)
    return found


def test_killed_driver_leaves_no_process_and_resume_continues(tmp_path, blobs, cli, ray_cluster):
    """SIGKILL of `lepton-ray train` (a parameter-server run): its workers, PS shards, metrics sink and Ray Train
    controller are all gone within 60 s (the time is printed), and `lepton-ray train --resume` finishes the run."""
    cfg = _config(tmp_path, blobs, "t", delay_s=0.1, sync={"strategy": "ps", "ps": {"num_shards": 2, "mode": "sync"}},
                  train={"max_steps": 200})
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML
    store = CheckpointStore(str(tmp_path / "runs" / "t" / "checkpoints"))
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([str(Path(os.environ["PATH"].split(os.pathsep)[0]) / "lepton-ray"), "train", str(config), "--no-progress"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    try:
        _wait_for("the first checkpoint", lambda: store.steps() or driver.poll() is not None)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        pids = {**_run_pids(), "worker": [int((tmp_path / "pids-t" / f"rank{r}.pid").read_text()) for r in range(2)]}
        assert sorted(pids) == ["controller", "ps shard", "sink", "worker"] and len(pids["ps shard"]) == 2 and len(pids["sink"]) == 1, pids
        driver.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        driver.wait(timeout=30)
        left = lambda: {k: [p for p in v if _alive(p)] for k, v in pids.items() if any(_alive(p) for p in v)}
        try:
            _wait_for("the run's processes to end", lambda: not left(), timeout=60)
        except AssertionError:
            raise AssertionError(f"60 s after the driver's SIGKILL these are still alive: {left()}") from None
        print(f"\nall {sum(map(len, pids.values()))} processes of the run ({', '.join(pids)}) gone "
              f"{time.monotonic() - killed:.1f} s after the driver's SIGKILL")
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()

    done = store.steps()[-1]
    assert done < 200
    # the rest without the per-step delay that kept the run alive for the kill
    proc = cli("train", str(config), "--resume", "--set", "model.kwargs.delay_s=0.0", "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 200 and result["checkpoint"] == f"{store.uri}/step_00000200"
    records = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, done]
