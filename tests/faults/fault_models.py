"""Models of the fault-injection tests, importable by Ray workers as ``faults.fault_models`` (tests/ is on
their PYTHONPATH). Each records its worker's pid in ``<pid_dir>/rank<r>.pid`` on its first training forward,
so a test can signal or look for the training processes (the driver builds the model too, never training it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from torch import nn

from lepton_ray.models.mlp import mlp


def _rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


class Faulty(nn.Module):
    """An MLP that writes its pid file, sleeps ``delay_s`` per training forward (so a test can act mid-run) and,
    on rank ``stop_rank``'s ``stop_at``-th training forward, freezes its own process with SIGSTOP, once per
    ``marker`` file (which records the pid and the time it stopped). With ``hang``, that rank blocks in Python instead
    (:func:`hang_in_python`): its process runs, its heartbeat thread keeps beating, its loop never finishes the step
    and the other ranks wait for it in the step's all-reduce. With ``hold_at``, every rank's ``hold_at``-th training
    forward writes ``<hold_file>.held`` and waits until the file ``hold_file`` exists (a test holds the run there until
    it has done what it must do mid-run, so no race with the run's end)."""

    def __init__(self, inner: nn.Module, pid_dir: str, delay_s: float, stop_rank: int, stop_at: int, marker: str,
                 hang: bool = False, hold_at: int = 0, hold_file: str = ""):
        super().__init__()
        self.inner, self.pid_dir, self.delay_s = inner, pid_dir, delay_s
        self.stop_rank, self.stop_at, self.marker, self.hang = stop_rank, stop_at, marker, hang
        self.hold_at, self.hold_file = hold_at, hold_file
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 1:
                with open(os.path.join(self.pid_dir, f"rank{_rank()}.pid"), "w") as fh:
                    fh.write(str(os.getpid()))
            if self.marker and self.calls == self.stop_at and _rank() == self.stop_rank:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, f"{os.getpid()} {time.time()}".encode())
                    os.close(fd)
                    if self.hang:
                        hang_in_python()
                    os.kill(os.getpid(), signal.SIGSTOP)
            if self.calls == self.hold_at:
                from lr_testing_models import hold_until

                hold_until(self.hold_file)
            time.sleep(self.delay_s)
        return self.inner(x)


def hang_in_python() -> None:
    """Never return, in a loop that holds no lock and releases the GIL (the process's other threads run on): what a
    rank waiting forever on something of its own looks like. Only a kill ends it; its name is what a stack dump shows."""
    while True:
        time.sleep(0.2)


def faulty_mlp(input_dim: int, num_outputs: int, pid_dir: str, delay_s: float = 0.0, stop_rank: int = 1, stop_at: int = 0,
               marker: str = "", hang: bool = False, hold_at: int = 0, hold_file: str = "") -> nn.Module:
    return Faulty(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=[32]), pid_dir, delay_s, stop_rank, stop_at,
                  marker, hang, hold_at, hold_file)


class Slow(nn.Module):
    """An MLP whose training forward sleeps ``delay_s`` (so a fault lands mid-run), and whose process writes its
    pid to ``<pid_dir>/rank<r>`` when built (a restarted worker overwrites it), so a test can kill it from outside."""

    def __init__(self, inner: nn.Module, delay_s: float, pid_dir: str):
        super().__init__()
        self.inner, self.delay_s = inner, delay_s
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        path = Path(pid_dir) / f"rank{rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(path)

    def forward(self, x):
        if self.training and self.delay_s:
            time.sleep(self.delay_s)
        return self.inner(x)


def slow_mlp(input_dim: int, num_outputs: int, delay_s: float, pid_dir: str, hidden=(32,)) -> nn.Module:
    return Slow(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), delay_s, pid_dir)


def _watch_read_retries(path: Path) -> None:
    """In a training worker: find this process's data stream (a ``WorkerStream``; its ``stats`` count ``read_retries``)
    and write its count to ``path`` whenever it changes, so a test sees a failed-and-retried read as it happens, on every
    rank (the run's records carry rank 0's count, at the end)."""
    import gc

    stream = None
    while stream is None:  # by class name: no attribute of anything else is touched (a lazy loader would load it)
        stream = next((o for o in gc.get_objects() if type(o).__name__ == "WorkerStream"), None)
        time.sleep(0.2)
    stats = stream.stats
    seen = -1
    while True:
        count = int(stats["read_retries"])
        if count != seen:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(count))
            tmp.replace(path)
            seen = count
        time.sleep(0.05)


def retry_counting_ids_mlp(input_dim: int, num_outputs: int, log_dir: str) -> nn.Module:
    """``lr_testing_models.record_ids_mlp``, and in a training worker a thread that keeps ``<log_dir>/retries-rank<r>``
    equal to its stream's ``read_retries`` (see :func:`_watch_read_retries`)."""
    import threading

    import torch.distributed as dist

    from lr_testing_models import record_ids_mlp

    if dist.is_initialized():  # a training worker (the driver builds the model too, without a process group)
        path = Path(log_dir) / f"retries-rank{dist.get_rank()}"
        threading.Thread(target=_watch_read_retries, args=(path,), name="test-read-retries", daemon=True).start()
    return record_ids_mlp(input_dim, num_outputs, log_dir)


class SlowIds(nn.Module):
    """An MLP over features 1.. that, on each training forward, appends ``<pid> <ids...>`` to ``<log_dir>/rank<r>.txt``
    (feature 0 is the row id; the pid tells one attempt's process from the next) and sleeps ``delay_s`` until the file
    ``<log_dir>/fast`` exists (so a fault lands mid-run, and the test can let the rest of the run go at full speed)."""

    def __init__(self, inner: nn.Module, log_dir: str, delay_s: float):
        super().__init__()
        self.inner, self.log_dir, self.delay_s = inner, Path(log_dir), delay_s

    def forward(self, x):
        if self.training:
            with open(self.log_dir / f"rank{_rank()}.txt", "a") as fh:
                fh.write(" ".join(str(v) for v in [os.getpid(), *(int(i) for i in x[:, 0].tolist())]) + "\n")
            if not (self.log_dir / "fast").exists():
                time.sleep(self.delay_s)
        return self.inner(x[:, 1:])


def slow_ids_mlp(input_dim: int, num_outputs: int, log_dir: str, delay_s: float) -> nn.Module:
    return SlowIds(mlp(input_dim=input_dim - 1, num_outputs=num_outputs, hidden=[32]), log_dir, delay_s)
