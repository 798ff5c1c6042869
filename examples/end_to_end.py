"""From a bucket to a served model, the way a team would run it, on this machine:

  a moto S3 server on 127.0.0.1 (the bucket)
  -> a 2-node Ray cluster (two ``ray start`` on 127.0.0.1, 1 CPU each, token authentication on)
  -> ``lepton-ray data prepare``: scikit-learn's digits as sharded Parquet in the bucket
  -> ``lepton-ray train``, submitted with ``ray job submit``: one worker on each node, both reading the shards
     from and checkpointing to the bucket
  -> ``lepton-ray sweep`` over lr and batch size with ASHA (a job)
  -> ``lepton-ray optimize``: the better checkpoint into a serving bundle in the bucket
  -> ``lepton-ray predict`` over the eval split with Ray Data (a job), the predictions written to the bucket
  -> ``lepton-ray serve`` (a job): real HTTP requests over KServe v1 JSON and the Open Inference Protocol v2 for
     a few eval rows, whose answers must be the batch prediction's.

The nodes know nothing of the bucket: its endpoint and credentials (the standard ``AWS_*`` variables) reach each
job, its driver and every Ray process it starts (Train workers, Tune trials, Serve replicas, Ray Data tasks),
through the job's runtime env. Everything started here (moto, the two nodes and with them the jobs) is stopped by
its process id at the end, also on an error, Ctrl-C or SIGTERM.

    python examples/end_to_end.py            # the config's sizes: 30 epochs, 8 trials, a torch.compile candidate
    python examples/end_to_end.py --quick    # 4-5 minutes on 2 cores: fewer epochs and trials (tests/integration/test_end_to_end.py)

The second node joins through a host name for 127.0.0.1 other than ``localhost`` (Ray rewrites the literal
loopback names): ``LEPTON_RAY_LOOPBACK_NAME``, else ``lepton-node2`` or this machine's host name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

CONFIG = Path(__file__).with_suffix(".yaml")  # the jobs' config: their working directory holds a copy
BIN = Path(sys.executable).parent
BUCKET = "lepton-ray-example"  # the config's bucket
SAMPLE_ROWS = 5  # eval rows (the lowest ids) sent over HTTP and looked up in the batch output
JOB_TIMEOUT_S = 900

SIZES = {  # per size: --set overrides of the config for train and for sweep, and the optimize candidates
    "full": ([], [], ["fp32", "bf16", "int8", "compile"]),
    "quick": (["train.epochs=8"],
              ["train.epochs=4", "sweep.num_samples=4", "sweep.asha={grace_period: 1, reduction_factor: 2}"],
              ["fp32", "bf16", "int8"]),
}


# ----------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    """A port free a moment ago: only for what cannot bind port 0 itself (``ray start``'s ports, Serve's HTTP port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_name() -> str:
    """A host name other than 'localhost' for 127.0.0.1, for the second node to join through."""
    wanted = os.environ.get("LEPTON_RAY_LOOPBACK_NAME")
    for name in [wanted] if wanted else ["lepton-node2", socket.gethostname()]:
        try:
            if name != "localhost" and socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            pass
    raise SystemExit("end_to_end: no host name other than 'localhost' resolves to 127.0.0.1 here"
                     + (f" (LEPTON_RAY_LOOPBACK_NAME={wanted!r} does not)" if wanted else "")
                     + ", so a second Ray node cannot join on loopback; add one (as root): echo '127.0.0.1 lepton-node2' >> /etc/hosts")


MARK = "LEPTON_RAY_EXAMPLE_RUN"  # in the environment of every process of a run: its work directory


def marked(run: str) -> list[int]:
    """The processes whose environment carries ``MARK=run`` (Linux: /proc)."""
    needle = f"{MARK}={run}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # gone meanwhile, a zombie, or not ours to read
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and int(pid) != os.getpid():
                pids.append(int(pid))
    return pids


class Started:
    """Every process started here, and stopped at the end: SIGTERM to each one's process group (each is started in a
    session of its own, and Ray's processes stay in their node's) and to every other process of the run (the jobs'
    entrypoints, which Ray starts in sessions of their own: found by ``MARK`` in their environment, which they
    inherit); SIGKILL to what is left 5 s later. Nothing here needs a graceful Ray stop."""

    def __init__(self, run: str):
        self.run, self.procs = run, []
        os.environ[MARK] = run

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, procs: Optional[list[subprocess.Popen]] = None) -> None:
        """Stop ``procs`` (their process groups), or everything of the run."""
        groups = [p.pid for p in (self.procs if procs is None else procs)]

        def left() -> bool:
            for proc in self.procs:
                proc.poll()  # reap the group leaders started here
            return any(_group_alive(g) for g in groups) or (procs is None and bool(marked(self.run)))

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            for pid in marked(self.run) if procs is None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while left() and time.monotonic() < deadline:
                time.sleep(0.1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def start_moto(work: Path, started: Started) -> tuple[str, int]:
    """A moto S3 server on 127.0.0.1, on a port it binds itself, in a process of its own: (endpoint, pid)."""
    code = ("import threading; from moto.server import ThreadedMotoServer\n"
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start()\n"
            "print(s.get_host_and_port()[1], flush=True); threading.Event().wait()")
    with open(work / "moto.log", "wb") as log:
        proc = started.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log)
    port = proc.stdout.readline().strip()
    if not port:
        raise RuntimeError(f"the moto server did not start: {(work / 'moto.log').read_text()[-2000:]}")
    return f"http://127.0.0.1:{int(port)}", proc.pid


