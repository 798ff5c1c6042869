"""Storage faults injected into real runs: a corrupted newest checkpoint, a damaged data shard, and the S3
server going down mid-epoch (back seconds later, or left down), plus a checkpoint write cut by the outage.

The outage is a moto S3 server of the test's own, stopped and restarted on the same port: its clients get
``connection refused`` meanwhile, as from a crashed server. moto keeps its objects in this process (shared
with the session's server), so they are still there after the restart. The figures (outage to the run
continuing, outage to the run failing) are printed (``pytest -s``), never asserted. The outage that is ridden out
lasts until a worker's read has failed and is being retried (counted by the stream itself, see
``fault_models.retry_counting_ids_mlp``), not a fixed number of seconds: a read certainly failed during it, and the
retry budget (``data.read_retries``) is far longer than it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from botocore.exceptions import EndpointConnectionError

from conftest import moto_server
from lepton_ray import ConfigError, Trainer, TrainingError, load_config
from lepton_ray.data import prepare
from lepton_ray.train.checkpoint import CheckpointError, CheckpointStore
from run_configs import final_params, small_config


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ids_table(n: int, first: int = 0) -> pa.Table:
    """Rows whose feature ``id`` is the row's id (``first`` .. ``first + n - 1``): RecordIds logs what each worker trained on."""
    x = np.random.default_rng(first).normal(size=(n, 4)).astype(np.float32)
    return pa.table({"id": np.arange(first, first + n, dtype=np.float32), **{f"f{i}": x[:, i] for i in range(4)},
                     "label": (x[:, 0] > 0).astype(np.int64)})


def _ids_config(tmp_path: Path, train: str, name: str, *, epochs: int, factory: str = "lr_testing_models:record_ids_mlp",
                **data) -> dict:
    log = tmp_path / f"ids-{name}"
    log.mkdir(parents=True, exist_ok=True)
    return {
        "model": {"factory": factory, "kwargs": {"log_dir": str(log)}},
        "data": {"train": train, "label": "label", "shuffle_buffer_rows": 200, **data},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "seed": 11},
        "scaling": {"num_workers": 2},
        "checkpoint": {"every_n_steps": 0},
        "run": {"dir": str(tmp_path / "runs"), "name": name},
    }


