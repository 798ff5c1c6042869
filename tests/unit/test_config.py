"""Unit tests for lepton_ray.config: loading, overrides, and the exact error messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lepton_ray.checks import check_config
from lepton_ray.config import (
    Config,
    ConfigError,
    DataConfig,
    ScalingConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from lepton_ray.sync.allreduce import AllReduceConfig
from lepton_ray.sync.base import options

BASE = {"data": {"train": "data/train.parquet"}}

TRAIN_KEYS = (
    "epochs, max_steps, batch_size, lr, optimizer, momentum, weight_decay, schedule, warmup_steps, "
    "min_lr_ratio, grad_accum_steps, grad_clip_norm, precision, seed, eval_batch_size, eval_every_steps, log_every_steps, collective_timeout_s, straggler_factor, "
    "activation_checkpointing, compile, init_from"
)
SECTIONS = "model, data, train, scaling, sync, checkpoint, run, sweep, serve"


def with_base(**sections) -> dict:
    return {**BASE, **sections}


def checked(raw) -> Config:
    """Load, then check the names the registries own (models, losses, strategies and their options sections)."""
    return check_config(load_config(raw))


def raises(message: str):
    """pytest.raises for a ConfigError whose whole message is ``message``."""
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


def write_yaml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- loading YAML


def test_yaml_file_loads_and_run_name_defaults_to_file_stem(tmp_path):
    path = write_yaml(
        tmp_path,
        "my_digits_run.yaml",
        """
data:
  train: data/train.parquet
  eval: data/eval.parquet
train:
  lr: 0.05
  batch_size: 32
  epochs: 3
model:
  hidden: [16, 8]
scaling:
  num_workers: 4
