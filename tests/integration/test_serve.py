"""Serving end to end: train digits (tiny) -> optimize -> Ray Serve on 127.0.0.1 -> real HTTP; batch prediction on S3.

One training run and one Serve instance per module; Serve is shut down at the end so the
session cluster is left as it was for the other modules.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_ray import Trainer, load_config
from lepton_ray.config import ServeConfig
from lepton_ray.serve import load_bundle, optimize, predict
from lepton_ray.serve.predictor import Predictor

TOKEN_ENV = "LEPTON_RAY_TEST_SERVE_TOKEN"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """A tiny digits model (40 steps, 1 worker) and its held-out split."""
    root = tmp_path_factory.mktemp("serve")
    cfg = load_config({
        "model": {"name": "mlp", "hidden": [32]},
        "data": {"train": str(root / "data/train.parquet"), "eval": str(root / "data/eval.parquet"), "builder": "digits"},
        "train": {"max_steps": 40, "batch_size": 64, "lr": 0.1, "seed": 0},
        "scaling": {"num_workers": 1},
        "checkpoint": {"every_n_steps": 0},
        "run": {"dir": str(root / "runs"), "name": "digits"},
    })
    result = Trainer(cfg, progress=False).fit()
    return {"root": root, "checkpoint": result.checkpoint, "eval": str(root / "data/eval.parquet"),
            "accuracy": result.metrics["eval_accuracy"]}


@pytest.fixture(scope="module")
def optimized(trained):
    """Optimize with a bound of 0 accuracy points: the chosen form must be exactly as accurate as fp32."""
    bundle = str(trained["root"] / "bundle")
    report = optimize(trained["checkpoint"], trained["eval"], bundle,
                      config=ServeConfig(max_accuracy_drop=0.0, candidates=["fp32", "bf16", "int8"]), verbose=False)
    return {"bundle": bundle, "report": report}


@pytest.fixture(scope="module")
def served(optimized):
    """The bundle served at / (no auth) and at /secure (bearer token), both on 127.0.0.1."""
    from ray import serve

    from lepton_ray.serve.app import deploy

    os.environ[TOKEN_ENV] = TOKEN
    port = free_port()
    try:
        url = deploy(optimized["bundle"], ServeConfig(port=port, max_instances=64, batch_wait_ms=5.0))
        secure = deploy(optimized["bundle"], ServeConfig(port=port, auth_token_env=TOKEN_ENV),
                        name="secure", route_prefix="/secure")
        yield {"url": url, "secure": secure, "bundle": optimized["bundle"]}
    finally:
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def eval_rows(trained):
    table = pq.read_table(trained["eval"])
    x = np.stack([table.column(f"px{i}").to_numpy() for i in range(64)], axis=1).astype(np.float32)
    return x, table.column("label").to_numpy()


# ------------------------------------------------------------------ optimizer


def test_optimizer_respects_a_zero_accuracy_bound(trained, optimized):
    """Bound 0: the chosen form's held-out accuracy equals fp32's; it is the fastest such form; the bundle says so."""
    report = optimized["report"]
    forms, chosen = report["forms"], report["chosen"]
    assert forms["fp32"]["accuracy"] == pytest.approx(trained["accuracy"] * 100, abs=1e-6)  # same eval as training
    assert forms[chosen]["accuracy"] == forms["fp32"]["accuracy"]
    accurate = [n for n, r in forms.items() if not r.get("error") and r["accuracy"] >= forms["fp32"]["accuracy"]]
    assert chosen == min(accurate, key=lambda n: forms[n]["latency_ms_batch"])
    for name, r in forms.items():  # a less accurate form is never marked acceptable
        if not r.get("error"):
            assert r["accurate"] == (r["accuracy"] >= forms["fp32"]["accuracy"]), name
    written = json.loads((Path(optimized["bundle"]) / "optimize_report.json").read_text())
    assert written["chosen"] == chosen
    assert load_bundle(optimized["bundle"]).form == chosen


# ------------------------------------------------------------------ HTTP: happy path


def test_health_endpoints(served):
    r = requests.get(served["url"] + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert requests.get(served["url"] + "/livez", timeout=10).status_code == 200


def test_http_predictions_equal_offline_predictions(served, eval_rows):
    """Rows sent over HTTP (one by one, and 8 concurrent clients) get the offline model's answers."""
    x, _ = eval_rows
    offline = Predictor(load_bundle(served["bundle"]))
    url = served["url"] + "/predict"

    # one request per 4 rows, sequentially: each model call sees exactly these rows
    for start in range(0, 40, 4):
        rows = x[start:start + 4]
        want = offline.predict(rows)
        got = requests.post(url, json={"instances": rows.tolist()}, timeout=30).json()["predictions"]
        assert [p["label"] for p in got] == want["label"].tolist()
        np.testing.assert_allclose([p["probabilities"] for p in got], want["probabilities"], rtol=0, atol=1e-6)

    # concurrent clients: requests are batched together; labels are the offline labels
    def ask(i: int) -> list:
        return requests.post(url, json={"instances": x[i:i + 2].tolist()}, timeout=60).json()["predictions"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(0, 128, 2)))
    got_labels = [p["label"] for a in answers for p in a]
    assert got_labels == offline.predict(x[:128])["label"].tolist()


def test_instances_as_objects_by_feature_name(served, eval_rows):
    x, _ = eval_rows
    objects = [{f"px{j}": float(v) for j, v in enumerate(row)} for row in x[:3]]
    by_name = requests.post(served["url"] + "/predict", json={"instances": objects}, timeout=30).json()
    by_list = requests.post(served["url"] + "/predict", json={"instances": x[:3].tolist()}, timeout=30).json()
    assert by_name == by_list


