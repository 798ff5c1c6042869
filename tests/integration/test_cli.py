"""The ``lepton-ray`` command as a user runs it: the README's main job, ``ray job submit``, config errors."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def test_ray_job_submit(ray_cluster, tmp_path):
    """The README's `ray job submit --working-dir . -- lepton-ray train ...` on a running cluster."""
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO), "--",
         "lepton-ray", "train", "examples/digits.yaml", "--json", "--no-progress",
         *_digits_overrides(tmp_path), "--set", "train.epochs=5"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith("{"))
    result = json.loads(line)
    assert result["steps"] == 5 * (1438 // 64)
    assert result["eval_accuracy"] > 0.9
    assert (tmp_path / "runs" / "digits" / "result.json").exists()


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
        ("train.lrr=0.1", "train.lrr: unknown key (did you mean 'lr'?); valid keys in 'train' are: epochs, max_steps, batch_size, lr, optimizer, momentum, weight_decay, schedule, warmup_steps, min_lr_ratio, grad_accum_steps, grad_clip_norm, precision, seed, eval_batch_size, eval_every_steps, log_every_steps, collective_timeout_s, activation_checkpointing, compile, init_from"),
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


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    from lepton_ray.data.schema import Column, Schema
    from lepton_ray.serve.bundle import Bundle, write_bundle

    schema = Schema(inputs=(Column("x", ("x",), "float32", (4,)),), targets=(Column("label", ("label",), "int64", (), 3),))
    write_bundle(Bundle(model={"name": "mlp", "hidden": [4]}, schema=schema, state=None, name="tiny"), str(tmp_path / "bundle"))
    return tmp_path / "bundle"


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


def test_serve_prints_its_one_url_and_every_replica_answers_there(tmp_path, tiny_bundle, ray_cluster):
    """`lepton-ray serve --replicas 2 --json` on a cluster: one JSON line with the URL, where both replicas answer;
    Ctrl-C stops it."""
    port = free_port()
    args = [str(BIN / "lepton-ray"), "serve", str(tiny_bundle), "--port", str(port), "--replicas", "2", "--json"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    try:
        line, deadline = "", time.monotonic() + 240
        while not line.startswith("{"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        assert json.loads(line) == {"url": url, "predict": f"{url}/predict", "infer": f"{url}/v2/models/tiny/infer",
                                    "model_name": "tiny", "replicas": 2}
        replicas = set()
        for _ in range(30):
            r = requests.post(f"{url}/predict", json={"instances": [[0.1, 0.2, 0.3, 0.4]]}, headers={"Connection": "close"}, timeout=30)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 1
            replicas.add(r.headers["x-lepton-replica"])
        assert len(replicas) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