def _ids_by_epoch(log: Path, steps_per_epoch: int) -> list[list[int]]:
    """The ids both workers trained on in each epoch (sorted)."""
    ranks = [[[int(i) for i in line.split()] for line in (log / f"rank{r}.txt").read_text().splitlines()] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and len(ranks[0]) % steps_per_epoch == 0, [len(r) for r in ranks]
    return [sorted(i for rank in ranks for batch in rank[e:e + steps_per_epoch] for i in batch)
            for e in range(0, len(ranks[0]), steps_per_epoch)]


# --------------------------------------------------------------------------- 1. a torn or corrupted checkpoint


def test_checkpoint_store_skips_torn_and_corrupt_checkpoints(tmp_path):
    """load_latest: the newest checkpoint whose every file matches its manifest, and why each newer one was skipped."""
    store = CheckpointStore(str(tmp_path), keep_last=5)
    for step in (10, 20, 30, 40):
        store.save(step, {"model": {"w": torch.full((4,), float(step))}, "strategy": {"v": torch.ones(2)}}, meta={"step": step})
    model_30 = tmp_path / "step_00000030" / "model.pt"
    model_30.write_bytes(model_30.read_bytes()[:-7])  # torn: truncated
    (tmp_path / "step_00000040" / "MANIFEST.json").write_text('{"format": "lepton_ray.checkpoint/1", "st')  # damaged

    latest, state, skipped = store.load_latest()
    assert latest.step == 20 and state["model"]["w"].tolist() == [20.0] * 4
    assert len(skipped) == 2
    assert skipped[0].startswith(f"skipped the checkpoint of step 40: '{tmp_path}/step_00000040/MANIFEST.json' is not valid JSON: ")
    size = (tmp_path / "step_00000030" / "model.pt").stat().st_size
    assert skipped[1] == (f"skipped the checkpoint of step 30: '{tmp_path}/step_00000030/model.pt' does not match its manifest"
                          f" (size {size}, expected {size + 7})")
    # a reader of one file (a parameter-server shard) still verifies them all: it picks what the workers pick
    assert store.load_latest(["strategy"])[0].step == 20

    (tmp_path / "step_00000020" / "model.pt").unlink()
    (tmp_path / "step_00000010" / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=rf"^no checkpoint under '{tmp_path}' matches its manifest: .*step 20: "
                                              rf"'{tmp_path}/step_00000020/model.pt' is missing \(named in its manifest\)"):
        store.load_latest()


@pytest.mark.usefixtures("ray_cluster")
def test_resume_skips_a_corrupted_newest_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path, blobs):
    """The uninterrupted run is the first one: 30 steps, checkpoints at 10, 20 and 30. Its newest checkpoint corrupted,
    a resume to step 30 starts from step 20 and must end where the first run ended."""
    cfg = small_config(tmp_path, blobs, train={"max_steps": 30})
    want = final_params(Trainer(cfg, progress=False).fit())
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    assert CheckpointStore(str(ckpts)).steps() == [10, 20, 30]
    model_30 = ckpts / "step_00000030" / "model.pt"
    data = bytearray(model_30.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the manifest is there, the checksum does not match
    model_30.write_bytes(bytes(data))

    resumed = Trainer(load_config(cfg), resume=True, progress=False).fit()
    assert resumed.resumed_from.endswith("step_00000020") and resumed.metrics["steps"] == 30
    start = [r for r in resumed.records if r.get("event") == "start"][-1]
    assert start["step"] == 20
    assert start["notes"] == [f"skipped the checkpoint of step 30: '{ckpts}/step_00000030/model.pt' does not match its manifest"
                              " (size or SHA-256 differ)"]
    assert _max_diff(final_params(resumed), want) <= 1e-6
    store = CheckpointStore(str(ckpts))
    assert _max_diff(want, store.load(store.get(20), ["model"])["model"]) > 1e-3  # steps 20-30 moved it: not vacuous


# --------------------------------------------------------------------------- 2. a damaged data shard


def _three_shards(tmp_path: Path) -> tuple[Path, list[Path]]:
    """3 shards of 256 rows (ids 0-255, 256-511, 512-767), 4 row groups each."""
    d = tmp_path / "shards"
    d.mkdir()
    paths = [d / f"part-{i}.parquet" for i in range(3)]
    for i, p in enumerate(paths):
        pq.write_table(_ids_table(256, first=256 * i), p, row_group_size=64)
    return d, paths


def test_truncated_shard_is_an_error_naming_it(tmp_path):
    d, paths = _three_shards(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"^data\.train: '{paths[1]}' is not a readable Parquet file: .*; to train without it,"
                                          r" set data\.on_bad_shard: skip$"):
        Trainer(_ids_config(tmp_path, str(d), "error", epochs=1), progress=False).fit()
    with pytest.raises(ConfigError, match=r"^data\.on_bad_shard: 'skipp' is not one of error, skip"):
        load_config(_ids_config(tmp_path, str(d), "typo", epochs=1, on_bad_shard="skipp"))


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.slow  # CI keeps the corrupt-shard error test
def test_truncated_shard_is_skipped_when_asked_and_counted(tmp_path):
    d, paths = _three_shards(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:1000])
    result = Trainer(_ids_config(tmp_path, str(d), "skip", epochs=2, on_bad_shard="skip"), progress=False).fit()
    # trained on the other two shards' rows, each exactly once per epoch (512 rows: 8 steps of 64)
    assert _ids_by_epoch(tmp_path / "ids-skip", 8) == [list(range(256)) + list(range(512, 768))] * 2
    start = next(r for r in _records(result.run_dir) if r.get("event") == "start")
    assert [s.split(": ", 1)[0] for s in start["bad_shards_skipped"]] == [str(paths[1])]
    assert "Parquet magic bytes not found" in start["bad_shards_skipped"][0]


