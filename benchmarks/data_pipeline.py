"""Data pipeline throughput on a local moto S3 endpoint, against plain pyarrow, in one run.

Measures, on the same prepared shards (default 2M rows x 32 float32 features + label, 16 shards):

1. baseline: ONE process reading every shard with pyarrow through the same filesystem (rows/s);
2. lepton_ray: ``WorkerStream`` delivering torch batches to 2 consumer processes (rank 0 and 1
   of 2), rows/s over the wall time of both; cold (no cache) and with ``data.cache_dir``
   (first pass fills the cache, second pass reads it);
3. optional (--ray-data): Ray Data's ``read_parquet(...).iter_torch_batches`` with defaults;
4. in a reference training run (an MLP on this data, 2 Ray Train workers), the fraction of
   step time the loop waited for data (``data_wait_frac`` in metrics.jsonl).

Bars (issue 3): lepton/baseline >= 0.5; data wait <= 5% of step time.

    python benchmarks/data_pipeline.py            # ~3-5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def make_table(rows: int, features: int) -> pa.Table:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=features).astype(np.float32)
    label = (x @ w > 0).astype(np.int64)
    return pa.table({**{f"f{i}": x[:, i] for i in range(features)}, "label": label})


def baseline_rows_per_s(uri: str) -> float:
    from lepton_ray.config import DataConfig
    from lepton_ray.data import describe
    from lepton_ray.storage import arrow_filesystem, filesystem

    info = describe("data.train", uri, DataConfig(train=uri))
    fs, _ = filesystem(uri)
    afs = arrow_filesystem(fs)
    t0 = time.perf_counter()
    rows = 0
    for path in info.files:
        rows += pq.read_table(path, filesystem=afs).num_rows
    return rows / (time.perf_counter() - t0)


def _consume(uri: str, rank: int, batch: int, cache_dir: str | None, epochs: int, memory: int, out: "mp.Queue") -> None:
    from lepton_ray.config import DataConfig
    from lepton_ray.data import WorkerStream, describe

    cfg = DataConfig(train=uri, cache_dir=cache_dir, memory_cache_bytes=memory)
    info = describe("data.train", uri, cfg)
    stream = WorkerStream(info, cfg, rank=rank, world_size=2, local_batch=batch, seed=0)
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        rows = 0
        for batch in stream.epoch(epoch):
            rows += len(batch["label"])
        times.append((rows, t0, time.perf_counter()))
    out.put((rank, times))


def lepton_rows_per_s(uri: str, batch: int, cache_dir: str | None, epochs: int, memory: int = 0) -> list[float]:
    """Rows/s per epoch over both consumers (total rows / wall time from the first start to the last end).

    ``memory``: ``data.memory_cache_bytes`` (0 = every epoch reads its shards again, from S3 or the disk cache)."""
    q: mp.Queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_consume, args=(uri, r, batch, cache_dir, epochs, memory, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get() for _ in procs)
    for p in procs:
        p.join()
    out = []
    for e in range(epochs):
        parts = [results[r][e] for r in range(2)]
        rows = sum(p[0] for p in parts)
        out.append(rows / (max(p[2] for p in parts) - min(p[1] for p in parts)))
    return out


@contextlib.contextmanager
def local_ray(cpus: int):
    """A private local Ray instance with ``cpus`` logical CPUs for data tasks (the consumers hold none)."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _timed(consumers: list) -> float:
    """Rows/s over all consumers: total rows / wall time from the first start to the last end."""
    import ray

    parts = ray.get(consumers)
    return sum(p[0] for p in parts) / (max(p[2] for p in parts) - min(p[1] for p in parts))


def ray_data_engine_rows_per_s(uri: str, batch: int) -> float:
    """lepton_ray's ``data.engine: ray_data`` (no transform, caches off), 2 consumers (Ray tasks holding no CPU), first epoch."""
    import ray

    @ray.remote(num_cpus=0)
    def consume(rank: int) -> tuple[int, float, float]:
        from lepton_ray.config import DataConfig
        from lepton_ray.data import WorkerStream, describe

        cfg = DataConfig(train=uri, memory_cache_bytes=0, engine="ray_data")
        stream = WorkerStream(describe("data.train", uri, cfg), cfg, rank=rank, world_size=2, local_batch=batch, seed=0)
        t0, rows = time.perf_counter(), 0
        for b in stream.epoch(0):
            rows += len(b["label"])
        return rows, t0, time.perf_counter()

    return _timed([consume.remote(r) for r in range(2)])


