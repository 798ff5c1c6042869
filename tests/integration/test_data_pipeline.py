"""The object-storage data path on a real moto S3 server: prepare -> stream -> train, exactly-once resume, cache, errors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray import ConfigError, Trainer, TrainingError, load_config
from lepton_ray.config import DataConfig
from lepton_ray.data import WorkerStream, describe, prepare
from lepton_ray.data.builders import digits
from run_configs import data_digest, final_params, ids_table, once


def _digits_local(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "digits.parquet"
    digits(str(src), None)  # all 1797 rows in one file
    return src


def _train_cfg(tmp_path: Path, train: str, eval: str, name: str, **data) -> dict:
    return {
        "model": {"name": "mlp", "hidden": [64]},
        "data": {"train": train, "eval": eval, "label": "label", **data},
        "train": {"max_steps": 150, "batch_size": 64, "lr": 0.1, "seed": 3, "eval_every_steps": 150},
        "scaling": {"num_workers": 2},
        "checkpoint": {"every_n_steps": 0},
        "run": {"dir": str(tmp_path / "runs"), "name": name},
    }


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("engine", ["native", "ray_data"])
def test_prepare_on_s3_then_train_equals_the_local_run(tmp_path, bucket, engine):
    """The same prepared data on S3 (through the shard cache), read by ``engine``, and on local disk, read natively,
    trains to the same model."""
    src = _digits_local(tmp_path)
    for dest in (f"s3://{bucket}/digits", str(tmp_path / "prepared")):
        prepare(str(src), dest, num_shards=4, row_group_rows=128, eval_fraction=0.2, seed=1)
    s3 = Trainer(_train_cfg(tmp_path, f"s3://{bucket}/digits/train", f"s3://{bucket}/digits/eval", "s3",
                            cache_dir=str(tmp_path / "cache"), engine=engine), progress=False).fit()
    local = once("digits-local:" + data_digest(tmp_path / "prepared"), lambda: Trainer(
        _train_cfg(tmp_path, str(tmp_path / "prepared" / "train"), str(tmp_path / "prepared" / "eval"), "local"),
        progress=False).fit().metrics)
    assert s3.metrics["eval_accuracy"] == local["eval_accuracy"]
    assert s3.metrics["eval_accuracy"] > 0.9
    assert s3.metrics["train_loss"] == local["train_loss"]
    end = next(r for r in s3.records if r.get("event") == "end")
    if engine == "native":
        assert end["data_stats"]["cache_misses"] > 0 and end["data_stats"]["remote_bytes"] > 0  # it really read S3
    else:  # the data tasks read S3 (through their node's shard cache): the worker only received blocks
        assert end["data_stats"]["ray_data_blocks"] > 0 and "remote_bytes" not in end["data_stats"]
        assert any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # filled by the data tasks, not the driver


def _recorded(log_dir: Path, world: int) -> list[list[list[int]]]:
    return [[[int(i) for i in line.split()] for line in (log_dir / f"rank{r}.txt").read_text().splitlines()] for r in range(world)]


@pytest.mark.usefixtures("ray_cluster")
def test_stop_mid_epoch_and_resume_consumes_every_row_exactly_once(tmp_path, bucket):
    """Ids each worker consumed: stopped at step 5 of an epoch of 16, resumed to its end; union = every row once, in the
    order of the uninterrupted run, and the resumed run ends with the uninterrupted run's parameters (2 Ray Train
    workers, DDP, checkpoints on S3). The ray_data engine gives the same batches as this (native) one in a resumed and a
    resized epoch: ``test_ray_data_engine_gives_the_native_batches_bitwise``."""
    prepare(ids_table(1024), f"s3://{bucket}/ids", num_shards=4, row_group_rows=64, seed=0)

    def cfg(name: str, log: Path, max_steps: int) -> dict:
        log.mkdir(parents=True, exist_ok=True)
        return {
            "model": {"factory": "lr_testing_models:record_ids_mlp", "kwargs": {"log_dir": str(log)}},
            "data": {"train": f"s3://{bucket}/ids", "label": "label", "shuffle_buffer_rows": 200},
            # a constant rate: the stopped run's 5 steps then take the rates of the uninterrupted run's first 5
            "train": {"max_steps": max_steps, "batch_size": 64, "lr": 0.05, "schedule": "constant", "momentum": 0.9,
                      "seed": 11, "log_every_steps": 4},
            "scaling": {"num_workers": 2},
            "checkpoint": {"every_n_steps": 0, "dir": f"s3://{bucket}/ckpt"},
            "run": {"dir": str(tmp_path / "runs"), "name": name},
        }

    straight = tmp_path / "straight"
    def run_straight() -> tuple[list, dict]:
        result = Trainer(cfg("straight", straight, 16), progress=False).fit()
        return _recorded(straight, 2), final_params(result)

    uninterrupted, straight_params = once("ids-straight:" + data_digest(f"s3://{bucket}/ids"), run_straight)
    parts = tmp_path / "parts"
    first = Trainer(cfg("parts", parts, 5), progress=False).fit()
    assert first.metrics["steps"] == 5
    resumed = Trainer(load_config(cfg("parts", parts, 16)), resume=True, progress=False).fit()
    assert resumed.resumed_from == f"s3://{bucket}/ckpt/parts/step_00000005"

    interrupted = _recorded(parts, 2)
    assert [len(b) for b in uninterrupted] == [16, 16] and [len(b) for b in interrupted] == [16, 16]
    every = sorted(i for rank in interrupted for batch in rank for i in batch)
    assert every == list(range(1024))  # exactly once across the stop
    assert interrupted == uninterrupted  # and in the uninterrupted order
    params = final_params(resumed)  # the model and the optimizer's momentum came back from S3 as they were
    assert params.keys() == straight_params.keys()
    assert max((params[k] - straight_params[k]).abs().max().item() for k in params) <= 1e-6


def test_cache_serves_later_epochs_and_refetches_a_tampered_shard(tmp_path, bucket, s3_endpoint):
    prepare(ids_table(1024), f"s3://{bucket}/c", num_shards=4, row_group_rows=128, seed=0)
    # memory_cache_bytes=0: every epoch reads its shards again, so this test sees the disk cache serve them
    cfg = DataConfig(train=f"s3://{bucket}/c", cache_dir=str(tmp_path / "cache"), memory_cache_bytes=0)
    info = describe("data.train", cfg.train, cfg)
    total = sum(s.bytes for s in info.shards)

    stream = WorkerStream(info, cfg, rank=0, world_size=1, local_batch=64, seed=0)
    epoch0 = [xb[:, 0].tolist() for xb in (b["x"] for b in stream.epoch(0))]
    assert stream.stats["remote_bytes"] == total and stream.source.cache.stats["misses"] == 4

    # the objects are gone from the bucket: epoch 1 can only come from the cache
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    saved = {}
    for s in info.shards:
        key = s.path.split("/", 1)[1]
        saved[key] = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.delete_object(Bucket=bucket, Key=key)
    epoch1 = [xb[:, 0].tolist() for xb in (b["x"] for b in stream.epoch(1))]
    assert stream.stats["remote_bytes"] == total  # not one more byte from S3
    assert stream.source.cache.stats["hits"] >= 4
    assert sorted(sum(epoch1, [])) == sorted(sum(epoch0, []))

    # tamper with one cached shard: a new process (stream) detects it and fetches that shard again
    for key, body in saved.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    victim = sorted((tmp_path / "cache").glob("*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = WorkerStream(info, cfg, rank=0, world_size=1, local_batch=64, seed=0)
    assert [xb[:, 0].tolist() for xb in (b["x"] for b in again.epoch(0))] == epoch0
    assert again.source.cache.stats["refetched"] == 1 and again.stats["remote_bytes"] == victim.stat().st_size


# --------------------------------------------------------------------------- bad input: clear errors, before training


def _describe(uri: str, **data) -> None:
    cfg = DataConfig(train=uri, **data)
    describe("data.train", uri, cfg)


def test_missing_bucket(s3_endpoint):
    with pytest.raises(ConfigError, match=r"^data\.train: 's3://no-such-bucket-lr/x' does not exist$"):
        _describe("s3://no-such-bucket-lr/x")


def test_missing_prefix(bucket):
    with pytest.raises(ConfigError, match=rf"^data\.train: 's3://{bucket}/nothing/here' does not exist$"):
        _describe(f"s3://{bucket}/nothing/here")


def test_prefix_without_parquet(bucket, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="notes/readme.txt", Body=b"hi")
    with pytest.raises(ConfigError, match=rf"^data\.train: 's3://{bucket}/notes' holds no \.parquet files$"):
        _describe(f"s3://{bucket}/notes")


def test_corrupt_shard(bucket, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="bad/part-0.parquet", Body=b"PAR1 not really")
    with pytest.raises(ConfigError, match=rf"^data\.train: '{bucket}/bad/part-0\.parquet' is not a readable Parquet file: "):
        _describe(f"s3://{bucket}/bad")


def test_schema_differs_between_shards(tmp_path):
    pq.write_table(pa.table({"a": [1.0], "label": [0]}), tmp_path / "p0.parquet")
    pq.write_table(pa.table({"b": [1.0], "label": [0]}), tmp_path / "p1.parquet")
    message = (f"data.train: '{tmp_path}/p1.parquet' has columns (b: double, label: int64) but '{tmp_path}/p0.parquet' has"
               " (a: double, label: int64); every file must match")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        _describe(str(tmp_path))


def test_missing_feature_column_on_s3(bucket):
    prepare(ids_table(64), f"s3://{bucket}/f", num_shards=2)
    with pytest.raises(ConfigError, match=rf"^data\.features: column 'nope' is not in data\.train 's3://{bucket}/f' \(columns: id, f0, f1, f2, f3, label\)$"):
        _describe(f"s3://{bucket}/f", features=["nope"])


def test_unfinished_prepare_is_refused(bucket, s3_endpoint):
    prepare(ids_table(64), f"s3://{bucket}/u", num_shards=2)
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket=bucket, Key="u/_manifest.json")
    with pytest.raises(ConfigError, match=r"has shard-\*\.parquet files but no _manifest\.json: an unfinished `lepton-ray data prepare`"):
        _describe(f"s3://{bucket}/u")


def test_manifest_that_does_not_match_is_refused(tmp_path):
    prepare(ids_table(64), str(tmp_path / "m"), num_shards=2)
    shard = tmp_path / "m" / "shard-00001.parquet"
    pq.write_table(pa.table({"id": [1.0], "f0": [1.0], "f1": [1.0], "f2": [1.0], "f3": [1.0], "label": [0]}), shard)
    with pytest.raises(ConfigError, match=r"shard-00001\.parquet' has \d+ bytes but the manifest says \d+; the data set changed after it was prepared$"):
        _describe(str(tmp_path / "m"))


def test_unreachable_endpoint_fails_fast_naming_it():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^data\.train: cannot read 's3://b/k' \(endpoint http://127\.0\.0\.1:9\): "):
        _describe("s3://b/k", storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s3cr3t"})
    assert time.monotonic() - t0 < 60


def test_secrets_never_appear_in_errors():
    with pytest.raises(ConfigError) as exc:
        _describe("s3://b/k", storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "AKIAEXAMPLE", "secret": "s3cr3t-value"})
    assert "s3cr3t-value" not in str(exc.value) and "AKIAEXAMPLE" not in str(exc.value)


# ---- data.engine: ray_data (its batches are the native engine's: the exactly-once tests above hold for it too)


def _engine_streams(data: Path, engine: str, world: int, **extra):
    cfg = DataConfig(train=str(data), label="label", shuffle_buffer_rows=200, engine=engine, **extra)
    info = describe("data.train", str(data), cfg)
    return [WorkerStream(info, cfg, rank=r, world_size=world, local_batch=32, seed=5) for r in range(world)]


@pytest.mark.usefixtures("ray_cluster")
def test_ray_data_engine_gives_the_native_batches_bitwise(tmp_path):
    """Same data, seed and world size: the ray_data engine's batches equal the native ones bit for bit, in a whole
    epoch, in an epoch resumed at step 3, and in the rest of an epoch resized from 2 workers (4 steps) to 1 and from 1
    worker (4 steps) to 2 (the native engine's runs of these are checked row by row on Ray Train: the stop/resume test
    above, and the 2 -> 1 -> 2 resizes of tests/faults/test_multinode.py's elastic run)."""
    from lepton_ray.data.plan import Segment

    pq.write_table(ids_table(1000), tmp_path / "ids.parquet", row_group_size=100)
    got = {}
    for engine in ("native", "ray_data"):
        two = _engine_streams(tmp_path / "ids.parquet", engine, 2)
        one = _engine_streams(tmp_path / "ids.parquet", engine, 1)[0]
        one.resume_after(0, (Segment(world_size=2, local_batch=32, steps=4),))
        grown = _engine_streams(tmp_path / "ids.parquet", engine, 2)
        for s in grown:
            s.resume_after(0, (Segment(world_size=1, local_batch=64, steps=4),))
        got[engine] = ([list(s.epoch(0)) + list(s.epoch(1, start_step=3)) for s in two] + [list(one.epoch(0, start_step=4))]
                       + [list(s.epoch(0, start_step=4)) for s in grown])
        assert engine == "native" or all(s.stats["ray_data_blocks"] > 0 for s in two)  # it really read through Ray Data
    # each worker's Ray Data execution is held to its share of data.cpus (2 by default), whatever the cluster has free,
    # set on the Dataset's own context: the process's is left as it was (a next-epoch prefetch thread, still reading
    # in the background here, makes Datasets at the same time)
    import ray.data

    pieces, _ = two[0]._plan(0).windows(0, 2)[0]
    ds = two[0].source._dataset(pieces, 0)
    options = ds.context.execution_options
    assert (options.resource_limits.cpu, options.preserve_order) == (1.0, True)
    process = ray.data.DataContext.get_current()
    assert process is not ds.context and not process.execution_options.preserve_order
    assert process.execution_options.resource_limits.cpu == float("inf")
    for native, ray_data in zip(got["native"], got["ray_data"]):
        assert len(native) == len(ray_data) > 0
        for a, b in zip(native, ray_data):
            assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("ray_cluster")
def test_ray_data_transform_feeds_the_digits_cnn(tmp_path):
    """digits_images' uint8 [64] pixels -> float32 [1, 8, 8] with a seeded jitter, in Ray Data tasks: the CNN trains on
    what the transform makes (the schema after it) and the start record says where the rows were read."""
    cfg = {"model": {"name": "cnn", "hidden": [64], "kwargs": {"channels": [16, 32]}},
           "data": {"train": str(tmp_path / "d" / "train.parquet"), "eval": str(tmp_path / "d" / "eval.parquet"), "builder": "digits_images",
                    "inputs": {"image": "image"}, "targets": {"label": "label"}, "engine": "ray_data",
                    "transform": "lr_testing_models:images_to_float"},
           "train": {"max_steps": 200, "batch_size": 64, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "seed": 0, "eval_every_steps": 200},
           "scaling": {"num_workers": 2}, "checkpoint": {"every_n_steps": 0}, "run": {"dir": str(tmp_path / "runs"), "name": "cnn"}}
    trainer = Trainer(cfg, progress=False)
    assert [(c.dtype, c.shape) for c in trainer.train_info.batch_schema.inputs] == [("float32", (1, 8, 8))]
    result = trainer.fit()
    assert result.metrics["eval_accuracy"] > 0.9
    start = next(r for r in result.records if r.get("event") == "start")
    assert start["data"] == {"engine": "ray_data", "transform": "lr_testing_models:images_to_float",
                             "reads_in": "in Ray Data: Ray tasks of 1 CPU each, at most 1 CPUs per worker (data.cpus 2),"
                                         " off the training workers' CPUs"}


def _ids_cfg(tmp_path: Path, data: str, log: Path, **data_extra) -> dict:
    log.mkdir(parents=True, exist_ok=True)
    return {"model": {"factory": "lr_testing_models:record_ids_mlp", "kwargs": {"log_dir": str(log)}},
            "data": {"train": data, "label": "label", "shuffle_buffer_rows": 200, "engine": "ray_data", **data_extra},
            "train": {"max_steps": 16, "batch_size": 64, "lr": 0.05, "seed": 11, "log_every_steps": 4},
            "scaling": {"num_workers": 2}, "checkpoint": {"every_n_steps": 0}, "run": {"dir": str(tmp_path / "runs"), "name": "ids"}}


@pytest.mark.usefixtures("ray_cluster")
def test_a_raising_transform_fails_the_run_naming_it_and_the_row(tmp_path):
    pq.write_table(ids_table(1024), tmp_path / "ids.parquet", row_group_size=64)
    cfg = _ids_cfg(tmp_path, str(tmp_path / "ids.parquet"), tmp_path / "log", transform="lr_testing_models:fail_on_id",
                   transform_kwargs={"bad_id": 300})
    with pytest.raises(TrainingError) as err:
        Trainer(cfg, progress=False).fit()
    assert ("data.transform 'lr_testing_models:fail_on_id' raised on the batch of 64 rows starting at row id 256 (epoch 0):"
            " ValueError: cannot transform row 300") in str(err.value)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("concurrency", [None, 1], ids=["tasks", "actors"])
def test_a_transform_process_killed_mid_epoch_loses_and_repeats_no_row(tmp_path, concurrency):
    """The process running the transform dies on the batch holding row 300 (once): Ray Data runs that piece again in
    a new process, and the epoch's 1024 rows each reach the model exactly once."""
    pq.write_table(ids_table(1024), tmp_path / "ids.parquet", row_group_size=64)
    marker = tmp_path / "died"
    cfg = _ids_cfg(tmp_path, str(tmp_path / "ids.parquet"), tmp_path / "log", transform="lr_testing_models:die_once_on_id",
                   transform_kwargs={"bad_id": 300, "marker": str(marker)}, transform_resources={"concurrency": concurrency})
    result = Trainer(cfg, progress=False).fit()
    assert marker.exists()  # it did die
    assert result.metrics["steps"] == 16
    every = sorted(i for rank in _recorded(tmp_path / "log", 2) for batch in rank for i in batch)
    assert every == list(range(1024))
