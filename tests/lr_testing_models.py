"""Models used by the integration tests; importable by Ray workers (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os

from torch import nn

from lepton_ray.models.mlp import mlp


class CrashOnce(nn.Module):
    """An MLP whose process dies (``os._exit``) on its ``crash_at``-th training forward, once per marker file.

    The first worker process to reach that forward creates ``marker`` and exits,
    like a machine lost mid-step; later runs see the marker and train normally.
    """

    def __init__(self, inner: nn.Module, crash_at: int, marker: str):
        super().__init__()
        self.inner, self.crash_at, self.marker = inner, crash_at, marker
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at:
                try:
                    os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
        return self.inner(x)


def crash_once_mlp(input_dim: int, num_outputs: int, crash_at: int, marker: str, hidden=(32,)) -> nn.Module:
    return CrashOnce(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), crash_at, marker)


class RecordIds(nn.Module):
    """An MLP over features 1.. that appends each training batch's row ids (feature 0) to ``<log_dir>/rank<r>.txt``.

    One line per training forward: the ids of the rows that worker consumed, in order.
    """

    def __init__(self, inner: nn.Module, log_dir: str):
        super().__init__()
        self.inner, self.log_dir = inner, log_dir

    def forward(self, x):
        if self.training:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0  # 0 in a run without a process group (fit(local=True))
            with open(os.path.join(self.log_dir, f"rank{rank}.txt"), "a") as fh:
                fh.write(" ".join(str(int(i)) for i in x[:, 0].tolist()) + "\n")
        return self.inner(x[:, 1:])


def record_ids_mlp(input_dim: int, num_outputs: int, log_dir: str) -> nn.Module:
    return RecordIds(mlp(input_dim=input_dim - 1, num_outputs=num_outputs, hidden=[16]), log_dir)


class SleepyForward(nn.Module):
    """An MLP whose training forward first sleeps ``sleep_s[rank]`` seconds: compute made slow on purpose, per rank."""

    def __init__(self, inner: nn.Module, sleep_s: list[float]):
        super().__init__()
        self.inner, self.sleep_s = inner, sleep_s

    def forward(self, x):
        if self.training:
            import time

            import torch.distributed as dist

            time.sleep(self.sleep_s[dist.get_rank() if dist.is_initialized() else 0])
        return self.inner(x)


def sleepy_mlp(input_dim: int, num_outputs: int, sleep_s: list[float]) -> nn.Module:
    return SleepyForward(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=[16]), sleep_s)


def leaky_mlp(input_dim: int, num_outputs: int, hidden=(32,)) -> nn.Module:
    """An MLP built from process state that it then changes, as careless user code does: its output bias is
    the number in ``LEPTON_TEST_LEAK`` (0 when unset), which it then increments. A warm worker that let one
    run's environment leak into the next would build the next run's model differently."""
    import torch

    shift = float(os.environ.get("LEPTON_TEST_LEAK", "0"))
    os.environ["LEPTON_TEST_LEAK"] = str(shift + 1)
    net = mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden))
    with torch.no_grad():
        net[-1].bias.add_(shift)
    return net


# ---- data.transform functions (tests/ is on the Ray workers' and data tasks' PYTHONPATH)


def images_to_float(batch, seeds):
    """digits_images' uint8 pixels [n, 64] -> float32 [n, 1, 8, 8] in [0, 1], each row's brightness jittered by
    up to 10 % with its own seed (a random augmentation that a resumed epoch must repeat exactly)."""
    import numpy as np

    jitter = np.array([np.random.default_rng(int(s)).uniform(0.9, 1.1) for s in seeds], dtype=np.float32)
    image = batch["image"].reshape(-1, 1, 8, 8).astype(np.float32) / 255.0 * jitter[:, None, None, None]
    return {**batch, "image": image}


def fail_on_id(batch, bad_id: int):
    """Raise on the batch holding row id ``bad_id`` (feature 0 of ``x`` is the id)."""
    if (batch["x"][:, 0] == bad_id).any():
        raise ValueError(f"cannot transform row {bad_id}")
    return batch


def die_once_on_id(batch, bad_id: int, marker: str):
    """The process running the transform dies (``os._exit``) on the batch holding row id ``bad_id``, once per marker
    file: a data task or actor lost mid-epoch. Records the ids it returned in ``<marker>.ids`` (one line per batch)."""
    if (batch["x"][:, 0] == bad_id).any():
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return batch


def drop_a_row(batch):
    return {k: v[1:] for k, v in batch.items()}


def hold_until(path: str, timeout_s: float = 300) -> None:
    """Write ``<path>.held`` (the test sees the run has arrived), then wait until the file ``path`` exists (the test
    released it); a test that never does fails the run after ``timeout_s`` instead of hanging it."""
    import time

    open(path + ".held", "a").close()
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


class HoldLaterTrial(nn.Module):
    """An MLP whose ``hold_at``-th training forward, in a sweep trial that starts after another trial finished (a file
    matches ``finished_glob``), writes ``<hold_file>.held`` and waits until ``hold_file`` exists: a test holds that trial
    mid-run, past a checkpoint, for as long as it needs (the first trial, and the held one once released, run on)."""

    def __init__(self, inner: nn.Module, hold_at: int, finished_glob: str, hold_file: str):
        super().__init__()
        self.inner, self.hold_at, self.finished_glob, self.hold_file = inner, hold_at, finished_glob, hold_file
        self.calls = 0

    def forward(self, x):
        if self.training:
            import glob

            self.calls += 1
            if self.calls == self.hold_at and glob.glob(self.finished_glob):
                hold_until(self.hold_file)
        return self.inner(x)


def hold_later_trial_mlp(input_dim: int, num_outputs: int, hold_at: int, finished_glob: str, hold_file: str,
                         hidden=(32,)) -> nn.Module:
    return HoldLaterTrial(mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=list(hidden)), hold_at, finished_glob,
                          hold_file)