def start_node(make: Callable[[], list[str]], env: dict[str, str], log: Path, started: Started) -> subprocess.Popen:
    """``ray start --block``, started again on fresh ports (``make()`` picks them) when it fails: a port taken
    meanwhile, or a raylet too slow to register with the head."""
    for _ in range(3):
        with open(log, "wb") as out:
            proc = started.popen([str(BIN / "ray"), "start", "--block", *make()], stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                started.stop([proc])
                break
            time.sleep(0.5)
        else:
            return proc
    raise RuntimeError(f"ray start failed 3 times; the last:\n{log.read_text()[-3000:]}")


def start_cluster(work: Path, env: dict[str, str], started: Started) -> tuple[str, str, list[int]]:
    """The head and a second node, 1 logical CPU each, token authentication on (``env``): returns the GCS address,
    the dashboard's URL (the Jobs API) and the two ``ray start`` pids."""
    join_as = loopback_name()
    ports: dict[str, int] = {}

    def node_args() -> list[str]:  # two nodes on one machine: each its own ports
        return ["--num-cpus=1", "--object-store-memory=300000000", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def head() -> list[str]:
        ports.update(gcs=free_port(), dashboard=free_port())
        env["RAY_ADDRESS"] = f"127.0.0.1:{ports['gcs']}"  # the cluster's own processes ask their own state API
        return ["--head", f"--port={ports['gcs']}", f"--temp-dir={work / 'ray'}", "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={free_port()}", *node_args()]

    nodes = [start_node(head, env, work / "head.log", started)]
    address, dashboard = f"127.0.0.1:{ports['gcs']}", f"http://127.0.0.1:{ports['dashboard']}"
    # Ray lets a second node join only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and then maps the literal 127.0.0.1
    # to the machine's routable IP; a host name for 127.0.0.1 keeps the node on loopback
    nodes.append(start_node(lambda: [f"--address={join_as}:{ports['gcs']}", *node_args()],
                            {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, work / "node2.log", started))
    from ray.util.state import list_nodes

    deadline = time.monotonic() + 120
    while len([n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the second node never joined the cluster")
        time.sleep(1)
    return address, dashboard, [p.pid for p in nodes]


class Jobs:
    """``ray job submit``: the working directory holds the config (lepton_ray is installed on the cluster), the
    runtime env the bucket's settings. Each job's output (``ray job submit`` follows its logs) goes to
    ``<work>/<name>.log``.

    The working directory is a copy made once: Ray unpacks a new working-directory package again (deleting it
    first) when the job's first worker starts on the driver's node, which takes the driver's current directory
    away from under it; ``lepton-ray train`` (the first job here) does not mind, Ray Tune's driver does."""

    def __init__(self, dashboard: str, env_vars: dict[str, str], work: Path, started: Started):
        self.dashboard, self.env_vars, self.work, self.started = dashboard, env_vars, work, started
        self.working_dir = work / "job"
        self.working_dir.mkdir()
        shutil.copy(CONFIG, self.working_dir / CONFIG.name)

    def submit(self, name: str, entrypoint: list[str]) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "wb") as log:
            return self.started.popen([str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id", name,
                                       "--working-dir", str(self.working_dir), "--runtime-env-json",
                                       json.dumps({"env_vars": self.env_vars}), "--", *entrypoint],
                                      stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> list[str]:
        return (self.work / f"{name}.log").read_text(errors="replace").splitlines()

    def run(self, name: str, entrypoint: list[str]) -> list[str]:
        """Submit, wait for the job to end; its log lines."""
        proc = self.submit(name, entrypoint)
        try:
            code = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = f"none: still running after {JOB_TIMEOUT_S} s"
        if code != 0:
            raise RuntimeError(f"job {name} failed (exit {code}); its log ends:\n" + "\n".join(self.log(name)[-40:]))
        return self.log(name)

    def start(self, name: str, entrypoint: list[str], ready: Callable[[list[str]], Optional[dict]]) -> dict:
        """Submit a job that keeps running; wait until ``ready(its log lines)`` finds what it looks for."""
        proc, deadline = self.submit(name, entrypoint), time.monotonic() + JOB_TIMEOUT_S
        while (found := ready(self.log(name))) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"job {name} is not running; its log ends:\n" + "\n".join(self.log(name)[-40:]))
            time.sleep(0.5)
        return found


def last_json(lines: list[str]) -> dict[str, Any]:
    """The object a ``--json`` command printed last (a job's log has Ray's own lines after it)."""
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


class Report:
    """Each stage's result and the seconds it took, printed as the stage ends."""

    def __init__(self, work: Path):
        self.results: dict[str, Any] = {"work_dir": str(work)}
        self.start = self.last = time.monotonic()

    def done(self, stage: str, result: dict[str, Any], text: str) -> None:
        now = time.monotonic()
        self.results[stage] = {**result, "seconds": round(now - self.last, 1)}
        self.last = now
        print(f"[{stage}] {text} ({self.results[stage]['seconds']} s)", flush=True)


# ----------------------------------------------------------------------------------------------- stages


def start_prepare(work: Path, started: Started) -> subprocess.Popen:
    """scikit-learn's digits with an id column as a team's raw data (one local Parquet file), then
    ``lepton-ray data prepare`` into the bucket: 4 train and 4 eval shards, each split with its manifest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    raw = work / "digits.parquet"
    pq.write_table(pa.table({"id": np.arange(len(pixels), dtype=np.int64),
                             "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 64),
                             "label": digits.target.astype(np.int64)}), raw)
    return started.popen([str(BIN / "lepton-ray"), "data", "prepare", str(raw), f"s3://{BUCKET}/digits", "--num-shards", "4",
                          "--eval-fraction", "0.2", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_nodes(dashboard: str) -> list[str]:
    """The node ('head' or 'node2') of each Ray Train worker the cluster has run."""
    from ray.util.state import list_actors, list_nodes

    heads = {n.node_id for n in list_nodes(address=dashboard, detail=True) if n.is_head_node}
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
    return sorted("head" if a.node_id in heads else "node2" for a in actors)


def read_split(uri: str) -> pa.Table:
    """Every Parquet file under ``uri`` (a prepared split's ``_manifest.json`` left out)."""
    from lepton_ray.storage import arrow_filesystem, filesystem

    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=arrow_filesystem(fs), ignore_prefixes=["_"])


def http_predictions(served: dict[str, str], rows: np.ndarray) -> dict[str, Any]:
    """The same rows through KServe v1 (``/predict``, JSON instances) and the Open Inference Protocol v2 (FP32)."""
    v1 = requests.post(served["predict"], json={"instances": rows.tolist()}, timeout=60)
    v1.raise_for_status()
    v2 = requests.post(served["infer"], json={"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32",
                                                          "data": rows.ravel().tolist()}]}, timeout=60)
    v2.raise_for_status()
    out = {o["name"]: o for o in v2.json()["outputs"]}
    return {"v1_labels": [p["label"] for p in v1.json()["predictions"]],
            "v1_probabilities": [p["probabilities"] for p in v1.json()["predictions"]],
            "v2_labels": out["label"]["data"],
            "v2_probabilities": np.asarray(out["probabilities"]["data"]).reshape(len(rows), -1).tolist()}


def run(quick: bool, work: Path, started: Started) -> dict[str, Any]:
    train_sets, sweep_sets, candidates = SIZES["quick" if quick else "full"]
    report = Report(work)
    # the nodes (and so the jobs' entrypoints) find lepton-ray where this Python's are, activated virtualenv or not
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

    # setup: the bucket; the data prepared into it while the cluster starts, whose nodes get no AWS variables
    endpoint, moto_pid = start_moto(work, started)
    s3_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(s3_env)  # this process and the commands it runs here: prepare, optimize, reading the results
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    preparing = start_prepare(work, started)
    # token authentication: the cluster's token in RAY_AUTH_TOKEN, for its nodes and for every client here
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    cluster_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    address, dashboard, node_pids = start_cluster(work, cluster_env, started)
    os.environ["RAY_ADDRESS"] = address
    jobs = Jobs(dashboard, s3_env, work, started)
    report.done("setup", {"endpoint": endpoint, "ray_address": address,
                          "pids": {"moto": moto_pid, "head": node_pids[0], "node2": node_pids[1]}},
                f"bucket s3://{BUCKET} at {endpoint} (moto, pid {moto_pid}); Ray cluster at {address}: 2 nodes, token "
                f"authentication on (ray start pids {node_pids[0]}, {node_pids[1]})")

    printed = preparing.communicate()[0].strip().splitlines()  # "train: 1438 rows in 4 shards", "eval: ..."
    if preparing.returncode != 0:
        raise RuntimeError("lepton-ray data prepare failed:\n" + "\n".join(printed[-30:]))
    data = {"train": f"s3://{BUCKET}/digits/train", "eval": f"s3://{BUCKET}/digits/eval", "printed": printed}
    report.done("prepare", data, "; ".join(printed) + f" -> {data['train']}, {data['eval']} (beside the setup)")

    sets = [a for s in train_sets for a in ("--set", s)]
    trained = last_json(jobs.run("train", ["lepton-ray", "train", CONFIG.name, "--json", "--no-progress",
                                           "--set", f"run.dir={work / 'runs'}", *sets]))
    nodes = worker_nodes(dashboard)
    files = sorted(Path(f).name for f in s3fs.S3FileSystem().ls(trained["checkpoint"]))
    report.done("train", {"eval_accuracy": trained["eval_accuracy"], "steps": trained["steps"],
                          "checkpoint": trained["checkpoint"], "checkpoint_files": files, "worker_nodes": nodes},
                f"eval_accuracy={trained['eval_accuracy']:.4f} after {trained['steps']} steps, workers on "
                f"{' and '.join(nodes)}; checkpoint {trained['checkpoint']} ({', '.join(files)})")

    sets = [a for s in ["scaling.num_workers=1", *sweep_sets] for a in ("--set", s)]  # one 1-CPU worker a trial
    swept = last_json(jobs.run("sweep", ["lepton-ray", "sweep", CONFIG.name, "--json", "--no-progress",
                                         "--set", f"sweep.dir={work / 'sweeps'}", *sets]))
    report.done("sweep", {k: swept[k] for k in ("trial", "eval_accuracy", "params", "checkpoint", "num_trials", "stopped_early")},
                f"{swept['num_trials']} trials, {swept['stopped_early']} stopped early by ASHA; best {swept['trial']}: "
                f"eval_accuracy={swept['eval_accuracy']:.4f} with lr={swept['params']['train.lr']:.4g}, "
                f"batch_size={swept['params']['train.batch_size']}")

    best = swept if swept["eval_accuracy"] > trained["eval_accuracy"] else trained
    bundle = f"s3://{BUCKET}/bundles/digits"
    out = subprocess.run([str(BIN / "lepton-ray"), "optimize", best["checkpoint"], "--eval", data["eval"], "-o", bundle,
                          "--candidates", *candidates, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"lepton-ray optimize failed:\n{out.stderr[-3000:]}")
    optimized = json.loads(out.stdout.strip().splitlines()[-1])
    forms, chosen = optimized["forms"], optimized["chosen"]
    report.done("optimize", {"chosen": chosen, "bundle": bundle, "checkpoint": best["checkpoint"],
                             "forms": {n: {k: f.get(k) for k in ("accuracy", "latency_ms_batch", "accurate", "error")}
                                       for n, f in forms.items()}},
                f"the {'sweep' if best is swept else 'training job'}'s checkpoint as {chosen}: accuracy "
                f"{forms[chosen]['accuracy']:.2f}% (fp32 {forms['fp32']['accuracy']:.2f}%), "
                f"{forms[chosen]['latency_ms_batch']:.3f} ms a batch of {optimized['bench_batch_size']} "
                f"(fp32 {forms['fp32']['latency_ms_batch']:.3f}) -> {bundle}")

    output = f"s3://{BUCKET}/predictions/digits"
    jobs.run("predict", ["lepton-ray", "predict", bundle, "--input", data["eval"], "--output", output, "--id-column", "id"])
    predicted = read_split(output).sort_by("id")
    ids = predicted.column("id").to_pylist()[:SAMPLE_ROWS]  # the rows that are also sent over HTTP
    labels = predicted.column("label").to_pylist()[:SAMPLE_ROWS]
    probs = np.asarray(predicted.column("probabilities").to_pylist()[:SAMPLE_ROWS])
    split = read_split(data["eval"])
    once = predicted.column("id").to_pylist() == sorted(split.column("id").to_pylist())  # every eval row, once
    report.done("predict", {"output": output, "rows": predicted.num_rows, "every_eval_row_once": once, "ids": ids,
                            "labels": labels, "probabilities": probs.tolist()},
                f"{predicted.num_rows} predictions -> {output} ({'every eval row once' if once else 'NOT every eval row once'});"
                f" ids {ids} -> labels {labels}")

    where = {i: n for n, i in enumerate(split.column("id").to_pylist())}
    pixels = split.column("pixels").to_numpy(zero_copy_only=False)
    rows = np.stack([pixels[where[i]] for i in ids]).astype(np.float32)

    def serving(lines: list[str]) -> Optional[dict]:  # `lepton-ray serve --json` prints one line once serving
        return next((json.loads(line) for line in lines if line.startswith('{"url"')), None)

    for attempt in range(3):  # Serve's port cannot be bound as 0: another one if it was taken meanwhile
        try:  # it serves until the cluster stops
            served = jobs.start(f"serve-{attempt}", ["lepton-ray", "serve", bundle, "--port", str(free_port()), "--json"],
                                serving)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    http = http_predictions(served, rows)
    diff = max(float(np.abs(probs - np.asarray(http[k])).max()) for k in ("v1_probabilities", "v2_probabilities"))
    report.done("serve", {"url": served["url"], "ids": ids, **http, "max_abs_diff_vs_batch": diff},
                f"{served['url']}: ids {ids} -> v1 /predict labels {http['v1_labels']}, v2 infer labels "
                f"{http['v2_labels']}; probabilities within {diff:.1g} of the batch prediction's")
    return report.results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer epochs and trials, no torch.compile candidate (for CI)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, run and sweep directories)")
    p.add_argument("--json", action="store_true", help="print every stage's result as one JSON object on the last line")
    args = p.parse_args(argv)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C: everything is stopped
    work = Path(tempfile.mkdtemp(prefix="lr-e2e-", dir="/tmp"))  # short: Ray's socket paths live under it
    print(f"work directory: {work}", flush=True)
    started = Started(str(work))
    try:
        results = run(args.quick, work, started)
    except BaseException:
        print(f"end_to_end: failed; the logs are in {work}", file=sys.stderr, flush=True)
        raise
    finally:
        started.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - began, 1)
    print(f"done in {results['seconds']} s; everything started here is stopped", flush=True)
    if args.json:
        print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
