"""A sweep's outputs: the trials table (terminal, ``sweep_results.csv``), the plot, ``best.json``.

One row per trial, built from the trial's own files (``trial.json``, ``result.json``,
``metrics.jsonl``) and the last result Tune recorded, so the table is the same
whether the sweep ran in one go or was interrupted and continued.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from lepton_ray.train.checkpoint import CheckpointStore

__all__ = ["TrialRow", "trial_row", "results_frame", "format_table", "best_row", "write_plot", "COMPLETED", "STOPPED", "ERROR"]

COMPLETED, STOPPED, ERROR, RUNNING, PENDING = "completed", "stopped early", "error", "running", "pending"

TrialRow = dict[str, Any]


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run directory's ``metrics.jsonl`` records (none if it has no file yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the writer (the metrics sink) was killed
            continue
    return out


def trial_row(trials_dir: Path, trial_id: str, params: dict[str, Any], last: dict[str, Any], metric: str,
              tune_status: str, error: bool = False) -> TrialRow:
    """One trial's row: its sampled params, effective lr and batch, status, evaluations, metric, checkpoint."""
    run_dir = trials_dir / trial_id
    info = json.loads((run_dir / "trial.json").read_text()) if (run_dir / "trial.json").exists() else {}
    done = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else None
    train = info.get("config", {}).get("train", {})
    if done is not None:
        status = COMPLETED
    elif error:
        status = ERROR
    elif tune_status == "TERMINATED":
        status = STOPPED
    else:
        status = RUNNING if tune_status == "RUNNING" else PENDING
    value = done.get(metric) if done is not None else last.get(metric)
    checkpoint = done.get("checkpoint") if done is not None else None
    if checkpoint is None and info.get("checkpoint_uri"):
        latest = CheckpointStore(info["checkpoint_uri"]).latest()
        checkpoint = latest.uri if latest else None
    # launch overhead: from the trial function starting to the first optimizer step of that launch
    records = read_records(run_dir)
    firsts = [r["time"] for r in records if r.get("event") == "first_step"]
    launches = info.get("launches", [])
    launch_s = (firsts[0] - launches[0]) if firsts and launches and firsts[0] >= launches[0] else None
    return {
        "trial": trial_id,
        **params,
        "lr": train.get("lr"),
        "batch_size": train.get("batch_size"),
        "status": status,
        "evaluations": int(last.get("evaluation", 0) or 0),
        metric: value,
        "launches": len(launches),
        "started_at": launches[0] if launches else None,
        "last_report_at": last.get("reported_at"),
        "launch_s": launch_s,
        "checkpoint": checkpoint,
    }


def results_frame(rows: list[TrialRow]) -> pd.DataFrame:
    return pd.DataFrame(rows).sort_values("trial", kind="stable").reset_index(drop=True)


def format_table(rows: list[TrialRow], metric: str) -> str:
    """The terminal table: trial, swept params, lr, batch size, status, evaluations, metric."""
    if not rows:
        return "(no trials yet)"
    df = results_frame(rows)
    hide = {"checkpoint", "launches", "launch_s", "started_at", "last_report_at"}
    for effective, swept in (("lr", "train.lr"), ("batch_size", "train.batch_size")):
        if swept in df.columns and df[effective].equals(df[swept]):
            hide.add(effective)  # the same values: show the swept column only
    cols = [c for c in df.columns if c not in hide]
    df = df[cols].astype(object).map(_cell)
    return df.to_string(index=False)


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else v


def best_row(rows: list[TrialRow], metric: str, mode: str) -> Optional[TrialRow]:
    """The best trial on its final metric: among the completed trials if any, else among all that reported."""
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
    pool = [r for r in scored if r["status"] == COMPLETED] or scored
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda r: r[metric])


def write_plot(rows: list[TrialRow], metric: str, path: Path, x: str = "lr", log_x: bool = True) -> Path:
    """Metric against ``x`` (the lr), one colour per batch size; early-stopped trials drawn as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    batches = sorted({r["batch_size"] for r in rows if r.get("batch_size") is not None})
    colours = plt.get_cmap("tab10")
    for i, b in enumerate(batches):
        for status, marker, label in ((COMPLETED, "o", f"batch {b}"), (STOPPED, "x", f"batch {b}, stopped early")):
            pts = [(r[x], r[metric]) for r in rows if r.get("batch_size") == b and r["status"] == status and r.get(metric) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=marker, s=60, color=colours(i % 10), label=label, linewidths=2)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (last evaluation)")
    ax.set_title(f"sweep: {metric} vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
