"""One benchmark figure as a row: what was measured, against which baseline (measured in the same run), and its bar.

Every benchmark script returns a list of these (``bench_rows(argv)``); the suite (``python -m benchmarks``) stores
them in ``benchmarks/results.json`` and ``benchmarks/render.py`` draws them.

>>> r = row("train_overhead", "MLP samples/s", 960.0, "samples/s", "plain DDP", 1000.0, bar=">= 0.95")
>>> r.ratio, r.met
(0.96, True)
>>> row("serve", "tiny p50 @1 client", 2.5, "ms", "the 2 ms bar", 2.0, bar="<= 2", bar_on="figure").met
False
>>> row("sweep", "info only", 3.0, "s", "FIFO", 4.0).met is None
True
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["Row", "row", "check_bar", "parse_bar", "BarError"]

_BAR = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS = {">=": lambda x, b: x >= b, "<=": lambda x, b: x <= b, ">": lambda x, b: x > b, "<": lambda x, b: x < b}


class BarError(ValueError):
    """A bar that is not ``OP NUMBER`` with OP one of >=, <=, >, <."""


def parse_bar(bar: str) -> tuple[str, float]:
    """``">= 0.95"`` -> ``(">=", 0.95)``.

    >>> parse_bar("<=1.1")
    ('<=', 1.1)
    """
    m = _BAR.match(bar)
    if not m:
        raise BarError(f"bar {bar!r}: expected 'OP NUMBER' with OP one of {', '.join(_OPS)}, e.g. '>= 0.95'")
    return m.group(1), float(m.group(2))


def check_bar(value: Optional[float], bar: Optional[str]) -> Optional[bool]:
    """Whether ``value`` meets ``bar``; None where there is no bar. A missing or non-finite value never meets one.

    >>> check_bar(1.2, ">= 1.2"), check_bar(1.2, "> 1.2"), check_bar(float("nan"), "<= 5"), check_bar(3.0, None)
    (True, False, False, None)
    """
    if bar is None:
        return None
    op, threshold = parse_bar(bar)
    if value is None or not math.isfinite(value):
        return False
    return _OPS[op](value, threshold)


@dataclass(kw_only=True)
class Row:
    """One measured figure against its baseline."""

    benchmark: str
    """The benchmark script it comes from, e.g. ``train_overhead``."""
    name: str
    """What was measured, e.g. ``MLP samples/s, allreduce``."""
    figure: dict[str, Any]
    """``{"value": float, "unit": str}``: lepton_ray's figure."""
    baseline: Optional[dict[str, Any]]
    """``{"name": str, "value": float}``: what it is compared with, measured in the same run (or a fixed bar)."""
    ratio: Optional[float]
    """figure / baseline (None without a baseline or where the baseline is 0)."""
    bar: Optional[str]
    """``"OP NUMBER"`` the ratio (or the figure, see ``bar_on``) must meet; None: for information."""
    bar_on: str = "ratio"
    """``ratio`` or ``figure``: what the bar applies to."""
    met: Optional[bool]
    """Whether the bar is met (and ``also``, where given); None where there is no bar."""
    note: str = ""
    """Anything the figures alone do not say (a second condition, a bound, ...)."""
    part: str = ""
    """The suite part that measured it (filled in by the suite)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further figures for information (JSON-serialisable)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        return cls(**d)


def _num(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(x)


def row(benchmark: str, name: str, value: Optional[float], unit: str, baseline_name: Optional[str] = None,
        baseline_value: Optional[float] = None, *, bar: Optional[str] = None, bar_on: str = "ratio",
        also: Optional[bool] = None, note: str = "", extra: Optional[dict[str, Any]] = None) -> Row:
    """A :class:`Row`, its ratio and whether it meets ``bar`` worked out. ``also``: a second condition the row must meet
    too (say why in ``note``)."""
    if bar_on not in ("ratio", "figure"):
        raise ValueError(f"bar_on {bar_on!r}: expected 'ratio' or 'figure'")
    if bar is not None:
        parse_bar(bar)  # fail here, at the row, not when rendering
    value, baseline_value = _num(value), _num(baseline_value)
    ratio = None
    if value is not None and baseline_value not in (None, 0.0):
        ratio = value / baseline_value
    met = check_bar(ratio if bar_on == "ratio" else value, bar)
    if met is not None and also is not None:
        met = met and bool(also)
    baseline = None if baseline_name is None else {"name": baseline_name, "value": baseline_value}
    return Row(benchmark=benchmark, name=name, figure={"value": value, "unit": unit}, baseline=baseline, ratio=ratio,
               bar=bar, bar_on=bar_on, met=met, note=note, extra=dict(extra or {}))
