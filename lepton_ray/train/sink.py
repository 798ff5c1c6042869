"""The metrics sink and heartbeat board: one actor per Ray Train run, on the driver's node.

Kept apart from the loop's modules: the actor's process imports only this (no torch, no numpy), so it is up in a
fraction of a second while the worker group starts beside it on the same cores.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

__all__ = ["Board", "MetricsSink", "Sink"]

log = logging.getLogger(__name__)


class Sink:
    """Collects records from the workers: appends each batch to ``path`` (``metrics.jsonl``) as it
    arrives, and keeps it for the driver to drain (progress bar, result).

    Writing here, not in the driver, keeps the records of a run whose driver is killed (a sweep
    trial that ASHA stops): everything rank 0 shipped is on disk. The actor runs on the driver's
    node, so ``path`` is the driver's local run directory. Each batch also goes to TensorBoard
    (``tensorboard/`` beside ``path``, unless ``tensorboard`` is False) and, where this process is
    connected to Ray, to Ray's metrics tagged with the run's name (:mod:`lepton_ray.train.export`).
    """

    def __init__(self, path: str, tensorboard: bool = True) -> None:
        from lepton_ray.train.export import RayMetrics, TensorBoard

        self._records: list[dict[str, Any]] = []
        self._path = path
        run_dir = os.path.dirname(path)
        self._exports: list[Any] = [TensorBoard(os.path.join(run_dir, "tensorboard"))] if tensorboard else []
        if ray.is_initialized():
            self._exports.append(RayMetrics(os.path.basename(run_dir)))

    def log(self, records: list[dict[str, Any]]) -> None:
        with open(self._path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
        self._records.extend(records)
        for export in list(self._exports):
            try:
                export.log(records)
            except Exception as exc:  # a side channel: metrics.jsonl has every record, the run goes on
                log.warning("metrics sink: %s failed (%s: %s); it gets no more records of this run", type(export).__name__, type(exc).__name__, exc)
                self._exports.remove(export)

    def drain(self) -> list[dict[str, Any]]:
        out, self._records = self._records, []
        return out

    def close(self) -> None:
        """Write out what the exports hold (TensorBoard's queued events); a record after this opens them again."""
        for export in self._exports:
            export.close()

    def __getstate__(self) -> dict[str, Any]:
        """A copy sent to another process (a warm group's helper, with the run's spec) is the path alone: the records
        and the open exports (TensorBoard's writer thread and queue) stay with the process that drains them."""
        return {"_path": self._path, "_records": [], "_exports": []}


class Board:
    """The heartbeat board (mixed into the metrics sink actor, pinned to the driver's node)."""

    def __init__(self, stacks_dir: str) -> None:
        self._stacks_dir = stacks_dir
        self._beats: dict[int, dict[str, Any]] = {}
        self._want_stacks = False
        self._retired: set[int] = set()

    def beat(self, rank: int, info: dict[str, Any]) -> bool:
        """A worker's heartbeat (``step``, ``pid``, ``host``, ``node``, ``world``); True asks it for its stack dump."""
        if info["pid"] in self._retired:  # a process of a group the watchdog gave up on, not yet gone
            return False
        for gone in [r for r in self._beats if r >= info.get("world", r + 1)]:  # a smaller group (an elastic resize)
            del self._beats[gone]
        now = time.monotonic()
        old = self._beats.get(rank)
        if old is None or old["pid"] != info["pid"]:  # a new process (a restarted group) starts afresh
            old = {"advanced": now, "step": None, "stacks": None}
        advanced = now if info["step"] != old["step"] else old["advanced"]
        self._beats[rank] = {**old, **info, "seen": now, "advanced": advanced}
        return self._want_stacks and self._beats[rank]["stacks"] is None

    def put_stacks(self, rank: int, pid: int, text: str) -> str:
        path = Path(self._stacks_dir) / f"rank{rank}-{pid}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if rank in self._beats and self._beats[rank]["pid"] == pid:
            self._beats[rank]["stacks"] = str(path)
        return str(path)

    def want_stacks(self, on: bool = True) -> None:
        self._want_stacks = on

    def beats(self) -> dict[int, dict[str, Any]]:
        """rank -> its last heartbeat, with ``age`` (s since it) and ``stalled`` (s since its step changed)."""
        now = time.monotonic()
        return {r: {**b, "age": now - b["seen"], "stalled": now - b["advanced"]} for r, b in self._beats.items()}

    def leave(self, rank: int, pid: int) -> None:
        """A worker whose loop ended (finished or failed) stops beating on purpose."""
        self._retired.add(pid)
        if self._beats.get(rank, {}).get("pid") == pid:
            del self._beats[rank]

    def retire(self) -> None:
        """Forget every rank: its group is being torn down (restarted or failed); the next group beats afresh."""
        self._retired.update(b["pid"] for b in self._beats.values())
        self._beats.clear()


class _RunSink(Sink, Board):
    """The sink of a Ray Train run, also the workers' heartbeat board (one actor, already on the driver's node).
    Stack dumps go to ``stacks/`` beside ``metrics.jsonl``."""

    def __init__(self, path: str, tensorboard: bool = True) -> None:
        Sink.__init__(self, path, tensorboard)
        Board.__init__(self, os.path.join(os.path.dirname(path), "stacks"))


MetricsSink = ray.remote(num_cpus=0)(_RunSink)
"""The sink as an actor on the driver's node (a run under Ray Train); a plain :class:`Sink` serves a local run."""
