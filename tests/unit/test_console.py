"""What a run prints: the lines :class:`lepton_ray.train.events.RunEvents` makes of a run's records (the hang guard's
diagnosis once, each restart with its cause), the C++ line pattern that keeps Ray's backend lines off the console, and
the progress bars of the long CLI operations. The real runs are ``tests/integration/test_cli.py`` (a quiet default
output) and ``tests/faults/test_hangs.py`` (a real stall and restart, printed)."""

from __future__ import annotations

import io
import re
import types

import numpy as np
import pyarrow as pa
import pytest

from lepton_ray.console import CPP_LOG_LINE, is_cpp_line, progress_bar, quiet_ray_env
from lepton_ray.train.events import RunEvents, failure_record

DIAGNOSIS = ("ranks stuck: rank 0 (host h, pid 11, after step 14: no progress for 21 s), rank 1 (host h, pid 12, after step "
             "14: no progress for 21 s) (train.collective_timeout_s 20); killed them. Stack dumps of the live ranks: "
             "runs/t/stacks (rank0-11.txt, rank1-12.txt)")
CKPT = "runs/t/checkpoints/step_00000010"


def start(step=0, world=2, resumed_from=None):
    return {"event": "start", "step": step, "total_steps": 30, "world_size": world, "resumed_from": resumed_from}


def test_a_run_without_trouble_prints_nothing():
    events = RunEvents("t")
    steps = [{"step": s, "train_loss": 1.0 / s} for s in range(1, 5)]
    assert events.lines([start(), *steps, {"event": "first_step", "step": 1}, {"event": "end", "step": 4}]) == []
    assert events.starts == 1


def test_the_diagnosis_is_printed_once_when_it_arrives_and_the_restart_names_it():
    events = RunEvents("t")
    assert events.lines([start(), {"step": 14, "train_loss": 0.5}]) == []
    stalled = {"event": "stalled", "ranks": [0, 1], "diagnosis": DIAGNOSIS, "time": 1.0, "steps": {"0": 14, "1": 14}}
    assert events.lines([stalled]) == [f"lepton_ray: run 't': {DIAGNOSIS}"]
    assert events.lines([{"step": 15, "train_loss": 0.4}]) == []  # nothing again until the group restarts
    assert events.lines([start(10, resumed_from=CKPT)]) == [
        f"lepton_ray: run 't': worker group restarted (attempt 2, 2 workers) from step 10 ({CKPT}); "
        "the previous attempt ended: the hang guard killed stuck ranks 0, 1 (diagnosis above)"]


@pytest.mark.parametrize("ended,cause", [
    ([{"event": "preempted", "step": 17, "ranks": [1]}], "rank 1 got SIGTERM; every rank checkpointed step 17"),
    ([{"event": "failed", "rank": 1, "error": "ValueError: bad batch"}, {"event": "failed", "rank": 0, "error": "RuntimeError: peer closed"}],
     "rank 0 raised RuntimeError: peer closed; rank 1 raised ValueError: bad batch"),
    ([], "no rank reported an error: a worker process ended (killed, out of memory, or its node lost)"),
], ids=["preempted", "raised", "unknown"])
def test_a_restart_says_why_the_previous_attempt_ended(ended, cause):
    events = RunEvents("digits")
    events.lines([start()])
    assert events.lines([*ended, start(10, resumed_from=CKPT)]) == [
        f"lepton_ray: run 'digits': worker group restarted (attempt 2, 2 workers) from step 10 ({CKPT}); "
        f"the previous attempt ended: {cause}"]


def test_each_attempt_has_its_own_cause_size_and_resume_point():
    """Causes do not carry over to the next attempt; a smaller group (an elastic run that lost a node) says so; a
    restart before the first checkpoint starts over."""
    events = RunEvents("e")
    events.lines([start(world=2)])
    first = events.lines([{"event": "failed", "rank": 1, "error": "OSError: disk"}, start(0, world=1)])
    second = events.lines([start(20, world=2, resumed_from="runs/e/checkpoints/step_00000020")])
    assert first == ["lepton_ray: run 'e': worker group restarted (attempt 2, 1 workers, was 2) from the start (no checkpoint "
                     "was committed); the previous attempt ended: rank 1 raised OSError: disk"]
    assert second == ["lepton_ray: run 'e': worker group restarted (attempt 3, 2 workers, was 1) from step 20 "
                      "(runs/e/checkpoints/step_00000020); the previous attempt ended: no rank reported an error: a worker "
                      "process ended (killed, out of memory, or its node lost)"]


def test_a_failure_record_keeps_the_first_line_of_the_error_cut_short():
    assert failure_record(3, ValueError("x" * 500 + "\nmore"), 7.0) == {
        "event": "failed", "rank": 3, "error": ("ValueError: " + "x" * 500)[:300], "time": 7.0}
    assert failure_record(0, KeyError(), 1.0)["error"] == "KeyError: "


