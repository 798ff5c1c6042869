"""prepare(): shards + a manifest committed last; read_manifest refuses unfinished or altered splits; ShardCache LRU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_ray.config import ConfigError, DataConfig
from lepton_ray.data import ShardCache, describe, prepare


def table(n=100):
    return pa.table({"x": np.arange(n, dtype=np.float32), "label": np.arange(n) % 3})


def test_prepare_writes_shards_and_a_manifest_that_describes_them(tmp_path):
    out = prepare(table(100), str(tmp_path / "d"), num_shards=3, row_group_rows=16, seed=5)
    manifest = json.loads((tmp_path / "d" / "_manifest.json").read_text())
    assert out["train"] == manifest
    assert manifest["split"] == "train" and manifest["num_rows"] == 100
    assert [s["num_rows"] for s in manifest["shards"]] == [33, 33, 34]
    assert manifest["schema"] == [{"name": "x", "type": "float", "dtype": "float32", "shape": []},
                                  {"name": "label", "type": "int64", "dtype": "int64", "shape": []}]
    for s in manifest["shards"]:
        data = (tmp_path / "d" / s["path"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        meta = pq.ParquetFile(tmp_path / "d" / s["path"]).metadata
        assert s["row_groups"] == [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert max(s["row_groups"]) <= 16
    rows = pa.concat_tables([pq.read_table(tmp_path / "d" / s["path"]) for s in manifest["shards"]])
    assert sorted(rows.column("x").to_pylist()) == list(range(100))  # every row once
    assert rows.column("x").to_pylist() != list(range(100))  # shuffled with the seed


def test_prepare_splits_by_fraction_disjointly_and_reproducibly(tmp_path):
    a = prepare(table(200), str(tmp_path / "a"), num_shards=2, eval_fraction=0.25, seed=1)
    b = prepare(table(200), str(tmp_path / "b"), num_shards=2, eval_fraction=0.25, seed=1)
    assert a["train"]["num_rows"] == 150 and a["eval"]["num_rows"] == 50
    xs = {split: sorted(pq.read_table(tmp_path / "a" / split).column("x").to_pylist()) for split in ("train", "eval")}
    assert not set(xs["train"]) & set(xs["eval"]) and len(xs["train"]) + len(xs["eval"]) == 200
    assert [s["sha256"] for s in a["train"]["shards"]] == [s["sha256"] for s in b["train"]["shards"]]


def test_prepare_reads_csv_and_parquet_sources(tmp_path):
    (tmp_path / "src.csv").write_text("x,label\n1.5,0\n2.5,1\n3.5,0\n")
    out = prepare(str(tmp_path / "src.csv"), str(tmp_path / "d"), num_shards=1, shuffle=False)
    assert pq.read_table(tmp_path / "d" / out["train"]["shards"][0]["path"]).column("x").to_pylist() == [1.5, 2.5, 3.5]


@pytest.mark.parametrize("kwargs,message", [
    ({"num_shards": 0}, "prepare: --num-shards must be >= 1, got 0"),
    ({"num_shards": 2, "compression": "brotli9"}, "prepare: --compression 'brotli9' is not one of zstd, snappy, gzip, lz4, none"),
    ({"num_shards": 2, "eval_fraction": 1.0}, "prepare: --eval-fraction must be in [0, 1), got 1.0"),
    ({"num_shards": 500}, "prepare: the train split has 100 rows, fewer than --num-shards 500"),
])
def test_prepare_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        prepare(table(100), str(tmp_path / "d"), **kwargs)


def test_prepare_missing_source(tmp_path):
    with pytest.raises(ConfigError, match=f"^{re.escape(f'prepare: source {str(tmp_path / chr(110))!r} does not exist')}$"):
        prepare(str(tmp_path / "n"), str(tmp_path / "d"), num_shards=1)


def test_describe_uses_the_manifest_and_refuses_an_uncommitted_split(tmp_path):
    prepare(table(100), str(tmp_path / "d"), num_shards=4, row_group_rows=10)
    info = describe("data.train", str(tmp_path / "d"), DataConfig(train=str(tmp_path / "d")))
    assert info.prepared and len(info.shards) == 4 and all(s.sha256 for s in info.shards)
    (tmp_path / "d" / "_manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"has shard-\*\.parquet files but no _manifest\.json: an unfinished `lepton-ray data prepare`; prepare it again$"):
        describe("data.train", str(tmp_path / "d"), DataConfig(train=str(tmp_path / "d")))


def test_re_preparing_uncommits_first(tmp_path):
    prepare(table(100), str(tmp_path / "d"), num_shards=2)
    first = json.loads((tmp_path / "d" / "_manifest.json").read_text())
    prepare(table(60), str(tmp_path / "d"), num_shards=2)
    assert json.loads((tmp_path / "d" / "_manifest.json").read_text())["num_rows"] == 60 != first["num_rows"]


def test_cache_evicts_least_recently_used(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), max_bytes=250)
    blobs = [bytes([i]) * 100 for i in range(3)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    cache.get(shas[0], 100, lambda: blobs[0])
    cache.get(shas[1], 100, lambda: blobs[1])
    os.utime(cache._path(shas[0]), (time.time() + 10, time.time() + 10))  # shard 0 used most recently
    cache.get(shas[2], 100, lambda: blobs[2])
    assert sorted(p.stem for p in (tmp_path / "c").glob("*.parquet")) == sorted([shas[0], shas[2]])


def test_cache_refuses_a_fetch_that_does_not_match(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), max_bytes=10**6)
    with pytest.raises(IOError, match="fetched shard does not match its manifest"):
        cache.get(hashlib.sha256(b"right").hexdigest(), 5, lambda: b"wrong")
    assert not list((tmp_path / "c").glob("*.parquet"))