""",
    )
    cfg = load_config(path)
    assert cfg.run.name == "my_digits_run"
    assert cfg.data.train == "data/train.parquet"
    assert cfg.data.eval == "data/eval.parquet"
    assert cfg.train.lr == 0.05
    assert cfg.train.batch_size == 32
    assert cfg.train.epochs == 3
    assert cfg.model.hidden == [16, 8]
    assert cfg.scaling.num_workers == 4
    # untouched keys keep their defaults
    assert cfg.sync.strategy == "allreduce"
    assert cfg.train.optimizer == "sgd"
    assert cfg.checkpoint.keep_last == 3


def test_yaml_explicit_run_name_wins_over_file_stem(tmp_path):
    path = write_yaml(tmp_path, "file_stem.yaml", "data: {train: x}\nrun: {name: explicit}\n")
    assert load_config(path).run.name == "explicit"


def test_yaml_path_given_as_str(tmp_path):
    path = write_yaml(tmp_path, "as_string.yml", "data: {train: x}\n")
    assert load_config(str(path)).run.name == "as_string"


def test_dict_source_keeps_default_run_name():
    assert load_config(BASE).run.name == "run"


def test_dict_source_is_not_mutated_by_overrides():
    source = {"data": {"train": "x"}, "train": {"lr": 0.5}}
    cfg = load_config(source, ["train.lr=0.25", "scaling.num_workers=1"])
    assert cfg.train.lr == 0.25
    assert source == {"data": {"train": "x"}, "train": {"lr": 0.5}}


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with raises(f"config file '{path}' does not exist"):
        load_config(path)


def test_directory_is_not_a_config_file(tmp_path):
    with raises(f"config file '{tmp_path}' does not exist"):
        load_config(tmp_path)


def test_invalid_yaml(tmp_path):
    text = "data:\n  train: [unclosed\n"
    path = write_yaml(tmp_path, "bad.yaml", text)
    with pytest.raises(yaml.YAMLError) as expected:
        yaml.safe_load(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"config file '{path}' is not valid YAML: {expected.value}"
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "list.yaml", "- a\n- b\n")
    with raises(f"config file '{path}': expected a mapping of sections, got list"):
        load_config(path)


def test_empty_yaml_file_is_an_empty_config(tmp_path):
    path = write_yaml(tmp_path, "empty.yaml", "")
    # an empty file is read as {} and then fails on the one required key, not on parsing
    with raises("data.train: is required: a Parquet file or directory, got ''"):
        load_config(path)
    assert load_config(path, ["data.train=d"]).run.name == "empty"


# --------------------------------------------------------------------------- --set overrides


def test_overrides_apply_on_top_of_yaml(tmp_path):
    path = write_yaml(tmp_path, "base.yaml", "data: {train: x}\ntrain: {lr: 0.1, epochs: 2}\nmodel: {hidden: [32]}\n")
    cfg = load_config(path, ["train.lr=0.05", "model.hidden=[8,4]", "sync.allreduce.bucket_mb=4", "run.name=other"])
    assert cfg.train.lr == 0.05
    assert cfg.model.hidden == [8, 4]
    assert cfg.train.epochs == 2  # untouched key of an overridden section stays
    assert options(AllReduceConfig, cfg).bucket_mb == 4.0
    assert cfg.run.name == "other"


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(BASE, ["scaling.use_gpu=false", "train.max_steps=null", "data.features=[a, b]", "run.name=abc"])
    assert cfg.scaling.use_gpu is False
    assert cfg.train.max_steps is None
    assert cfg.data.features == ["a", "b"]
    assert cfg.run.name == "abc"


def test_apply_overrides_creates_sections_and_nested_keys():
    raw = {"train": {"lr": 0.1}}
    out = apply_overrides(raw, ["train.lr=0.05", "sync.allreduce.bucket_mb=2", "model.hidden=[8,4]"])
    assert out is raw
    assert raw == {"train": {"lr": 0.05}, "sync": {"allreduce": {"bucket_mb": 2}}, "model": {"hidden": [8, 4]}}


def test_override_of_unknown_key():
    with raises(f"train.lrr: unknown key (did you mean 'lr'?); valid keys in 'train' are: {TRAIN_KEYS}"):
        load_config(BASE, ["train.lrr=0.05"])


def test_override_of_unknown_section():
    with raises(f"trian: unknown section (did you mean 'train'?); valid sections are: {SECTIONS}"):
        load_config(BASE, ["trian.lr=0.05"])


def test_override_without_equals_sign():
    with raises("--set 'train.lr': expected section.key=value, e.g. train.lr=0.05"):
        load_config(BASE, ["train.lr"])


def test_override_without_key():
    with raises("--set '=3': expected section.key=value, e.g. train.lr=0.05"):
        apply_overrides({}, ["=3"])


def test_override_through_a_value_that_is_not_a_section():
    with raises("--set train.lr.x=1: 'train.lr' is not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_override_with_wrong_type_names_the_key():
    with raises("train.epochs: expected an integer, got 'many'"):
        load_config(BASE, ["train.epochs=many"])


def test_override_scientific_notation_is_a_number():
    assert load_config(BASE, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_yaml_scientific_notation_is_a_number(tmp_path):
    path = write_yaml(tmp_path, "sci.yaml", "data: {train: x}\ntrain: {lr: 3e-4}\n")
    assert load_config(path).train.lr == pytest.approx(3e-4)


# --------------------------------------------------------------------------- unknown keys and sections


def test_unknown_key_with_did_you_mean_hint():
    with raises(f"train.lrr: unknown key (did you mean 'lr'?); valid keys in 'train' are: {TRAIN_KEYS}"):
        load_config(with_base(train={"lrr": 0.1}))


def test_unknown_key_without_a_close_match():
    with raises("scaling.zzzz: unknown key; valid keys in 'scaling' are: num_workers, resize_check_s, use_gpu, cpus_per_worker, max_failures, poll_interval_s, worker_start_timeout_s, shared_filesystem"):
        load_config(with_base(scaling={"zzzz": 1}))


def test_unknown_key_in_nested_section():
    with raises(
        "sync.allreduce.bucket: unknown key (did you mean 'bucket_mb'?); "
        "valid keys in 'sync.allreduce' are: bucket_mb, find_unused_parameters, cpu_transport, shm_dir, shard_optimizer"
    ):
        checked(with_base(sync={"allreduce": {"bucket": 4}}))


def test_unknown_section():
    with raises(f"optimiser: unknown section; valid sections are: {SECTIONS}"):
        load_config(with_base(optimiser={"lr": 0.1}))


def test_unknown_section_with_hint():
    with raises(f"scalling: unknown section (did you mean 'scaling'?); valid sections are: {SECTIONS}"):
        load_config(with_base(scalling={"num_workers": 2}))


def test_unknown_key_in_yaml_file(tmp_path):
    path = write_yaml(tmp_path, "typo.yaml", "data: {train: x}\ntrain: {lrr: 0.1}\n")
    with raises(f"train.lrr: unknown key (did you mean 'lr'?); valid keys in 'train' are: {TRAIN_KEYS}"):
        load_config(path)


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got 2.5"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer, got true"),
        ({"train": {"lr": True}}, "train.lr: expected a number, got true"),
        ({"scaling": {"use_gpu": 1}}, "scaling.use_gpu: expected true or false, got 1"),
        ({"scaling": {"use_gpu": "yes please"}}, "scaling.use_gpu: expected true or false, got 'yes please'"),
        ({"train": {"max_steps": "ten"}}, "train.max_steps: expected an integer (or null), got 'ten'"),
        ({"train": {"grad_clip_norm": [1]}}, "train.grad_clip_norm: expected a number (or null), got [1]"),
        ({"model": {"hidden": [8, "a"]}}, "model.hidden[1]: expected an integer, got 'a'"),
        ({"model": {"kwargs": [1, 2]}}, "model.kwargs: expected a mapping, got [1, 2]"),
        ({"data": {"train": 5}}, "data.train: expected a string, got 5"),
        ({"sync": "allreduce"}, "sync: expected a mapping, got 'allreduce'"),
        ({"sync": {"allreduce": 3}}, "sync.allreduce: expected a mapping, got 3"),
    ],
)
def test_wrong_type(sections, message):
    with raises(message):
        checked(with_base(**sections))


def test_wrong_type_for_a_list_reads_naturally():
    with raises("model.hidden: expected a list of integers, got 5"):
        load_config(with_base(model={"hidden": 5}))


def test_wrong_type_in_dataclass_constructor():
    with raises("train.lr: expected a number, got 'fast'"):
        TrainConfig(lr="fast")


def test_ints_widen_to_floats():
    cfg = load_config(with_base(train={"lr": 1, "momentum": 0, "min_lr_ratio": 1}, sync={"allreduce": {"bucket_mb": 4}}))
    bucket = options(AllReduceConfig, cfg).bucket_mb
    for value in (cfg.train.lr, cfg.train.momentum, cfg.train.min_lr_ratio, bucket):
        assert type(value) is float
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.min_lr_ratio, bucket) == (1.0, 0.0, 1.0, 4.0)
    assert type(load_config(BASE, ["train.grad_clip_norm=2"]).train.grad_clip_norm) is float
    assert type(TrainConfig(lr=2).lr) is float


# --------------------------------------------------------------------------- enums


def test_invalid_enum():
    with raises("sync.strategy: 'allreduc' is not one of allreduce, fsdp, ps, hybrid (did you mean 'allreduce'?)"):
        checked(with_base(sync={"strategy": "allreduc"}))


def test_unknown_strategy_section():
    with raises("sync.fsdb: unknown key (did you mean 'fsdp'?); valid keys in 'sync' are: strategy, allreduce, fsdp, ps"):
        checked(with_base(sync={"strategy": "fsdp", "fsdb": {"reshard_after_forward": False}}))


def test_config_py_imports_no_registry():
    """config.py checks shapes only; the names are checked by the registries that own them (no import cycle)."""
    import ast

    import lepton_ray.config

    tree = ast.parse(Path(lepton_ray.config.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
               [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [m for m in imported if m and m.startswith("lepton_ray")] == []


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"optimizer": "adam"}}, "train.optimizer: 'adam' is not one of sgd, adamw"),
        ({"train": {"schedule": "linear"}}, "train.schedule: 'linear' is not one of cosine, constant"),
        ({"train": {"precision": "fp8"}}, "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
        ({"model": {"task": 3}}, "model.task: 3 is not one of classification, regression"),
        ({"sync": {"allreduce": {"cpu_transport": "tcp"}}}, "sync.allreduce.cpu_transport: 'tcp' is not one of auto, shm, gloo"),
    ],
)
def test_invalid_enums(sections, message):
    with raises(message):
        checked(with_base(**sections))


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"lr": 0}}, "train.lr: must be > 0, got 0.0"),
        ({"train": {"lr": -0.5}}, "train.lr: must be > 0, got -0.5"),
        ({"train": {"epochs": 0}}, "train.epochs: must be >= 1, got 0"),
        ({"train": {"max_steps": 0}}, "train.max_steps: must be >= 1, got 0"),
        ({"train": {"momentum": 1.0}}, "train.momentum: must be in [0, 1), got 1.0"),
        ({"train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio: must be in [0, 1], got 1.5"),
        ({"train": {"grad_accum_steps": 0}}, "train.grad_accum_steps: must be >= 1, got 0"),
        ({"train": {"grad_clip_norm": 0}}, "train.grad_clip_norm: must be > 0, got 0.0"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers: must be >= 1, got 0"),
        ({"scaling": {"max_failures": -2}}, "scaling.max_failures: must be >= 0 (or -1 for unlimited), got -2"),
        ({"scaling": {"poll_interval_s": 0}}, "scaling.poll_interval_s: must be between 0.05 and 60 seconds, got 0.0"),
        ({"model": {"dropout": 1.0}}, "model.dropout: must be in [0, 1), got 1.0"),
        ({"model": {"hidden": [8, 0]}}, "model.hidden: every width must be > 0, got [8, 0]"),
        ({"model": {"name": "resnet"}}, "model.name: must be one of cnn, gpt, mlp, recommender (or set model.factory), got 'resnet'"),
        ({"model": {"factory": "nocolon"}}, "model.factory: must look like 'package.module:function', got 'nocolon'"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last: must be >= 1, got 0"),
        ({"checkpoint": {"every_n_steps": -1}}, "checkpoint.every_n_steps: must be >= 0, got -1"),
        ({"run": {"name": "a/b"}}, "run.name: must be a non-empty name without '/', got 'a/b'"),
        ({"sync": {"allreduce": {"bucket_mb": 0}}}, "sync.allreduce.bucket_mb: must be > 0, got 0.0"),
        ({"data": {"train": "x", "features": []}}, "data.features: must name at least one column (or be omitted), got []"),
        (
            {"data": {"train": "x", "features": ["a", "label"]}},
            "data.features: must not contain the label column 'label', got [a, label]",
        ),
    ],
)
def test_out_of_range(sections, message):
    with raises(message):
        checked(with_base(**sections))


def test_data_train_is_required():
    with raises("data.train: is required: a Parquet file or directory, got ''"):
        load_config({})


def test_batch_size_must_divide_by_workers_times_accumulation():
    with raises(
        "train.batch_size: 100 must be divisible by scaling.num_workers x train.grad_accum_steps = 4 x 8 = 32"
    ):
        load_config(with_base(train={"batch_size": 100, "grad_accum_steps": 8}, scaling={"num_workers": 4}))
    with raises("train.batch_size: 63 must be divisible by scaling.num_workers x train.grad_accum_steps = 2 x 1 = 2"):
        load_config(with_base(train={"batch_size": 63}))
    cfg = load_config(with_base(train={"batch_size": 96, "grad_accum_steps": 8}, scaling={"num_workers": 4}))
    assert cfg.train.batch_size == 96


def test_fp16_needs_a_gpu():
    with raises("train.precision: 'fp16' needs a GPU (scaling.use_gpu: true); on CPU use 'bf16' or 'fp32'"):
        load_config(with_base(train={"precision": "fp16"}))
    assert load_config(with_base(train={"precision": "fp16"}, scaling={"use_gpu": True})).train.precision == "fp16"
    assert load_config(with_base(train={"precision": "bf16"})).train.precision == "bf16"


def test_cross_section_checks_also_run_for_direct_construction():
    with raises("train.batch_size: 10 must be divisible by scaling.num_workers x train.grad_accum_steps = 4 x 1 = 4"):
        Config(data=DataConfig(train="x"), train=TrainConfig(batch_size=10), scaling=ScalingConfig(num_workers=4))


# --------------------------------------------------------------------------- round trip


def test_to_dict_round_trips_to_an_equal_config():
    cfg = load_config(
        with_base(
            data={"train": "t.parquet", "eval": "e.parquet", "features": ["a", "b"], "storage_options": {"anon": True}},
            model={"hidden": [8, 4], "dropout": 0.1, "kwargs": {"k": 1}},
            train={"lr": 0.05, "batch_size": 32, "max_steps": 7, "grad_clip_norm": 1, "precision": "bf16"},
            scaling={"num_workers": 4},
            sync={"allreduce": {"bucket_mb": 1}},
            checkpoint={"dir": "s3://b/p", "every_n_steps": 5, "keep_last": 2},
            run={"name": "rt"},
        )
    )
    d = cfg.to_dict()
    assert isinstance(d, dict) and isinstance(d["train"], dict) and isinstance(d["sync"]["allreduce"], dict)
    again = load_config(d)
    assert again == cfg
    assert again.to_dict() == d
    assert load_config(cfg) == cfg  # a Config is also a valid source
    # and through a YAML file, as a user would save it
    assert load_config(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_to_dict_round_trip_through_a_yaml_file(tmp_path):
    cfg = load_config(with_base(train={"lr": 0.25}), ["run.name=saved"])
    path = write_yaml(tmp_path, "dumped.yaml", yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg


def test_config_equality_detects_a_difference():
    assert load_config(BASE, ["train.lr=0.05"]) != load_config(BASE, ["train.lr=0.06"])


def test_load_config_from_config_applies_overrides_without_mutating_source():
    cfg = load_config(BASE)
    other = load_config(cfg, ["train.lr=0.5"])
    assert other.train.lr == 0.5
    assert cfg.train.lr == 0.1


def test_nested_section_instance_is_accepted():
    cfg = Config(data=DataConfig(train="x"), sync={"allreduce": AllReduceConfig(bucket_mb=2)})
    assert options(AllReduceConfig, cfg).bucket_mb == 2.0
    assert load_config(cfg.to_dict()) == cfg


def test_ray_train_settings_are_handed_over_unless_the_user_set_them(monkeypatch):
    """scaling.poll_interval_s and worker_start_timeout_s reach Ray Train through the variables its driver side
    propagates, for one fit only; a variable the user set wins."""
    import os

    from lepton_ray.train.trainer import _ray_train_env

    poll, start = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    scaling = load_config(with_base(scaling={"poll_interval_s": 0.25, "worker_start_timeout_s": 20})).scaling
    monkeypatch.delenv(poll, raising=False)
    monkeypatch.delenv(start, raising=False)
    with _ray_train_env(scaling):
        assert (os.environ[poll], os.environ[start]) == ("0.25", "20.0")
    assert poll not in os.environ and start not in os.environ
    monkeypatch.setenv(poll, "3")
    with _ray_train_env(scaling):
        assert (os.environ[poll], os.environ[start]) == ("3", "20.0")
    assert os.environ[poll] == "3" and start not in os.environ


# --------------------------------------------------------------------------- elastic scaling


def test_elastic_num_workers_is_a_min_max_pair():
    s = load_config(with_base(scaling={"num_workers": [1, 2]})).scaling
    assert (s.elastic, s.min_workers, s.max_workers) == (True, 1, 2)
    fixed = load_config(with_base(scaling={"num_workers": 2})).scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 2, 2)


@pytest.mark.parametrize("value", [[2, 1], [0, 2], [1, 2, 3]])
def test_elastic_num_workers_out_of_order_or_range(value):
    with raises(f"scaling.num_workers: must be a worker count >= 1 or an elastic [min, max] with 1 <= min <= max, got {value}"):
        load_config(with_base(scaling={"num_workers": value}))


def test_elastic_batch_must_split_at_every_size():
    with raises("train.batch_size: 64 must be divisible by scaling.num_workers x train.grad_accum_steps = 3 x 1 = 3 (elastic [2, 4]: at 3 workers)"):
        load_config(with_base(train={"batch_size": 64}, scaling={"num_workers": [2, 4]}))


def test_elastic_needs_a_strategy_that_resizes():
    with raises("scaling.num_workers: elastic [1, 2] needs a strategy that resumes at any worker count (allreduce, fsdp);"
                " sync.strategy 'ps' does not; use a fixed worker count"):
        checked(with_base(sync={"strategy": "ps"}, scaling={"num_workers": [1, 2]}))


def test_num_workers_of_another_type():
    with raises("scaling.num_workers: expected an integer or a list of integers, got 'two'"):
        load_config(with_base(scaling={"num_workers": "two"}))


def test_data_cpus_must_hold_the_data_engines_tasks_at_once():
    """ray_data's reservation (data.cpus) must fit one task, and every actor of every worker's pool at once."""
    ray_data = {"train": "x.parquet", "engine": "ray_data"}
    with raises("data.cpus: 1 CPUs hold 0 data tasks of data.transform_resources.num_cpus 2; the run needs room for one task:"
                " set data.cpus >= 2"):
        load_config(with_base(data={**ray_data, "cpus": 1, "transform_resources": {"num_cpus": 2}}))
    with raises("data.cpus: 2 CPUs hold 2 data tasks of data.transform_resources.num_cpus 1; the run needs room for 2 actors x 2"
                " workers: set data.cpus >= 4"):
        load_config(with_base(data={**ray_data, "transform_resources": {"concurrency": 2}}, scaling={"num_workers": 2}))
    assert load_config(with_base(data={**ray_data, "cpus": 4, "transform_resources": {"concurrency": 2}}, scaling={"num_workers": 2}))
    assert load_config(with_base(data={"train": "x.parquet", "cpus": 1, "transform_resources": {"num_cpus": 2}}))  # native: unused
