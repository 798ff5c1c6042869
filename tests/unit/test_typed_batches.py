"""Typed columns end to end without Ray: the schema a split resolves to, the batches a worker streams,
the prepared manifest, and the errors a user sees before any worker starts."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray import ConfigError, Trainer
from lepton_ray.config import DataConfig
from lepton_ray.data import prepare
from lepton_ray.data.stream import WorkerStream
from lepton_ray.data.table import describe, load_arrays
from lepton_ray.data.schema import Column


def raises(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


def write_tokens(path, rows=64, block=8, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, block + 1), dtype=np.uint8)
    ids = (rng.integers(0, 2**40, size=(rows, 3)) + 2**40).astype(np.int64)  # far above float32's exact 2**24
    img = pa.FixedShapeTensorArray.from_numpy_ndarray(rng.integers(0, 256, size=(rows, 1, 4, 4), dtype=np.uint8))
    table = pa.table({
        "input": pa.FixedSizeListArray.from_arrays(pa.array(data[:, :-1].ravel()), block),
        "target": pa.FixedSizeListArray.from_arrays(pa.array(data[:, 1:].ravel().astype(np.int64)), block),
        "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), 3),
        "image": img,
        "label": np.arange(rows) % 3,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=16)
    return data, ids, img.to_numpy_ndarray()


def test_columns_keep_their_dtype_and_shape(tmp_path):
    data, ids, img = write_tokens(tmp_path / "t.parquet")
    cfg = DataConfig(train=str(tmp_path / "t.parquet"), inputs={"tokens": "input", "ids": "ids", "pixels": {"column": "image", "shape": [16]}},
                     targets={"next": "target"})
    info = describe("data.train", cfg.train, cfg)
    assert info.schema.inputs == (Column("tokens", ("input",), "uint8", (8,)), Column("ids", ("ids",), "int64", (3,)),
                                  Column("pixels", ("image",), "uint8", (16,)))
    assert info.schema.targets == (Column("next", ("target",), "int64", (8,)),)
    arrays = load_arrays(info, {})
    assert arrays["ids"].dtype == np.int64 and np.array_equal(arrays["ids"], ids)  # exact above 2**24 (and 2**40)
    assert np.array_equal(arrays["tokens"], data[:, :-1]) and arrays["tokens"].dtype == np.uint8
    assert np.array_equal(arrays["pixels"], img.reshape(len(img), 16))
    # the worker's batches: a dict of tensors in those dtypes, rows kept together across the columns
    (stream,) = [WorkerStream(info, cfg, rank=0, world_size=1, local_batch=16, seed=1)]
    seen = []
    for b in stream.epoch(0):
        assert set(b) == {"tokens", "ids", "pixels", "next"}
        assert (b["tokens"].dtype, b["ids"].dtype, b["pixels"].dtype, b["next"].dtype) == (torch.uint8, torch.int64, torch.uint8, torch.int64)
        assert torch.equal(b["tokens"][:, 1:].long(), b["next"][:, :-1])  # the target is the input shifted by one, row by row
        seen += b["ids"][:, 0].tolist()
    assert sorted(seen) == sorted(ids[:, 0].tolist())  # every row once


def test_fixed_shape_tensor_keeps_its_shape_and_a_config_shape_reshapes(tmp_path):
    write_tokens(tmp_path / "t.parquet")
    cfg = DataConfig(train=str(tmp_path / "t.parquet"), inputs={"image": "image", "flat": {"column": "input", "shape": [2, 4], "dtype": "float32"}})
    info = describe("data.train", cfg.train, cfg)
    assert [(c.dtype, c.shape) for c in info.schema.inputs] == [("uint8", (1, 4, 4)), ("float32", (2, 4))]
    assert load_arrays(info, {})["flat"].dtype == np.float32


def test_bad_columns_name_the_column_the_type_and_what_is_valid(tmp_path):
    write_tokens(tmp_path / "t.parquet")
    f = str(tmp_path / "t.parquet")
    with raises(f"data.inputs.x.shape: [3, 3] holds 9 values per row, but column 'input' in data.train '{f}' has 8 "
                "(fixed_size_list<element: uint8>[8])"):
        describe("data.train", f, DataConfig(train=f, inputs={"x": {"column": "input", "shape": [3, 3]}}))
    with raises(f"data.inputs.x: column 'nope' is not in data.train '{f}' (columns: input, target, ids, image, label)"):
        describe("data.train", f, DataConfig(train=f, inputs={"x": "nope"}))
    pq.write_table(pa.table({"v": pa.array([[1], [2, 3]], pa.list_(pa.int64())), "label": [0, 1]}), tmp_path / "v.parquet")
    v = str(tmp_path / "v.parquet")
    with raises(f"data.inputs.v: column 'v' in data.train '{v}' has type list<element: int64> (a variable-length list: write it as "
                "a fixed-size list, pa.list_(type, n)); valid: numeric or bool scalars, fixed-size lists of them, or Arrow fixed-shape tensors"):
        describe("data.train", v, DataConfig(train=v, inputs={"v": "v"}))


def test_eval_split_with_another_shape_is_refused_before_ray(tmp_path):
    write_tokens(tmp_path / "train.parquet", block=8)
    write_tokens(tmp_path / "eval.parquet", block=4)
    cfg = {"data": {"train": str(tmp_path / "train.parquet"), "eval": str(tmp_path / "eval.parquet"),
                    "inputs": {"tokens": "input"}, "targets": {"next": "target"}},
           "model": {"name": "gpt", "kwargs": {"n_layer": 1, "n_head": 1, "n_embd": 8}}, "train": {"batch_size": 8},
           "run": {"dir": str(tmp_path / "runs")}}
    with raises(f"data.eval: column 'input' (tokens) in '{tmp_path / 'eval.parquet'}' is uint8 [4] per row; data.train has uint8 [8]"):
        Trainer(cfg, progress=False).fit()


def test_a_per_token_target_with_a_flat_model_fails_on_the_driver_with_both_shapes(tmp_path):
    """The issue's new-user case: a fixed-size list of int64 as the label, the default mlp. Before, a numpy
    traceback from the driver's own error message; now one line with the output's and the target's shape."""
    write_tokens(tmp_path / "t.parquet")
    cfg = {"data": {"train": str(tmp_path / "t.parquet"), "label": "target", "features": ["input"]},
           "train": {"batch_size": 8}, "run": {"dir": str(tmp_path / "runs")}}
    with raises("model: cross_entropy: the model's output [2, 256] does not fit the target [2, 8]: expected logits "
                "[B, C, ...] or [B, ..., C] against class ids [B, ...]"):
        Trainer(cfg, progress=False).fit()


def test_class_ids_must_be_non_negative_integers(tmp_path):
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": [0.5, 1.5]}), tmp_path / "f.parquet")
    cfg = {"data": {"train": str(tmp_path / "f.parquet")}, "train": {"batch_size": 2}, "scaling": {"num_workers": 1},
           "run": {"dir": str(tmp_path / "runs")}}
    with raises("data.targets.label: column 'label' must hold class ids 0..K-1 for cross_entropy (found dtype float64, min 0.5);"
                " for real-valued targets set model.task: regression (or model.loss: mse)"):
        Trainer(cfg, progress=False).fit()


def test_prepare_records_every_columns_dtype_and_shape(tmp_path):
    write_tokens(tmp_path / "src" / "t.parquet")
    prepare(str(tmp_path / "src"), str(tmp_path / "d"), num_shards=2, row_group_rows=16)
    schema = {c["name"]: (c["dtype"], c["shape"]) for c in json.loads((tmp_path / "d" / "_manifest.json").read_text())["schema"]}
    assert schema == {"input": ("uint8", [8]), "target": ("int64", [8]), "ids": ("int64", [3]), "image": ("uint8", [1, 4, 4]),
                      "label": ("int64", [])}
