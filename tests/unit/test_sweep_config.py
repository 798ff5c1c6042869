"""The sweep section: bad search spaces fail at load with exact messages; trial configs; resources (no Ray)."""

from __future__ import annotations

import math

import pytest

from lepton_ray import ConfigError, load_config
from lepton_ray.checks import check_config
from lepton_ray.tune.space import concurrent_trials, evaluation_index, max_evaluations, trial_bundles, trial_config

BASE = {"data": {"train": "t.parquet", "eval": "e.parquet"}, "train": {"lr": 0.1, "batch_size": 64}}


def _load(space=None, **sweep):
    """Load, then check the names (a sweep's keys and the values a trial can draw: lepton_ray.checks, as Trainer and sweep do)."""
    return check_config(load_config({**BASE, "sweep": {"space": space if space is not None else {"train.lr": {"loguniform": [1e-4, 1.0]}}, **sweep}}))


@pytest.mark.parametrize(
    "space,message",
    [
        ({"train.lrr": {"loguniform": [1e-4, 1.0]}},
         "sweep.space.train.lrr: not a config key (did you mean 'train.lr'?); a key is section.field, e.g. train.lr or train.batch_size"),
        ({"train.batch_size": {"choice": []}}, "sweep.space.train.batch_size: choice list is empty; give at least one value"),
        ({"train.lr": {"uniform": [0.5, 0.1]}}, "sweep.space.train.lr: uniform low must be < high, got low=0.5 high=0.1"),
        ({"train.lr": {"loguniform": [0.1, 0.1]}}, "sweep.space.train.lr: loguniform low must be < high, got low=0.1 high=0.1"),
        ({"train.lr": {"loguniform": [0, 1.0]}}, "sweep.space.train.lr: loguniform bounds must be > 0, got low=0"),
        ({"train.lr": {"loguniform": [-1.0, 1.0]}}, "sweep.space.train.lr: loguniform bounds must be > 0, got low=-1.0"),
        ({"train.lr": {"normal": [0, 1]}}, "sweep.space.train.lr: expected one of {loguniform|uniform|randint|choice: ...}, got {normal: [0, 1]}"),
        ({"train.lr": {"uniform": [0.1]}}, "sweep.space.train.lr: uniform needs [low, high] (two numbers), got [0.1]"),
        ({"run.name": {"choice": ["a", "b"]}},
         "sweep.space.run.name: not a config key; a key is section.field, e.g. train.lr or train.batch_size"),
        # a value a trial could draw that makes an invalid run: caught at load, not an hour in
        ({"train.batch_size": {"choice": [32, 63]}},
         "sweep.space: a trial with train.batch_size=63 would be invalid: train.batch_size: 63 must be divisible by "
         "scaling.num_workers x train.grad_accum_steps = 2 x 1 = 2"),
        ({"train.lr": {"uniform": [-0.5, 0.5]}},
         "sweep.space: a trial with train.lr=-0.5 would be invalid: train.lr: must be > 0, got -0.5"),
    ],
    ids=["unknown-key", "empty-choice", "low-above-high", "low-equals-high", "log-zero", "log-negative",
         "unknown-distribution", "one-bound", "run-section", "invalid-batch-value", "invalid-lr-value"],
)
def test_bad_search_space_is_a_config_error(space, message):
    with pytest.raises(ConfigError) as err:
        _load(space)
    assert str(err.value) == message


def test_other_sweep_errors():
    with pytest.raises(ConfigError) as err:
        _load(metric="eval_mse")
    assert str(err.value) == "sweep.metric: 'eval_mse' is not reported for model.task 'classification'; choose one of: eval_accuracy, eval_loss"
    with pytest.raises(ConfigError) as err:
        check_config(load_config({"data": {"train": "t.parquet"}, "sweep": {"space": {"train.lr": {"choice": [0.1]}}}}))
    assert str(err.value) == "sweep.metric: eval_accuracy comes from evaluation; set data.eval (held-out data) to sweep"
    with pytest.raises(ConfigError) as err:
        _load(scheduler="hyperband")
    assert str(err.value) == "sweep.scheduler: 'hyperband' is not one of asha, fifo"
    with pytest.raises(ConfigError) as err:
        _load(asha={"reduction_factor": 1})
    assert str(err.value) == "sweep.asha.reduction_factor: must be >= 2, got 1"


