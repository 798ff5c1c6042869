"""The Python API as a Ray user meets it in a notebook or script: functions defined right there (not importable by
name on any worker) as the model factory, the loss and the data transform, trained through Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lepton_ray import ConfigError, Trainer
from lepton_ray.imports import register
from lepton_ray.serve.bundle import load_checkpoint
from run_configs import small_config


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("engine", ["native", "ray_data"])
def test_callables_defined_in_a_script_train_on_ray_train_workers(tmp_path, blobs, engine):
    scale = 2.0  # captured by the transform: shipped by value with it

    def build(input_dim, num_outputs):  # local functions: a worker cannot import them by name
        from torch import nn

        return nn.Sequential(nn.Linear(input_dim, 32), nn.ReLU(), nn.Linear(32, 4))  # the blobs' 4 classes

    def loss(output, target):
        import torch.nn.functional as F

        return F.cross_entropy(output, target)

    def double(batch):
        return {**batch, "x": batch["x"] * scale}

    cfg = small_config(tmp_path, blobs, data={"engine": engine}, train={"max_steps": 40})
    result = Trainer(cfg, model=build, loss=loss, transform=double, progress=False).fit()
    assert result.metrics["steps"] == 40 and result.metrics["train_loss"] < 1.0
    saved = json.loads((Path(result.run_dir) / "config.yaml").read_text())  # what the run recorded that it was given
    qual = "test_callables_defined_in_a_script_train_on_ray_train_workers.<locals>"
    assert saved["model"]["factory"] == f"callable:test_python_api.{qual}.build"
    assert saved["model"]["loss"] == f"callable:test_python_api.{qual}.loss"
    assert saved["data"]["transform"] == f"callable:test_python_api.{qual}.double"


def test_serving_a_checkpoint_whose_model_was_a_callable_says_how_to_give_it(tmp_path, blobs):
    def build(input_dim, num_outputs):
        from torch import nn

        return nn.Linear(input_dim, num_outputs)

    cfg = small_config(tmp_path, blobs, train={"max_steps": 10}, scaling={"num_workers": 1})
    result = Trainer(cfg, model=build, progress=False).fit(local=True)
    name = "callable:test_python_api.test_serving_a_checkpoint_whose_model_was_a_callable_says_how_to_give_it.<locals>.build"
    from lepton_ray import imports

    imports._REGISTRY.pop(name)  # a fresh serving process: nobody registered it
    with pytest.raises(ConfigError) as err:
        load_checkpoint(result.checkpoint).build_fp32()
    assert str(err.value) == (f"model.factory: '{name}' was a Python callable passed to the run (e.g. Trainer(cfg, model=fn)); this"
                              " process has no such callable: call lepton_ray.imports.register(fn) with the same function first"
                              " (or name an importable 'package.module:function' instead)")
    assert register(build) == name
    assert load_checkpoint(result.checkpoint).build_fp32() is not None


@pytest.mark.usefixtures("ray_cluster")
def test_a_ray_data_dataset_passed_in_trains_says_its_guarantees_and_restarts_from_its_newest_checkpoint(tmp_path, blobs):
    """A Ray user's own Dataset (read_parquet + map_batches), for train and eval, with data.train left out of the config.
    A worker process dies at its 15th step (a machine lost): under max_failures 1, Ray Train restarts the group, which
    resumes from the checkpoint of step 10 and reads the rest from the same Dataset's splits (a fresh pass, as the
    guarantees say) to the end."""
    import ray.data

    from lepton_ray.data.dataset import GUARANTEES

    def shift(batch):
        return {**batch, "f0": batch["f0"] + 0.0}

    train = ray.data.read_parquet(str(blobs)).map_batches(shift)
    cfg = small_config(tmp_path, blobs, model={"factory": "lr_testing_models:crash_once_mlp",
                                               "kwargs": {"crash_at": 15, "marker": str(tmp_path / "crashed")}},
                       train={"max_steps": 20}, scaling={"max_failures": 1})
    del cfg["data"]["train"]
    result = Trainer(cfg, datasets={"train": train, "eval": ray.data.read_parquet(str(blobs))}, progress=False).fit()
    assert (tmp_path / "crashed").exists() and result.metrics["steps"] == 20 and result.metrics["eval_accuracy"] > 0.9
    assert result.resumed_from.endswith("step_00000010")
    starts = [r for r in result.records if r.get("event") == "start"]
    assert [s["resumed_from"] is None for s in starts] == [True, False]
    assert all(s["data"]["engine"] == "dataset" and s["data"]["guarantees"] == GUARANTEES for s in starts)
    saved = json.loads((Path(result.run_dir) / "config.yaml").read_text())
    assert saved["data"]["train"] == "dataset:train" and saved["data"]["eval"] == "dataset:eval"


@pytest.mark.usefixtures("ray_cluster")
def test_a_dataset_and_a_config_path_for_one_split_is_an_error(tmp_path, blobs):
    import ray.data

    with pytest.raises(ConfigError, match=r"^data.train: given twice, as '.*train.parquet' in the config and as datasets\['train'\]; give one$"):
        Trainer(small_config(tmp_path, blobs), datasets={"train": ray.data.read_parquet(str(blobs))}, progress=False)
    with pytest.raises(ConfigError, match=r"^datasets\['train'\]: expected a ray.data.Dataset, got list$"):
        Trainer(small_config(tmp_path, blobs), datasets={"train": [1, 2]}, progress=False)
    cfg = small_config(tmp_path, blobs)
    del cfg["data"]["train"]
    with pytest.raises(ConfigError, match=r"^transform: does not apply to a ray.data.Dataset passed as datasets\['train'\]; apply"):
        Trainer(cfg, datasets={"train": ray.data.read_parquet(str(blobs))}, transform=lambda b: b, progress=False)
