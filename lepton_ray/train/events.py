"""What the driver tells the console about a Ray Train run, read from the run's records (pure: no Ray, no I/O).

Ray's own lines say that an actor died; the records say what lepton_ray knows: the hang guard's diagnosis (a
``stalled`` record, shown once, when the driver sees it), and for each restart of the worker group (every
``start`` record after the first) which attempt it is, where it resumed, and why the previous attempt ended
when the records tell (the hang guard killed stuck ranks, ranks got SIGTERM, a rank raised).

>>> events = RunEvents("digits")
>>> events.lines([{"event": "start", "step": 0, "world_size": 2, "resumed_from": None}])
[]
>>> events.lines([{"event": "failed", "rank": 1, "error": "ValueError: bad batch"},
...               {"event": "start", "step": 200, "world_size": 2, "resumed_from": "runs/digits/checkpoints/step_00000200"}])
["lepton_ray: run 'digits': worker group restarted (attempt 2, 2 workers) from step 200 (runs/digits/checkpoints/step_00000200); the previous attempt ended: rank 1 raised ValueError: bad batch"]
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["RunEvents", "failure_record"]

MAX_ERROR_CHARS = 300
"""A rank's error is shown by its first line, cut to this many characters (the whole is in Ray's log)."""


def failure_record(rank: int, exc: BaseException, now: float) -> dict[str, Any]:
    """The record a rank sends when its loop raises: which rank, and its error's first line.

    >>> failure_record(1, RuntimeError("gloo: connection closed\\nat ..."), 12.5)
    {'event': 'failed', 'rank': 1, 'error': 'RuntimeError: gloo: connection closed', 'time': 12.5}
    """
    first = (str(exc).splitlines() or [""])[0]
    return {"event": "failed", "rank": rank, "error": f"{type(exc).__name__}: {first}"[:MAX_ERROR_CHARS], "time": now}


def _ranks(ranks: Iterable[int]) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


class RunEvents:
    """Turns the run's records, in the order they arrive, into the lines the console shows (``lepton_ray: ...``)."""

    def __init__(self, name: str):
        self.name = name
        self.starts = 0
        """Worker groups started so far (the first ``start`` record is attempt 1)."""
        self._world: Any = None
        self._ended: list[dict[str, Any]] = []  # what the records said since the last start: stalled, preempted, failed

    def lines(self, records: Iterable[dict[str, Any]]) -> list[str]:
        out = []
        for r in records:
            event = r.get("event")
            if event in ("stalled", "preempted", "failed"):
                self._ended.append(r)
                if event == "stalled":
                    out.append(f"lepton_ray: run '{self.name}': {r['diagnosis']}")
            elif event == "start":
                self.starts += 1
                if self.starts > 1:
                    out.append(self._restart(r))
                self._world, self._ended = r.get("world_size"), []
        return out

    def _restart(self, start: dict[str, Any]) -> str:
        world = start.get("world_size")
        size = f"{world} workers" + (f", was {self._world}" if self._world not in (None, world) else "")
        where = (f"from step {start['step']} ({start['resumed_from']})" if start.get("resumed_from")
                 else "from the start (no checkpoint was committed)")
        return f"lepton_ray: run '{self.name}': worker group restarted (attempt {self.starts}, {size}) {where}; the previous attempt ended: {self._cause()}"

    def _cause(self) -> str:
        by = {e: [r for r in self._ended if r["event"] == e] for e in ("stalled", "preempted", "failed")}
        if by["stalled"]:
            return f"the hang guard killed stuck {_ranks(by['stalled'][-1]['ranks'])} (diagnosis above)"
        if by["preempted"]:
            p = by["preempted"][-1]
            return f"{_ranks(p['ranks'])} got SIGTERM; every rank checkpointed step {p['step']}"
        if by["failed"]:
            return "; ".join(f"rank {r['rank']} raised {r['error']}" for r in sorted(by["failed"], key=lambda r: r["rank"]))
        return "no rank reported an error: a worker process ended (killed, out of memory, or its node lost)"
