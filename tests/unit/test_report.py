"""What a run leaves to look at: TensorBoard event files (read back with TensorBoard's own reader) and
``lepton-ray report``'s PNGs, from one real tiny run (``fit(local=True)``, no Ray); the sink's TensorBoard
export of records a test writes (per-rank breakdowns, a straggler, a restarted worker group)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_blobs
from lepton_ray import Trainer, load_config
from lepton_ray.cli import main
from lepton_ray.train.sink import Sink
from lepton_ray.tune.results import read_records


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """8 steps of a small MLP in this process (2 epochs of 4 batches), evaluated every 2 steps."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    data = write_blobs(tmp / "data" / "train.parquet", rows=128)
    cfg = {"model": {"name": "mlp", "hidden": [8]}, "data": {"train": str(data), "eval": str(data), "label": "label"},
           "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "seed": 3, "eval_every_steps": 2},
           "scaling": {"num_workers": 1}, "checkpoint": {"every_n_steps": 0}, "run": {"dir": str(tmp / "runs"), "name": "tiny"}}
    return Path(Trainer(load_config(cfg), progress=False).fit(local=True).run_dir)


def _scalars(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def _logged(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _f32(x: float) -> float:  # TensorBoard keeps a scalar as a float32
    return float(np.float32(x))


def test_tensorboard_holds_every_train_and_eval_value_of_metrics_jsonl(tiny_run):
    records = read_records(tiny_run)
    train = [r for r in records if "event" not in r and "train_loss" in r]
    evals = [r for r in records if "event" not in r and "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [2, 4, 6, 8]
    acc = _scalars(tiny_run / "tensorboard")
    for key in ("train_loss", "lr", "samples_per_s", "data_wait_frac"):
        assert _logged(acc, key) == [(r["step"], _f32(r[key])) for r in train], key
    for key in ("eval_loss", "eval_accuracy"):
        assert _logged(acc, key) == [(r["step"], _f32(r[key])) for r in evals], key
    assert [e.wall_time for e in acc.Scalars("train_loss")] == [r["time"] for r in train]
    assert len(list((tiny_run / "tensorboard").iterdir())) == 1  # one run, one start record: one file


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every row: a truncated file fails here
        assert len(set(img.convert("RGB").get_flattened_data())) > 20  # drawn, not a blank canvas
        return img.size


def test_report_draws_the_runs_pngs_and_prints_their_paths(tiny_run, tmp_path, capsys):
    """The tiny run's records, with two ranks' per-epoch breakdowns and a straggler warning added (a 2-rank run's)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "metrics.jsonl", run / "metrics.jsonl")
    breakdown = [{"event": "breakdown", "rank": rank, "host": f"h{rank}", "epoch": epoch, "step": 4 * (epoch + 1), "steps": 4,
                  "time": 0.0, "step_s": 2.0, "data_s": 0.25, "compute_s": 1.0 + rank, "sync_s": 0.5, "optimizer_s": 0.125,
                  "checkpoint_s": 0.0, "eval_s": 0.0625, "residual_s": 0.0625} for epoch in (0, 1) for rank in (0, 1)]
    straggler = {"event": "straggler", "epoch": 1, "rank": 1, "host": "h1", "compute_s_per_step": 0.5, "median_compute_s_per_step": 0.375,
                 "ratio": 1.33, "factor": 1.2, "message": "rank 1 on h1 is a straggler in epoch 1"}
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in [*breakdown, straggler]))
    out = tmp_path / "png"
    assert main(["report", str(run), "--out", str(out)]) == 0
    names = ["curves.png", "throughput.png", "breakdown.png"]
    assert capsys.readouterr().out.splitlines() == [str(out / n) for n in names]
    assert [_png(out / n) for n in names] == [(1200, 400), (700, 560), (800, 450)]  # curves: loss, and eval_accuracy beside it
    assert all((out / n).stat().st_size > 10_000 for n in names)


def test_report_of_a_directory_without_metrics_or_train_records_says_what_it_expects(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"lepton-ray report: {tmp_path} has no metrics.jsonl: expected a run directory"
                                       " (runs/<name>/, written by `lepton-ray train`)\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"lepton-ray report: {tmp_path / 'metrics.jsonl'} has no train records (records with"
                                       " 'step' and 'train_loss'): the run stopped before its first logged step\n")
    assert not (tmp_path / "report").exists()


def _train(steps: range, scale: float) -> list[dict]:
    return [{"step": s, "epoch": 0, "lr": 0.1, "train_loss": scale / s, "time": 100.0 + s} for s in steps]


def test_sink_tensorboard_breakdown_per_rank_straggler_text_and_a_restart_replacing_later_steps(tmp_path):
    """A restarted worker group resumes from step 2: its file hides steps 3-4 of the first try (a resumed run's
    TensorBoard shows each step once)."""
    sink = Sink(str(tmp_path / "metrics.jsonl"))
    sink.log([{"event": "start", "step": 0}, *_train(range(1, 5), 1.0), {"step": 4, "epoch": 0, "eval_loss": 0.75, "time": 104.0}])
    sink.log([{"event": "start", "step": 2}, *_train(range(3, 6), 2.0)])
    sink.log([{"event": "breakdown", "rank": rank, "host": "h", "epoch": 0, "step": 5, "steps": 5, "time": 105.0,
               "step_s": 2.0, "compute_s": 1.5 + rank, "data_s": 0.5} for rank in (0, 1)])
    sink.log([{"event": "straggler", "epoch": 0, "rank": 1, "host": "h", "compute_s_per_step": 0.5, "median_compute_s_per_step": 0.4,
               "ratio": 1.25, "factor": 1.2, "message": "rank 1 is slow"}, {"event": "end", "step": 5}])
    acc = _scalars(tmp_path / "tensorboard")  # read without sink.close(): the end record closed the file
    assert _logged(acc, "train_loss") == [(1, 1.0), (2, 0.5), (3, _f32(2 / 3)), (4, 0.5), (5, _f32(0.4))]
    assert _logged(acc, "eval_loss") == []  # evaluated at step 4 of the first try only
    assert _logged(acc, "breakdown/rank0/compute_s") == [(5, 1.5)] and _logged(acc, "breakdown/rank1/compute_s") == [(5, 2.5)]
    assert _logged(acc, "breakdown/rank1/step_s") == [(5, 2.0)] and "breakdown/rank1/steps" not in acc.Tags()["scalars"]
    text = acc.Tensors("straggler/text_summary")
    assert [(t.step, t.tensor_proto.string_val) for t in text] == [(5, [b"rank 1 is slow"])]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2


def test_sink_without_tensorboard_writes_only_metrics_jsonl(tmp_path):
    sink = Sink(str(tmp_path / "metrics.jsonl"), tensorboard=False)
    sink.log(_train(range(1, 3), 1.0))
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert sink.drain() == _train(range(1, 3), 1.0)


def test_the_sink_writes_tensorboard_without_importing_torch(tmp_path):
    """The sink actor's process stays light (see lepton_ray.train.export._summary_writer)."""
    code = ("import sys; from lepton_ray.train.sink import Sink; s = Sink(sys.argv[1]); s.log([{'step': 1, 'train_loss': 0.5}]);"
            " s.close(); print(sorted(m for m in ('torch', 'tensorboardX') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "metrics.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['tensorboardX']"
    assert _logged(_scalars(tmp_path / "tensorboard"), "train_loss") == [(1, 0.5)]
