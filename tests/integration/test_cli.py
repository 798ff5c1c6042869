"""The ``lepton-ray`` command as a user runs it: the README's main job, ``ray job submit``, config errors."""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _digits_overrides(tmp_path: Path) -> list[str]:
    return [
        "--set", f"run.dir={tmp_path / 'runs'}",
        "--set", f"data.train={tmp_path / 'digits' / 'train.parquet'}",
        "--set", f"data.eval={tmp_path / 'digits' / 'eval.parquet'}",
    ]


RAY_BELOW_WARNING = re.compile(
    r"\tINFO \S+:\d+ -- "  # the driver's own Ray logger ("Connecting to existing Ray cluster", "Started a local Ray instance")
    r"|Requesting resources|Attempting to start training worker group|Started training worker group"  # Ray Train's controller
    r"|Setting up process group for"  # Ray Train's workers
    r"|\[\d{4}-\d\d-\d\d [\d:,]+ [DIWE] \d+ \d+\] \S+:\d+: ")  # the C++ backend, any process
"""Ray's lines below WARNING, as the main job printed them before lepton_ray quieted them, and every C++ backend line
short of FATAL. Not every ``(TrainController pid=...)`` line: the forwarded text carries no level, and that process's
warnings (e.g. "Failed to send resource request" on a loaded machine) are kept on purpose."""


def test_digits_example_through_the_cli(cli, tmp_path):
    """The README's main job on 2 workers reaches >= 0.95 held-out accuracy and writes its run files; its console shows
    the progress bar and the result, and none of Ray's INFO or C++ lines."""
    proc = cli("train", "examples/digits.yaml", "--json", *_digits_overrides(tmp_path), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] >= 0.95
    assert f"held-out accuracy: {result['eval_accuracy']:.4f}" in proc.stdout
    shown = proc.stdout.splitlines() + proc.stderr.replace("\r", "\n").splitlines()
    assert [line for line in shown if RAY_BELOW_WARNING.search(line)] == []
    assert any(line.startswith("result: train_loss=") for line in shown)
    assert re.search(rf"digits: 100%\|#+\| {result['steps']}/{result['steps']} ", proc.stderr)  # the bar, in a log file
    run_dir = Path(result["run_dir"])
    assert run_dir == tmp_path / "runs" / "digits"
    assert json.loads((run_dir / "result.json").read_text()) == result
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, result["steps"] + 1))
    assert sum("eval_accuracy" in r and "event" not in r for r in records) == 30  # one evaluation per epoch
    assert result["checkpoint"] == str(run_dir / "checkpoints" / f"step_{result['steps']:08d}")
    assert result["samples_per_s"] > 0 and result["train_loss"] < 0.1
    # the run's newest values, exported by its metrics sink, on the node's Ray metrics endpoint (Prometheus text)
    expected = {"step": result["steps"], "loss": result["train_loss"], "eval_accuracy": result["eval_accuracy"]}
    assert _exported_by_one_process("digits", expected) == expected


