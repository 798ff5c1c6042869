"""data.transform: the contract (one row out per row in, every key), errors that name the transform and the row,
per-row seeds that make a random transform repeat on a resumed epoch, and the schema the model sees after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray import ConfigError
from lepton_ray.data.schema import Column, Schema
from lepton_ray.data.transform import Transform, TransformError, row_seeds
from lr_testing_models import drop_a_row, images_to_float
from test_stream import streams, write_ids


def _batch(n=4):
    return {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3), "label": np.arange(n)}


def test_a_transform_that_changes_the_row_count_is_refused_saying_why():
    t = Transform(drop_a_row, "tests:drop_a_row", seed=0)
    with pytest.raises(TransformError) as err:
        t(_batch(), np.arange(10, 14), epoch=2)
    assert str(err.value) == ("data.transform 'tests:drop_a_row' returned 3 rows of 'x' for 4 rows in (batch starting at row id 10): a"
                              " transform must map each row to one row (exactly-once resume counts rows); filter or expand rows when"
                              " preparing the data instead")


def test_a_raising_transform_names_itself_and_the_first_row():
    def boom(batch):
        raise KeyError("pixels")

    with pytest.raises(TransformError) as err:
        Transform(boom, "pkg.mod:boom", seed=0)(_batch(), np.arange(40, 44), epoch=1)
    assert str(err.value) == "data.transform 'pkg.mod:boom' raised on the batch of 4 rows starting at row id 40 (epoch 1): KeyError: 'pixels'"


def test_a_transform_must_return_every_key():
    with pytest.raises(TransformError, match=r"^data.transform 't' dropped label; it must return every key it was given \(x, label\)$"):
        Transform(lambda b: {"x": b["x"]}, "t", seed=0)(_batch(), np.arange(4), epoch=0)


def test_row_seeds_depend_on_seed_epoch_and_row_only():
    ids = np.arange(1000)
    a = row_seeds(7, 3, ids)
    assert len(set(a.tolist())) == 1000  # distinct per row
    perm = np.random.default_rng(0).permutation(1000)
    assert np.array_equal(row_seeds(7, 3, ids[perm]), a[perm])  # the batch a row is in does not matter
    assert not np.array_equal(row_seeds(7, 4, ids), a) and not np.array_equal(row_seeds(8, 3, ids), a)


def test_schema_after_the_transform_is_what_the_model_sees():
    schema = Schema(inputs=(Column("image", ("image",), "uint8", (64,)),), targets=(Column("label", ("label",), "int64", (), 10),))
    sample = {"image": np.zeros((2, 64), np.uint8), "label": np.zeros(2, np.int64)}
    after, rows = Transform(images_to_float, "t", seed=0).on_sample(schema, sample)
    assert after.inputs == (Column("image", ("image",), "float32", (1, 8, 8)),)
    assert rows["image"].shape == (2, 1, 8, 8) and rows["image"].dtype == np.float32  # the rows it found that from
    assert after.targets == schema.targets  # num_classes kept


def test_a_broken_transform_is_a_config_error_on_the_driver():
    schema = Schema(inputs=(Column("x", ("x",), "float32", (3,)),), targets=())
    with pytest.raises(ConfigError, match=r"^data.transform 'tests:drop_a_row' returned 1 rows of 'x' for 2 rows in"):
        Transform(drop_a_row, "tests:drop_a_row", seed=0).on_sample(schema, {"x": np.zeros((2, 3), np.float32)})


def _jitter(batch, seeds):
    """Noise on feature 0 (the row id), one draw per row from its seed."""
    x = batch["x"].copy()
    x[:, 0] += np.array([np.random.default_rng(int(s)).normal() for s in seeds], np.float32)
    return {**batch, "x": x}


def test_a_random_transform_repeats_exactly_on_a_resumed_epoch(tmp_path, monkeypatch):
    """The native stream applies the transform per window; resuming at step 5 yields exactly the uninterrupted
    epoch's (augmented) batches from step 5 on, and the augmentation differs between epochs."""
    write_ids(tmp_path / "d")
    monkeypatch.setattr("lepton_ray.imports.import_object", lambda spec, option: _jitter)
    full = streams(tmp_path / "d", 2, transform="t:jitter", shuffle_buffer_rows=200)
    plain = streams(tmp_path / "d", 2, shuffle_buffer_rows=200)
    resumed = streams(tmp_path / "d", 2, transform="t:jitter", shuffle_buffer_rows=200)
    for r in range(2):
        a, b = list(full[r].epoch(1)), list(resumed[r].epoch(1, start_step=5))
        assert len(b) == len(a) - 5 and all(torch.equal(x["x"], y["x"]) for x, y in zip(a[5:], b))
        p = list(plain[r].epoch(1))
        assert all(torch.equal(x["x"][:, 1:], y["x"][:, 1:]) and not torch.equal(x["x"], y["x"]) for x, y in zip(a, p))
        e2 = list(full[r].epoch(2))
        assert not torch.equal(a[0]["x"], e2[0]["x"])