@pytest.mark.usefixtures("ray_cluster")
def test_shard_damaged_inside_fails_the_run_naming_it(tmp_path):
    """A damaged page header: the footer reads fine on the driver (so on_bad_shard cannot skip it); the worker's
    read fails and the run's error names the shard."""
    d, paths = _three_shards(tmp_path)
    data = bytearray(paths[1].read_bytes())
    data[4:20] = b"\xff" * 16  # the first page header, right after the magic bytes
    paths[1].write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=rf"data\.train: reading row group 0 of '{paths[1]}' failed \(a damaged shard\?\): "
                                            "OSError: Couldn't deserialize thrift"):
        Trainer(_ids_config(tmp_path, str(d), "damaged", epochs=1, on_bad_shard="skip"), progress=False).fit()


# --------------------------------------------------------------------------- 3. the S3 server goes down


class _S3Server:
    """A moto S3 server of this test's own on 127.0.0.1 that can be stopped and started again on the same port (the
    first start binds a port of its own: no guess)."""

    def __init__(self) -> None:
        self._server, self.port = moto_server()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server, _ = moto_server(self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # closes the listening socket: new connections are refused
            self._server = None


@pytest.fixture
def own_s3(s3_endpoint):
    server = _S3Server()
    yield server
    server.stop()


def _fit_in_thread(trainer: Trainer) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"], out["failed_at"] = exc, time.monotonic()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    return runner, out


def _wait_for_training(runner: threading.Thread, log: Path) -> None:
    """Until rank 0 has trained on its first batch: the run is inside its first epoch, reading from S3."""
    deadline = time.monotonic() + 300
    while not ((log / "rank0.txt").exists() and (log / "rank0.txt").read_text()):
        assert runner.is_alive() and time.monotonic() < deadline, "the run never started training"
        time.sleep(0.05)


OUTAGE_EPOCHS = 24  # long enough that the run is still training when the server goes down after its first logged step


def _start_outage_run(tmp_path: Path, bucket: str, own_s3: _S3Server, name: str, **data) -> tuple[Trainer, threading.Thread, dict]:
    """An ``OUTAGE_EPOCHS``-epoch run over 4 shards on ``own_s3``, started in a thread, with its first steps logged.
    memory_cache_bytes 0, no cache_dir: every epoch fetches its shards from S3 again. Each worker keeps
    ``ids-<name>/retries-rank<r>`` equal to its stream's ``read_retries``."""
    prepare(_ids_table(1024), f"s3://{bucket}/ids", num_shards=4, row_group_rows=64, seed=0)
    trainer = Trainer(_ids_config(tmp_path, f"s3://{bucket}/ids", name, epochs=OUTAGE_EPOCHS, memory_cache_bytes=0,
                                  factory="faults.fault_models:retry_counting_ids_mlp",
                                  storage_options={"endpoint_url": own_s3.endpoint}, **data), progress=False)
    runner, out = _fit_in_thread(trainer)
    _wait_for_training(runner, tmp_path / f"ids-{name}")
    metrics, deadline = trainer.run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and '"train_loss"' in metrics.read_text()):  # a logged step: the outage comes after it
        assert runner.is_alive() and time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.05)
    return trainer, runner, out


@pytest.mark.usefixtures("ray_cluster")
def _retries(log: Path) -> dict[int, int]:
    """rank -> its stream's read_retries so far (the ranks that have counted)."""
    return {int(p.name.removeprefix("retries-rank")): int(p.read_text()) for p in log.glob("retries-rank*") if p.suffix != ".tmp"}