def ray_data_peer_rows_per_s(uri: str, batch: int) -> float:
    """What a Ray user has today: ``read_parquet`` -> ``streaming_split(2)`` -> ``iter_torch_batches``, default settings,
    2 consumers (Ray tasks holding no CPU)."""
    import ray

    @ray.remote(num_cpus=0)
    def consume(it) -> tuple[int, float, float]:
        t0, rows = time.perf_counter(), 0
        for b in it.iter_torch_batches(batch_size=batch):
            rows += len(b["label"])
        return rows, t0, time.perf_counter()

    return _timed([consume.remote(it) for it in ray.data.read_parquet(uri).streaming_split(2)])


def training_wait_fraction(uri: str, steps: int, tmp: str) -> tuple[float, float]:
    from lepton_ray import Trainer

    cfg = {
        "model": {"name": "mlp", "hidden": [128, 64]},
        "data": {"train": uri, "label": "label", "cache_dir": f"{tmp}/train-cache"},
        "train": {"max_steps": steps, "batch_size": 512, "lr": 0.05, "log_every_steps": 10},
        "scaling": {"num_workers": 2},
        "checkpoint": {"every_n_steps": 0},
        "run": {"dir": f"{tmp}/runs", "name": "bench"},
    }
    result = Trainer(cfg, progress=False).fit()
    recs = [r for r in result.records if "data_wait_frac" in r and "event" not in r][1:]  # skip the warm-up window
    return float(np.mean([r["data_wait_frac"] for r in recs])), result.metrics["samples_per_s"]


# ---- a CPU-heavy transform: where it runs decides how long the trainer waits (--heavy)

HEAVY_W = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32) / 6


def heavy(batch: dict, reps: int) -> dict:
    """Per-row CPU work (``reps`` tanh(x @ W) layers over the 32 features), returning the batch unchanged otherwise:
    a stand-in for decoding and augmenting an image. Shipped by value to the workers (it lives in ``__main__``)."""
    y = batch["x"]
    for _ in range(reps):
        y = np.tanh(y @ HEAVY_W)
    return {**batch, "x": batch["x"] + 0 * y}


def heavy_driver(uri: str, steps: int, batch: int, tmp: str, out: str) -> None:
    """Runs on the head node's core: calibrates ``heavy`` to ~0.75 x one training step of a 1-worker, 1-thread run,
    then trains with ``data.engine`` native and ray_data, the transform on the second node's core; writes a JSON."""
    import json

    import torch
    from torch import nn

    import lepton_ray
    from lepton_ray.models.mlp import mlp

    torch.set_num_threads(1)
    net, opt = mlp(input_dim=32, num_outputs=2, hidden=[256, 256]), None
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    xb, yb = torch.randn(batch, 32), torch.randint(0, 2, (batch,))
    for i in range(60):
        if i == 10:
            t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / 50
    rows = {"x": np.random.default_rng(0).normal(size=(batch, 32)).astype(np.float32)}
    t0 = time.perf_counter()
    heavy(rows, 10)
    per_rep = (time.perf_counter() - t0) / 10
    reps = max(1, round(0.75 * step_s / per_rep))
    result = {"step_s": step_s, "transform_s": reps * per_rep, "reps": reps}
    for engine in ("native", "ray_data"):
        cfg = {"model": {"name": "mlp", "hidden": [256, 256]},
               "data": {"train": uri, "features": ["x"], "label": "label", "engine": engine, "memory_cache_bytes": 0,
                        "transform_kwargs": {"reps": reps}, "cpus": 1,
                        "transform_resources": {"num_cpus": 0, "resources": {"data_node": 1}}},
               "train": {"max_steps": steps, "batch_size": batch, "optimizer": "sgd", "lr": 0.01, "log_every_steps": 20},
               "scaling": {"num_workers": 1, "cpus_per_worker": 1, "shared_filesystem": True},
               "checkpoint": {"every_n_steps": 0}, "run": {"dir": f"{tmp}/runs", "name": engine}}
        r = lepton_ray.Trainer(cfg, transform=heavy, progress=False).fit()
        recs = [x for x in r.records if "data_wait_frac" in x and "event" not in x][1:]  # the first window warms up
        result[engine] = {"data_wait_frac": float(np.mean([x["data_wait_frac"] for x in recs])), "samples_per_s": r.metrics["samples_per_s"]}
    Path(out).write_text(json.dumps(result))