def _exported_by_one_process(run: str, expected: dict[str, float], deadline_s: float = 30) -> dict[str, float]:
    """``ray_lepton_ray_train_<name>`` of ``run`` on the Ray metrics endpoints of the cluster's nodes: the values of the
    one process (the run's metrics sink) that exported ``expected``, or the last values seen when none did by the deadline.
    Ray exports a process's metrics when it exits (the sink is killed at the end of the run) and keeps them ~20 s."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    prefix, seen = "ray_lepton_ray_train_", {}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        by_process: dict[str, dict[str, float]] = {}
        for port in ports:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for sample in (s for f in text_string_to_metric_families(text) for s in f.samples):
                if sample.name.startswith(prefix) and sample.labels.get("run") == run:
                    by_process.setdefault(sample.labels["WorkerId"], {})[sample.name.removeprefix(prefix)] = sample.value
        for values in by_process.values():
            seen = {k: values.get(k) for k in expected}
            if seen == expected:
                return seen
        time.sleep(0.5)
    return seen


def _cli_error(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run lepton-ray where no Ray cluster is involved: a config error must stop it before Ray starts."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(BIN / "lepton-ray"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def digits_yaml(tmp_path) -> Path:
    """examples/digits.yaml with its data and runs under tmp_path (the file keeps the name digits.yaml)."""
    text = (REPO / "examples" / "digits.yaml").read_text()
    text = text.replace("data/digits/", f"{tmp_path}/digits/").replace("dir: runs", f"dir: {tmp_path}/runs")
    path = tmp_path / "digits.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=0.1", "train.lrr: unknown key (did you mean 'lr'?); valid keys in 'train' are: epochs, max_steps, batch_size, lr, optimizer, momentum, weight_decay, schedule, warmup_steps, min_lr_ratio, grad_accum_steps, grad_clip_norm, precision, seed, eval_batch_size, eval_every_steps, log_every_steps, collective_timeout_s, straggler_factor, activation_checkpointing, compile, init_from"),
        ("train.epochs=many", "train.epochs: expected an integer, got 'many'"),
        ("sync.strategy=allreduc", "sync.strategy: 'allreduc' is not one of allreduce, fsdp, ps, hybrid (did you mean 'allreduce'?)"),
        ("train.precision=fp16", "train.precision: 'fp16' needs a GPU (scaling.use_gpu: true); on CPU use 'bf16' or 'fp32'"),
        ("train.batch_size=63", "train.batch_size: 63 must be divisible by scaling.num_workers x train.grad_accum_steps = 2 x 1 = 2"),
    ],
    ids=["unknown-key", "wrong-type", "bad-enum", "fp16-on-cpu", "indivisible-batch"],
)
def test_config_errors_exit_2_with_the_message(tmp_path, digits_yaml, override, message):
    proc = _cli_error(tmp_path, "train", str(digits_yaml), "--set", override)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lepton-ray: config error: {message}"
    assert not (tmp_path / "runs").exists()


def test_missing_data_path_is_a_config_error(tmp_path, digits_yaml):
    missing = tmp_path / "nowhere" / "train.parquet"
    proc = _cli_error(tmp_path, "train", str(digits_yaml), "--set", f"data.train={missing}", "--set", "data.builder=null")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lepton-ray: config error: data.train: '{missing}' does not exist"


def test_missing_label_column_is_a_config_error(tmp_path, digits_yaml):
    proc = _cli_error(tmp_path, "train", str(digits_yaml), "--set", "data.label=target")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"lepton-ray: config error: data.label: column 'target' is not in data.train '{tmp_path / 'digits' / 'train.parquet'}' (columns: px0, px1,")


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path, digits_yaml):
    proc = _cli_error(tmp_path, "train", str(digits_yaml), "--resume")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"lepton-ray: config error: --resume: run 'digits' has no committed checkpoint under '{tmp_path / 'runs' / 'digits' / 'checkpoints'}'; nothing to resume"
    )


def test_missing_config_file(tmp_path):
    proc = _cli_error(tmp_path, "train", "nope.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lepton-ray: config error: config file 'nope.yaml' does not exist"


def _tiny_bundle(path: Path) -> Path:
    """A 4-feature, 3-class MLP bundle (seeded random weights: answers are checked against the offline model)."""
    import torch

    from lepton_ray.data.schema import Column, Schema
    from lepton_ray.serve.bundle import Bundle, write_bundle

    torch.manual_seed(0)
    schema = Schema(inputs=(Column("x", ("x",), "float32", (4,)),), targets=(Column("label", ("label",), "int64", (), 3),))
    write_bundle(Bundle(model={"name": "mlp", "hidden": [4]}, schema=schema, state=None, name="tiny"), str(path))
    return path


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    return _tiny_bundle(tmp_path / "bundle")


def test_serve_refuses_a_missing_bundle_before_ray_starts(tmp_path):
    proc = _cli_error(tmp_path, "serve", str(tmp_path / "nonexistent" / "ck"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"lepton-ray: '{tmp_path / 'nonexistent' / 'ck'}' is neither a serving bundle (bundle.json) "
                                   "nor a lepton_ray checkpoint (MANIFEST.json)")
    assert "Ray" not in proc.stdout + proc.stderr  # nothing started


def test_serve_refuses_an_unset_token_variable_and_a_taken_port_before_ray_starts(tmp_path, tiny_bundle):
    env_name = "LEPTON_TEST_TOKEN_THAT_IS_NOT_SET"
    proc = _cli_error(tmp_path, "serve", str(tiny_bundle), "--auth-token-env", env_name)
    assert (proc.returncode, proc.stderr.strip()) == (
        2, f"lepton-ray: config error: --auth-token-env: environment variable {env_name} is not set (or empty); export the token in it first")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli_error(tmp_path, "serve", str(tiny_bundle), "--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lepton-ray: config error: --port: 127.0.0.1:{port} is not free (Address already in use); pick another port"
    assert "Ray" not in proc.stdout


def test_serve_refuses_a_host_beyond_loopback_without_a_token_before_ray_starts(tmp_path, tiny_bundle):
    proc = _cli_error(tmp_path, "serve", str(tiny_bundle), "--host", "0.0.0.0")
    assert (proc.returncode, proc.stderr.strip()) == (
        2, "lepton-ray: config error: serve.host: is not a loopback address: other machines reach it, so every request must "
           "carry a bearer token: pass --auth-token-env NAME (serve.auth_token_env), NAME an environment variable holding the "
           "token, or bind 127.0.0.1, got '0.0.0.0'")
    assert "Ray" not in proc.stdout


# ---------------------------------------------------------------- one `lepton-ray serve` process for the tests below

TOKEN_ENV, TOKEN = "LEPTON_RAY_TEST_CLI_TOKEN", "cli-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """``lepton-ray serve BUNDLE --host 0.0.0.0 --auth-token-env ... --replicas 2 --json`` on the session cluster, in its
    own process group, shared by the tests below (the last one SIGTERMs it). ``counts``: the (path, code) of every
    request the tests sent it; ``replicas``: how many of them each replica (pid) answered."""
    from lepton_ray.serve import load_bundle
    from lepton_ray.serve.predictor import Predictor

    root = tmp_path_factory.mktemp("cli-serve")
    bundle, port, log = _tiny_bundle(root / "bundle"), free_port(), root / "serve.log"
    args = [str(BIN / "lepton-ray"), "serve", str(bundle), "--host", "0.0.0.0", "--port", str(port), "--replicas", "2",
            "--auth-token-env", TOKEN_ENV, "--json"]
    with log.open("w") as err:
        proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                env={**os.environ, "RAY_ADDRESS": ray_cluster.address, TOKEN_ENV: TOKEN})
    try:
        line, deadline = "", time.monotonic() + 240
        while not line.startswith("{"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        yield types.SimpleNamespace(proc=proc, line=line, port=port, log=log, offline=Predictor(load_bundle(str(bundle))),
                                    counts=collections.Counter(), replicas=collections.Counter())
    finally:
        if proc.poll() is None:  # the SIGTERM test did not stop it: stop it and its application
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _predict(server, rows: list, headers: dict) -> requests.Response:
    """POST /predict on a new connection, counted in ``server.counts``."""
    r = requests.post(f"http://127.0.0.1:{server.port}/predict", json={"instances": rows},
                      headers={"Connection": "close", **headers}, timeout=30)
    server.counts["/predict", str(r.status_code)] += 1
    server.replicas[r.headers["x-lepton-replica"]] += 1
    return r


def _check_answers(server, rows, body: dict) -> None:
    """``body`` is the offline model's answer for ``rows``."""
    want = server.offline.predict(np.asarray(rows, np.float32))
    assert [p["label"] for p in body["predictions"]] == want["label"].tolist()
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], want["probabilities"], rtol=0, atol=1e-6)


