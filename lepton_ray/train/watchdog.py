"""Hang detection and preemption: what keeps a frozen or terminated worker from stalling a run.

Three pieces, one per side:

- :class:`lepton_ray.train.sink.Board` (a mixin of the metrics sink actor on the driver's node): every rank's last heartbeat, kept
  on the board's own clock (no clock skew between hosts), and the stack dumps it writes into the run directory.
- :class:`WorkerGuard` (every Ray Train worker): a thread that beats once a second with the loop's step, and
  dumps the stacks of all the process's threads when the driver asks; and a SIGTERM handler that turns a
  preemption into a just-in-time checkpoint (:meth:`WorkerGuard.at_step`, every rank, agreed by all-reduce).
- :class:`Watchdog` (a driver thread): finds a stuck rank (:func:`find_stuck`, pure), collects the live ranks'
  stacks, SIGKILLs the stuck process on its node, and keeps the diagnosis for the run's error message. Ray
  Train then restarts the worker group (``scaling.max_failures``) or fails the run.

The heartbeat comes from a thread, not the loop: a rank blocked in a collective keeps beating (its thread runs),
a process frozen or gone does not. So a silent rank is the stuck one; when every rank beats but none advances
(a deadlock), the ranks at the lowest step are.

>>> find_stuck({0: {"age": 1.0, "stalled": 30.0, "step": 7}, 1: {"age": 9.0, "stalled": 30.0, "step": 7}}, timeout_s=10)
[1]
>>> find_stuck({0: {"age": 1.0, "stalled": 11.0, "step": 8}, 1: {"age": 1.0, "stalled": 11.0, "step": 7}}, timeout_s=10)
[1]
>>> find_stuck({0: {"age": 1.0, "stalled": 11.0, "step": 8}, 1: {"age": 1.0, "stalled": 3.0, "step": 9}}, timeout_s=10)
[]
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["Preempted", "Watchdog", "WorkerGuard", "find_stuck", "stack_dump"]

BEAT_S = 1.0
"""Seconds between a worker's heartbeats (one small actor call each)."""


class Preempted(RuntimeError):
    """A rank got SIGTERM; every rank checkpointed the step it had reached and stopped."""


def find_stuck(beats: dict[int, dict[str, Any]], timeout_s: float) -> list[int]:
    """The ranks to kill: silent for ``timeout_s / 2`` (a frozen or lost process: its heartbeat thread stopped),
    else, when no rank advanced for ``timeout_s`` (a deadlock; a rank still starting up, with no step yet, does
    not count), the ranks at the lowest step. ``beats``: rank -> {"age", "stalled", "step"} (seconds, on one clock).
    """
    silent = [r for r, b in beats.items() if b["age"] > timeout_s / 2]
    if silent:
        return sorted(silent)
    started = {r: b for r, b in beats.items() if b.get("step") is not None}
    if started and len(started) == len(beats) and all(b["stalled"] > timeout_s for b in started.values()):
        low = min(b["step"] for b in started.values())
        return sorted(r for r, b in started.items() if b["step"] == low)
    return []