def test_the_cpp_pattern_matches_rays_backend_lines_below_fatal_only():
    """Lines as Ray's processes wrote them (seen in this project's runs), before the driver adds ``(name pid=...)``."""
    for level in "DIWE":
        assert is_cpp_line(f"[2026-12-07 03:28:23,885 {level} 26550 26592] core_worker.cc:2465: Actor with class name: "
                           "'PreemptionWatcher' has constructor arguments in the object store and max_restarts > 0.")
    assert not is_cpp_line("[2026-12-07 03:28:23,885 F 26550 26592] raylet.cc:10: Check failed")  # a crash stays
    for python_line in ("Requesting resources: {'CPU': 1} * 2", "Error in training function:",
                        "ValueError: bad batch at forward 15", "[Rank 1 Error Snippet]:", "  [2026-12-07 03:28:23,885 E 1 2] x.cc:1:"):
        assert not is_cpp_line(python_line)
    assert re.compile(CPP_LOG_LINE).pattern == CPP_LOG_LINE  # one valid regex, as Ray compiles it


def test_quiet_ray_env_sets_the_skip_pattern_unless_verbose_or_set_by_the_user():
    env = {"PATH": "/bin"}
    assert quiet_ray_env(False, env) == {"RAY_DEDUP_LOGS_SKIP_REGEX": CPP_LOG_LINE}
    assert env == {"PATH": "/bin", "RAY_DEDUP_LOGS_SKIP_REGEX": CPP_LOG_LINE}
    assert quiet_ray_env(True, {}) == {}
    mine = {"RAY_DEDUP_LOGS_SKIP_REGEX": "noise"}
    assert quiet_ray_env(False, mine) == {} and mine == {"RAY_DEDUP_LOGS_SKIP_REGEX": "noise"}


def test_a_bar_in_a_log_file_prints_its_start_and_its_end(capsys):
    """Not a terminal (pytest's capture): no redraw within 10 s, so a short job is two states, ASCII only; on its own
    line even while another bar is open (tqdm would move the cursor down to stack it: newlines in a log)."""
    from tqdm import tqdm

    left_open = tqdm(total=1, file=io.StringIO())
    with progress_bar(5, "job", "row") as bar:
        for _ in range(5):
            bar.update(1)
    err = capsys.readouterr().err
    assert re.fullmatch(r"\rjob:   0%\| +\| 0/5 \[[^\]]*\]\rjob: 100%\|#+\| 5/5 \[[^\]]*\]\n", err), repr(err)
    left_open.close()
    with progress_bar(5, "off", "row", enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""


def test_prepare_shows_the_rows_written(tmp_path, capsys):
    from lepton_ray.data import prepare

    prepare(pa.table({"x": np.arange(200, dtype=np.float32)}), str(tmp_path / "d"), num_shards=2, eval_fraction=0.25,
            progress=True)
    assert re.search(r"prepare: 100%\|#+\| 200/200 ", capsys.readouterr().err)


def test_the_sweep_bar_counts_ended_trials_and_shows_the_best_so_far(tmp_path, capsys):
    """Tune's Trial objects as the callback sees them (id, status, last result); a trial Tune reports complete while
    its status still says RUNNING counts as ended."""
    from lepton_ray.tune.sweep import _Progress

    shown = _Progress(str(tmp_path), ["train.lr"], "eval_accuracy", "max", 4, "s")
    trial = lambda i, status, acc: types.SimpleNamespace(trial_id=f"t{i}", status=status, config={"train.lr": 0.1},  # noqa: E731
                                                        last_result={} if acc is None else {"eval_accuracy": acc})
    shown.on_trial_result(1, [trial(0, "RUNNING", 0.5), trial(1, "PENDING", None)], None, {})
    assert (shown.bar.n, shown.bar.postfix) == (0, "best eval_accuracy=0.5000, trial=t0")
    trials = [trial(0, "TERMINATED", 0.9), trial(1, "ERROR", None), trial(2, "RUNNING", 0.95), trial(3, "RUNNING", 0.7)]
    shown.on_trial_complete(2, trials, trials[3])
    assert (shown.bar.n, shown.bar.postfix) == (3, "best eval_accuracy=0.9500, trial=t2")
    assert "== sweep: 3/4 trials done ==" in capsys.readouterr().out  # the table, as a trial ends
    assert shown.__getstate__()["bar"] is None  # Tune pickles its callbacks; a bar holds its stream
    shown.on_experiment_end(trials)
    assert shown.bar is None and re.search(r"sweep s:  75%\|#+5? +\| 3/4 ", capsys.readouterr().err)


def test_ray_data_in_a_worker_logs_at_ray_trains_level_without_its_progress_bar_notice():
    """The ray_data engine turns Ray Data's progress bars off; Ray Data's warning that they are off, and its INFO
    lines, stay out of the console unless Ray Train's worker logs are at INFO (``--verbose``). Levels put back after."""
    import logging

    from lepton_ray.data.ray_source import _data_logs

    data, bars, train = (logging.getLogger(n) for n in ("ray.data", "ray.data._internal.progress", "ray.train"))
    saved = data.level, bars.level, train.level
    try:
        for train_level, want in ((logging.WARNING, logging.WARNING), (logging.INFO, logging.INFO)):
            data.setLevel(logging.INFO)
            bars.setLevel(logging.NOTSET)
            train.setLevel(train_level)
            with _data_logs():
                assert (data.getEffectiveLevel(), bars.getEffectiveLevel()) == (want, logging.ERROR)
            assert (data.level, bars.level) == (logging.INFO, logging.NOTSET)
    finally:
        data.setLevel(saved[0]), bars.setLevel(saved[1]), train.setLevel(saved[2])