def test_metrics_count_requests_errors_and_batches(served, eval_rows):
    url = served["url"]
    requests.post(url + "/predict", json={"instances": eval_rows[0][:1].tolist()}, timeout=30)
    requests.post(url + "/predict", data=b"{", timeout=30)
    text = requests.get(url + "/metrics", timeout=10).text

    def value(pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        assert m, f"{pattern} not in /metrics"
        return float(m.group(1))

    assert value(r'^lepton_ray_serve_requests_total\{code="200",path="/predict"\} (\S+)') >= 1
    assert value(r'^lepton_ray_serve_errors_total\{code="400"\} (\S+)') >= 1
    assert value(r"^lepton_ray_serve_batch_size_count (\S+)") >= 1
    assert value(r"^lepton_ray_serve_request_latency_seconds_count (\S+)") >= 1


# ------------------------------------------------------------------ HTTP: client mistakes are 400s


BAD = {
    "malformed-json": (b'{"instances": [[0.1, 0.2]', "malformed JSON: Expecting ',' delimiter: line 1 column 26 (char 25)"),
    "not-an-object": (b"[[0.0]]", 'the body must be a JSON object like {"instances": [[...], ...]}, got list'),
    "missing-instances": (b'{"rows": [[0.0]]}', 'missing "instances": the body must be {"instances": [[...], ...]} (keys found: "rows")'),
    "instances-not-a-list": (b'{"instances": 3}', '"instances" must be a list of rows, got 3'),
    "empty-instances": (b'{"instances": []}', '"instances" is empty: send at least one row'),
    "wrong-feature-count": (json.dumps({"instances": [[0.0] * 64, [0.0] * 63]}).encode(), "instances[1]: expected 64 feature values, got 63"),
    "non-numeric": (json.dumps({"instances": [[0.0] * 10 + ["x"] + [0.0] * 53]}).encode(), 'instances[0][10]: expected a number, got "x"'),
    "boolean": (json.dumps({"instances": [[True] + [0.0] * 63]}).encode(), "instances[0][0]: expected a number, got true"),
    "nan": (b'{"instances": [[NaN' + b", 0" * 63 + b"]]}", "malformed JSON: NaN is not allowed; every feature value must be a finite number"),
    "infinity": (b'{"instances": [[0' + b", 0" * 62 + b", -Infinity]]}", "malformed JSON: -Infinity is not allowed; every feature value must be a finite number"),
    "overflow": (b'{"instances": [[0' + b", 0" * 62 + b", 1e999]]}", "instances[0][63]: value is not finite in float32 (NaN, inf or beyond ±3.4e+38)"),
    "too-many-instances": (json.dumps({"instances": [[0.0] * 64] * 65}).encode(), "too many instances: 65 > 64 per request; split the request"),
    "unknown-feature": (json.dumps({"instances": [{**{f"px{i}": 0.0 for i in range(64)}, "pz": 1.0}]}).encode(), 'instances[0]: unknown feature "pz" (features: px0, px1, px2, px3, px4, px5, px6, px7, ...)'),
    "missing-feature": (json.dumps({"instances": [{f"px{i}": 0.0 for i in range(63)}]}).encode(), 'instances[0]: missing feature "px63"'),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_400_that_says_why(served, name):
    body, message = BAD[name]
    r = requests.post(served["url"] + "/predict", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": message}


def test_get_on_predict_is_405_and_unknown_path_404(served):
    assert requests.get(served["url"] + "/predict", timeout=10).status_code == 405
    r = requests.get(served["url"] + "/nope", timeout=10)
    assert r.status_code == 404 and "no endpoint /nope" in r.json()["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=30,
)
bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["instances", "inputs", "px0"]), json_values, max_size=3).map(lambda v: json.dumps(v).encode()),
    st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(), min_size=63, max_size=65),
             min_size=1, max_size=3).map(lambda rows: json.dumps({"instances": rows}).encode()),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_random_bodies_never_get_a_5xx(served, body):
    r = requests.post(served["url"] + "/predict", data=body, timeout=30)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code == 200:
        assert len(r.json()["predictions"]) == len(json.loads(body)["instances"])
    else:
        assert r.status_code == 400 and r.json()["error"]


# ------------------------------------------------------------------ auth


def test_auth_token_required_except_health(served, eval_rows):
    url = served["secure"]
    body = {"instances": eval_rows[0][:2].tolist()}
    assert requests.post(url + "/predict", json=body, timeout=30).status_code == 401
    wrong = requests.post(url + "/predict", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    ok = requests.post(url + "/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert requests.get(url + "/livez", timeout=10).status_code == 200


# ------------------------------------------------------------------ batch prediction


def test_batch_prediction_on_s3_writes_one_prediction_per_row(optimized, eval_rows, bucket):
    import s3fs

    x, _ = eval_rows
    n = len(x)
    ids = np.arange(1000, 1000 + n)
    cols = {"id": ids, **{f"px{i}": x[:, i] for i in range(64)}}
    fs = s3fs.S3FileSystem()
    for part, sl in enumerate((slice(0, n // 2), slice(n // 2, n))):  # two input files
        with fs.open(f"{bucket}/in/part-{part}.parquet", "wb") as fh:
            pq.write_table(pa.table({k: v[sl] for k, v in cols.items()}), fh)

    out = predict(optimized["bundle"], f"s3://{bucket}/in", f"s3://{bucket}/out", batch_size=100)
    assert out["rows"] == n
    files = [f for f in fs.find(f"{bucket}/out") if f.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files]).sort_by("id")
    assert table.num_rows == n
    assert table.column("id").to_numpy().tolist() == ids.tolist()  # every row exactly once
    want = Predictor(load_bundle(optimized["bundle"])).predict(x)["label"]
    assert (table.column("label").to_numpy() == want).mean() >= 0.99  # int8 activations are scaled per batch
