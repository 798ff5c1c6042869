"""Where each step's time goes, per rank: the step-time breakdown and the straggler check.

Every worker times its steps' phases as **exposed** time — what the step waited for, not work overlapped with it:

- ``data``: waiting for the next batch (the stream reads ahead in a thread; only the wait counts);
- ``compute``: forward and backward, less the synchronisation the strategy reports inside them;
- ``sync``: exposed synchronisation the strategy reports (:meth:`~lepton_ray.sync.base.Strategy.sync_s`): DDP's
  all-reduce not hidden behind backward, the parameter server's push and pull; FSDP's collectives run inside its
  forward and backward and are counted in ``compute``;
- ``optimizer``: the optimizer step (and gradient clipping, unscaling), less synchronisation inside it;
- ``checkpoint`` and ``eval``: the steps' checkpoints and evaluations;
- ``residual``: the rest of the step's wall time (logging, the loop's own work), so that the phases and the
  residual add up to the step time exactly.

Totals are kept per rank and taken per epoch (and for the last, possibly partial, one) as ``breakdown`` records.
In lock-step training every rank's step time is the same (the fast ranks wait in the collective), so a slow rank
shows in its **compute** time: :func:`stragglers` flags a rank whose compute exceeds the median over the ranks by
a factor.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

__all__ = ["PHASES", "StepTimes", "SyncTimer", "peak_flops", "stragglers", "table"]

PHASES = ("data", "compute", "sync", "optimizer", "checkpoint", "eval")
"""The timed phases, in step order; each record also has ``residual_s`` and ``step_s``."""

T = TypeVar("T")
_END = object()


class SyncTimer:
    """Seconds a strategy waited on synchronisation, summed (what :meth:`Strategy.sync_s` returns).

    >>> ticks = iter([1.0, 3.5])
    >>> s = SyncTimer(clock=lambda: next(ticks))
    >>> with s:
    ...     pass
    >>> s.total
    2.5
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.total, self._clock, self._t0 = 0.0, clock, 0.0

    def __enter__(self) -> "SyncTimer":
        self._t0 = self._clock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.total += self._clock() - self._t0

    def add(self, seconds: float) -> None:
        self.total += seconds

    def timed(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` with the seconds each call takes added (calls may nest in other timed work: each times itself).

        >>> ticks = iter([1.0, 1.5])
        >>> s = SyncTimer(clock=lambda: next(ticks))
        >>> s.timed(lambda x: x + 1)(1), s.total
        (2, 0.5)
        """
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = self._clock()
            try:
                return call(*args, **kwargs)
            finally:
                self.total += self._clock() - t0

        return timed_call


class StepTimes:
    """One rank's phase totals since the last :meth:`take`.

    ``sync_s``: the strategy's running total of exposed synchronisation seconds (read at each phase's start and
    end: what it grew by inside a phase is ``sync``, not that phase); ``clock``: seconds (a test's own clock);
    ``wait``: called at each phase's end before the clock is read (a GPU run synchronises its stream there, else
    the phase would time only the kernels' launch).
    """

    def __init__(self, sync_s: Callable[[], float] = lambda: 0.0, clock: Callable[[], float] = time.perf_counter,
                 wait: Optional[Callable[[], None]] = None):
        self._sync_s, self._clock, self._wait = sync_s, clock, wait
        self._reset()

    def _reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._since = self._clock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0, s0 = self._clock(), self._sync_s()
        try:
            yield
        finally:
            if self._wait is not None:
                self._wait()
            synced = self._sync_s() - s0
            self.totals[name] += self._clock() - t0 - synced
            self.totals["sync"] += synced

    def batches(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, each wait for the next one timed as ``data``."""
        it = iter(batches)
        while True:
            with self.phase("data"):
                batch = next(it, _END)
            if batch is _END:
                return
            yield batch  # type: ignore[misc]

    def take(self, **fields: Any) -> dict[str, Any]:
        """A ``breakdown`` record of the time since the last take (``fields`` added: rank, host, epoch, step), and a
        fresh start. ``step_s`` is the wall time; ``residual_s`` what the phases do not cover."""
        step_s = self._clock() - self._since
        record = {"event": "breakdown", **fields, "steps": self.steps, "step_s": step_s,
                  **{f"{k}_s": v for k, v in self.totals.items()}, "residual_s": step_s - sum(self.totals.values())}
        self._reset()
        return record


def stragglers(records: list[dict[str, Any]], factor: float) -> list[dict[str, Any]]:
    """``straggler`` records for the ranks (of one epoch's ``breakdown`` records, one per rank) whose compute time per
    step exceeds the median over the ranks by more than ``factor``. With two ranks the median is their mean, so a rank
    at most doubles it: a factor of 2 or more never flags one of two.

    >>> rs = [{"rank": 0, "host": "a", "epoch": 1, "steps": 10, "compute_s": 1.0},
    ...       {"rank": 1, "host": "b", "epoch": 1, "steps": 10, "compute_s": 3.0}]
    >>> [(s["rank"], s["host"], round(s["ratio"], 2)) for s in stragglers(rs, 1.4)]
    [(1, 'b', 1.5)]
    >>> stragglers(rs, 1.6)
    []
    """
    per_step = {r["rank"]: r["compute_s"] / r["steps"] for r in records if r.get("steps")}
    if len(per_step) < 2:
        return []
    median = statistics.median(per_step.values())
    out = []
    for r in records:
        mine = per_step.get(r["rank"])
        if mine is None or median <= 0 or mine <= factor * median:
            continue
        out.append({"event": "straggler", "epoch": r.get("epoch"), "rank": r["rank"], "host": r.get("host"),
                    "compute_s_per_step": mine, "median_compute_s_per_step": median, "ratio": mine / median, "factor": factor,
                    "message": f"rank {r['rank']} on {r.get('host')} is a straggler in epoch {r.get('epoch')}: its compute takes"
                               f" {mine * 1e3:.1f} ms per step, {mine / median:.2f}x the median over {len(per_step)} ranks"
                               f" ({median * 1e3:.1f} ms; train.straggler_factor {factor:g}); the other ranks wait for it"})
    return out


def table(records: Iterable[dict[str, Any]]) -> str:
    """The run's breakdown per rank (every ``breakdown`` record summed), as a text table: seconds and share of the
    step time per phase. Empty when there are none.

    >>> print(table([{"event": "breakdown", "rank": 0, "host": "h", "steps": 4, "step_s": 2.0, "data_s": 0.5,
    ...               "compute_s": 1.0, "sync_s": 0.25, "optimizer_s": 0.25, "checkpoint_s": 0.0, "eval_s": 0.0,
    ...               "residual_s": 0.0}]))
    rank  host steps  step s  data          compute       sync          optimizer     checkpoint    eval          residual
    0     h        4    2.00  0.50 ( 25%)   1.00 ( 50%)   0.25 ( 12%)   0.25 ( 12%)   0.00 (  0%)   0.00 (  0%)   0.00 (  0%)
    """
    keys = [f"{p}_s" for p in PHASES] + ["residual_s"]
    ranks: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("event") != "breakdown":
            continue
        acc = ranks.setdefault(r["rank"], {"host": r.get("host", "?"), "steps": 0, "step_s": 0.0, **dict.fromkeys(keys, 0.0)})
        for k in ["steps", "step_s", *keys]:
            acc[k] += r.get(k, 0)
    if not ranks:
        return ""
    host_w = max(4, *(len(str(a["host"])) for a in ranks.values()))
    lines = [f"{'rank':<5} {'host':<{host_w}} {'steps':>5} {'step s':>7}  " + " ".join(f"{k[:-2]:<13}" for k in keys).rstrip()]
    for rank in sorted(ranks):
        a = ranks[rank]
        total = a["step_s"] or 1.0
        cells = " ".join(f"{f'{a[k]:.2f} ({100 * a[k] / total:3.0f}%)':<13}" for k in keys)
        lines.append(f"{rank:<5} {str(a['host']):<{host_w}} {a['steps']:>5} {a['step_s']:>7.2f}  {cells}".rstrip())
    return "\n".join(lines)


_PEAK_TFLOPS = (  # dense bf16/fp16 tensor-core peaks per GPU, from the vendors' data sheets (most specific name first)
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0),
    ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0),
)


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """The GPU's peak FLOP/s for the MFU's denominator: its dense bf16/fp16 tensor-core peak; None for fp32 (whose
    peak depends on TF32 settings) and for a GPU not in the table.

    >>> peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    989400000000000.0
    >>> peak_flops("NVIDIA H100 PCIe", "fp16"), peak_flops("NVIDIA H100 80GB HBM3", "fp32"), peak_flops("cpu", "bf16")
    (756000000000000.0, None, None)
    """
    if precision not in ("bf16", "fp16"):
        return None
    return next((tflops * 1e12 for name, tflops in _PEAK_TFLOPS if name in device_name), None)
