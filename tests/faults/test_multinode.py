"""A real 2-node Ray cluster (two ``ray start`` on 127.0.0.1, token authentication on): a local path the
workers on the other node could not read is one config error before any worker starts; with
``scaling.shared_filesystem: true`` (true here: both nodes are this machine) the run trains across both nodes."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable

import pytest
from conftest import free_port, ray_start, ray_stop

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
                {**base, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"})

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
                  "--set", "train.epochs=2")
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
