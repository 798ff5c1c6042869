"""``lepton-ray report RUN_DIR``: a run's ``metrics.jsonl`` as PNG figures (matplotlib, Agg).

``curves.png``: train loss per step with each evaluation's loss, and a panel per other eval metric;
``throughput.png``: samples/s and the share of time spent waiting for data; ``breakdown.png`` (when the run
wrote ``breakdown`` records): each rank's seconds per phase as stacked bars, for the latest epoch and summed
over all epochs, stragglers marked.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Union

from lepton_ray.storage import atomic_write, filesystem
from lepton_ray.train.export import BREAKDOWN, STRAGGLER

__all__ = ["ReportError", "as_it_stands", "phase_seconds", "report"]

# the per-step train fields the throughput figure draws (names as in metrics.jsonl)
_THROUGHPUT = {"samples_per_s": "samples/s (all workers)", "data_wait_frac": "share of time waiting for data"}


class ReportError(ValueError):
    """A run directory the report cannot draw (no ``metrics.jsonl``, no train records)."""


def report(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None) -> list[Path]:
    """Render the run's figures into ``out`` (default ``RUN_DIR/report``) and return their paths.

    >>> report("/nonexistent/run")
    Traceback (most recent call last):
    ...
    lepton_ray.report.ReportError: /nonexistent/run has no metrics.jsonl: expected a run directory (runs/<name>/, written by `lepton-ray train`)
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl: expected a run directory (runs/<name>/, written by `lepton-ray train`)")
    from lepton_ray.tune.results import read_records

    records = as_it_stands(read_records(run_dir))
    train = [r for r in records if "event" not in r and "train_loss" in r]
    if not train:
        raise ReportError(f"{run_dir / 'metrics.jsonl'} has no train records (records with 'step' and 'train_loss'):"
                          " the run stopped before its first logged step")
    evals = [r for r in records if "event" not in r and any(k.startswith("eval_") for k in r)]
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = [_save(plt, _curves(plt, run_dir.name, train, evals), out / "curves.png"),
             _save(plt, _throughput(plt, run_dir.name, train), out / "throughput.png")]
    breakdown = [r for r in records if r.get("event") == BREAKDOWN]
    if breakdown:
        paths.append(_save(plt, _breakdown(plt, run_dir.name, breakdown, [r for r in records if r.get("event") == STRAGGLER]),
                           out / "breakdown.png"))
    return paths


def as_it_stands(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the steps the run kept: a ``start`` record at step s (a resume, a restarted worker group)
    replaces what was logged after step s before it (as its TensorBoard file does).

    >>> [r.get("event", r["step"]) for r in as_it_stands([{"event": "start", "step": 0}, {"step": 1}, {"step": 2},
    ...                                                   {"event": "start", "step": 1}, {"step": 2}])]
    ['start', 1, 'start', 2]
    """
    kept: list[dict[str, Any]] = []
    for r in records:
        if r.get("event") == "start":
            kept = [k for k in kept if k.get("step", -1) <= r["step"]]
        kept.append(r)
    return kept


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs, local = filesystem(str(path.resolve()))
    atomic_write(fs, local, buf.getvalue())
    return path


def _curves(plt: Any, name: str, train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> Any:
    others = sorted({k for r in evals for k in r if k.startswith("eval_") and k != "eval_loss"})
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(6 * (1 + len(others)), 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train_loss")
    with_loss = [r for r in evals if "eval_loss" in r]
    if with_loss:
        ax.plot([r["step"] for r in with_loss], [r["eval_loss"] for r in with_loss], "o-", label="eval_loss")
    ax.set(title=f"{name}: loss", xlabel="step", ylabel="loss")
    ax.legend()
    for ax, key in zip(axes[0][1:], others):
        pts = [r for r in evals if key in r]
        ax.plot([r["step"] for r in pts], [r[key] for r in pts], "o-")
        ax.set(title=f"{name}: {key}", xlabel="step", ylabel=key)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _throughput(plt: Any, name: str, train: list[dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(len(_THROUGHPUT), 1, figsize=(7, 2.8 * len(_THROUGHPUT)), dpi=100, sharex=True)
    for ax, (key, label) in zip(axes, _THROUGHPUT.items()):
        pts = [r for r in train if key in r]
        ax.plot([r["step"] for r in pts], [r[key] for r in pts])
        ax.set(ylabel=label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"{name}: throughput")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


def phase_seconds(records: list[dict[str, Any]], epoch: Optional[int] = None) -> dict[int, dict[str, float]]:
    """rank -> phase -> seconds, from ``breakdown`` records: of ``epoch``, or summed over all epochs. The phases are
    the ``*_s`` fields but ``step_s`` (their whole).

    >>> phase_seconds([{"rank": 0, "epoch": 0, "step_s": 3.0, "compute_s": 2.0, "data_s": 1.0},
    ...                {"rank": 0, "epoch": 1, "step_s": 3.5, "compute_s": 2.5, "data_s": 1.0}])
    {0: {'compute_s': 4.5, 'data_s': 2.0}}
    """
    table: dict[int, dict[str, float]] = {}
    for r in records:
        if epoch is None or r["epoch"] == epoch:
            row = table.setdefault(r["rank"], {})
            for k, v in r.items():
                if k.endswith("_s") and k != "step_s":
                    row[k] = row.get(k, 0.0) + v
    return dict(sorted(table.items()))


def _breakdown(plt: Any, name: str, records: list[dict[str, Any]], stragglers: list[dict[str, Any]]) -> Any:
    """Each rank's seconds per phase as stacked bars: the latest epoch, and all epochs summed."""
    last = max(r["epoch"] for r in records)
    tables = ((f"epoch {last}", phase_seconds(records, last)), ("all epochs", phase_seconds(records)))
    ranks = list(tables[1][1])
    phases = list(dict.fromkeys(p for row in tables[1][1].values() for p in row))
    hosts = {r["rank"]: r.get("host", "") for r in records}
    slow = {r["rank"] for r in stragglers}
    labels = [f"rank {k}\n{hosts[k]}" + ("\nstraggler" if k in slow else "") for k in ranks]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ranks) + 4), 4.5), dpi=100)
    colours = plt.get_cmap("tab10")
    for ax, (title, table) in zip(axes, tables):
        bottom = [0.0] * len(ranks)
        for i, p in enumerate(phases):
            heights = [table.get(k, {}).get(p, 0.0) for k in ranks]
            ax.bar(range(len(ranks)), heights, bottom=bottom, label=p.removesuffix("_s"), color=colours(i % 10))
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(ranks)), labels)
        ax.set(title=f"{name}: seconds per phase, {title}", ylabel="seconds")
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
