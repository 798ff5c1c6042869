"""The driver plans, then launches: ``Trainer(cfg)`` reads nothing; ``fit()`` (or the first planned attribute) makes
the plan before Ray starts; a sweep's trials plan on the data the sweep described once (no Ray here)."""

from __future__ import annotations

import re

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from torch import nn

from lepton_ray import ConfigError, Trainer
from lepton_ray.config import load_config
from lepton_ray.imports import register
from lepton_ray.tune.sweep import _absolute, _plan, _trial_raw


def _cfg(data, tmp_path, **train) -> dict:
    return {"data": {"train": str(data)}, "model": {"hidden": [8]}, "train": {"batch_size": 32, "epochs": 1, **train},
            "scaling": {"num_workers": 1}, "run": {"name": "p", "dir": str(tmp_path / "runs")}}


class Counted(MemoryFileSystem):
    """fsspec's in-memory filesystem, as ``counted://``, recording each call that reads or lists it."""

    protocol = "counted"
    calls: list[str] = []

    def ls(self, path, detail=True, **kwargs):
        self.calls.append(f"ls {path}")
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        self.calls.append(f"info {path}")
        return super().info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self.calls.append(f"open {path}")
        return super()._open(path, mode=mode, **kwargs)


fsspec.register_implementation("counted", Counted, clobber=True)


def test_a_missing_data_path_fails_in_fit_before_ray_not_in_the_constructor(tmp_path):
    import ray

    connected = ray.is_initialized()  # in a whole-suite run an earlier test may have connected this process
    missing = tmp_path / "nowhere" / "train.parquet"
    trainer = Trainer(_cfg(missing, tmp_path), progress=False)  # constructs: nothing is read yet
    message = f"^{re.escape(f'data.train: {str(missing)!r} does not exist')}$"
    with pytest.raises(ConfigError, match=message):
        trainer.fit()
    with pytest.raises(ConfigError, match=message):  # a planned attribute makes the same plan, with the same error
        trainer.train_info
    assert ray.is_initialized() == connected and not (tmp_path / "runs").exists()  # Ray not started, no run directory


def test_constructing_a_trainer_reads_no_storage_and_builds_no_model(blobs, tmp_path):
    built = []

    def model(input_dim: int, num_outputs: int) -> nn.Module:
        built.append(input_dim)
        return nn.Linear(input_dim, num_outputs)

    fs = Counted()
    fs.pipe(f"/{tmp_path.name}/train.parquet", blobs.read_bytes())
    cfg = _cfg(f"counted://{tmp_path.name}/train.parquet", tmp_path)
    cfg["checkpoint"] = {"dir": f"counted://{tmp_path.name}/checkpoints"}
    Counted.calls.clear()
    trainer = Trainer(cfg, model=model, progress=False)
    assert Counted.calls == [] and built == []  # no listing, no Parquet read, no checkpoint lookup, no model
    assert trainer.run_name == "p"  # the first planned attribute plans: reads the data, builds the model, lists checkpoints
    assert f"open /{tmp_path.name}/train.parquet" in Counted.calls and built and trainer.train_info.num_rows == 512
    assert any(c.startswith(f"ls /{tmp_path.name}/checkpoints") or c.startswith(f"info /{tmp_path.name}/checkpoints")
               for c in Counted.calls), Counted.calls


def narrow(input_dim: int, num_outputs: int, features: int = 0) -> nn.Module:
    """A model whose input width is a kwarg: a trial that sweeps it to the wrong width fails its forward check."""
    return nn.Linear(features or input_dim, num_outputs)


def test_a_sweep_trial_plans_on_the_described_data_and_checks_its_own_swept_keys(blobs, tmp_path):
    cfg = _cfg(blobs, tmp_path)
    cfg["model"] = {"factory": register(narrow)}
    cfg["sweep"] = {"space": {"train.batch_size": {"choice": [32, 64]}}, "dir": str(tmp_path / "sweeps")}
    config = load_config(cfg)
    plan = _plan(_absolute(config), config.sweep, "s", tmp_path / "sweeps" / "s" / "trials")  # the sweep driver's step
    assert plan["data"].train.num_rows == 512
    blobs.unlink()  # from here on, a trial that read the data again would fail

    def trial(params: dict, trial_id: str) -> Trainer:
        return Trainer(load_config(_trial_raw(plan, params, trial_id)), progress=False, data_plan=plan["data"])

    ok = trial({"train.batch_size": 64, "model.kwargs": {"features": 16}}, "t1")
    assert ok.run_name == "t1" and ok.train_info is plan["data"].train  # planned without reading the data
    with pytest.raises(ConfigError, match=r"^train.batch_size: 1024 is larger than data.train \(512 rows\)$"):
        trial({"train.batch_size": 1024}, "t2").plan
    with pytest.raises(ConfigError, match=r"^model: a forward pass on 2 rows of data.train \(.*\) failed: RuntimeError: "):
        trial({"model.kwargs": {"features": 15}}, "t3").plan
    with pytest.raises(ConfigError, match=r"^data.train: '.*' does not exist$"):  # a swept data key: the data is described again
        trial({"data.shuffle": False}, "t4").plan


def test_a_plan_made_inside_a_meta_device_context_checks_the_model_on_the_cpu(blobs, tmp_path):
    """The first planned attribute may be read inside a strategy's meta-device build (a model factory that asks for
    ``trainer.train_info``): the plan's forward-pass check still builds and runs its model on the CPU."""
    import torch

    trainer = Trainer(load_config(_cfg(blobs, tmp_path)), progress=False)
    with torch.device("meta"):
        info = trainer.train_info
    assert info.num_rows == 512 and [c.name for c in info.batch_schema.inputs] == ["x"]