def stack_dump() -> str:
    """Every thread of this process: its name and Python stack (what ``faulthandler`` prints, as text)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [f"pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
    for ident, frame in sys._current_frames().items():
        parts.append(f"\nThread {names.get(ident, '?')} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "".join(parts)


class WorkerGuard:
    """A worker's side: heartbeats to the board, stack dumps on request, SIGTERM -> just-in-time checkpoint.

    The loop calls :meth:`start` once it knows its strategy and :meth:`at_step` after every step, on every rank.
    Without a board (a local run, a sweep group) it does nothing but answer ``at_step`` with ``[]``.

    ``at_step`` all-reduces one flag per rank. A gloo all-reduce of 2 floats between 2 local processes took
    1.1-1.2 ms on this project's (busy) 2-core machine: once per step it would cost a 43 ms step ~3 % and a
    few-ms step of a small MLP far more. So after ``calibrate_after`` steps it runs every ~``target_s`` seconds'
    worth of steps (the slowest rank's mean step time, agreed by one all-reduce; 1..``max_every``): ~0.25 % of
    the time, and a SIGTERM is answered within ~``target_s`` plus a step.
    """

    def __init__(self, board: Any = None, rank: int = 0, *, target_s: float = 0.5, calibrate_after: int = 8, max_every: int = 1000):
        self.board, self.rank = board, rank
        self.target_s, self.calibrate_after, self.max_every = target_s, calibrate_after, max_every
        self.step: Optional[int] = None
        """The loop's last finished step (read by the heartbeat thread; None until the first one)."""
        self.terminated = threading.Event()
        self.every, self._calls, self._t0 = 1, 0, 0.0
        self.world, self.device, self.jit = 1, torch.device("cpu"), False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._previous: Any = None
        self.installed = False
        """True once :meth:`install_sigterm` routed SIGTERM here (a Ray Train worker)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self, world: int, device: torch.device, *, jit: bool) -> None:
        """``jit``: the strategy can checkpoint at any step on every rank (lock-step and step-wise); otherwise a
        SIGTERM ends the process as it would without this guard."""
        self.world, self.device, self.jit, self._t0 = world, device, jit and self.installed, time.perf_counter()
        if self.board is not None and self._thread is None:
            self._thread = threading.Thread(target=self._beat_forever, name="lepton-heartbeat", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """The loop is over: stop beating, leave the board (a finished rank is not a silent one), and let a
        later SIGTERM end the process as Ray's own handler does."""
        self._stop.set()
        self.jit = False
        _GUARDS.pop(id(self), None)
        if self.board is not None:
            self.board.leave.remote(self.rank, os.getpid())

    def install_sigterm(self) -> None:
        """Handle SIGTERM in this Ray actor process. Python runs signal handlers in the main thread only, and a
        Ray Train worker trains in another thread: the handler is installed from the actor's main thread (an
        actor call to itself), where Ray's own handler (exit at once) was."""
        import ray

        _GUARDS[id(self)] = self  # the call below is pickled: it finds this guard by id, in this same process
        me = ray.get_runtime_context().current_actor
        ray.get(me.__ray_call__.remote(_install, id(self)), timeout=60)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.jit and not self.terminated.is_set():
            self.terminated.set()  # the loop checkpoints at its next agreed step and stops
            return
        if callable(self._previous):  # a second SIGTERM, or a strategy without just-in-time checkpoints
            self._previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    # ------------------------------------------------------------------ the loop's side

    def at_step(self, step: int) -> list[int]:
        """After every step, on every rank: the ranks that got SIGTERM (the same list on every rank), or []."""
        self.step = step
        if not self.jit:
            return []
        if self.world == 1:
            return [0] if self.terminated.is_set() else []
        self._calls += 1
        if self._calls % self.every:
            return []
        flags = torch.zeros(self.world, dtype=torch.float32, device=self.device)
        flags[self.rank] = float(self.terminated.is_set())
        dist.all_reduce(flags)
        if self.every == 1 and self._calls == self.calibrate_after:
            interval = torch.tensor([(time.perf_counter() - self._t0) / self._calls], dtype=torch.float64, device=self.device)
            dist.all_reduce(interval, op=dist.ReduceOp.MAX)
            self.every = max(1, min(self.max_every, int(self.target_s / max(interval.item(), 1e-9))))
        return [r for r, f in enumerate(flags.tolist()) if f]

    # ------------------------------------------------------------------ the heartbeat thread

    def _beat_forever(self) -> None:
        import ray

        me = {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id()}
        while True:  # the first beat at once: a rank that freezes within its first second is on the board
            try:
                wanted = ray.get(self.board.beat.remote(self.rank, {**me, "step": self.step, "world": self.world}), timeout=10)
                if wanted:
                    ray.get(self.board.put_stacks.remote(self.rank, me["pid"], stack_dump()), timeout=10)
            except Exception:  # the board is gone (the run is ending) or slow: try again at the next beat
                pass
            if self._stop.wait(BEAT_S):
                return


_GUARDS: dict[int, WorkerGuard] = {}
"""The guards of this process by id (a signal handler is per process; a Ray worker runs one loop at a time)."""


def _install(_actor: Any, key: int) -> None:
    """In the actor's main thread: route SIGTERM to the guard ``key``."""
    guard = _GUARDS[key]
    guard._previous = signal.signal(signal.SIGTERM, guard._on_sigterm)
    guard.installed = True


def _kill(pid: int) -> bool:
    """SIGKILL ``pid`` (a task run on its node; SIGKILL ends a SIGSTOPped process too). False: it was gone already."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class Watchdog(threading.Thread):
    """The driver's side: polls the board; on a stuck rank collects the live ranks' stacks and kills the stuck
    processes, so Ray Train restarts the group (or fails the run). ``diagnosis`` says what it found, for the error."""

    def __init__(self, board: Any, timeout_s: float, stacks_dir: Path, poll_s: float = 1.0, stacks_wait_s: float = 5.0):
        super().__init__(daemon=True, name="lepton-watchdog")
        self.board, self.timeout_s, self.stacks_dir, self.poll_s, self.stacks_wait_s = board, timeout_s, stacks_dir, poll_s, stacks_wait_s
        self.diagnosis: Optional[str] = None
        """What the last stall acted on was (each one is also a ``stalled`` record in metrics.jsonl)."""
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        import ray

        while not self._stop_event.wait(self.poll_s):
            try:
                beats = ray.get(self.board.beats.remote(), timeout=30)
            except ray.exceptions.GetTimeoutError:  # a busy board: ask again
                continue
            except Exception:  # the board is gone: the run is over
                return
            stuck = find_stuck(beats, self.timeout_s)
            try:
                if stuck:
                    self._act(stuck, beats)
            except Exception as exc:  # never let the driver's fit() wait on a watchdog that died
                self.diagnosis = f"the hang watchdog failed acting on stuck ranks {stuck}: {type(exc).__name__}: {exc}"
                self.board.retire.remote()

    def _act(self, stuck: list[int], beats: dict[int, dict[str, Any]]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        detected = time.time()
        # every rank whose heartbeat thread answers dumps its stacks: in a deadlock that is the stuck ranks too (they
        # are alive, only not advancing), and their stacks are the diagnosis; a frozen or lost rank cannot answer
        live = [r for r in beats if beats[r]["age"] <= self.timeout_s / 2]
        ray.get(self.board.want_stacks.remote(True), timeout=30)
        deadline = time.monotonic() + self.stacks_wait_s + 2 * BEAT_S
        while time.monotonic() < deadline and not self._stop_event.is_set():
            now = ray.get(self.board.beats.remote(), timeout=30)
            if all(now.get(r, {}).get("stacks") for r in live):
                break
            time.sleep(0.2)
        now = ray.get(self.board.beats.remote(), timeout=30)
        dumps = sorted(Path(p).name for p in (now.get(r, {}).get("stacks") for r in live) if p)
        ray.get(self.board.want_stacks.remote(False), timeout=30)
        kill = ray.remote(num_cpus=0, max_retries=0)(_kill)
        killed = ray.get([kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(beats[r]["node"], soft=False)).remote(beats[r]["pid"])
                          for r in stuck], timeout=60)
        self.board.retire.remote()
        if not any(killed):  # they had died already (a crash): Ray Train's own failure handling has it
            return
        what = ", ".join(
            f"rank {r} (host {beats[r]['host']}, pid {beats[r]['pid']}, "
            + (f"after step {beats[r]['step']}: " if beats[r]["step"] is not None else "before its first step: ")
            + (f"no heartbeat for {beats[r]['age']:.0f} s" if beats[r]["age"] > self.timeout_s / 2 else f"no progress for {beats[r]['stalled']:.0f} s")
            + ")"
            for r in stuck)
        self.diagnosis = (f"{'rank' if len(stuck) == 1 else 'ranks'} stuck: {what} (train.collective_timeout_s {self.timeout_s:g}); "
                          f"killed {'it' if len(stuck) == 1 else 'them'}. Stack dumps of the live ranks: "
                          + (f"{self.stacks_dir} ({', '.join(dumps)})" if dumps else "none (no live rank answered)"))
        self.board.log.remote([{"event": "stalled", "ranks": stuck, "diagnosis": self.diagnosis, "time": detected,
                                "steps": {r: beats[r]["step"] for r in beats}}])  # into metrics.jsonl, with the run's records
