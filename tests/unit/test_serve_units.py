"""Serving pieces without Ray: bundles (schema, safe format, atomic, verified), forms, heads, the optimizer's gate,
/predict validation, the Open Inference Protocol's parsing and encoding, config."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from lepton_ray.config import ConfigError, ServeConfig, load_config
from lepton_ray.data.schema import Column, Schema
from lepton_ray.models import build_model
from lepton_ray.serve import v2
from lepton_ray.serve.bundle import Bundle, BundleError, check_name, load_bundle, load_checkpoint, write_bundle
from lepton_ray.serve.forms import make_form
from lepton_ray.serve.optimize import optimize
from lepton_ray.serve.predictor import Predictor
from lepton_ray.serve.validate import BadRequest, Part, Request, TensorSpec, parse_instances
from lepton_ray.train.checkpoint import CheckpointStore

# --------------------------------------------------------------------------- test models (built through model.factory)


class TwoInputs(nn.Module):
    """A classifier over a dict of inputs: dense float32 [2] and ids int64 [2] (embedded)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.lin = nn.Linear(2 + 2 * 3, 3)

    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(torch.cat([d["dense"], self.emb(d["ids"]).flatten(1)], 1))


def two_inputs(schema: Schema) -> nn.Module:
    return TwoInputs()