def heavy_transform(args: argparse.Namespace, tmp: str) -> dict:
    """A 2-node local cluster (head: the trainer, pinned to core 0; second node: only ``data_node``, pinned to core 1),
    token authentication on; the driver runs pinned to core 0 too. Returns what :func:`heavy_driver` wrote."""
    import json
    import secrets
    import signal

    here = Path(__file__).resolve()
    ray_bin = str(Path(sys.executable).parent / "ray")
    n = args.heavy_rows
    x = np.random.default_rng(0).normal(size=(n, 32)).astype(np.float32)
    data = Path(tmp) / "heavy.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 32), "label": (x[:, 0] > 0).astype(np.int64)}),
                   data, row_group_size=4096)
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    loopback = next(h for h in (socket.gethostname(), "localhost.localdomain", "ip6-localhost")
                    if h != "localhost" and _resolves_to_loopback(h))
    temp = tempfile.mkdtemp(prefix="lrh-", dir="/tmp")
    common = ["--block", "--disable-usage-stats", "--object-store-memory=300000000", f"--dashboard-agent-listen-port={free_port()}",
              f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    nodes = [subprocess.Popen(["taskset", "-c", "0", ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}",
                               "--node-ip-address=127.0.0.1", "--include-dashboard=false", *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)]
    try:
        time.sleep(15)
        common = [c if not c.startswith("--") or "port" not in c else c.split("=")[0] + f"={free_port()}" for c in common]
        nodes.append(subprocess.Popen(["taskset", "-c", "1", ray_bin, "start", f"--address={loopback}:{port}", "--num-cpus=0",
                                       '--resources={"data_node": 1}', *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True, env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}))
        time.sleep(15)
        out = Path(tmp) / "heavy.json"
        subprocess.run(["taskset", "-c", "0", sys.executable, str(here), "--heavy-driver", str(data), str(out),
                        "--heavy-steps", str(args.heavy_steps)], env=env, check=True,
                       timeout=1200)
        return json.loads(out.read_text())
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        time.sleep(5)
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)


