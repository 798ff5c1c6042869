"""Small training configs, checkpoint readers and a run in the background, shared by the integration and fault tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from lepton_ray.train.checkpoint import CheckpointStore


def small_config(tmp_path: Path, data_path: Path, **sections) -> dict:
    """20 SGD steps of an MLP [32] on ``data_path``, 2 workers, checkpoints every 10 steps.

    Each keyword is a section merged into the defaults; a dict value of a key that already holds
    a dict (e.g. ``sync={"ps": {"mode": "ssp"}}``) is merged into it rather than replacing it.
    """
    cfg = {
        "model": {"name": "mlp", "hidden": [32]},
        "data": {"train": str(data_path), "label": "label"},
        "train": {"max_steps": 20, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                  "schedule": "constant", "seed": 7},
        "scaling": {"num_workers": 2},
        "checkpoint": {"every_n_steps": 10, "keep_last": 5},
        "run": {"dir": str(tmp_path / "runs"), "name": "t"},
    }
    return merge_sections(cfg, **sections)


_ONCE: dict[str, Any] = {}
T = TypeVar("T")


def data_digest(data: str | Path) -> str:
    """SHA-256 of the Parquet bytes at ``data``: a file, or every ``.parquet`` file under a directory (names relative to
    it), local or on S3 (a prepared dataset's manifest holds its creation time, so it is left out)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(data))
    files = [root] if fs.isfile(root) else sorted(f for f in fs.find(root) if f.endswith(".parquet"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.removeprefix(root).encode() + fs.cat_file(f))
    return digest.hexdigest()


def once(key: str, run: Callable[[], T]) -> T:
    """``run()`` once per test session and ``key`` (an uninterrupted reference run several tests compare with: the key
    holds what decides its result, e.g. the config's varied part and :func:`data_digest` of its data)."""
    if key not in _ONCE:
        _ONCE[key] = run()
    return _ONCE[key]


def ids_table(n: int, seed: int = 0):
    """Rows whose feature 0 is the row id (``lr_testing_models.record_ids_mlp`` and the elastic test's model record it
    and train on the rest), 4 seeded normal features and a label feature 1 (the first of them) decides."""
    import numpy as np
    import pyarrow as pa

    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return pa.table({"id": np.arange(n).astype(np.float32), **{f"f{i}": x[:, i] for i in range(4)},
                     "label": (x[:, 0] > 0).astype(np.int64)})


def merge_sections(cfg: dict, **sections) -> dict:
    """``cfg`` with each keyword section merged in (one level deep, see :func:`small_config`)."""
    for section, values in sections.items():
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(cfg.get(section, {}).get(k), dict):
                cfg[section][k].update(v)
            else:
                cfg.setdefault(section, {})[k] = v
    return cfg


def final_params(result) -> dict[str, torch.Tensor]:
    """The model parameters of a run's newest checkpoint (which must be the one its result names)."""
    store = CheckpointStore(result.checkpoint.rsplit("/", 1)[0])
    latest = store.latest()
    assert latest is not None and latest.uri == result.checkpoint
    return store.load(latest, ["model"])["model"]


def records(run_dir: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` so far ([] before it exists)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


RUN_ACTORS = ("TrainController", "RayTrainWorker", "_RayShardServer", "_Peer")
"""The actor classes of a run in flight (Ray Train's controller and workers, PS shards, warm-group helpers)."""


class BackgroundFit:
    """``trainer.fit(**kwargs)`` in a thread, for a test that acts on the run mid-way (kills a process). Use it as a
    context manager: a test that fails while the run is still going stops it (nothing a test starts outlives it)."""

    def __enter__(self) -> "BackgroundFit":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread.is_alive():
            self.stop()

    def stop(self, timeout_s: float = 60) -> None:
        """SIGKILL the processes of every run actor still alive (the tests run one at a time on the session cluster) until
        Ray's state API reports none alive (it learns of a death a moment after it), then wait for the thread: ``fit``
        returns with an error once its controller or group is gone."""
        from ray.util.state import list_actors

        def alive() -> list:
            return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10000) if a.class_name in RUN_ACTORS]

        deadline = time.monotonic() + timeout_s
        while (left := alive()) and time.monotonic() < deadline:  # until Ray has seen every one of them die
            for a in left:
                if a.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(a.pid, signal.SIGKILL)
            time.sleep(0.5)
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    def __init__(self, trainer: Any, **kwargs: Any):
        self.trainer, self._out = trainer, {}
        self._thread = threading.Thread(target=lambda: self._out.update(result=trainer.fit(**kwargs)), daemon=True)
        self._thread.start()

    def wait_for_step(self, step: int, timeout_s: float = 300) -> None:
        """Until the run has logged a training loss at ``step`` or later."""
        deadline = time.monotonic() + timeout_s
        while not any(r.get("step", 0) >= step and "train_loss" in r for r in records(self.trainer.run_dir)):
            assert self._thread.is_alive() and time.monotonic() < deadline, f"the run never got to step {step}"
            time.sleep(0.2)

    def result(self, timeout_s: float = 400) -> Any:
        """The run's Result, once it has finished (within ``timeout_s``)."""
        self._thread.join(timeout=timeout_s)
        assert not self._thread.is_alive(), f"the run did not finish within {timeout_s:.0f} s"
        assert "result" in self._out, "the run failed (its error is in the log above)"
        return self._out["result"]
