"""Serving pieces without Ray: bundles (safe format, atomic, verified), forms, the optimizer's gate, validation, config."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray.config import ConfigError, ServeConfig, load_config
from lepton_ray.models import build_model
from lepton_ray.serve.bundle import Bundle, BundleError, load_bundle, load_checkpoint, write_bundle
from lepton_ray.serve.forms import make_form
from lepton_ray.serve.optimize import optimize
from lepton_ray.serve.predictor import Predictor
from lepton_ray.serve.validate import BadRequest, parse_instances
from lepton_ray.train.checkpoint import CheckpointStore


def _checkpoint(tmp_path, hidden=(16,), d=6, n=3):
    cfg = load_config({"data": {"train": "unused"}, "model": {"hidden": list(hidden)}})
    torch.manual_seed(0)
    net = build_model(cfg.model, d, n)
    feats = [f"f{i}" for i in range(d)]
    ckpt = CheckpointStore(str(tmp_path / "ckpt")).save(7, {"model": net.state_dict()}, {
        "step": 7, "config": cfg.to_dict(),
        "model_io": {"input_dim": d, "num_outputs": n, "features": feats, "label": "y", "task": "classification"}})
    return ckpt, net.eval(), feats


def test_checkpoint_loads_as_fp32_bundle_by_step_or_root(tmp_path):
    ckpt, net, feats = _checkpoint(tmp_path)
    for uri in (ckpt.uri, str(tmp_path / "ckpt")):
        b = load_checkpoint(uri)
        assert (b.input_dim, b.num_outputs, b.features, b.label, b.form) == (6, 3, feats, "y", "fp32")
        x = torch.randn(4, 6)
        assert torch.equal(b.build_fp32()(x), net(x))


def test_bundle_round_trip_is_safetensors_and_verified(tmp_path):
    ckpt, net, _ = _checkpoint(tmp_path)
    b = load_checkpoint(ckpt.uri)
    b.form = "int8"
    out = tmp_path / "bundle"
    write_bundle(b, str(out), report={"chosen": "int8"})
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.safetensors", "optimize_report.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no temporary left behind
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["form"] == "int8" and meta["input"] == {"features": b.features, "dim": 6, "dtype": "float32"}
    back = load_bundle(str(out))
    x = torch.randn(5, 6)
    assert torch.equal(back.build_fp32()(x), net(x))
    # rewriting replaces atomically; tampering is detected
    write_bundle(back, str(out))
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the SHA-256 in bundle.json"):
        load_bundle(str(out))


def test_missing_bundle_names_what_was_expected(tmp_path):
    with pytest.raises(BundleError, match=r"is neither a serving bundle \(bundle.json\) nor a lepton_ray checkpoint"):
        load_bundle(str(tmp_path / "nothing"))


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


def test_predictor_probabilities_and_labels():
    b = Bundle(model={"name": "mlp", "hidden": [4]}, input_dim=3, num_outputs=2, features=["a", "b", "c"], state=None,
               labels=["cat", "dog"])
    p = Predictor(b)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    out = p.predict(x)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-6)
    logits = p.logits(x)
    assert out["label"].tolist() == [["cat", "dog"][i] for i in logits.argmax(1)]


def test_optimizer_gate_with_bound_zero_picks_fp32_accuracy(tmp_path):
    ckpt, net, feats = _checkpoint(tmp_path, hidden=(64, 64), d=16, n=4)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    y = rng.integers(0, 4, 400)  # random labels: fp32 accuracy is ~25%, forms may differ from it
    pq.write_table(pa.table({**{f: x[:, i] for i, f in enumerate(feats)}, "y": y}), tmp_path / "eval.parquet")
    rep = optimize(ckpt.uri, str(tmp_path / "eval.parquet"), str(tmp_path / "b"),
                   config=ServeConfig(max_accuracy_drop=0.0, candidates=["bf16", "int8"]), verbose=False)
    with torch.inference_mode():
        ref = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean() * 100)
    assert rep["forms"]["fp32"]["accuracy"] == pytest.approx(ref)
    assert rep["forms"][rep["chosen"]]["accuracy"] >= ref
    assert set(rep["forms"]) == {"fp32", "bf16", "int8"}
    assert load_bundle(str(tmp_path / "b")).form == rep["chosen"]


def test_parse_instances_accepts_lists_and_objects():
    x = parse_instances(b'{"instances": [[1, 2.5], {"b": 4, "a": 3}]}', features=["a", "b"], dim=2, max_instances=4)
    assert x.dtype == np.float32 and x.tolist() == [[1.0, 2.5], [3.0, 4.0]]


def test_parse_instances_rejects_objects_for_a_list_column_model():
    with pytest.raises(BadRequest, match=r"instances\[0\]: this model reads 4 values from 1 column\(s\)"):
        parse_instances(b'{"instances": [{"img": [1, 2, 3, 4]}]}', features=["img"], dim=4, max_instances=4)


@pytest.mark.parametrize("values,message", [
    ({"max_accuracy_drop": -1}, "serve.max_accuracy_drop: must be in [0, 100] (accuracy points), got -1.0"),
    ({"candidates": ["int4"]}, "serve.candidates: every entry must be one of fp32, bf16, int8, compile, got [int4]"),
    ({"port": 0}, "serve.port: must be a TCP port in [1, 65535], got 0"),
    ({"auth_token_env": "MY-TOKEN"}, "serve.auth_token_env: must be an environment variable name, got 'MY-TOKEN'"),
    ({"max_batch_size": 0}, "serve.max_batch_size: must be >= 1, got 0"),
])
def test_serve_config_errors(values, message):
    with pytest.raises(ConfigError) as exc:
        load_config({"data": {"train": "x"}, "serve": values})
    assert str(exc.value) == message


def test_serve_run_builder_validates_its_arguments(tmp_path):
    from lepton_ray.serve.app import app

    assert type(app({"bundle": str(tmp_path), "max_batch_size": "16"})).__name__ == "Application"
    with pytest.raises(ConfigError, match=r"^serve.max_batch_sise: unknown key \(did you mean 'max_batch_size'\?\)"):
        app({"bundle": str(tmp_path), "max_batch_sise": "16"})
    with pytest.raises(ValueError, match="needs bundle=URI"):
        app({})