def test_nested_spelling_and_overrides_give_the_same_space():
    nested = _load({"train": {"lr": {"loguniform": [1e-4, 1.0]}, "batch_size": {"choice": [32, 128]}}})
    dotted = load_config({**BASE, "sweep": {}}, ["sweep.space.train.lr={loguniform: [1.0e-4, 1.0]}",
                                                 "sweep.space.train.batch_size={choice: [32, 128]}"])
    assert nested.sweep.space == dotted.sweep.space == {"train.lr": {"loguniform": [1e-4, 1.0]}, "train.batch_size": {"choice": [32, 128]}}


@pytest.mark.parametrize("rule,expected", [("none", 0.1), ("linear", 0.2), ("sqrt", 0.1 * math.sqrt(2))])
def test_lr_scaled_with_the_batch(rule, expected):
    cfg = _load({"train.batch_size": {"choice": [32, 128]}}, scale_lr_with_batch=rule)
    raw = trial_config(cfg.to_dict(), {"train.batch_size": 128}, cfg.sweep)
    assert raw["train"]["batch_size"] == 128 and "sweep" not in raw
    assert raw["train"]["lr"] == pytest.approx(expected)
    # a sampled lr is scaled too, relative to reference_batch_size when given
    cfg = _load({"train.batch_size": {"choice": [32, 128]}}, scale_lr_with_batch=rule, reference_batch_size=32)
    raw = trial_config(cfg.to_dict(), {"train.batch_size": 32, "train.lr": 0.05}, cfg.sweep)
    assert raw["train"]["lr"] == pytest.approx(0.05)


def test_evaluations_count_like_the_loop():
    # eval every epoch of 11 steps for 3 epochs: evaluations after steps 11, 22, 33
    assert [evaluation_index(s, 11, 33) for s in (10, 11, 22, 33)] == [0, 1, 2, 3]
    # max_steps not a multiple of the interval: one more at the last step
    assert evaluation_index(25, 10, 25) == 3
    cfg = _load({"train.batch_size": {"choice": [32, 128]}}, )
    cfg.train.epochs = 4
    assert max_evaluations(cfg, 1438) == 4
    cfg = load_config({**BASE, "train": {"max_steps": 100, "eval_every_steps": 30},
                       "sweep": {"space": {"train.eval_every_steps": {"choice": [10, 30]}}}})
    assert max_evaluations(cfg, 1438) == 10


def test_concurrent_trials_from_resources():
    cfg = _load()  # 2 workers x 1 CPU = 2 CPUs a trial (the trial's own process is rank 0)
    assert trial_bundles(cfg) == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert concurrent_trials(cfg, {"CPU": 4.0}, {"CPU": 4.0}) == 2
    assert concurrent_trials(cfg, {"CPU": 12.0}, {"CPU": 7.0}) == 3
    assert concurrent_trials(cfg, {"CPU": 12.0}, {"CPU": 1.0}) == 1  # busy now: one at a time, waiting
    assert concurrent_trials(_load(num_samples=2), {"CPU": 64.0}, {"CPU": 64.0}) == 2
    with pytest.raises(ConfigError) as err:
        concurrent_trials(cfg, {"CPU": 1.0}, {"CPU": 1.0})
    assert str(err.value) == "sweep: one trial needs 2 CPU (2 workers x 1 CPU); the Ray cluster has 1 CPU"
    with pytest.raises(ConfigError) as err:
        concurrent_trials(_load(max_concurrent_trials=3), {"CPU": 4.0}, {"CPU": 4.0})
    assert str(err.value) == (
        "sweep.max_concurrent_trials: 3 trials at once need 6 CPU (each: 2 workers x 1 CPU); "
        "the Ray cluster has 4 CPU, enough for 2 at a time"
    )
