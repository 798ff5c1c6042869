"""Unit tests for the built-in models: built from a hand-made Schema, shapes, dtypes, exact ids, causality, errors."""

from __future__ import annotations

import re

import pytest
import torch

from lepton_ray.config import ConfigError, ModelConfig
from lepton_ray.data.schema import Column, Schema
from lepton_ray.models import build_model
from lepton_ray.models.cnn import cnn
from lepton_ray.models.gpt import gpt
from lepton_ray.models.recommender import hash_rows, recommender
from lepton_ray.train.losses import cross_entropy

P, A, B = 2**31 - 1, 1_588_635_695, 950_706_376


def col(name: str, dtype: str, shape: tuple, num_classes=None) -> Column:
    return Column(name, (name,), dtype, tuple(shape), num_classes)


def schema(inputs: list[Column], target: Column) -> Schema:
    return Schema(inputs=tuple(inputs), targets=(target,))


def raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


LABEL10 = col("label", "int64", (), 10)
IMAGES = schema([col("image", "uint8", (1, 8, 8))], LABEL10)
TEXT = schema([col("tokens", "uint8", (16,))], col("next", "uint8", (16,), 256))
CLICKS = schema([col("ids", "int64", (3,)), col("dense", "float32", (2,))], col("label", "int64", (), 2))


def small_gpt(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return gpt(TEXT, **{"n_layer": 2, "n_head": 2, "n_embd": 16, **kw}).eval()


# --------------------------------------------------------------------------- cnn


def test_cnn_takes_uint8_images_and_scales_them_like_floats():
    torch.manual_seed(0)
    m = cnn(IMAGES, hidden=[16], channels=[4, 8])
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    out = m(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    assert torch.equal(out, m(x.float() / 255))  # uint8 pixels are x / 255 on the model side
    assert cross_entropy(out, torch.randint(0, 10, (5,))).dim() == 0


def test_cnn_pools_only_while_the_map_is_at_least_4x4():
    pools = lambda m: sum(isinstance(layer, torch.nn.MaxPool2d) for layer in m.features)  # noqa: E731
    assert pools(cnn(IMAGES, channels=[4, 4, 4])) == 2  # 8 -> 4 -> 2, then no pool
    wide = cnn(schema([col("image", "float32", (3, 2, 2))], LABEL10), channels=[4], hidden=[])
    assert pools(wide) == 0 and wide(torch.zeros(2, 3, 2, 2)).shape == (2, 10)


def test_cnn_refuses_a_flat_input_naming_it_and_the_shape_to_use():
    flat = schema([col("image", "uint8", (64,))], LABEL10)
    with raises("the cnn needs one image input of shape [C, H, W] per row; data.inputs.image is uint8 [64] "
                "(set data.inputs.image.shape, e.g. [1, 8, 8])"):
        cnn(flat)
    with pytest.raises(ConfigError, match=r"^model: cannot build 'cnn': the cnn needs one image input"):
        build_model(ModelConfig(name="cnn", hidden=[8]), flat)


# --------------------------------------------------------------------------- gpt


def test_gpt_logits_shape_and_loss_against_next_byte_targets():
    m = small_gpt()
    x = torch.randint(0, 256, (3, 16), dtype=torch.uint8)
    out = m(x)
    assert out.shape == (3, 16, 256)
    assert torch.equal(out, m(x.long()))  # uint8 bytes and int64 ids are the same tokens
    loss = cross_entropy(out, torch.randint(0, 256, (3, 16), dtype=torch.uint8))
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1  # nanoGPT's init: ~uniform logits at first


def test_gpt_is_causal():
    m = small_gpt()
    x = torch.randint(0, 256, (2, 16))
    for t in (0, 7, 14):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1) % 256
        a, b = m(x), m(y)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)  # positions <= t never see token t + 1
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # ...the later ones do


def test_gpt_ties_the_head_to_the_token_embedding_and_stores_it_once():
    m = small_gpt()
    names = list(m.state_dict())
    assert sum(1 for n in names if n.endswith("wte.weight")) == 1 and not any("lm_head" in n for n in names)
    with torch.no_grad():
        m.transformer.wte.weight[65].zero_()
    assert torch.all(m(torch.zeros(1, 4, dtype=torch.long))[..., 65] == 0)  # the head reads the embedding's rows


def test_gpt_generate_greedy_is_deterministic_and_crops_to_the_block_size():
    m = small_gpt()
    prompt = torch.tensor([[104, 105]], dtype=torch.uint8)
    out = m.generate(prompt, max_new_tokens=30)  # longer than the block size of 16: the context is cropped
    assert out.shape == (1, 32) and out.dtype == torch.int64 and out[0, :2].tolist() == [104, 105]
    assert torch.equal(out, m.generate(prompt, max_new_tokens=30))
    step = m.generate(out[:, :20], max_new_tokens=1)  # greedy: each new token is the argmax over the last 16
    assert step[0, -1] == m(out[:, 4:20])[0, -1].argmax()
    sampled = m.generate(prompt, 5, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 7)


