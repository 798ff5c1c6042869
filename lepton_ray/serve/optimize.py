"""Quality-gated optimization: time every form of a model, keep the fastest one that is still as good.

For each candidate form (``serve.candidates``: fp32, bf16, int8, compile) the optimizer
measures the latency of one forward pass at batch 1 and at ``serve.bench_batch_size``
(median of repeated calls, torch on ``serve.threads_per_replica`` threads, as in a
replica, on real held-out rows) and the quality on a held-out Parquet set, read with the
bundle's schema (:func:`~lepton_ray.data.schema.decode`) and scored by the training
metrics (:class:`~lepton_ray.train.losses.Evaluator`). The gate metric is the first of:

* ``bits_per_byte`` (a language model; always computed for one) — lower is better;
* ``accuracy``, then ``auc`` — higher is better, reported in percent;
* ``mse``, then the eval ``loss`` — lower is better.

A form passes when it is at most ``serve.max_accuracy_drop`` points below fp32's (percent
metrics) or at most that many percent above fp32's (lower-is-better metrics). The
optimizer picks the passing form with the lowest batch latency, writes a serving bundle
with ``optimize_report.json`` and prints a table.

>>> report = optimize("runs/digits/checkpoints/step_00000660", "data/digits/eval.parquet",
...                   "bundles/digits")  # doctest: +SKIP
>>> report["chosen"], report["metric"]  # doctest: +SKIP
('int8', 'accuracy')
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from lepton_ray.config import ConfigError, ServeConfig
from lepton_ray.console import progress_bar
from lepton_ray.data.schema import Schema, decode
from lepton_ray.serve.bundle import load_bundle, write_bundle
from lepton_ray.serve.forms import FormUnavailable
from lepton_ray.serve.predictor import Predictor
from lepton_ray.storage import arrow_filesystem, filesystem
from lepton_ray.train.losses import Evaluator, make_loss, model_inputs

__all__ = ["optimize", "evaluate", "gate_metric", "read_split", "time_forward", "format_report"]

_GATES = (("bits_per_byte", False), ("accuracy", True), ("auc", True), ("mse", False), ("loss", False))
"""Gate metrics in order of preference, with whether higher is better."""
_PERCENT = ("accuracy", "auc")


def time_forward(fn: Any, x: Any, budget_s: float = 0.5, min_calls: int = 5) -> float:
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


def read_split(key: str, uri: str, schema: Schema, storage_options: Optional[dict] = None) -> dict[str, np.ndarray]:
    """Every row of the Parquet data at ``uri`` as one array per input and target of ``schema`` (``[N, *shape]``).

    A missing column, or one whose values do not fit the schema's shape, is a ``ConfigError`` naming ``key``.
    """
    from lepton_ray.data.table import list_parquet

    files = list_parquet(key, uri, storage_options)
    fs, _ = filesystem(uri, storage_options)
    afs = arrow_filesystem(fs)
    names = pq.read_schema(files[0], filesystem=afs).names
    for c in schema.columns:
        for col in c.columns:
            if col not in names:
                what = "input" if c in schema.inputs else "target"
                raise ConfigError(f"{key}: column '{col}' ({what} {c.name}) is not in '{uri}' (columns: {', '.join(names)})")
    table = pq.ParquetDataset(files, filesystem=afs).read(columns=schema.parquet_columns())
    try:
        return decode(schema, table, key=key, uri=uri)
    except ValueError as exc:  # a reshape that does not fit: the file's columns are not the trained shapes
        if isinstance(exc, ConfigError):
            raise
        shapes = ", ".join(f"{c.name}: {c.dtype} {list(c.shape)}" for c in schema.columns)
        raise ConfigError(f"{key}: the columns of '{uri}' do not have the model's shapes ({shapes}): {exc}") from None


def gate_metric(result: dict[str, float]) -> tuple[str, bool]:
    """The metric the gate compares (the first of bits_per_byte, accuracy, auc, mse, loss) and whether higher is better."""
    return next((m, hi) for m, hi in _GATES if m in result)


def _evaluator(pred: Predictor) -> Evaluator:
    b = pred.bundle
    mcfg = dataclasses.replace(b.model_config(), loss=b.loss)
    metrics = list(b.metric_names or [])
    if pred.head == "language_model" and "bits_per_byte" not in metrics:
        metrics.append("bits_per_byte")
    return Evaluator(make_loss(mcfg, b.schema), metrics)


def evaluate(pred: Predictor, data: dict[str, np.ndarray], batch: int = 512) -> dict[str, float]:
    """The training metrics of ``pred`` on ``data`` (inputs and targets): ``loss`` plus the bundle's metrics
    (``bits_per_byte`` too for a language model); ``accuracy`` and ``auc`` in percent."""
    ev = _evaluator(pred)
    rows = len(next(iter(data.values())))
    with torch.inference_mode():
        for i in range(0, rows, batch):
            tensors = pred.tensors({k: v[i:i + batch] for k, v in data.items()})
            ev.update(pred.call(tensors), tensors)
    out = ev.result()
    return {k: (v * 100.0 if k in _PERCENT else v) for k, v in out.items()}


def _passes(metric: str, higher: bool, m: dict[str, float], ref: dict[str, float], max_drop: float) -> bool:
    if higher:
        return m[metric] >= ref[metric] - max_drop - 1e-9
    return m[metric] <= ref[metric] * (1.0 + max_drop / 100.0) + 1e-12


def format_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width table (one row per form, the chosen one marked)."""
    metric = report["metric"]
    bs = report["bench_batch_size"]
    width = max(9, len(metric))
    lines = [f"{'form':<8} {metric:>{width}} {'ms@1':>8} {f'ms@{bs}':>8} {'rows/s':>10}  note"]
    for name, r in report["forms"].items():
        if r.get("error"):
            lines.append(f"{name:<8} {'-':>{width}} {'-':>8} {'-':>8} {'-':>10}  unavailable: {r['error']}")
            continue
        mark = "<- chosen" if name == report["chosen"] else ("" if r["accurate"] else f"rejected: {metric}")
        lines.append(f"{name:<8} {r[metric]:>{width}.4f} {r['latency_ms_batch1']:>8.3f} {r['latency_ms_batch']:>8.3f}"
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
    progress: bool = False,
) -> dict[str, Any]:
    """Benchmark every candidate form of ``checkpoint`` (or bundle) and write a serving bundle.

    Returns the report (also written as ``<output>/optimize_report.json``); ``report["chosen"]``
    is the selected form, ``report["metric"]`` the gate metric. ``eval_data`` is a Parquet file or
    directory with the model's input and target columns (as in training). ``verbose``: print the table;
    ``progress``: a bar of the forms measured on stderr (the CLI's default).
    """
    cfg = config or ServeConfig()
    src = load_bundle(checkpoint, storage_options)
    data = read_split("--eval", eval_data, src.schema, storage_options)
    rows = len(next(iter(data.values())))
    inputs = {c.name: data[c.name] for c in src.schema.inputs}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads_per_replica)
    try:
        rng = np.random.default_rng(0)  # representative batches: real held-out rows
        pick = rng.integers(0, rows, cfg.bench_batch_size)
        forms: dict[str, dict[str, Any]] = {}
        names = list(dict.fromkeys(["fp32", *cfg.candidates]))  # fp32 is always the reference
        bar = progress_bar(len(names), "optimize", "form", enabled=progress, iterable=names)
        for name in bar:  # counted as each form is done
            bar.set_postfix_str(name)
            try:
                pred = Predictor(src, form=name)
            except FormUnavailable as exc:
                forms[name] = {"error": str(exc)}
                continue
            batch = model_inputs(pred.tensors({k: v[pick] for k, v in inputs.items()}), pred.input_names, src.loss)
            one = model_inputs(pred.tensors({k: v[pick[:1]] for k, v in inputs.items()}), pred.input_names, src.loss)
            lat1 = time_forward(pred.fn, one)
            latb = time_forward(pred.fn, batch)
            forms[name] = {**evaluate(pred, data), "latency_ms_batch1": lat1 * 1e3, "latency_ms_batch": latb * 1e3,
                           "rows_per_s": cfg.bench_batch_size / latb}
    finally:
        torch.set_num_threads(threads)
    ref = forms["fp32"]
    metric, higher = gate_metric(ref)
    for r in forms.values():
        if not r.get("error"):
            r["accurate"] = _passes(metric, higher, r, ref, cfg.max_accuracy_drop)
    ok = [n for n, r in forms.items() if not r.get("error") and r["accurate"]]
    chosen = min(ok, key=lambda n: forms[n]["latency_ms_batch"])
    report = {
        "source": src.source or checkpoint, "eval": eval_data, "eval_rows": int(rows), "task": src.task,
        "metric": metric, "higher_is_better": higher, "percent": metric in _PERCENT,
        "max_accuracy_drop": cfg.max_accuracy_drop, "bench_batch_size": cfg.bench_batch_size,
        "threads": cfg.threads_per_replica, "torch": torch.__version__, "forms": forms, "chosen": chosen,
        "speedup_vs_fp32": ref["latency_ms_batch"] / forms[chosen]["latency_ms_batch"],
    }
    if output is not None:
        out = dataclasses.replace(src, form=chosen, metrics={**src.metrics, "optimize": {
            "form": chosen, "metric": metric, metric: forms[chosen][metric], "fp32": ref[metric]}})
        write_bundle(out, output, report=report, storage_options=storage_options)
        report["bundle"] = output
    if verbose:
        print(format_report(report))
        bound = (f"at most {cfg.max_accuracy_drop:g} points below fp32" if higher
                 else f"at most {cfg.max_accuracy_drop:g}% above fp32")
        print(f"chosen: {chosen} ({report['speedup_vs_fp32']:.2f}x fp32 at batch {cfg.bench_batch_size}; "
              f"{metric} {bound})" + (f"; bundle: {output}" if output else ""))
    return report