ROWS = [[0.1, 0.2, 0.3, 0.4], [-1.0, 0.5, 2.0, 0.0]]


def test_serve_binds_every_interface_with_a_token_and_every_replica_answers_on_one_url(server):
    """`--json` prints one line with the URL; the server listens on 0.0.0.0 (every interface); requests need the token
    (the health probe does not); both replicas answer on the one URL with the offline model's predictions."""
    url = f"http://127.0.0.1:{server.port}"
    assert json.loads(server.line) == {"url": url, "predict": f"{url}/predict", "infer": f"{url}/v2/models/tiny/infer",
                                       "model_name": "tiny", "replicas": 2}
    listening = {(f.split()[1], f.split()[3]) for f in Path("/proc/net/tcp").read_text().splitlines()[1:]}
    assert (f"00000000:{server.port:04X}", "0A") in listening  # 0.0.0.0:port in state LISTEN
    assert _predict(server, ROWS, {}).status_code == 401
    assert _predict(server, ROWS, {"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    for _ in range(30):
        r = _predict(server, ROWS, AUTH)
        assert r.status_code == 200, r.text
        _check_answers(server, ROWS, r.json())
    assert len(server.replicas) == 2  # the kernel spread the connections over both replicas


def test_a_20_mb_body_is_a_413_that_urllib_reads(server):
    """urllib sends the whole body before reading the answer: the server reads and drops what it refuses, so the
    client reads the 413 (not 'Connection reset by peer'), which names the limit and how to raise it."""
    import urllib.error
    import urllib.request

    from lepton_ray.serve.app import body_limit

    size = 20 * 1024 * 1024
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/predict", data=b"0" * size, method="POST",
                                 headers={"Content-Type": "application/json", **AUTH})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    server.counts["/predict", "413"] += 1
    server.replicas[refused.value.headers["x-lepton-replica"]] += 1
    assert refused.value.code == 413
    limit = body_limit(server.offline.inputs, 1024)
    assert json.loads(refused.value.read()) == {"error": (
        f"request body of {size} bytes is larger than {limit} bytes, the limit for 1024 instances per request; send fewer "
        "instances per request or raise the limit with --max-instances (serve.max_instances)")}


def _node_metrics() -> dict:
    """Every node's Ray metrics endpoint, parsed and summed: {(sample name, labels as a sorted tuple): value}."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for node in (n for n in ray.nodes() if n["Alive"]):
        text = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0) + s.value
    return out


def test_every_replicas_serving_metrics_reach_the_nodes_ray_metrics_endpoint(server, ray_cluster):
    """Requests by path and code, batch sizes and latencies of both replicas, summed from the nodes' Ray metrics
    endpoints (Ray exports every few seconds: polled, bounded), equal what the tests sent."""
    for _ in range(10):
        assert _predict(server, ROWS[:1], AUTH).status_code == 200
    assert _predict(server, [[0.0] * 3], AUTH).status_code == 400
    predict = {code: n for (path, code), n in server.counts.items() if path == "/predict"}

    def ours(metrics: dict, name: str, **only: str) -> dict:
        """{(path and code labels): value summed over this server's replicas} of the samples ``name`` with ``only``'s labels."""
        out: dict = {}
        for (sample, labels), value in metrics.items():
            tags = dict(labels)
            if (sample == name and tags.get("model") == "tiny" and tags.get("replica") in server.replicas
                    and all(tags.get(k) == v for k, v in only.items())):
                key = tuple((k, v) for k, v in labels if k in ("path", "code"))  # sorted: code, path
                out[key] = out.get(key, 0) + value
        return out

    # requests sent one at a time: each answered one is a model call of its own, of one request (Ray's _sum of a
    # histogram is estimated from its buckets, so the calls are counted, not summed)
    want = {"requests": {(("code", c), ("path", "/predict")): n for c, n in predict.items()},
            "errors": {(("code", c),): n for c, n in predict.items() if c != "200"},
            "latency_count": {(): sum(predict.values())},
            "batch_count": {(): predict["200"]},
            "batch_size_1": {(): predict["200"]}}
    deadline = time.monotonic() + 120
    while True:
        metrics = _node_metrics()
        got = {"requests": ours(metrics, "ray_lepton_ray_serve_requests_total", path="/predict"),
               "errors": ours(metrics, "ray_lepton_ray_serve_errors_total"),
               "latency_count": ours(metrics, "ray_lepton_ray_serve_request_latency_seconds_count"),
               "batch_count": ours(metrics, "ray_lepton_ray_serve_batch_size_count"),
               "batch_size_1": ours(metrics, "ray_lepton_ray_serve_batch_size_bucket", le="1.0")}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == want
    per_replica = collections.Counter()
    for (name, labels), value in metrics.items():
        tags = dict(labels)
        if name == "ray_lepton_ray_serve_requests_total" and tags.get("model") == "tiny" and tags.get("path") == "/predict":
            per_replica[tags["replica"]] += int(value)
    assert per_replica == server.replicas  # each replica's own numbers


def _post_once(port: int, body: bytes) -> tuple[str, object]:
    """POST /predict on a new connection: ("refused", None) at connect, ("dropped", None) closed before a byte of an
    answer, ("answered", (status, body)). A truncated answer raises (IncompleteRead)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return "refused", None
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "application/json", "Connection": "close", **AUTH})
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            return "dropped", None
        return "answered", (response.status, response.read())
    finally:
        conn.close()