def test_gpt_refuses_bad_shapes_and_settings():
    with raises("the gpt needs token ids of shape [T] per row; data.inputs.tokens is uint8 [4, 4] "
                "(a fixed-size list of T ids, e.g. the text builder's 'input' column)"):
        gpt(schema([col("tokens", "uint8", (4, 4))], TEXT.targets[0]))
    with raises("model.kwargs.n_embd: 30 is not divisible by model.kwargs.n_head 4 (each head gets n_embd / n_head dims)"):
        gpt(TEXT, n_embd=30)
    with raises("model.kwargs.vocab_size: 128 is smaller than the 256 classes of data.targets.next (its ids go up to 255); "
                "use vocab_size >= 256"):
        gpt(TEXT, vocab_size=128)
    with raises("gpt: a sequence of 17 tokens is longer than the block size 16 (the input's T)"):
        small_gpt()(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------- recommender


def reference_row(x: int, field: int, n: int) -> int:
    """The hash in Python's unbounded integers (two's complement bits of x): what int64 must reproduce exactly."""
    x &= 2**64 - 1
    h = field + 1
    for piece in ((x >> 42) & (2**22 - 1), (x >> 21) & (2**21 - 1), x & (2**21 - 1)):
        h = (h * A + piece) % P
    return h * B % P % n


def test_recommender_hashes_ids_exactly_in_int64():
    ids = [2**40, 2**40 + 2**30, 2**53 + 1, 2**60, 2**60 + 1, 2**63 - 1, 2**63 - 2, 0, 1, -5]
    rows = hash_rows(torch.tensor(ids).reshape(-1, 1), 1000).flatten().tolist()
    assert rows == [reference_row(x, 0, 1000) for x in ids]
    assert rows[0] != rows[1]  # ids differing only above bit 24 (float32 would merge them)
    assert rows[3] != rows[4] and rows[5] != rows[6]  # ...and by 1 above 2**53 (float64 would merge them)
    assert hash_rows(torch.tensor([[7, 7, 7]]), 1000).unique().numel() == 3  # the field is part of the hash
    spread = hash_rows(torch.arange(10_000).reshape(-1, 1), 100).flatten().bincount(minlength=100)
    assert spread.min() > 60 and spread.max() < 140  # sequential ids spread over the table (100 expected per row)


def test_recommender_forward_looks_up_the_hashed_rows():
    torch.manual_seed(0)
    m = recommender(CLICKS, hidden=[8], num_embeddings=1000, embedding_dim=4)
    ids = torch.tensor([[2**60, 2**60 + 1, 2**40], [2**62 + 3, 5, 2**40 + 2**30]])
    dense = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    seen = []
    m.embedding.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # what the PS strategy hooks
    out = m({"ids": ids, "dense": dense})
    rows = torch.tensor([[reference_row(int(x), f, 1000) for f, x in enumerate(r)] for r in ids.tolist()])
    assert seen[0].dtype == torch.int64 and torch.equal(seen[0], rows)
    expected = m.mlp(torch.cat([m.embedding.weight[rows].flatten(1), dense], 1))
    assert out.shape == (2, 2) and torch.allclose(out, expected)
    assert cross_entropy(out, torch.tensor([0, 1])).dim() == 0


def test_recommender_with_ids_only_and_renamed_inputs():
    one = recommender(schema([col("cats", "int64", (3,))], CLICKS.targets[0]), hidden=[8], num_embeddings=50)
    assert one(torch.tensor([[1, 2**45, 3]])).shape == (1, 2)
    two = recommender(schema([col("c", "int32", (2,)), col("f", "float64", (3,))], CLICKS.targets[0]), hidden=[8],
                      num_embeddings=50, embedding_dim=2, ids_input="c", dense_input="f")
    assert two.mlp[0].in_features == 2 * 2 + 3
    assert two({"c": torch.tensor([[1, 2]], dtype=torch.int32), "f": torch.ones(1, 3, dtype=torch.float64)}).shape == (1, 2)


def test_recommender_refuses_float_ids_unknown_inputs_and_bad_sizes():
    y = CLICKS.targets[0]
    with raises("the recommender needs integer ids; data.inputs.ids is float32 [3] "
                "(name an int64 column in data.inputs, e.g. {ids: ids, dense: dense})"):
        recommender(schema([col("ids", "float32", (3,))], y))
    with raises("data.inputs.extra: the recommender takes ids ('ids', model.kwargs.ids_input) and dense features "
                "('dense', model.kwargs.dense_input); 'extra' is neither"):
        recommender(schema([*CLICKS.inputs, col("extra", "float32", (1,))], y))
    with raises("the recommender's ids input 'cats' (model.kwargs.ids_input) is not in data.inputs (ids, dense)"):
        recommender(CLICKS, ids_input="cats")
    with raises("model.kwargs.num_embeddings: must be an integer in 1..2147483647 (hash buckets), got 0"):
        recommender(CLICKS, num_embeddings=0)
    with pytest.raises(ConfigError, match=r"^model: cannot build 'recommender': .*num_categorical"):
        build_model(ModelConfig(name="recommender", kwargs={"num_categorical": 8}), CLICKS)


# --------------------------------------------------------------------------- through the registry


@pytest.mark.parametrize(("cfg", "data", "x", "y"), [
    (ModelConfig(name="mlp", hidden=[8]), IMAGES, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([1, 2])),
    (ModelConfig(name="cnn", hidden=[8], kwargs={"channels": [4]}), IMAGES, torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
     torch.tensor([1, 2])),
    (ModelConfig(name="gpt", kwargs={"n_layer": 1, "n_head": 2, "n_embd": 8}), TEXT, torch.zeros(2, 16, dtype=torch.uint8),
     torch.zeros(2, 16, dtype=torch.uint8)),
    (ModelConfig(name="recommender", hidden=[8], kwargs={"num_embeddings": 64, "embedding_dim": 4}), CLICKS,
     {"ids": torch.tensor([[1, 2, 2**50]] * 2), "dense": torch.zeros(2, 2)}, torch.tensor([0, 1])),
], ids=["mlp", "cnn", "gpt", "recommender"])
def test_every_builtin_model_builds_and_fits_cross_entropy(cfg, data, x, y):
    loss = cross_entropy(build_model(cfg, data)(x), y)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
