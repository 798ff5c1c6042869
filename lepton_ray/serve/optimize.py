"""Accuracy-gated optimization: time every form of a model, keep the fastest accurate one.

For each candidate form (``serve.candidates``: fp32, bf16, int8, compile) the optimizer
measures the latency of one forward pass at batch 1 and at ``serve.bench_batch_size``
(median of repeated calls, torch on ``serve.threads_per_replica`` threads, as in a
replica) and the accuracy on a held-out Parquet set. It picks the form with the lowest
batch latency whose accuracy is at most ``serve.max_accuracy_drop`` points below
fp32's (regression: whose MSE is at most that many percent above fp32's), writes a
serving bundle with ``optimize_report.json`` and prints a table.

>>> report = optimize("runs/digits/checkpoints/step_00000660", "data/digits/eval.parquet",
...                   "bundles/digits")  # doctest: +SKIP
>>> report["chosen"]  # doctest: +SKIP
'int8'
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import numpy as np
import torch

from lepton_ray.config import DataConfig, ServeConfig
from lepton_ray.data.pipeline import describe, load_arrays
from lepton_ray.serve.bundle import Bundle, load_bundle, write_bundle
from lepton_ray.serve.forms import FormUnavailable
from lepton_ray.serve.predictor import Predictor

__all__ = ["optimize", "evaluate", "time_forward", "format_report"]


def time_forward(fn: Any, x: torch.Tensor, budget_s: float = 0.5, min_calls: int = 5) -> float:
    """Median seconds per ``fn(x)`` call (after warm-up), calling for about ``budget_s``."""
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        end = time.perf_counter() + budget_s
        while len(times) < min_calls or (time.perf_counter() < end and len(times) < 10_000):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def evaluate(pred: Predictor, x: np.ndarray, y: np.ndarray, batch: int = 512) -> dict[str, float]:
    """Accuracy in percent (classification) or MSE (regression) of ``pred`` on ``(x, y)``."""
    outs = np.concatenate([pred.logits(x[i:i + batch]) for i in range(0, len(x), batch)])
    if pred.bundle.task == "classification":
        return {"accuracy": float((outs.argmax(axis=1) == y).mean() * 100.0)}
    target = y.reshape(len(y), -1).astype(np.float32)
    return {"mse": float(((outs.reshape(target.shape) - target) ** 2).mean())}


def _accurate_enough(task: str, m: dict[str, float], ref: dict[str, float], max_drop: float) -> bool:
    if task == "classification":
        return m["accuracy"] >= ref["accuracy"] - max_drop - 1e-9
    return m["mse"] <= ref["mse"] * (1.0 + max_drop / 100.0) + 1e-12


def format_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width table (one row per form, the chosen one marked)."""
    metric = "accuracy" if report["task"] == "classification" else "mse"
    bs = report["bench_batch_size"]
    lines = [f"{'form':<8} {metric:>9} {'ms@1':>8} {f'ms@{bs}':>8} {'rows/s':>10}  note"]
    for name, r in report["forms"].items():
        if r.get("error"):
            lines.append(f"{name:<8} {'-':>9} {'-':>8} {'-':>8} {'-':>10}  unavailable: {r['error']}")
            continue
        mark = "<- chosen" if name == report["chosen"] else ("" if r["accurate"] else "rejected: accuracy")
        lines.append(f"{name:<8} {r[metric]:>9.4f} {r['latency_ms_batch1']:>8.3f} {r['latency_ms_batch']:>8.3f}"
                     f" {r['rows_per_s']:>10.0f}  {mark}")
    return "\n".join(lines)


def optimize(
    checkpoint: str,
    eval_data: str,
    output: Optional[str] = None,
    *,
    config: Optional[ServeConfig] = None,
    storage_options: Optional[dict] = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Benchmark every candidate form of ``checkpoint`` (or bundle) and write a serving bundle.

    Returns the report (also written as ``<output>/optimize_report.json``); ``report["chosen"]``
    is the selected form. ``eval_data`` is a Parquet file or directory with the model's
    feature columns and its label column.
    """
    cfg = config or ServeConfig()
    src = load_bundle(checkpoint, storage_options)
    info = describe("--eval", eval_data, DataConfig(train=eval_data, label=src.label, features=list(src.features),
                                                    storage_options=dict(storage_options or {})))
    x, y = load_arrays(info, dict(storage_options or {}))
    if x.shape[1] != src.input_dim:
        raise ValueError(f"--eval: '{eval_data}' has {x.shape[1]} feature values per row, the model takes {src.input_dim}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads_per_replica)
    try:
        rng = np.random.default_rng(0)  # representative batches: real held-out rows
        batch = torch.from_numpy(x[rng.integers(0, len(x), cfg.bench_batch_size)])
        forms: dict[str, dict[str, Any]] = {}
        for name in dict.fromkeys(["fp32", *cfg.candidates]):  # fp32 is always the reference
            try:
                pred = Predictor(src, form=name)
            except FormUnavailable as exc:
                forms[name] = {"error": str(exc)}
                continue
            lat1 = time_forward(pred.fn, batch[:1])
            latb = time_forward(pred.fn, batch)
            forms[name] = {**evaluate(pred, x, y), "latency_ms_batch1": lat1 * 1e3, "latency_ms_batch": latb * 1e3,
                           "rows_per_s": len(batch) / latb}
    finally:
        torch.set_num_threads(threads)
    ref = forms["fp32"]
    for r in forms.values():
        if not r.get("error"):
            r["accurate"] = _accurate_enough(src.task, r, ref, cfg.max_accuracy_drop)
    ok = [n for n, r in forms.items() if not r.get("error") and r["accurate"]]
    chosen = min(ok, key=lambda n: forms[n]["latency_ms_batch"])
    report = {
        "source": src.source or checkpoint, "eval": eval_data, "eval_rows": int(len(x)), "task": src.task,
        "max_accuracy_drop": cfg.max_accuracy_drop, "bench_batch_size": cfg.bench_batch_size,
        "threads": cfg.threads_per_replica, "torch": torch.__version__, "forms": forms, "chosen": chosen,
        "speedup_vs_fp32": ref["latency_ms_batch"] / forms[chosen]["latency_ms_batch"],
    }
    if output is not None:
        out = Bundle(**{**src.__dict__, "form": chosen,
                        "metrics": {**src.metrics, **{k: v for k, v in forms[chosen].items() if k in ("accuracy", "mse")}}})
        write_bundle(out, output, report=report, storage_options=storage_options)
        report["bundle"] = output
    if verbose:
        print(format_report(report))
        print(f"chosen: {chosen} ({report['speedup_vs_fp32']:.2f}x fp32 at batch {cfg.bench_batch_size})"
              + (f"; bundle: {output}" if output else ""))
    return report