def test_sigterm_stops_accepting_lets_the_requests_in_flight_finish_and_exits_0(server):
    """Two clients post in a loop; one request is in flight (headers and half its body sent) when the server gets
    SIGTERM. Once connections are refused (every replica stopped accepting), the held request sends the rest of its
    body and gets its full answer. Every answer any client got is complete and correct; requests after the stop fail
    at connect (or are closed before a byte of an answer, never in the middle of one); the process exits 0 without a
    stack trace."""
    body = json.dumps({"instances": ROWS}).encode()
    held = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    held.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    outcomes: list = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                outcomes.append(_post_once(server.port, body))
            except Exception as exc:  # noqa: BLE001 - a broken answer: recorded, and it fails the test
                outcomes.append(("broken", repr(exc)))

    clients = [threading.Thread(target=client) for _ in range(2)]
    try:
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while sum(kind == "answered" for kind, _ in outcomes) < 10:
            assert time.monotonic() < deadline, outcomes[-5:]
            time.sleep(0.05)
        sent_at = len(outcomes)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while True:  # every replica's listener closed: connections are refused
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline and server.proc.poll() is None, "connections still accepted 60 s after SIGTERM"
            time.sleep(0.05)
        held.sendall(body[10:])
        answer = b""
        while chunk := held.recv(65536):
            answer += chunk
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
        held.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    _check_answers(server, ROWS, json.loads(payload))
    assert server.proc.wait(timeout=120) == 0
    stderr = server.log.read_text()
    for bad in ("SIGTERM received", "Aborted", "Traceback"):
        assert bad not in stderr, stderr[-3000:]
    kinds = collections.Counter(kind for kind, _ in outcomes)
    print(f"SIGTERM under 2 looping clients: {dict(kinds)}; {sum(k == 'answered' for k, _ in outcomes[sent_at:])} answered "
          f"after the signal")
    assert set(kinds) <= {"answered", "refused", "dropped"}, [o for o in outcomes if o[0] == "broken"]
    assert kinds["refused"] >= 1
    for _, (status, payload) in (o for o in outcomes if o[0] == "answered"):
        assert status == 200, payload
        _check_answers(server, ROWS, json.loads(payload))