def test_s3_outage_of_seconds_mid_epoch_is_ridden_out_with_every_row_once_per_epoch(tmp_path, bucket, own_s3):
    """The server goes down after a logged step and comes back as soon as a worker's read has failed and is waiting
    to be tried again (its stream counted the retry): the run goes on, no row lost or repeated. read_retries 8 (waits of
    1, 2, 4, 8, 10 ... s: ~55 s) is far longer than the outage, so the retry, not luck, rides it out."""
    trainer, runner, out = _start_outage_run(tmp_path, bucket, own_s3, "outage", read_retries=8)
    log = tmp_path / "ids-outage"
    deadline = time.monotonic() + 60
    while _retries(log).keys() != {0, 1}:  # both workers' counters are watched
        assert runner.is_alive() and time.monotonic() < deadline, f"the workers' read_retries never showed: {_retries(log)}"
        time.sleep(0.05)
    assert _retries(log) == {0: 0, 1: 0}  # nothing failed before the outage
    down = time.time()
    own_s3.stop()
    deadline = time.monotonic() + 120
    while not any(_retries(log).values()):
        assert runner.is_alive() and time.monotonic() < deadline, f"no read failed within 120 s of the outage: {out}"
        time.sleep(0.05)
    failed = time.time()
    own_s3.start()
    up = time.time()
    runner.join(timeout=400)
    assert not runner.is_alive(), "the run did not finish after the outage"
    assert "error" not in out, out.get("error")
    result = out["result"]

    assert _ids_by_epoch(tmp_path / "ids-outage", 16) == [list(range(1024))] * OUTAGE_EPOCHS  # every row exactly once per epoch
    # the outage fell inside the run: it had trained before the server went down and still trained after it came back,
    # and (no memory cache) it fetched every epoch's shards from S3, so it needed the server across the outage
    steps = sorted((r["time"], r["step"]) for r in result.records if "train_loss" in r)
    assert steps[0][0] < down and steps[-1][0] > up
    end = next(r for r in result.records if r.get("event") == "end")
    assert end["data_stats"]["remote_bytes"] >= OUTAGE_EPOCHS * min(s.bytes for s in trainer.train_info.shards)  # re-read every epoch
    # a read failed and was tried again: counted by the workers' streams; the run's end record carries rank 0's count
    retries = _retries(log)
    assert sum(retries.values()) >= 1, retries
    assert end["data_stats"]["read_retries"] == retries[0], (end["data_stats"], retries)
    # the figures: when the run continued after the outage began (the end of the longest pause between steps)
    gap, resumed_at = max((b[0] - a[0], b[0]) for a, b in zip(steps, steps[1:]))
    print(f"\n[s3 outage] down for {up - down:.1f} s (a read failed {failed - down:.1f} s in); the run continued "
          f"{resumed_at - down:.1f} s after the outage began (longest pause between steps {gap:.1f} s; reads retried by rank: {retries})")


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.slow  # CI keeps the outage that is ridden out
def test_s3_left_down_fails_the_run_in_bounded_time_naming_the_endpoint(tmp_path, bucket, own_s3):
    _, runner, out = _start_outage_run(tmp_path, bucket, own_s3, "down")
    down = time.monotonic()
    own_s3.stop()
    runner.join(timeout=400)
    assert not runner.is_alive(), "the run did not fail with the storage down"
    assert isinstance(out.get("error"), TrainingError), out
    message = str(out["error"])
    assert f"from endpoint {own_s3.endpoint} failed after 4 attempts" in message, message
    assert f"reading {bucket}/ids/shard-" in message  # the shard it was reading
    print(f"\n[s3 left down] the run failed {out['failed_at'] - down:.1f} s after the outage began")


def test_checkpoint_write_cut_by_an_outage_leaves_the_previous_checkpoint_intact(bucket, own_s3):
    """The server dies between a checkpoint's files and its manifest: the save fails naming the endpoint, and
    the store still holds exactly the previous checkpoint, verified, after the server is back."""
    store = CheckpointStore(f"s3://{bucket}/ckpt", {"endpoint_url": own_s3.endpoint})
    store.save(10, {"model": {"w": torch.ones(3)}}, meta={"step": 10})
    t0 = time.monotonic()
    with pytest.raises(EndpointConnectionError, match=rf"Could not connect to the endpoint URL: \"{own_s3.endpoint}/{bucket}/ckpt/step_00000020/MANIFEST\.json\""):
        store.save(20, {"model": {"w": torch.zeros(3)}}, meta={"step": 20}, before_commit=own_s3.stop)
    failed_after = time.monotonic() - t0
    own_s3.start()
    latest, state, skipped = store.load_latest()
    assert store.steps() == [10] and latest.step == 10 and skipped == []
    assert state["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    print(f"\n[s3 down at commit] the checkpoint save failed after {failed_after:.1f} s")
