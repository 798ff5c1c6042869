"""A real 2-node Ray cluster (two ``ray start`` on 127.0.0.1, token authentication on): a local path the
workers on the other node could not read is one config error before any worker starts; with
``scaling.shared_filesystem: true`` (true here: both nodes are this machine) the run trains across both nodes; an
elastic run that loses the second node goes on smaller and grows back when a node joins, every row once per epoch."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, ray_start, ray_stop
from run_configs import ids_table

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _start(args: Callable[[], list[str]], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``ray start ... --block`` with ``args()`` (fresh ports on every try): :func:`conftest.ray_start`."""
    return ray_start(lambda: (args(), env), log)


_stop = ray_stop


def _python(code: str, cluster: types.SimpleNamespace, timeout: float = 120) -> str:
    """Run ``code`` in a fresh Python connected to the cluster (with its token); return its stdout."""
    script = f"import json, ray\nray.init(address={cluster.address!r}, logging_level='error')\n{code}"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


LOOPBACK_ALIAS = "lepton-node2"
"""The host name ``.ci/run`` maps to 127.0.0.1 in /etc/hosts for these tests (and removes again), exported to them as
``LEPTON_RAY_LOOPBACK_NAME``."""


def _loopback_name() -> str:
    """A host name other than 'localhost' that resolves to 127.0.0.1 (Ray rewrites the literal ones): the one CI set up
    (``LEPTON_RAY_LOOPBACK_NAME``), else ``lepton-node2`` or one the machine has. Under CI (the variable set) none is a
    failure, never a skip: a missing name would silently drop every multi-node test; elsewhere, a skip saying how to add one."""
    wanted = os.environ.get("LEPTON_RAY_LOOPBACK_NAME")
    for name in ([wanted] if wanted else [LOOPBACK_ALIAS, socket.gethostname(), "localhost.localdomain", "ip6-localhost"]):
        try:
            if name != "localhost" and socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    why = ("LEPTON_RAY_LOOPBACK_NAME=" + repr(wanted) + " does not resolve to 127.0.0.1" if wanted else
           "no host name other than 'localhost' resolves to 127.0.0.1 here") + (
        f", so a second Ray node cannot join on loopback. Add one (as .ci/run does, as root): echo '127.0.0.1 {LOOPBACK_ALIAS}' >> /etc/hosts")
    if wanted:  # CI set one up: its absence must not silently drop every multi-node test
        pytest.fail(why, pytrace=False)
    pytest.skip(why)  # a developer's machine without one (the README's test command must pass on a fresh machine)


