"""Unit tests for lepton_ray.data: describing local Parquet, reading arrays, sharded batch order, builders."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray.config import ConfigError, DataConfig
from lepton_ray.data import BUILDERS, build_data
from lepton_ray.data.builders import digits, write_table
from lepton_ray.data.table import Shard, TableInfo, data_exists, describe, load_arrays
from lepton_ray.data.schema import Column, Schema


def xy(info, options=None):
    """The legacy (features, label) pair of a split: the float32 input ``x`` and the target ``label``."""
    arrays = load_arrays(info, options or {})
    return arrays["x"], arrays[info.schema.targets[0].name]


def raises(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


def write(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def cfg(uri: str, **kwargs) -> DataConfig:
    return DataConfig(train=uri, **kwargs)


# --------------------------------------------------------------------------- describe


def test_describe_single_file(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": [1.0, 2.0, 3.0], "b": [1, 2, 3], "label": [0, 1, 0]})
    info = describe("data.train", str(f), cfg(str(f)))
    assert info == TableInfo(
        key="data.train", uri=str(f), files=(str(f),), num_rows=3,
        schema=Schema(inputs=(Column("x", ("a", "b"), "float32", (2,)),), targets=(Column("label", ("label",), "int64", ()),)),
        shards=(Shard(path=str(f), num_rows=3, row_groups=(3,), bytes=f.stat().st_size, sha256=None),), prepared=False,
    )


def test_describe_directory_lists_sorted_parquet_files_and_skips_hidden_ones(tmp_path):
    d = tmp_path / "split"
    write(d / "part-1.parquet", {"a": [1.0, 2.0], "label": [0, 1]})
    write(d / "part-0.parquet", {"a": [3.0], "label": [1]})
    write(d / "sub" / "part-2.parquet", {"a": [4.0, 5.0, 6.0], "label": [0, 0, 1]})
    write(d / "_ignored.parquet", {"zzz": ["not", "read"]})
    write(d / ".tmp-abc-part-9.parquet", {"zzz": ["not", "read"]})
    (d / "_SUCCESS").write_text("")
    (d / "notes.csv").write_text("a,label\n")
    info = describe("data.train", str(d), cfg(str(d)))
    assert info.files == (str(d / "part-0.parquet"), str(d / "part-1.parquet"), str(d / "sub" / "part-2.parquet"))
    assert info.num_rows == 6
    assert info.schema.inputs[0].columns == ("a",)
    x, y = xy(info)
    assert x[:, 0].tolist() == [3.0, 1.0, 2.0, 4.0, 5.0, 6.0]  # files in listed order
    assert y.tolist() == [1, 0, 1, 0, 0, 1]


def test_describe_file_uri_scheme(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": [1.0], "label": [0]})
    info = describe("data.eval", f"file://{f}", cfg(f"file://{f}"))
    assert info.files == (str(f),)
    assert info.key == "data.eval"


def test_describe_missing_path(tmp_path):
    uri = str(tmp_path / "missing")
    with raises(f"data.train: '{uri}' does not exist"):
        describe("data.train", uri, cfg(uri))
    assert data_exists(uri, {}) is False


def test_describe_directory_without_parquet_files(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "rows.csv").write_text("a,label\n1,0\n")
    write(d / ".tmp-1234-part.parquet", {"a": [1.0], "label": [0]})  # a temporary of write_table is not data
    with raises(f"data.train: '{d}' holds no .parquet files"):
        describe("data.train", str(d), cfg(str(d)))
    assert data_exists(str(d), {}) is True


def test_describe_missing_label_column(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": [1.0], "b": [2.0], "y": [0]})
    with raises(f"data.label: column 'label' is not in data.train '{f}' (columns: a, b, y)"):
        describe("data.train", str(f), cfg(str(f)))
    assert describe("data.train", str(f), cfg(str(f), label="y")).schema.inputs[0].columns == ("a", "b")


def test_describe_missing_feature_column(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": [1.0], "b": [2.0], "label": [0]})
    with raises(f"data.features: column 'c' is not in data.eval '{f}' (columns: a, b, label)"):
        describe("data.eval", str(f), cfg(str(f), features=["a", "c"]))


def test_describe_selected_features_keep_their_order(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": [1.0, 2.0], "b": [3.0, 4.0], "c": [5, 6], "label": [0, 1]})
    info = describe("data.train", str(f), cfg(str(f), features=["c", "a"]))
    assert info.schema.inputs[0].columns == ("c", "a")
    assert info.schema.inputs[0].shape == (2,)
    x, _ = xy(info)
    assert x.tolist() == [[5.0, 1.0], [6.0, 2.0]]


def test_describe_label_only(tmp_path):
    f = write(tmp_path / "t.parquet", {"label": [0, 1]})
    with raises(f"data.features: data.train '{f}' has no column besides the label 'label'"):
        describe("data.train", str(f), cfg(str(f)))


def test_describe_no_rows(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": pa.array([], pa.float32()), "label": pa.array([], pa.int64())})
    with raises(f"data.train: '{f}' has no rows"):
        describe("data.train", str(f), cfg(str(f)))


def test_describe_schemas_differ(tmp_path):
    d = tmp_path / "split"
    write(d / "p0.parquet", {"a": pa.array([1.0], pa.float64()), "label": pa.array([0], pa.int64())})
    write(d / "p1.parquet", {"a": pa.array([1], pa.int64()), "label": pa.array([0], pa.int64())})
    with raises(
        f"data.train: '{d / 'p1.parquet'}' has columns (a: int64, label: int64) but '{d / 'p0.parquet'}' has "
        "(a: double, label: int64); every file must match"
    ):
        describe("data.train", str(d), cfg(str(d)))


def test_describe_unreadable_parquet(tmp_path):
    f = tmp_path / "broken.parquet"
    f.write_bytes(b"this is not parquet")
    with pytest.raises(ConfigError) as exc:
        describe("data.train", str(f), cfg(str(f)))
    assert str(exc.value).startswith(f"data.train: '{f}' is not a readable Parquet file: ")


def test_describe_non_numeric_feature(tmp_path):
    f = write(tmp_path / "t.parquet", {"a": [1.0, 2.0], "name": ["x", "y"], "label": [0, 1]})
    with raises(
        f"data.train: feature column 'name' in '{f}' has type string; "
        "features must be numeric scalars or fixed-size numeric lists (for tensors, name the column in data.inputs instead)"
    ):
        describe("data.train", str(f), cfg(str(f)))
    # choosing only numeric features is fine
    assert describe("data.train", str(f), cfg(str(f), features=["a"])).schema.inputs[0].shape == (1,)


def test_describe_variable_length_list_feature_is_rejected(tmp_path):
    f = write(tmp_path / "t.parquet", {"v": pa.array([[1.0], [2.0, 3.0]], pa.list_(pa.float64())), "label": [0, 1]})
    with raises(
        f"data.train: feature column 'v' in '{f}' has type list<element: double>; "
        "features must be numeric scalars or fixed-size numeric lists (for tensors, name the column in data.inputs instead)"
    ):
        describe("data.train", str(f), cfg(str(f)))


def test_fixed_size_list_features(tmp_path):
    emb = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], pa.list_(pa.float32(), 3))
    ints = pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int32(), 2))
    f = write(tmp_path / "t.parquet", {"emb": emb, "s": [10.0, 20.0, 30.0], "pair": ints, "flag": [True, False, True], "label": [2, 1, 0]})
    info = describe("data.train", str(f), cfg(str(f)))
    assert info.schema.inputs[0].columns == ("emb", "s", "pair", "flag")
    assert info.schema.inputs[0].shape == (3 + 1 + 2 + 1,)
    x, y = xy(info)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    assert x.tolist() == [
        [1.0, 2.0, 3.0, 10.0, 1.0, 2.0, 1.0],
        [4.0, 5.0, 6.0, 20.0, 3.0, 4.0, 0.0],
        [7.0, 8.0, 9.0, 30.0, 5.0, 6.0, 1.0],
    ]
    assert y.tolist() == [2, 1, 0]
    assert y.flags.writeable
    assert torch.from_numpy(y).tolist() == [2, 1, 0]


def test_fixed_size_list_over_several_files_and_row_groups(tmp_path):
    d = tmp_path / "split"
    d.mkdir()
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    for i, (lo, hi) in enumerate([(0, 7), (7, 20)]):
        t = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(rows[lo:hi].ravel()), 2), "label": np.arange(lo, hi)})
        pq.write_table(t, d / f"p{i}.parquet", row_group_size=3)
    info = describe("data.train", str(d), cfg(str(d)))
    assert (info.num_rows, info.schema.inputs[0].shape) == (20, (2,))
    x, y = xy(info)
    np.testing.assert_array_equal(x, rows)
    assert y.tolist() == list(range(20))


def test_null_in_fixed_size_list_feature_is_rejected(tmp_path):
    vals = pa.array([[1.0, 2.0], None, [5.0, 6.0]], pa.list_(pa.float32(), 2))
    f = write(tmp_path / "t.parquet", {"v": vals, "label": [0, 1, 2]})
    info = describe("data.train", str(f), cfg(str(f)))
    with raises(f"data.train: column 'v' (x) in '{f}' has 1 null value(s); fill or drop them first"):
        load_arrays(info, {})


# --------------------------------------------------------------------------- builders


def test_digits_builder_writes_train_and_eval(tmp_path):
    train, ev = tmp_path / "digits" / "train.parquet", tmp_path / "digits" / "eval.parquet"
    build_data("digits", str(train), str(ev), {})
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["eval.parquet", "train.parquet"]  # no temporaries left
    t, e = pq.read_table(train), pq.read_table(ev)
    names = [f"px{i}" for i in range(64)] + ["label"]
    assert t.column_names == names and e.column_names == names
    assert t.num_rows + e.num_rows == 1797
    assert e.num_rows == round(1797 * 0.2)
    for table in (t, e):
        x = np.stack([table.column(f"px{i}").to_numpy() for i in range(64)], axis=1)
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
        assert set(table.column("label").to_numpy().tolist()) == set(range(10))
    info = describe("data.train", str(train), cfg(str(train)))
    x_col = info.schema.inputs[0]
    assert (info.num_rows, x_col.shape, x_col.columns[0], x_col.columns[-1]) == (t.num_rows, (64,), "px0", "px63")


def test_digits_builder_is_deterministic_and_splits_disjointly(tmp_path):
    a = (tmp_path / "a" / "train.parquet", tmp_path / "a" / "eval.parquet")
    b = (tmp_path / "b" / "train.parquet", tmp_path / "b" / "eval.parquet")
    digits(str(a[0]), str(a[1]))
    digits(str(b[0]), str(b[1]))
    assert pq.read_table(a[0]).equals(pq.read_table(b[0]))
    assert pq.read_table(a[1]).equals(pq.read_table(b[1]))
    # train and eval rows are different images (by pixel content) covering the whole data set
    from sklearn.datasets import load_digits

    all_rows = {tuple(r) for r in (load_digits().data / 16.0).astype(np.float32).tolist()}
    split_rows = []
    for p in a:
        t = pq.read_table(p)
        split_rows += [tuple(r) for r in np.stack([t.column(f"px{i}").to_numpy() for i in range(64)], axis=1).tolist()]
    assert len(split_rows) == 1797
    assert set(split_rows) == all_rows


def test_digits_builder_without_eval_writes_everything_to_train(tmp_path):
    train = tmp_path / "train.parquet"
    digits(str(train), None)
    assert pq.read_table(train).num_rows == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]


def test_builders_registry_and_errors():
    assert BUILDERS["digits"] is digits
    with raises("data.builder: 'nope' is not one of digits, digits_images, clicks, text nor 'package.module:function'"):
        build_data("nope", "t", None, {})
    with raises("data.builder: cannot import 'no_such_module_xyz:make': No module named 'no_such_module_xyz'"):
        build_data("no_such_module_xyz:make", "t", None, {})
    with raises("data.builder: cannot import 'json:no_such_fn': module 'json' has no attribute 'no_such_fn'"):
        build_data("json:no_such_fn", "t", None, {})


def test_user_builder_is_called_with_uris(tmp_path, monkeypatch):
    import types
    import sys

    calls = []
    mod = types.ModuleType("lr_unit_fake_builder")
    mod.build = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "lr_unit_fake_builder", mod)
    build_data("lr_unit_fake_builder:build", "t.parquet", "e.parquet", {"anon": True})
    assert calls == [{"train": "t.parquet", "eval": "e.parquet", "storage_options": {"anon": True}}]


def test_write_table_creates_parents_and_replaces_atomically(tmp_path):
    target = tmp_path / "deep" / "er" / "t.parquet"
    write_table(pa.table({"a": [1]}), str(target))
    write_table(pa.table({"a": [2, 3]}), str(target))
    assert pq.read_table(target).column("a").to_pylist() == [2, 3]
    assert [p.name for p in target.parent.iterdir()] == ["t.parquet"]


def test_what_the_driver_read_of_a_dataset_is_not_sent_to_the_workers():
    """A Dataset's planning pass keeps its target column on the driver (``scan``); the info the workers get (pickled
    into every worker's spec) leaves it out and is otherwise the same."""
    import pickle

    from lepton_ray.data.dataset import Scan

    info = TableInfo(key="data.train", uri="dataset:train", files=(), num_rows=3, schema=Schema((), ()),
                     scan=Scan(pa.table({"x": [1, 2]}), pa.table({"label": [0, 1, 1]})))
    sent = pickle.loads(pickle.dumps(info))
    assert sent.scan is None and info.scan is not None
    assert sent == info and (sent.key, sent.num_rows) == ("data.train", 3)