def _resolves_to_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host) == "127.0.0.1"
    except OSError:
        return False


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024, help="rows per consumer batch")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data rows (engine ray_data, Ray Data's own path)")
    ap.add_argument("--data-cpus", type=int, default=2, help="logical CPUs of the Ray instance the Ray Data rows run on")
    ap.add_argument("--heavy", action="store_true", help="only the CPU-heavy transform part (a 2-node local cluster, taskset)")
    ap.add_argument("--heavy-rows", type=int, default=400_000)
    ap.add_argument("--heavy-steps", type=int, default=400)
    ap.add_argument("--heavy-driver", nargs=2, help=argparse.SUPPRESS)
    return ap


def measure(args: argparse.Namespace) -> dict:
    """The default part (not --heavy): every reader's rows/s on the same shards, and the training run's data wait."""
    moto, endpoint = start_moto()
    try:
        import boto3

        from lepton_ray.data import prepare

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        uri = "s3://bench/data"
        t0 = time.perf_counter()
        prepare(make_table(args.rows, args.features), uri, num_shards=args.shards, row_group_rows=65536, compression="none")
        print(f"prepared {args.rows:,} rows x {args.features} float32 + label in {args.shards} shards on {endpoint} ({time.perf_counter() - t0:.1f} s)")

        with tempfile.TemporaryDirectory() as tmp:
            base = baseline_rows_per_s(uri)
            cold = lepton_rows_per_s(uri, args.batch, None, 1)[0]
            cache_fill, cache_warm = lepton_rows_per_s(uri, args.batch, f"{tmp}/cache", 2)
            _, in_memory = lepton_rows_per_s(uri, args.batch, None, 2, memory=2**30)
            engine = peer = None
            if not args.no_ray_data:
                with local_ray(args.data_cpus):
                    engine = ray_data_engine_rows_per_s(uri, args.batch)
                    peer = ray_data_peer_rows_per_s(uri, args.batch)
            wait, sps = training_wait_fraction(uri, args.train_steps, tmp)
    finally:
        moto.terminate()
    return {"base": base, "cold": cold, "cache_fill": cache_fill, "cache_warm": cache_warm, "in_memory": in_memory,
            "engine": engine, "peer": peer, "wait": wait, "sps": sps}


def bench_rows(argv: list[str]) -> list:
    """The suite's entry point: this script run with ``argv`` (``--heavy``: the CPU-heavy part), as rows."""
    from benchmarks.rows import row

    args = _parser().parse_args(argv)
    b = "data_pipeline"
    if args.heavy:
        with tempfile.TemporaryDirectory() as tmp:
            r = heavy_transform(args, tmp)
        native, ray_data = r["native"], r["ray_data"]
        return [row(b, "ray_data engine samples/s, CPU-heavy transform", ray_data["samples_per_s"], "samples/s", "native engine",
                    native["samples_per_s"], extra={"transform_ms": 1e3 * r["transform_s"], "step_ms": 1e3 * r["step_s"]}),
                row(b, "ray_data engine data wait, CPU-heavy transform", 100 * ray_data["data_wait_frac"], "% of step time",
                    bar="<= 10", bar_on="figure", also=native["data_wait_frac"] >= 0.4,
                    note=f"bar: where native waits >= 40 %; native waited {100 * native['data_wait_frac']:.1f} %",
                    extra={"native_data_wait_pct": 100 * native["data_wait_frac"]})]
    m = measure(args)
    rows = [row(b, "WorkerStream rows/s, 2 consumers, no cache", m["cold"], "rows/s", "1 pyarrow process", m["base"], bar=">= 0.5"),
            row(b, "WorkerStream rows/s, disk cache 1st pass", m["cache_fill"], "rows/s", "1 pyarrow process", m["base"]),
            row(b, "WorkerStream rows/s, disk cache 2nd pass", m["cache_warm"], "rows/s", "1 pyarrow process", m["base"]),
            row(b, "WorkerStream rows/s, memory cache 2nd pass", m["in_memory"], "rows/s", "1 pyarrow process", m["base"])]
    if m["engine"] is not None:
        rows += [row(b, "ray_data engine rows/s, 2 consumers", m["engine"], "rows/s", "native engine (no cache)", m["cold"],
                     bar=">= 0.5"),
                 row(b, "ray_data engine rows/s vs Ray Data's own path", m["engine"], "rows/s",
                     "read_parquet.streaming_split(2)", m["peer"], bar=">= 2")]
    rows.append(row(b, "training run data wait (MLP, 2 workers)", 100 * m["wait"], "% of step time", bar="<= 5", bar_on="figure",
                    extra={"samples_per_s": m["sps"]}))
    return rows


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    if args.heavy_driver:
        with tempfile.TemporaryDirectory() as tmp:
            return heavy_driver(args.heavy_driver[0], args.heavy_steps, 512, tmp, args.heavy_driver[1])
    if args.heavy:
        with tempfile.TemporaryDirectory() as tmp:
            r = heavy_transform(args, tmp)
        print(f"CPU-heavy transform ({r['reps']} tanh layers, {1e3 * r['transform_s']:.1f} ms per 512-row batch; a training step"
              f" {1e3 * r['step_s']:.1f} ms), 1 worker pinned to core 0, the transform's node pinned to core 1:")
        for engine in ("native", "ray_data"):
            print(f"  data.engine {engine:8s}: data wait {100 * r[engine]['data_wait_frac']:5.1f}% of step time,"
                  f" {r[engine]['samples_per_s']:,.0f} samples/s")
        print(f"  ratio ray_data / native samples/s = {r['ray_data']['samples_per_s'] / r['native']['samples_per_s']:.2f}"
              " (measured in this run); bar: ray_data data wait <= 10% where native >= 40%")
        return

    m = measure(args)
    base, cold, cache_fill, cache_warm, in_memory = m["base"], m["cold"], m["cache_fill"], m["cache_warm"], m["in_memory"]
    engine, peer, wait, sps = m["engine"], m["peer"], m["wait"], m["sps"]
    print()
    print(f"{'reader':58s} {'rows/s':>12s} {'vs baseline':>12s}")
    print(f"{'baseline: 1 process, pyarrow read_table, every shard':58s} {base:12,.0f} {1.0:12.2f}")
    print(f"{'lepton_ray WorkerStream, 2 consumers, no cache':58s} {cold:12,.0f} {cold / base:12.2f}")
    print(f"{'lepton_ray, 2 consumers, cache: 1st pass (fills it)':58s} {cache_fill:12,.0f} {cache_fill / base:12.2f}")
    print(f"{'lepton_ray, 2 consumers, cache: 2nd pass (local disk)':58s} {cache_warm:12,.0f} {cache_warm / base:12.2f}")
    print(f"{'lepton_ray, 2 consumers, no disk cache, 2nd pass (memory)*':58s} {in_memory:12,.0f} {in_memory / base:12.2f}")
    if engine is not None:
        print(f"{'lepton_ray data.engine ray_data, 2 consumers, no cache':58s} {engine:12,.0f} {engine / base:12.2f}")
        print(f"{'Ray Data read_parquet.streaming_split(2).iter_torch_batches':58s} {peer:12,.0f} {peer / base:12.2f}")
    print("  * data.memory_cache_bytes 1 GiB: row groups a consumer decoded in pass 1 come from memory; the deal changes")
    print("    every epoch, so about half of its pass-2 row groups are new to it and are read from S3 again")
    print()
    print(f"reference training run (MLP [128, 64], 2 workers, batch 512): {sps:,.0f} samples/s, "
          f"data wait = {100 * wait:.2f}% of step time (bar <= 5%)")
    print(f"ratio lepton (no cache) / baseline = {cold / base:.2f} (bar >= 0.5)")
    if engine is not None:
        print(f"ratio ray_data engine / native (no cache) = {engine / cold:.2f} (bar >= 0.5); "
              f"ray_data engine / Ray Data's default path = {engine / peer:.2f} (bar >= 2)")


if __name__ == "__main__":
    main()
