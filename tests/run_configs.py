"""Small training configs and checkpoint readers shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

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