@pytest.fixture(scope="module")
def two_nodes():
    """Head and one more node, 2 logical CPUs each, token authentication on (a fresh token for this
    cluster, in RAY_AUTH_TOKEN: nobody's ~/.ray/auth_token is read or written)."""
    join_as = _loopback_name()  # before anything starts: a missing name fails the test at once
    tmp = Path(tempfile.mkdtemp(prefix="lr2n-", dir="/tmp"))  # short: Ray's socket paths live under it
    base = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    base.pop("RAY_AUTH_TOKEN_PATH", None)
    ports: dict[str, int] = {}

    def head() -> tuple[list[str], dict[str, str]]:  # fresh ports on every try
        ports.update(gcs=free_port(), dashboard=free_port())
        return (["--head", f"--port={ports['gcs']}", f"--temp-dir={tmp}", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                 f"--ray-client-server-port={free_port()}", *node_args()],
                # the GCS marks a node dead ~3 s after its raylet stops answering (Ray's default: 5 checks 3 s apart),
                # so the elastic test's run sees the lost node's CPUs gone sooner (not a product setting: a test speed-up)
                {**base, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_failure_threshold": "3"})

    def node_args() -> list[str]:  # fresh ports per node: two nodes share this machine
        return ["--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    nodes = []
    try:
        nodes.append(ray_start(head, tmp / "head.log"))
        port, dashboard = ports["gcs"], ports["dashboard"]
        address = f"127.0.0.1:{port}"
        env = {**base, "RAY_ADDRESS": address}
        # Ray refuses a second node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (tests/conftest.py's loopback switch), and
        # with it on maps "127.0.0.1" (as --address or --node-ip-address) to the machine's routable IP; a host name for
        # 127.0.0.1 keeps the node on loopback: its node IP is then its source address towards the head, 127.0.0.1.
        join = f"--address={join_as}:{port}"
        nodes.append(_start(lambda: [join, *node_args()], tmp / "worker.log", {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}))
        cluster = types.SimpleNamespace(address=address, dashboard=f"http://127.0.0.1:{dashboard}", env=env, nodes=nodes, tmp=tmp)
        deadline = time.monotonic() + 120
        while len(ips := json.loads(_python("print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))", cluster))) < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(2)
        assert ips == ["127.0.0.1", "127.0.0.1"]  # both nodes on loopback only
        yield cluster
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(tmp, ignore_errors=True)


def _train(cluster: types.SimpleNamespace, tmp_path: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The README's main job through the CLI against the 2-node cluster, data and runs under tmp_path."""
    args = ["train", "examples/digits.yaml", "--json", "--no-progress",
            "--set", f"run.dir={tmp_path / 'runs'}",
            "--set", f"data.train={tmp_path / 'digits' / 'train.parquet'}",
            "--set", f"data.eval={tmp_path / 'digits' / 'eval.parquet'}", *overrides]
    return subprocess.run([str(BIN / "lepton-ray"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=cluster.env)


def test_local_paths_on_two_nodes_are_one_config_error(two_nodes, tmp_path):
    """Exit 2 with one line naming the key and the path, before any worker (or the run directory) exists."""
    proc = _train(two_nodes, tmp_path)
    train = tmp_path / "digits" / "train.parquet"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lepton-ray: config error: data.train: '{train}' is on this node's disk (so are data.eval, run.dir), but the Ray"
        " cluster has 2 nodes and workers on the other nodes cannot read it; use an object-storage URI (s3://bucket/prefix)"
        " or a filesystem every node mounts at the same path (and set scaling.shared_filesystem: true)")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started: no run directory, no metrics sink, no worker


@pytest.mark.slow  # CI keeps the config error on 2 nodes
def test_shared_filesystem_trains_on_both_nodes(two_nodes, tmp_path):
    """With scaling.shared_filesystem the same run trains; 2 CPUs per worker on 2-CPU nodes puts one worker on each node."""
    proc = _train(two_nodes, tmp_path, "--set", "scaling.shared_filesystem=true", "--set", "scaling.cpus_per_worker=2",
                  "--set", "train.epochs=2", "--verbose")  # --verbose: Ray Train's lines name each rank's pid
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 * (1438 // 64)
    assert result["checkpoint"] == str(tmp_path / "runs" / "digits" / "checkpoints" / f"step_{result['steps']:08d}")
    ranks = {int(rank): int(pid) for pid, rank in re.findall(r"pid=(\d+)\) world_rank=(\d+)", proc.stdout + proc.stderr)}
    node_of_pid = dict(json.loads(_python(
        "from ray.util.state import list_actors\n"
        f"print(json.dumps([(a.pid, a.node_id) for a in list_actors(address={two_nodes.dashboard!r}, "
        "filters=[('class_name', '=', 'RayTrainWorker')], detail=True, limit=100)]))", two_nodes)))
    assert sorted(ranks) == [0, 1] and node_of_pid[ranks[0]] != node_of_pid[ranks[1]], (ranks, node_of_pid)  # one rank per node


def test_ray_job_submit_on_two_nodes_shows_the_config_error(two_nodes):
    """The README's `ray job submit --working-dir . -- lepton-ray train examples/digits.yaml`: the job fails
    with the one-line error in its logs (the data it built sits in the head node's copy of the working dir)."""
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", two_nodes.dashboard, "--working-dir", str(REPO), "--",
         "lepton-ray", "train", "examples/digits.yaml", "--no-progress"],
        capture_output=True, text=True, timeout=600, env=two_nodes.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    error = next((line for line in out.splitlines() if line.startswith("lepton-ray: config error: ")), out[-3000:])
    assert error.startswith("lepton-ray: config error: data.train: '") and "/working_dir_files/" in error, error
    assert error.endswith("/data/digits/train.parquet' is on this node's disk (so are data.eval, run.dir), but the Ray cluster"
                          " has 2 nodes and workers on the other nodes cannot read it; use an object-storage URI (s3://bucket/prefix)"
                          " or a filesystem every node mounts at the same path (and set scaling.shared_filesystem: true)"), error
    assert "Traceback" not in out


def _node(node_id: str, cpus: float, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus}}


@pytest.mark.parametrize("nodes,overrides,fails", [
    ([_node("here", 4)], {}, False),                                         # one node: local paths work as ever
    ([_node("here", 4), _node("other", 4, alive=False)], {}, False),         # a dead node takes no worker
    ([_node("here", 4), _node("other", 1)], {"scaling": {"cpus_per_worker": 2}}, False),  # no room there for a worker
    ([_node("here", 0), _node("other", 4)], {}, True),                       # a CPU-less head: every worker is elsewhere
    ([_node("here", 4), _node("other", 4)], {}, True),
    ([_node("here", 4), _node("other", 4)], {"scaling": {"shared_filesystem": True}}, False),
    ([_node("here", 4), _node("other", 4)], {"data": {"train": "s3://b/t", "eval": "s3://b/e"},
                                             "checkpoint": {"dir": "s3://b/ck"}}, False),
], ids=["one-node", "dead-node", "no-room", "cpu-less-head", "two-nodes", "shared", "s3"])
def test_which_clusters_make_a_local_path_an_error(nodes, overrides, fails):
    """The decision alone, without Ray: is there a node besides the driver's where a worker fits?"""
    from lepton_ray.config import ConfigError, load_config
    from lepton_ray.train.placement import check_paths_reachable, node_local_paths

    raw = {"data": {"train": "/d/train.parquet"}, "run": {"dir": "/runs"}}
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    config = load_config(raw)
    local = node_local_paths(config, config.checkpoint.dir or "/runs/run/checkpoints")
    if fails:
        with pytest.raises(ConfigError, match=r"^data\.train: '/d/train\.parquet' is on this node's disk \(so are run\.dir\), but the Ray cluster has 2 nodes"):
            check_paths_reachable(config, local, nodes, "here")
    else:
        check_paths_reachable(config, local, nodes, "here")


# --------------------------------------------------------------------------- an elastic run loses a node


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


@pytest.mark.slow  # ~2 min on 2 cores; the stream's resize invariant alone: tests/unit/test_stream.py
def test_node_lost_mid_epoch_continues_smaller_and_grows_back(two_nodes, tmp_path):
    """Node loss on an elastic run (``scaling.num_workers: [1, 2]``, Ray Train V2's elastic worker group) on a real
    2-node cluster: the second node's raylet is killed mid-epoch; the run continues with one worker (from the newest
    checkpoint, dealing only the rows of the interrupted epoch not yet read), grows back to two when a node joins
    again, and ends. Every worker records the row ids of each batch it trains on: the batches that count (each attempt's,
    from the step it resumed at up to the step the next attempt resumed at) hold every row of every epoch exactly once,
    across both resizes. The figures: loss -> first step at 1 worker, join -> first step at 2 workers.

    Last in this module: it replaces the fixture's second node."""
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
    proc = subprocess.Popen([str(BIN / "lepton-ray"), "train", str(tmp_path / "elastic.yaml"), "--json", "--no-progress", "--verbose"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=two_nodes.env)
    out: dict = {"stdout": "", "stderr": []}  # stderr (--verbose: with Ray Train's INFO lines): when its controller decided what
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
