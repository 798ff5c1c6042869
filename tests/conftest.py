"""Session fixtures: one moto S3 server and one real Ray cluster (``ray start``) per test session.

The S3 credentials/endpoint and PYTHONPATH are put in the environment *before*
the Ray head starts, so every Ray worker inherits them, as on a real cluster
configured through the standard AWS variables.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

TESTS = Path(__file__).resolve().parent

# Nothing of Hypothesis's in the repository tree: no example database, and its caches (constants, unicode data)
# in the system's temporary directory instead of ./.hypothesis/
settings.register_profile("lepton_ray", database=None)
settings.load_profile("lepton_ray")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lepton_ray_hypothesis")
BIN = Path(sys.executable).parent

# Set before anything imports ray (it reads them at import time), and inherited by every Ray
# process of the session: Ray maps 127.0.0.1 to the machine's routable IP unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its macOS behaviour), so with it every socket of the test
# cluster stays on loopback; token auth is off for that loopback-only cluster; tests/ is on the
# workers' import path for the test models; the virtualenv's bin/ is on PATH as when it is activated
# (a `ray job submit` entrypoint runs `lepton-ray` from the cluster's PATH).
os.environ.update(
    PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_AUTH_MODE="disabled",
    PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
)


def free_port() -> int:
    """A port that was free a moment ago: a guess, which a later bind may lose to another process. Only for what cannot
    bind port 0 itself or take a bound socket (``ray start`` flags, Serve's HTTP port); whatever can, does (the moto
    servers); a ``ray start`` that loses its ports is started again on fresh ones (:func:`ray_start`); the process groups
    a test spawns meet in a file (:func:`rendezvous`), not on a port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous() -> str:
    """The ``init_method`` for the torch process group of processes a test spawns: a fresh file (torch's FileStore)
    in a new temporary directory, so no port is guessed."""
    return "file://" + os.path.join(tempfile.mkdtemp(prefix="lr-pg-"), "store")


FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel"]
"""What the fork server imports once per test session (torch and torch._dynamo: ~6 s of CPU a process here, the
optimizer's first step imports the latter)."""


def spawn(fn: Callable[..., None], args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs)`` from a fork server: each process is forked from one
    that imported torch once, instead of importing it again (``spawn``). The function and its arguments are pickled as
    with ``spawn``, and each process gets this process's environment of now (not the server's, from its start); a
    process that fails fails the call with its traceback."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts (the first call)
    mp.start_processes(_in_environment, args=(dict(os.environ), fn, *args), nprocs=nprocs, start_method="forkserver", join=True)


def _in_environment(rank: int, environ: dict[str, str], fn: Callable[..., None], *args: object) -> None:
    os.environ.clear()
    os.environ.update(environ)
    fn(rank, *args)


def moto_server(port: int = 0):
    """A started moto S3 server on 127.0.0.1: on ``port``, or (0) on a port the server itself bound."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


def ray_start(make: Callable[[], tuple[list[str], dict[str, str]]], log: Path, attempts: int = 3,
              wait_s: float = 180) -> subprocess.Popen:
    """``ray start --block *args`` (``make()`` gives the arguments and environment, with fresh ports each call) in its
    own process group (stopped by that group's id with :func:`ray_stop`, nobody else's). Started again, on fresh
    ports, when it fails: a port taken between :func:`free_port` and Ray's bind, or a raylet that missed Ray's fixed
    30 s to register with its GCS on a loaded 2-core machine ("The current node timed out during startup")."""
    for attempt in range(1, attempts + 1):
        args, env = make()
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
        deadline = time.monotonic() + wait_s
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                ray_stop(proc)
                if attempt == attempts:
                    raise RuntimeError(f"ray start failed {attempts} times; the last:\n{log.read_text()[-3000:]}")
                break
            time.sleep(0.5)
        else:
            return proc
    raise AssertionError("unreachable")


def ray_stop(proc: subprocess.Popen) -> None:
    """Stop a :func:`ray_start` node: SIGTERM to its process group, then (after 5 s: a graceful stop takes ~30 s on a
    loaded 2-core machine, nothing here needs it graceful) SIGKILL to whatever of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_* variables point at it for this session."""
    server, port = moto_server()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh, empty bucket per test and parameter set: a readable prefix, then a hash of the whole test id (the
    prefix alone is cut to fit S3's 63 characters, which would give two parameter sets one bucket)."""
    import boto3

    readable = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:36].strip("-")
    name = f"t-{readable}-{hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]}-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, tmp_path_factory):
    """A real single-node Ray cluster started with ``ray start`` (4 logical CPUs) on 127.0.0.1.

    Yields ``.address`` (GCS, for ray.init / RAY_ADDRESS) and ``.dashboard`` (for ``ray job submit``).

    ``ray start --block`` runs in its own process group, so teardown stops exactly this
    cluster and nobody else's.
    """
    import ray

    ports: dict[str, int] = {}

    def make() -> tuple[list[str], dict[str, str]]:
        ports.update(gcs=free_port(), dashboard=free_port())
        # RAY_ADDRESS in the cluster's own processes too: Ray Train's PlacementGroupCleaner (and any state-API
        # call inside the cluster) otherwise auto-detects "the latest cluster" on a machine running several,
        # fails to watch its controller, and a trial ASHA stops leaks its workers' placement group.
        return (["--head", f"--port={ports['gcs']}", "--num-cpus=4", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=1000000000", "--disable-usage-stats"],
                {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"})

    head = ray_start(make, tmp_path_factory.mktemp("ray") / "ray-start.log", wait_s=120)
    address, dashboard_port = f"127.0.0.1:{ports['gcs']}", ports["dashboard"]
    try:
        ray.init(address=address)
        os.environ["RAY_ADDRESS"] = address
        yield types.SimpleNamespace(address=address, dashboard=f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        ray_stop(head)


@pytest.fixture(scope="session")
def cli(ray_cluster):
    """Run ``lepton-ray`` as a user would (a subprocess against the session's cluster)."""

    def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "lepton-ray"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "RAY_ADDRESS": ray_cluster.address})

    return run


def write_blobs(path: Path, rows: int = 512, features: int = 16, classes: int = 4, seed: int = 0) -> Path:
    """Seeded, learnable classification data (Gaussian blobs) as one Parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, size=(classes, features))
    y = rng.integers(0, classes, size=rows)
    x = (centers[y] + rng.normal(0, 1, size=(rows, features))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(features)}, "label": y}), path)
    return path


@pytest.fixture
def blobs(tmp_path) -> Path:
    return write_blobs(tmp_path / "data" / "train.parquet")


def pytest_collection_modifyitems(items):
    """tests/faults/ is the fault-injection suite: every test there injects a real fault (a killed or frozen process,
    a stopped storage server, a torn file) into a real run, is bounded in time, listens on 127.0.0.1 only and cleans up
    the processes it started by their ids. They are marked ``faults``: ``python -m pytest -m faults`` runs just them."""
    for item in items:
        if "/tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