class TinyLM(nn.Module):
    """A byte-level causal model (running mean of embeddings): logits [B, T, 256]; nanoGPT's generate contract."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.emb = nn.Embedding(256, 16)
        self.pos = nn.Embedding(block_size, 16)
        self.head = nn.Linear(16, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.emb(idx.long()) + self.pos(torch.arange(t))
        return self.head(torch.cumsum(h, 1) / torch.arange(1, t + 1).view(1, -1, 1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0) -> torch.Tensor:
        for _ in range(max_new_tokens):
            nxt = self(idx[:, -self.block_size:])[:, -1, :].argmax(-1, keepdim=True).to(idx.dtype)
            idx = torch.cat([idx, nxt], 1)
        return idx


def tiny_lm(schema: Schema, block_size: int = 8) -> nn.Module:
    return TinyLM(block_size)


FLAT = Schema(inputs=(Column("x", tuple(f"f{i}" for i in range(6)), "float32", (6,)),),
              targets=(Column("y", ("y",), "int64", (), 3),))
TYPED = Schema(inputs=(Column("dense", ("dense",), "float32", (2,)), Column("ids", ("ids",), "int64", (2,))),
               targets=(Column("y", ("y",), "int64", (), 3),))
IMAGE = Schema(inputs=(Column("image", ("image",), "uint8", (1, 2, 2)),), targets=(Column("y", ("y",), "int64", (), 2),))
TOKENS = Schema(inputs=(Column("tokens", ("x",), "uint8", (8,)),), targets=(Column("next", ("y",), "uint8", (8,), 256),))
LM_MODEL = {"name": "mlp", "factory": "test_serve_units:tiny_lm", "kwargs": {"block_size": 6}}


def _checkpoint(tmp_path, hidden=(16,), d=6, n=3, model=None, schema=None, loss="cross_entropy", metrics=("accuracy",)):
    cfg = load_config({"data": {"train": "unused"}, "model": model or {"hidden": list(hidden)}, "run": {"name": "toy"}})
    schema = schema or Schema(inputs=(Column("x", tuple(f"f{i}" for i in range(d)), "float32", (d,)),),
                              targets=(Column("y", ("y",), "int64", (), n),))
    torch.manual_seed(0)
    net = build_model(cfg.model, schema)
    ckpt = CheckpointStore(str(tmp_path / "ckpt")).save(7, {"model": net.state_dict()}, {
        "step": 7, "config": cfg.to_dict(),
        "model_io": {"schema": schema.to_dict(), "loss": loss, "metrics": list(metrics), "task": "classification"}})
    return ckpt, net.eval(), schema


# --------------------------------------------------------------------------- bundles


def test_checkpoint_loads_as_fp32_bundle_by_step_or_root(tmp_path):
    ckpt, net, schema = _checkpoint(tmp_path)
    for uri in (ckpt.uri, str(tmp_path / "ckpt")):
        b = load_checkpoint(uri)
        assert (b.schema, b.num_outputs, b.labels, b.loss, b.metric_names, b.name, b.form) == (
            schema, 3, [0, 1, 2], "cross_entropy", ["accuracy"], "toy", "fp32")
        x = torch.randn(4, 6)
        assert torch.equal(b.build_fp32()(x), net(x))


def test_legacy_checkpoint_model_io_reads_as_the_flat_schema(tmp_path):
    """A checkpoint written before typed schemas (input_dim/num_outputs/features/label) can still be re-exported."""
    cfg = load_config({"data": {"train": "unused"}, "model": {"hidden": [4]}})
    net = build_model(cfg.model, FLAT)
    ckpt = CheckpointStore(str(tmp_path / "old")).save(1, {"model": net.state_dict()}, {"config": cfg.to_dict(), "model_io": {
        "input_dim": 6, "num_outputs": 3, "features": [f"f{i}" for i in range(6)], "label": "y", "task": "classification"}})
    b = load_checkpoint(ckpt.uri)
    assert b.schema == FLAT and b.loss == "cross_entropy" and b.labels == [0, 1, 2]


def test_bundle_round_trip_keeps_the_schema_and_is_verified(tmp_path):
    ckpt, net, schema = _checkpoint(tmp_path)
    b = load_checkpoint(ckpt.uri)
    b.form = "int8"
    out = tmp_path / "bundle"
    write_bundle(b, str(out), report={"chosen": "int8"})
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.safetensors", "optimize_report.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no temporary left behind
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["format"] == "lepton_ray.bundle/2" and meta["form"] == "int8" and meta["name"] == "toy"
    assert meta["model_io"] == {"schema": schema.to_dict(), "loss": "cross_entropy", "metrics": ["accuracy"],
                                "task": "classification"}
    assert meta["model_io"]["schema"]["inputs"][0] == {"name": "x", "columns": [f"f{i}" for i in range(6)],
                                                       "dtype": "float32", "shape": [6]}
    back = load_bundle(str(out))
    assert (back.schema, back.labels, back.name, back.form) == (schema, [0, 1, 2], "toy", "int8")
    x = torch.randn(5, 6)
    assert torch.equal(back.build_fp32()(x), net(x))
    # rewriting replaces atomically; tampering is detected
    write_bundle(back, str(out))
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the SHA-256 in bundle.json"):
        load_bundle(str(out))


def test_typed_multi_input_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    b = Bundle(model={"name": "mlp", "factory": "test_serve_units:two_inputs"}, schema=TYPED, state=None,
               labels=["a", "b", "c"], name="typed")
    b.state = b.build_fp32().state_dict()
    write_bundle(b, str(tmp_path / "b"))
    back = load_bundle(str(tmp_path / "b"))
    assert back.schema == TYPED and back.labels == ["a", "b", "c"]
    d = {"dense": np.ones((2, 2), np.float32), "ids": np.array([[1, 2], [3, 9]])}
    assert Predictor(back).run(d)["label"].tolist() == Predictor(b).run(d)["label"].tolist()


def test_a_version_1_bundle_is_refused_with_how_to_re_export(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "bundle.json").write_text(json.dumps({"format": "lepton_ray.bundle/1", "source": "runs/d/checkpoints/step_00000660",
                                                 "input": {"features": ["a"], "dim": 1, "dtype": "float32"}}))
    with pytest.raises(BundleError) as exc:
        load_bundle(str(out))
    assert str(exc.value) == (
        f"'{out}/bundle.json' is a lepton_ray.bundle/1 bundle (flat features, from before typed input schemas); this "
        f"lepton_ray reads lepton_ray.bundle/2: re-export it with 'lepton-ray optimize runs/d/checkpoints/step_00000660 "
        f"--eval <held-out data> -o {out}'")


def test_missing_bundle_names_what_was_expected(tmp_path):
    with pytest.raises(BundleError, match=r"is neither a serving bundle \(bundle.json\) nor a lepton_ray checkpoint"):
        load_bundle(str(tmp_path / "nothing"))


def test_model_names_must_fit_in_a_url():
    assert check_name("digits-v2.1", "--name") == "digits-v2.1"
    with pytest.raises(BundleError, match=r"^--name: 'a b' is not a model name"):
        check_name("a b", "--name")
    with pytest.raises(BundleError, match=r"^name: '' is not a model name"):
        Bundle(model={"name": "mlp"}, schema=FLAT, state=None, name="")


# --------------------------------------------------------------------------- forms and heads


@pytest.mark.parametrize("form,atol", [("fp32", 0.0), ("bf16", 0.1), ("int8", 0.1)])
def test_forms_compute_the_same_function(form, atol):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(16, 8)
    with torch.inference_mode():
        got, want = make_form(form, net)(x), net(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= atol
    if form == "int8":
        assert any("quantized" in type(m).__module__ for m in make_form(form, net).modules())


def test_bf16_form_keeps_integer_inputs_and_dicts():
    """Token ids and other integer inputs are not cast to bf16 (an embedding lookup needs them whole)."""
    torch.manual_seed(0)
    net = TwoInputs().eval()
    d = {"dense": torch.randn(4, 2), "ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 9]])}
    with torch.inference_mode():
        got = make_form("bf16", net, {k: v[:1] for k, v in d.items()})(d)
        assert got.dtype == torch.float32 and (got - net(d)).abs().max().item() <= 0.1


def test_classifier_head_probabilities_and_labels():
    b = Bundle(model={"name": "mlp", "hidden": [4]}, schema=FLAT, state=None, labels=["cat", "dog", "eel"])
    p = Predictor(b)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    out = p.predict(x)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-6)
    assert out["label"].tolist() == [["cat", "dog", "eel"][i] for i in out["logits"].argmax(1)]
    assert [(o.name, o.dtype, o.shape) for o in p.outputs] == [
        ("logits", "float32", (3,)), ("probabilities", "float32", (3,)), ("label", "bytes", ())]
    assert p.to_json(out, 0, 1) == [{"label": out["label"][0], "probabilities": out["probabilities"][0].tolist()}]


def test_language_model_head_next_token_and_greedy_continuation():
    torch.manual_seed(0)
    b = Bundle(model=LM_MODEL, schema=TOKENS, state=None, name="lm")
    b.state = b.build_fp32().state_dict()
    p = Predictor(b)
    assert p.head == "language_model" and p.can_generate
    # the context is the trained one (8) cut to the model's block size (6); a token id must be below 256
    assert p.inputs == (TensorSpec("tokens", "uint8", (8,), max_len=6, high=256),)
    prompt = np.array([[1, 2, 3]], np.uint8)
    out = p.run({"tokens": prompt}, max_new_tokens=4)
    net = b.build_fp32()
    with torch.inference_mode():
        logits = net(torch.from_numpy(prompt))[:, -1, :]
        idx = torch.from_numpy(prompt).long()
        for _ in range(4):
            idx = torch.cat([idx, net(idx[:, -6:])[:, -1:, :].argmax(-1)], 1)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["probabilities"], torch.softmax(logits, -1).numpy(), rtol=1e-5)
    assert out["continuation"].dtype == np.int64 and out["continuation"].tolist() == idx[:, 3:].tolist()
    assert p.to_json(out)[0]["next_token"] == int(logits.argmax())
    assert set(p.run({"tokens": prompt}, max_new_tokens=2, scores=False)) == {"continuation"}


def test_real_gpt_serves_next_bytes_and_continuations():
    schema = Schema(inputs=(Column("tokens", ("x",), "uint8", (16,)),), targets=(Column("next", ("y",), "uint8", (16,), 256),))
    torch.manual_seed(0)
    p = Predictor(Bundle(model={"name": "gpt"}, schema=schema, state=None, name="gpt"))
    assert p.head == "language_model" and p.can_generate and [o.name for o in p.outputs] == ["logits", "probabilities",
                                                                                             "continuation"]
    out = p.run({"tokens": np.array([[104, 105]], np.uint8)}, max_new_tokens=3)
    assert out["probabilities"].shape == (1, 256) and out["continuation"].shape == (1, 3)


# --------------------------------------------------------------------------- the optimizer's gate


def test_optimizer_gate_with_bound_zero_keeps_fp32_accuracy(tmp_path):
    ckpt, net, schema = _checkpoint(tmp_path, hidden=(64, 64), d=16, n=4)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    y = rng.integers(0, 4, 400)  # random labels: fp32 accuracy is ~25%, forms may differ from it
    pq.write_table(pa.table({**{f: x[:, i] for i, f in enumerate(schema.inputs[0].columns)}, "y": y}), tmp_path / "eval.parquet")
    rep = optimize(ckpt.uri, str(tmp_path / "eval.parquet"), str(tmp_path / "b"),
                   config=ServeConfig(max_accuracy_drop=0.0, candidates=["bf16", "int8"]), verbose=False)
    with torch.inference_mode():
        ref = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean() * 100)
    assert (rep["metric"], rep["higher_is_better"]) == ("accuracy", True)
    assert rep["forms"]["fp32"]["accuracy"] == pytest.approx(ref)
    assert rep["forms"][rep["chosen"]]["accuracy"] >= ref
    assert set(rep["forms"]) == {"fp32", "bf16", "int8"}
    for r in rep["forms"].values():
        assert r["accurate"] == (r["accuracy"] >= rep["forms"]["fp32"]["accuracy"])
    assert load_bundle(str(tmp_path / "b")).form == rep["chosen"]


def test_optimizer_gates_a_language_model_on_bits_per_byte(tmp_path, capsys):
    ckpt, net, schema = _checkpoint(tmp_path, model=LM_MODEL, schema=Schema(
        inputs=(Column("tokens", ("x",), "uint8", (6,)),), targets=(Column("next", ("y",), "uint8", (6,), 256),)))
    rng = np.random.default_rng(0)
    text = rng.integers(97, 123, size=(64, 7)).astype(np.uint8)
    col = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), pa.uint8()), 6)  # noqa: E731
    pq.write_table(pa.table({"x": col(text[:, :-1]), "y": col(text[:, 1:])}), tmp_path / "eval.parquet")
    rep = optimize(ckpt.uri, str(tmp_path / "eval.parquet"), config=ServeConfig(max_accuracy_drop=0.0, candidates=["bf16"]),
                   verbose=False, progress=True)
    assert re.search(r"optimize: 100%\|#+\| 2/2 \[.*, bf16\]", capsys.readouterr().err)  # the forms measured, on stderr
    with torch.inference_mode():
        logits = net(torch.from_numpy(text[:, :-1]))
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), torch.from_numpy(text[:, 1:]).long().reshape(-1))
    assert (rep["metric"], rep["higher_is_better"]) == ("bits_per_byte", False)
    assert rep["forms"]["fp32"]["bits_per_byte"] == pytest.approx(nll.item() / np.log(2), rel=1e-5)
    bf16 = rep["forms"]["bf16"]
    assert bf16["accurate"] == (bf16["bits_per_byte"] <= rep["forms"]["fp32"]["bits_per_byte"])


def test_optimizer_names_a_missing_eval_column(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path)
    pq.write_table(pa.table({"f0": [1.0], "y": [0]}), tmp_path / "eval.parquet")
    with pytest.raises(ConfigError, match=r"^--eval: column 'f1' \(input x\) is not in '.*eval.parquet' \(columns: f0, y\)$"):
        optimize(ckpt.uri, str(tmp_path / "eval.parquet"), verbose=False)


# --------------------------------------------------------------------------- /predict validation

X = TensorSpec("x", "float32", (3,), features=("a", "b", "c"))
PIXELS = TensorSpec("pixels", "float32", (3,), features=("pixels",))  # one list column of 3 values
IMG = TensorSpec("image", "uint8", (1, 2, 2))
DENSE, IDS = TensorSpec("dense", "float32", (2,)), TensorSpec("ids", "int64", (2,))
TOK = TensorSpec("tokens", "uint8", (8,), max_len=4)
FLAGS = TensorSpec("flags", "bool", (2,))


def _parse(body, specs, **kw):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_instances(raw, specs, max_instances=4, **kw)


def test_parse_instances_accepts_lists_objects_and_typed_tensors():
    x = _parse({"instances": [[1, 2.5, 3], {"b": 4, "a": 3, "c": 5}, {"x": [0, 0, 1]}]}, [X]).parts[0].inputs["x"]
    assert x.dtype == np.float32 and x.tolist() == [[1.0, 2.5, 3.0], [3.0, 4.0, 5.0], [0.0, 0.0, 1.0]]
    img = _parse({"instances": [[[[0, 255], [7, 8]]]]}, [IMG]).parts[0].inputs["image"]
    assert img.dtype == np.uint8 and img.shape == (1, 1, 2, 2) and img.tolist() == [[[[0, 255], [7, 8]]]]
    two = _parse({"instances": [{"dense": [0.5, 1], "ids": [2**40, -1]}]}, [DENSE, IDS]).parts[0].inputs
    assert two["dense"].dtype == np.float32 and two["ids"].dtype == np.int64 and two["ids"].tolist() == [[2**40, -1]]
    assert _parse({"instances": [[True, False]]}, [FLAGS]).parts[0].inputs["flags"].tolist() == [[True, False]]


def test_parse_instances_groups_token_prompts_by_length_and_keeps_the_last_tokens():
    r = _parse({"instances": [[1, 2], [3, 4, 5, 6, 7, 8], [9, 10]], "max_new_tokens": 3}, [TOK], generates=True)
    assert r.n == 3 and r.max_new_tokens == 3
    got = sorted((p.rows.tolist(), p.inputs["tokens"].tolist()) for p in r.parts)
    assert got == [([0, 2], [[1, 2], [9, 10]]), ([1], [[5, 6, 7, 8]])]  # a 6-token prompt keeps its last 4
    merged = r.merge([{"c": p.inputs["tokens"][:, :1]} for p in r.parts])["c"].tolist()
    assert merged == [[1], [5], [9]]  # back in request order
    same = _parse({"instances": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]}, [TOK])  # fast path: one part, cropped
    assert same.parts[0].rows is None and same.parts[0].inputs["tokens"].tolist() == [[3, 4, 5, 6], [9, 10, 11, 12]]


BAD_INSTANCES = [
    ({"instances": [[1, 2]]}, [X], "instances[0]: expected float32 [3], got a list of shape [2]"),
    ({"instances": [[[1, 2, 3]]]}, [X], "instances[0]: expected float32 [3], got a list of shape [1, 3]"),
    ({"instances": [[1, "x", 3]]}, [X], 'instances[0][1]: expected a number (input x: float32 [3]), got "x"'),
    ({"instances": [[1, 2, True]]}, [X], "instances[0][2]: expected a number (input x: float32 [3]), got true"),
    ({"instances": [[1, 2, None]]}, [X], "instances[0][2]: expected a number (input x: float32 [3]), got null"),
    ({"instances": [[0, 0, 1e39]]}, [X], "instances[0][2]: value is not finite in float32 (NaN, inf or beyond ±3.4e+38)"),
    ({"instances": [[0, 0, 0], "abc"]}, [X], 'instances[1]: expected float32 [3], got "abc"'),
    ({"instances": [{"a": 1, "b": 2, "z": 3}]}, [X], 'instances[0]: unknown feature "z" (features: a, b, c)'),
    ({"instances": [{"a": 1, "b": 2}]}, [X], 'instances[0]: missing feature "c"'),
    ({"instances": [{"a": 1, "b": 2, "c": "3"}]}, [X], 'instances[0].c: expected a number (input x: float32 [3]), got "3"'),
    ({"instances": [{"pixels": [1, 2, 3]}]}, [PIXELS],
     "instances[0]: this model reads 3 values from 1 column(s); send each instance as float32 [3] (a list of 3 numbers)"),
    ({"instances": [[[0, 1], [2, 3]]]}, [IMG], "instances[0]: expected uint8 [1, 2, 2], got a list of shape [2, 2]"),
    ({"instances": [[[[0, 1], [2, 256]]]]}, [IMG],
     "instances[0][0][1][1]: expected an integer in 0..255 (input image: uint8 [1, 2, 2]), got 256"),
    ({"instances": [[[[0, 1], [2, 3.5]]]]}, [IMG],
     "instances[0][0][1][1]: expected an integer in 0..255 (input image: uint8 [1, 2, 2]), got 3.5"),
    ({"instances": [[[[0, 1], [2]]]]}, [IMG], "instances[0]: expected uint8 [1, 2, 2], got a ragged nested list (rows of different lengths)"),
    ({"instances": [[0.5, 1, 2, 3]]}, [DENSE, IDS],
     'instances[0]: expected an object with the inputs "dense" (float32 [2]), "ids" (int64 [2]), got a list of shape [4]'),
    ({"instances": [{"dense": [0, 1]}]}, [DENSE, IDS], 'instances[0]: missing input "ids" (int64 [2])'),
    ({"instances": [{"dense": [0, 1], "ids": [1, 2], "idz": 3}]}, [DENSE, IDS],
     'instances[0]: unknown input "idz" (the model\'s inputs: "dense" (float32 [2]), "ids" (int64 [2]))'),
    ({"instances": [{"dense": [0, 1], "ids": [1, 2**63]}]}, [DENSE, IDS],
     "instances[0].ids[1]: expected an integer in -9223372036854775808..9223372036854775807 (input ids: int64 [2]), got 9223372036854775808"),
    ({"instances": [{"dense": [0, 1], "ids": [1]}]}, [DENSE, IDS], "instances[0].ids: expected int64 [2], got a list of shape [1]"),
    ({"instances": [[]]}, [TOK], "instances[0]: expected uint8 [L] token ids (L >= 1), got an empty list"),
    ({"instances": [[1, 2], [3, [4]]]}, [TOK], "instances[1]: expected uint8 [L] token ids (L >= 1), got a ragged nested list (rows of different lengths)"),
    ({"instances": [[1, -2]]}, [TOK], "instances[0][1]: expected an integer in 0..255 (input tokens: uint8 [L]), got -2"),
    ({"instances": [[1, 0]]}, [FLAGS], "instances[0][0]: expected true or false (input flags: bool [2]), got 1"),
    ({"instances": [[1, 2, 3]], "max_new_tokens": 2}, [X], '"max_new_tokens": this model does not generate tokens (only a language model does)'),
    ({"instances": [[1, 2]], "max_new_tokens": 513}, [TOK], '"max_new_tokens": expected an integer in 1..512, got 513'),
    ({"instances": [[0, 0, 0]] * 5}, [X], "too many instances: 5 > 4 per request; split the request"),
    ({"instances": []}, [X], '"instances" is empty: send at least one row'),
    ({"rows": []}, [X], 'missing "instances": the body must be {"instances": [[...], ...]} (keys found: "rows")'),
    (b"[1]", [X], 'the body must be a JSON object like {"instances": [[...], ...]}, got list'),
    (b'{"instances": [[NaN, 0, 0]]}', [X], "malformed JSON: NaN is not allowed; every value must be a finite number"),
    (b'{"instances": [[0, 0', [X], "malformed JSON: Expecting ',' delimiter: line 1 column 21 (char 20)"),
    ({"instances": [[[[[[[[[[[[[0]]]]]]]]]]]]]}, [X], "instances[0]: expected float32 [3], got a list nested 12 deep"),
]


@pytest.mark.parametrize("body,specs,message", BAD_INSTANCES, ids=[m[:40] for _, _, m in BAD_INSTANCES])
def test_bad_instances_are_400s_naming_index_expected_and_got(body, specs, message):
    with pytest.raises(BadRequest) as exc:
        _parse(body, specs, generates=any(s.max_len for s in specs))
    assert exc.value.status == 400 and str(exc.value) == message


def test_fast_and_slow_paths_agree():
    """The fast path (one np.array call) gives exactly what the value-by-value path gives."""
    rows = np.random.default_rng(0).normal(size=(4, 3)).tolist()
    fast = _parse({"instances": rows}, [X]).parts[0].inputs["x"]
    slow = _parse({"instances": [dict(zip("abc", r)) for r in rows]}, [X]).parts[0].inputs["x"]
    assert np.array_equal(fast, slow) and np.array_equal(fast, np.asarray(rows, np.float32))


def test_nesting_that_exhausts_the_stack_is_a_400():
    from lepton_ray.serve.validate import too_deep

    def recurse(n):
        return recurse(n + 1)

    with pytest.raises(BadRequest, match="^the body's lists are nested too deep$"):
        too_deep(recurse)(0)


def test_request_merge_restores_request_order():
    r = Request(4, (Part(np.array([1, 3]), {}), Part(np.array([0, 2]), {})))
    out = r.merge([{"y": np.array([[11], [13]])}, {"y": np.array([[10], [12]])}])
    assert out["y"].tolist() == [[10], [11], [12], [13]]


# --------------------------------------------------------------------------- Open Inference Protocol (v2)


def _outs(c=3):
    from lepton_ray.serve.validate import OutputSpec

    return (OutputSpec("logits", "float32", (c,)), OutputSpec("probabilities", "float32", (c,)), OutputSpec("label", "int64", ()))


def _infer(payload, specs=(X,), outputs=None, **kw):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return v2.parse_infer(raw, list(specs), list(outputs or _outs()), max_instances=4, **kw)


def _tensor(name, shape, datatype, data):
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def test_v2_flat_and_nested_data_are_the_same_tensor():
    flat = _infer({"inputs": [_tensor("x", [2, 3], "FP32", [1, 2, 3, 4, 5, 6])]})
    nested = _infer({"inputs": [_tensor("x", [2, 3], "FP32", [[1, 2, 3], [4, 5, 6]])]})
    assert flat.n == nested.n == 2
    assert flat.inputs["x"].dtype == np.float32 and np.array_equal(flat.inputs["x"], nested.inputs["x"])
    assert flat.inputs["x"].tolist() == [[1, 2, 3], [4, 5, 6]]
    img = _infer({"inputs": [_tensor("image", [1, 1, 2, 2], "UINT8", [[[[1, 2], [3, 4]]]])]}, specs=[IMG]).inputs["image"]
    assert img.dtype == np.uint8 and img.shape == (1, 1, 2, 2)


def test_v2_several_inputs_ids_outputs_and_parameters():
    req = _infer({"id": "req-1", "parameters": {"binary_data_output": True}, "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
                  "inputs": [_tensor("ids", [1, 2], "INT64", [3, 2**40]), _tensor("dense", [1, 2], "FP32", [0.5, 1])]},
                 specs=[DENSE, IDS])
    assert req.id == "req-1" and req.outputs == (("label", False),) and req.max_new_tokens == 0
    assert req.inputs["ids"].tolist() == [[3, 2**40]] and req.inputs["dense"].tolist() == [[0.5, 1.0]]
    # without "outputs": every output, binary when the request says so
    assert _infer({"inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 0])], "parameters": {"binary_data_output": True}}).outputs == (
        ("logits", True), ("probabilities", True), ("label", True))


def test_v2_token_prompts_and_generation():
    from lepton_ray.serve.validate import OutputSpec

    outs = (OutputSpec("logits", "float32", (256,)), OutputSpec("probabilities", "float32", (256,)),
            OutputSpec("continuation", "int64", (-1,), generated=True))
    req = _infer({"inputs": [_tensor("tokens", [1, 6], "UINT8", [1, 2, 3, 4, 5, 6])], "parameters": {"max_new_tokens": 5}},
                 specs=[TOK], outputs=outs, generates=True)
    assert req.inputs["tokens"].tolist() == [[3, 4, 5, 6]] and req.max_new_tokens == 5 and req.outputs == (("continuation", False),)
    plain = _infer({"inputs": [_tensor("tokens", [1, 2], "UINT8", [1, 2])]}, specs=[TOK], outputs=outs, generates=True)
    assert [n for n, _ in plain.outputs] == ["logits", "probabilities"]
    with pytest.raises(BadRequest, match=r'^outputs\[0\]: "continuation" is generated: send "parameters": \{"max_new_tokens": n\}'):
        _infer({"inputs": [_tensor("tokens", [1, 2], "UINT8", [1, 2])], "outputs": [{"name": "continuation"}]},
               specs=[TOK], outputs=outs, generates=True)


BAD_V2 = [
    ({"inputs": [_tensor("x", [1, 3], "FP64", [0, 0, 0])]},
     'inputs[0] "x": datatype "FP64" does not match the model\'s input x: FP32 [-1, 3]'),
    ({"inputs": [_tensor("x", [1, 3], "INT64", [0, 0, 0])]},
     'inputs[0] "x": datatype "INT64" does not match the model\'s input x: FP32 [-1, 3]'),
    ({"inputs": [_tensor("x", [1, 4], "FP32", [0, 0, 0, 0])]},
     'inputs[0] "x": shape [1, 4] does not match the model\'s input x: FP32 [-1, 3]'),
    ({"inputs": [_tensor("x", [3], "FP32", [0, 0, 0])]}, 'inputs[0] "x": shape [3] does not match the model\'s input x: FP32 [-1, 3]'),
    ({"inputs": [_tensor("y", [1, 3], "FP32", [0, 0, 0])]}, 'inputs[0]: unknown input "y" (the model\'s inputs: x: FP32 [-1, 3])'),
    ({"inputs": [_tensor("x", [2, 3], "FP32", [0, 0, 0, 0, 0])]}, 'inputs[0] "x": shape [2, 3] holds 6 values, "data" has 5'),
    ({"inputs": [_tensor("x", [2, 3], "FP32", [[0, 0, 0], [0, 0]])]},
     'inputs[0] "x": "data" is a ragged nested list (rows of different lengths), "shape" says [2, 3]'),
    ({"inputs": [_tensor("x", [2, 3], "FP32", [[0, 0], [0, 0], [0, 0]])]},
     'inputs[0] "x": "data" is a list of shape [3, 2], "shape" says [2, 3]'),
    ({"inputs": [_tensor("x", [1, 3], "FP32", [0, "1", 0])]}, 'inputs[0] "x": data[1]: expected a number (FP32), got "1"'),
    ({"inputs": [_tensor("x", [2, 3], "FP32", [[0, 0, 0], [0, False, 0]])]},
     'inputs[0] "x": data[1][1]: expected a number (FP32), got false'),
    ({"inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 1e39])]}, 'inputs[0] "x": data[2]: value is not finite in FP32 (NaN, inf or beyond ±3.4e+38)'),
    ({"inputs": [_tensor("x", [0, 3], "FP32", [])]}, 'inputs[0] "x": shape [0, 3] has no rows; send at least one'),
    ({"inputs": [_tensor("x", [5, 3], "FP32", [0] * 15)]}, "too many instances: 5 > 4 per request; split the request"),
    ({"inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 0]), _tensor("x", [1, 3], "FP32", [0, 0, 0])]}, 'inputs[1]: input "x" appears twice'),
    ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32"}]},
     'inputs[0] "x": missing "data" (or binary data announced by parameters.binary_data_size)'),
    ({"inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 0])], "outputs": [{"name": "scores"}]},
     'outputs[0]: unknown output "scores" (the model\'s outputs: logits, probabilities, label)'),
    ({"inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 0])], "outputs": [{"name": "label", "parameters": {"class_count": 2}}]},
     'outputs[0]: the classification extension (class_count) is not supported; ask for "probabilities" and take the top classes'),
    ({"inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 0])], "parameters": {"max_new_tokens": 3}},
     '"parameters.max_new_tokens": this model does not generate tokens (only a language model does)'),
    ({"id": 7, "inputs": [_tensor("x", [1, 3], "FP32", [0, 0, 0])]}, '"id" must be a string, got 7'),
    ({"instances": [[0, 0, 0]]}, 'missing "inputs": the body must be {"inputs": [{"name", "shape", "datatype", "data"}]} (keys found: "instances")'),
    ({"inputs": []}, '"inputs" must be a non-empty list of tensors, got []'),
]


@pytest.mark.parametrize("payload,message", BAD_V2, ids=[m[:40] for _, m in BAD_V2])
def test_v2_bad_requests_are_400s_that_say_why(payload, message):
    with pytest.raises(BadRequest) as exc:
        _infer(payload)
    assert exc.value.status == 400 and str(exc.value) == message


def test_v2_missing_and_mismatched_inputs_of_a_two_input_model():
    with pytest.raises(BadRequest) as exc:
        _infer({"inputs": [_tensor("dense", [1, 2], "FP32", [0, 0])]}, specs=[DENSE, IDS])
    assert str(exc.value) == 'missing input "ids" (the model\'s inputs: dense: FP32 [-1, 2], ids: INT64 [-1, 2])'
    with pytest.raises(BadRequest) as exc:
        _infer({"inputs": [_tensor("dense", [1, 2], "FP32", [0, 0]), _tensor("ids", [2, 2], "INT64", [0, 0, 0, 0])]},
               specs=[DENSE, IDS])
    assert str(exc.value) == 'inputs[1] "ids": shape [2, 2] has 2 rows, input "dense" has 1'


def test_v2_binary_tensor_data_as_tritons_client_sends_it():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, 2**40]], np.int64)
    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]}).encode()
    req = _infer(header + x.tobytes(), header_length=str(len(header)))
    assert np.array_equal(req.inputs["x"], x) and req.inputs["x"].flags.writeable
    header = json.dumps({"inputs": [{"name": "dense", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
                                    {"name": "ids", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": 16}}]}).encode()
    assert _infer(header + ids.tobytes(), specs=[DENSE, IDS], header_length=str(len(header))).inputs["ids"].tolist() == ids.tolist()
    with pytest.raises(BadRequest, match=r'^inputs\[0\] "x": binary_data_size 20 does not fit shape \[2, 3\] of FP32 \(24 bytes\)$'):
        bad = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 20}}]}).encode()
        _infer(bad + x.tobytes()[:20], header_length=str(len(bad)))
    with pytest.raises(BadRequest, match=r"^Inference-Header-Content-Length: 999 is not within the body's \d+ bytes$"):
        _infer(header, header_length="999")


def test_v2_response_json_and_binary():
    req = _infer({"id": "a", "inputs": [_tensor("x", [2, 3], "FP32", [0] * 6)],
                  "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}]})
    probs = np.array([[0.25, 0.5, 0.25], [1, 0, 0]], np.float32)
    body, headers = v2.encode_response("digits", req, {"label": np.array([1, 0]), "probabilities": probs, "logits": probs})
    n = int(headers["inference-header-content-length"])
    head = json.loads(body[:n])
    assert head == {"model_name": "digits", "model_version": "1", "id": "a", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]}
    assert np.array_equal(np.frombuffer(body[n:], "<f4").reshape(2, 3), probs)
    req = _infer({"inputs": [_tensor("x", [1, 3], "FP32", [0] * 3)], "outputs": [{"name": "label"}]})
    body, headers = v2.encode_response("m", req, {"label": np.array(["cat"])})
    assert headers == {"content-type": "application/json"}
    assert json.loads(body) == {"model_name": "m", "model_version": "1",
                                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]}]}
    req = _infer({"inputs": [_tensor("x", [1, 3], "FP32", [0] * 3)], "outputs": [{"name": "label", "parameters": {"binary_data": True}}]})
    body, headers = v2.encode_response("m", req, {"label": np.array(["cat"])})
    assert body[int(headers["inference-header-content-length"]):] == struct.pack("<I", 3) + b"cat"


def test_v2_metadata_spells_datatypes_and_batch_dims():
    p = Predictor(Bundle(model={"name": "mlp", "hidden": [4]}, schema=IMAGE, state=None))
    meta = v2.model_metadata("digits", p.inputs, p.outputs)
    assert meta == {"name": "digits", "versions": ["1"], "platform": "pytorch",
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 2, 2]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
                                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                                {"name": "label", "datatype": "INT64", "shape": [-1]}]}
    assert v2.server_metadata()["extensions"] == ["binary_tensor_data"]


# --------------------------------------------------------------------------- the replica's routing and batching, without Ray


def _server(uri: str, **kwargs):
    from lepton_ray.serve.app import ModelServer

    return ModelServer(uri, max_batch_size=4, **kwargs)


def _call(srv, method: str, path: str, body=b"", headers: dict = None):
    import asyncio

    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body if isinstance(body, bytes) else json.dumps(body).encode(), "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    r = asyncio.run(srv(Request(scope, receive)))
    return r.status_code, (json.loads(r.body) if r.headers["content-type"].startswith("application/json") else r.body)


@pytest.fixture
def toy(tmp_path):
    torch.manual_seed(0)
    b = Bundle(model={"name": "mlp", "hidden": [8]}, schema=FLAT, state=None, name="toy")
    b.state = b.build_fp32().state_dict()
    return write_bundle(b, str(tmp_path / "toy"))


def test_server_answers_both_protocols_and_their_errors(toy):
    srv = _server(toy, max_instances=8)
    rows = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    want = Predictor(load_bundle(toy)).predict(rows)
    code, body = _call(srv, "POST", "/predict", {"instances": rows.tolist()})
    assert code == 200 and [p["label"] for p in body["predictions"]] == want["label"].tolist()
    code, body = _call(srv, "POST", "/v2/models/toy/infer", {"id": "1", "inputs": [
        {"name": "x", "shape": [2, 6], "datatype": "FP32", "data": rows.ravel().tolist()}], "outputs": [{"name": "label"}]})
    assert code == 200 and body == {"model_name": "toy", "model_version": "1", "id": "1", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": want["label"].tolist()}]}
    assert _call(srv, "GET", "/v2/models/toy")[1]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 6]}]
    assert _call(srv, "GET", "/v2/models/toy/versions/1/ready") == (200, {"name": "toy", "ready": True})
    assert _call(srv, "GET", "/v2/health/live") == (200, {"live": True})
    assert _call(srv, "GET", "/v2")[1]["name"] == "lepton_ray"
    assert _call(srv, "GET", "/v2/models/mnist") == (404, {"error": "unknown model 'mnist'; this server serves 'toy'"})
    assert _call(srv, "GET", "/v2/models/toy/versions/3") == (404, {"error": "model 'toy' has no version '3' (versions: 1)"})
    assert _call(srv, "GET", "/v2/models/toy/infer")[0] == 405
    assert _call(srv, "POST", "/v2/models/toy/infer", {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP16", "data": [0] * 6}]}) == (
        400, {"error": 'inputs[0] "x": datatype "FP16" does not match the model\'s input x: FP32 [-1, 6]'})
    code, body = _call(srv, "POST", "/predict", b"[" * 2 + b"0" * srv.max_body)
    assert (code, body) == (413, {"error": f"request body of more than {2 + srv.max_body} bytes is larger than {srv.max_body} bytes, the "
                                           "limit for 8 instances per request; send fewer instances per request or raise the "
                                           "limit with --max-instances (serve.max_instances)"})
    assert _call(_server(toy, model_name="digits"), "GET", "/v2/models/digits")[1]["name"] == "digits"


def test_run_jobs_groups_alike_jobs_and_isolates_a_failing_one(tmp_path):
    from lepton_ray.serve.app import Job

    torch.manual_seed(0)
    b = Bundle(model=LM_MODEL, schema=TOKENS, state=None, name="lm")
    b.state = b.build_fp32().state_dict()
    srv = _server(write_bundle(b, str(tmp_path / "lm")))
    calls = []
    run = srv.predictor.run

    def counted(inputs, max_new_tokens=0, scores=True):
        calls.append((inputs["tokens"].shape, max_new_tokens))
        if (inputs["tokens"] == 7).any():
            raise ValueError("token 7 breaks this model")
        return run(inputs, max_new_tokens, scores)

    srv.predictor.run = counted
    t = lambda *rows: {"tokens": np.array(rows, np.uint8)}  # noqa: E731
    jobs = [Job(t([1, 2])), Job(t([3, 4, 5])), Job(t([6, 1], [2, 2])), Job(t([1, 2]), max_new_tokens=3, scores=False)]
    out = srv.run_jobs(jobs)
    assert sorted(calls) == sorted([((3, 2), 0), ((1, 3), 0), ((1, 2), 3)])  # rows of one shape and ask share a pass
    for job, got in zip(jobs, out):
        want = run(job.inputs, job.max_new_tokens, job.scores)
        assert set(got) == set(want) and all(np.allclose(got[k], want[k], atol=1e-6) for k in want)
    ok, bad = srv.run_jobs([Job(t([1, 2])), Job(t([7, 2]))])
    assert isinstance(bad, ValueError) and set(ok) == {"logits", "probabilities"}
    assert _call(srv, "POST", "/predict", {"instances": [[7, 1]]}) == (
        500, {"error": "the model failed on this request: ValueError: token 7 breaks this model"})


# --------------------------------------------------------------------------- config and the app builder


@pytest.mark.parametrize("values,message", [
    ({"max_accuracy_drop": -1}, "serve.max_accuracy_drop: must be in [0, 100] (accuracy points), got -1.0"),
    ({"candidates": ["int4"]}, "serve.candidates: every entry must be one of fp32, bf16, int8, compile, got [int4]"),
    ({"port": 0}, "serve.port: must be a TCP port in [1, 65535], got 0"),
    ({"auth_token_env": "MY-TOKEN"}, "serve.auth_token_env: must be an environment variable name, got 'MY-TOKEN'"),
    ({"max_batch_size": 0}, "serve.max_batch_size: must be >= 1, got 0"),
    ({"host": "localhost"}, "serve.host: must be an IP address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface), "
                            "got 'localhost'"),
    ({"host": "::"}, "serve.host: is not a loopback address: other machines reach it, so every request must carry a bearer "
                     "token: pass --auth-token-env NAME (serve.auth_token_env), NAME an environment variable holding the token, "
                     "or bind 127.0.0.1, got '::'"),
])
def test_serve_config_errors(values, message):
    with pytest.raises(ConfigError) as exc:
        load_config({"data": {"train": "x"}, "serve": values})
    assert str(exc.value) == message


def test_serve_run_builder_validates_its_arguments(tmp_path):
    from lepton_ray.serve.app import app

    assert type(app({"bundle": str(tmp_path), "max_batch_size": "16", "model_name": "digits"})).__name__ == "Application"
    with pytest.raises(ConfigError, match=r"^serve.max_batch_sise: unknown key \(did you mean 'max_batch_size'\?\)"):
        app({"bundle": str(tmp_path), "max_batch_sise": "16"})
    with pytest.raises(BundleError, match=r"^--name: 'a/b' is not a model name"):
        app({"bundle": str(tmp_path), "model_name": "a/b"})
    with pytest.raises(ValueError, match="needs bundle=URI"):
        app({})
