"""The benchmark suite's own logic (benchmarks/rows.py, suite.py, render.py): rows and bars, part selection, the results
file (atomic writes, --update merging, a failed part recorded beside the others' rows), deterministic rendering, and the
committed RESULTS.md against the committed results.json. No benchmark is run here (tests/integration runs one)."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import render, suite  # noqa: E402
from benchmarks.rows import BarError, Row, check_bar, parse_bar, row  # noqa: E402

# ------------------------------------------------------------------------------------------------ rows and bars


@pytest.mark.parametrize("value, bar, met", [
    (0.95, ">= 0.95", True), (0.9499, ">= 0.95", False), (1.1, "<= 1.1", True), (1.1001, "<= 1.1", False),
    (2.0, "> 2", False), (2.0001, "> 2", True), (1.99, "< 2", True), (-1.0, ">= -2", True), (5e-4, "<= 1e-3", True),
])
def test_check_bar_compares_with_each_operator(value, bar, met):
    assert check_bar(value, bar) is met


def test_check_bar_without_a_bar_is_none_and_a_missing_or_nonfinite_value_never_meets_one():
    assert check_bar(3.0, None) is None
    assert check_bar(None, ">= 1") is False
    assert check_bar(math.nan, "<= 5") is False
    assert check_bar(math.inf, ">= 1") is False


@pytest.mark.parametrize("bad", ["0.95", ">=", "=> 1", "== 1", ">= one", ""])
def test_a_malformed_bar_is_an_error_naming_the_bar_and_the_valid_form(bad):
    with pytest.raises(BarError, match=r"expected 'OP NUMBER'") as e:
        parse_bar(bad)
    assert repr(bad) in str(e.value)


def test_row_works_out_ratio_and_met_on_the_ratio_by_default():
    r = row("train_overhead", "MLP samples/s", 950.0, "samples/s", "plain DDP", 1000.0, bar=">= 0.95")
    assert r.ratio == pytest.approx(0.95) and r.met is True
    assert r.figure == {"value": 950.0, "unit": "samples/s"} and r.baseline == {"name": "plain DDP", "value": 1000.0}
    assert row("b", "slow", 900.0, "samples/s", "plain", 1000.0, bar=">= 0.95").met is False


def test_row_bar_on_the_figure_ignores_the_ratio():
    r = row("serve", "p50", 1.5, "ms", "plain", 0.5, bar="<= 2", bar_on="figure")
    assert r.ratio == pytest.approx(3.0) and r.met is True
    assert row("serve", "p50", 2.5, "ms", bar="<= 2", bar_on="figure").met is False


def test_row_second_condition_must_hold_too_and_info_rows_have_no_verdict():
    assert row("ps", "ssp", 2.0, "samples/s", "sync", 1.0, bar=">= 1.3", also=False).met is False
    assert row("ps", "ssp", 2.0, "samples/s", "sync", 1.0, bar=">= 1.3", also=True).met is True
    assert row("ps", "info", 2.0, "samples/s", "sync", 1.0, also=False).met is None  # no bar: nothing to meet


def test_row_without_a_usable_baseline_has_no_ratio_and_misses_a_ratio_bar():
    r = row("b", "x", 1.0, "s", "zero", 0.0, bar=">= 1")
    assert r.ratio is None and r.met is False
    assert row("b", "x", 1.0, "s").baseline is None


def test_row_rejects_a_bad_bar_or_bar_target_when_built():
    with pytest.raises(BarError):
        row("b", "x", 1.0, "s", "y", 1.0, bar="about 1")
    with pytest.raises(ValueError, match="bar_on"):
        row("b", "x", 1.0, "s", "y", 1.0, bar=">= 1", bar_on="baseline")


def test_row_round_trips_through_json():
    r = row("b", "x", 1.0, "s", "y", 2.0, bar="<= 1", note="n", extra={"k": [1, 2]})
    back = Row.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r


# ------------------------------------------------------------------------------------------------ part selection


def test_no_names_select_every_part_in_the_suites_order():
    assert suite.select([]) == list(suite.PARTS)


def test_a_script_name_selects_all_its_parts_and_the_order_is_the_suites():
    got = [p.name for p in suite.select(["serve", "train_overhead.gpt", "param_server"])]
    assert got == ["train_overhead.gpt", "param_server.rec", "param_server.dense", "param_server.straggler", "serve"]
    assert [p.name for p in suite.select(["memory.search", "memory.search"])] == ["memory.search"]


def test_an_unknown_name_is_an_error_listing_the_valid_ones_with_a_suggestion():
    with pytest.raises(suite.SelectionError) as e:
        suite.select(["memroy"])
    assert "'memroy'" in str(e.value) and "did you mean 'memory'" in str(e.value) and "train_overhead.mlp" in str(e.value)


def test_every_part_names_a_script_with_bench_rows_and_the_full_suite_fits_in_about_an_hour():
    for part in suite.PARTS:
        tree = ast.parse((REPO / "benchmarks" / f"{part.script}.py").read_text())
        assert "bench_rows" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, part.script
        assert part.name == part.script or part.name.startswith(part.script + ".")
        assert part.minutes > 0 and part.quick != part.full
    assert len({p.name for p in suite.PARTS}) == len(suite.PARTS)
    assert sum(p.minutes for p in suite.PARTS) <= 65


def test_quick_results_never_go_to_the_full_results_file():
    assert suite.default_paths(quick=True) != suite.default_paths(quick=False)
    assert render.output_paths(suite.default_paths(True))[0] != render.output_paths(suite.default_paths(False))[0]


# ------------------------------------------------------------------------------------------------ the results file


def _parts(*names: str) -> list[suite.Part]:
    return [suite.Part(n, n.split(".")[0], ("--full",), ("--quick",), 1.0, f"what {n} measures") for n in names]


def _fake_runner(rows_by_part: dict[str, list[Row]], fail: set[str] = frozenset()):
    calls = []

    def runner(part, quick, *, timeout_s, echo):
        calls.append(part.name)
        if part.name in fail:
            return {"status": "failed", "wall_s": 1.0, "date": "d", "load_avg_start": [0.1, 0, 0], "load_avg_end": [0.2, 0, 0],
                    "argv": [], "expected_min": 1.0, "error": "exit status 1\nRuntimeError: boom", "tables": {}, "rows": []}
        return {"status": "ok", "wall_s": 2.0, "date": "d", "load_avg_start": [0.1, 0, 0], "load_avg_end": [0.2, 0, 0],
                "argv": ["--quick"] if quick else [], "expected_min": 1.0, "error": None, "tables": {},
                "rows": [r.to_dict() for r in rows_by_part[part.name]]}

    runner.calls = calls
    return runner


@pytest.fixture
def fixed_machine(monkeypatch):
    monkeypatch.setattr(suite, "machine", lambda: {"cores": 2, "cpu": "test cpu", "gpu": "none"})


def test_update_merges_the_parts_it_runs_and_keeps_the_others(tmp_path, monkeypatch, fixed_machine):
    parts = _parts("a.x", "b", "c")
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in parts})
    out = tmp_path / "results.json"
    first = {"a.x": [row("a", "a1", 1.0, "s", "base", 2.0, bar="<= 1")], "b": [row("b", "b1", 3.0, "s")],
             "c": [row("c", "c1", 4.0, "s"), row("c", "c2", 5.0, "s")]}
    suite.run_suite(parts, quick=False, update=False, out=out, echo=lambda s: None, runner=_fake_runner(first))
    again = {"b": [row("b", "b1 again", 30.0, "s"), row("b", "b2", 31.0, "s")]}
    runner = _fake_runner(again)
    res = suite.run_suite(parts[1:2], quick=False, update=True, out=out, echo=lambda s: None, runner=runner)
    assert runner.calls == ["b"]
    stored = json.loads(out.read_text())
    assert stored == res
    assert [(r["part"], r["name"]) for r in stored["rows"]] == [("a.x", "a1"), ("b", "b1 again"), ("b", "b2"), ("c", "c1"), ("c", "c2")]
    assert list(stored["parts"]) == ["a.x", "b", "c"]


def test_a_subset_run_without_update_refuses_to_drop_the_other_parts(tmp_path, monkeypatch, fixed_machine):
    parts = _parts("a", "b")
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in parts})
    out = tmp_path / "results.json"
    suite.run_suite(parts, quick=False, update=False, out=out, echo=lambda s: None,
                    runner=_fake_runner({"a": [row("a", "a", 1.0, "s")], "b": [row("b", "b", 1.0, "s")]}))
    before = out.read_text()
    with pytest.raises(SystemExit, match="--update"):
        suite.run_suite(parts[:1], quick=False, update=False, out=out, echo=lambda s: None, runner=_fake_runner({}))
    assert out.read_text() == before


def test_update_refuses_to_mix_quick_and_full_results(tmp_path, monkeypatch, fixed_machine):
    parts = _parts("a")
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in parts})
    out = tmp_path / "results.json"
    suite.run_suite(parts, quick=False, update=False, out=out, echo=lambda s: None, runner=_fake_runner({"a": [row("a", "a", 1.0, "s")]}))
    with pytest.raises(SystemExit, match="full results, this run is quick"):
        suite.run_suite(parts, quick=True, update=True, out=out, echo=lambda s: None, runner=_fake_runner({"a": []}))


def test_a_failed_part_is_recorded_with_its_error_and_the_others_keep_their_rows(tmp_path, monkeypatch, fixed_machine):
    parts = _parts("a", "b", "c")
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in parts})
    out = tmp_path / "results.json"
    res = suite.run_suite(parts, quick=True, update=False, out=out, echo=lambda s: None,
                          runner=_fake_runner({"a": [row("a", "a1", 1.0, "s")], "c": [row("c", "c1", 2.0, "s")]}, fail={"b"}))
    assert [p["status"] for p in res["parts"].values()] == ["ok", "failed", "ok"]
    assert "boom" in res["parts"]["b"]["error"]
    assert [r["name"] for r in res["rows"]] == ["a1", "c1"]
    md = render.output_paths(out)[0].read_text()
    assert "**FAILED**" in md and "RuntimeError: boom" in md and "1 part(s) failed (b)" in md


def test_run_part_records_a_crashing_process_with_its_last_lines(tmp_path):
    part = _parts("x")[0]
    entry = suite.run_part(part, True, timeout_s=60, echo=lambda s: None,
                           command=lambda out: [sys.executable, "-c", "print('line one'); raise SystemExit('it broke')"])
    assert entry["status"] == "failed" and entry["rows"] == []
    assert entry["error"].splitlines()[0] == "exit status 1"
    assert "line one" in entry["error"] and "it broke" in entry["error"]


def test_run_part_reads_the_rows_the_process_wrote(tmp_path):
    part = _parts("x")[0]
    payload = {"rows": [row("x", "r", 1.0, "s", "b", 2.0, bar="<= 1").to_dict()], "tables": {"t": [{"k": 1}]}}
    code = f"import json, sys; open(sys.argv[1], 'w').write(json.dumps({payload!r}))"
    entry = suite.run_part(part, False, timeout_s=60, echo=lambda s: None, command=lambda out: [sys.executable, "-c", code, str(out)])
    assert entry["status"] == "ok" and entry["error"] is None
    assert [r["name"] for r in entry["rows"]] == ["r"] and entry["tables"] == {"t": [{"k": 1}]}
    assert entry["argv"] == ["--full"]


def test_run_part_stops_a_part_past_its_timeout(tmp_path):
    part = _parts("x")[0]
    entry = suite.run_part(part, True, timeout_s=1, echo=lambda s: None,
                           command=lambda out: [sys.executable, "-c", "import time; time.sleep(60)"])
    assert entry["status"] == "failed" and entry["error"].startswith("timed out after 1 s")


def test_results_are_written_atomically_and_a_failed_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "results.json"
    suite.write_json_atomic(out, {"a": 1})
    with pytest.raises(TypeError):
        suite.write_json_atomic(out, {"a": object()})
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_merge_is_pure_and_orders_parts_and_rows_as_the_suite_does():
    base = suite.empty_results("full")
    got = suite.merge(base, "c", {"status": "ok", "rows": [{"name": "c1"}]}, order=["a", "b", "c"])
    got = suite.merge(got, "a", {"status": "ok", "rows": [{"name": "a1"}, {"name": "a2"}]}, order=["a", "b", "c"])
    assert base["rows"] == [] and base["parts"] == {}
    assert list(got["parts"]) == ["a", "c"] and [r["name"] for r in got["rows"]] == ["a1", "a2", "c1"]
    assert all("rows" not in p for p in got["parts"].values())


def test_the_machine_description_names_cores_memory_cpu_gpu_and_versions():
    m = suite.machine()
    assert {"cores", "memory_gib", "cpu", "gpu", "torch", "ray"} <= set(m)
    assert m["cores"] >= 1 and m["gpu"]


# ------------------------------------------------------------------------------------------------ rendering


def _results() -> dict:
    rows = [row("train_overhead", "MLP samples/s", 950.0, "samples/s", "plain DDP", 1000.0, bar=">= 0.95"),
            row("train_overhead", "first step s", 2.0, "s", "bare Ray", 1.5, bar="<= 1.1"),
            row("serve", "p50 @1", 1.2, "ms", "plain", 1.0, bar="<= 2", bar_on="figure"),
            row("scaling_model", "anchor", 0.84, "efficiency predicted", "published", 0.9)]
    parts = ["train_overhead.mlp", "train_overhead.mlp", "serve", "scaling_model"]
    entry = {"status": "ok", "wall_s": 12.5, "date": "2026-01-01T00:00:00+00:00", "load_avg_start": [0.1, 0.2, 0.3],
             "load_avg_end": [0.4, 0.5, 0.6], "argv": ["--x"], "expected_min": 3, "error": None, "tables": {}}
    res = suite.empty_results("full")
    res.update(date="2026-01-01T00:00:00+00:00", machine={"cores": 2, "cpu": "cpu", "memory_gib": 24.0, "gpu": "none",
                                                          "torch": "2", "ray": "2", "python": "3"},
               load_avg={"start": [0.1, 0.2, 0.3], "end": [0.4, 0.5, 0.6]})
    for name in dict.fromkeys(parts):
        tables = {"anchors": [{"model": "Inception V3", "published_efficiency": 0.9, "predicted_no_overlap": 0.84}],
                  "table": [{"model": "m", "strategy": "ps", "workers": 2, "eff_10G": 0.5, "step_ms_10G": 3.0}]}
        e = {**entry, "tables": tables if name == "scaling_model" else {},
             "rows": [{**r.to_dict()} for r, p in zip(rows, parts) if p == name]}
        res = suite.merge(res, name, e)
    return res


def test_the_same_results_render_to_the_same_markdown_through_a_json_round_trip(tmp_path):
    res = _results()
    out = tmp_path / "results.json"
    suite.write_json_atomic(out, res)
    md = render.markdown_for(out)
    assert md == render.markdown_for(out) == render.render_markdown(json.loads(json.dumps(res)),
                                                                    {b: f"charts/{b}.png" for b in render.chart_rows(res)})
    written = render.render_files(out)
    assert written[0].read_text() == md
    assert sorted(p.name for p in written[1:]) == ["scaling_model.png", "serve.png", "train_overhead.png"]
    assert all(p.stat().st_size > 0 for p in written[1:])


def test_the_markdown_shows_every_row_its_verdict_the_machine_the_parts_and_the_scaling_tables():
    md = render.render_markdown(_results())
    for name in ("MLP samples/s", "first step s", "p50 @1", "anchor"):
        assert name in md
    assert md.count("**NOT MET**") == 1 and md.count("| met |") == 2 and md.count("| info |") == 1
    assert "<= 2 (figure)" in md and "2 cores (cpu)" in md and "GPU: none" in md
    assert "| train_overhead.mlp | ok | 12.5 s | ~3 min |" in md
    assert "## Scaling model: published anchors" in md and "Inception V3" in md
    assert "eff_10G" in md and "step_ms_10G" not in md


def test_quick_results_say_so_in_the_markdown():
    res = {**_results(), "mode": "quick"}
    assert "Quick mode" in render.render_markdown(res) and "Quick mode" not in render.render_markdown(_results())


def test_fmt_is_stable():
    assert [render.fmt(v) for v in (0.123456, 12.3456, 999.94, 12345.6, -0.5, None, 7)] == \
        ["0.1235", "12.35", "999.9", "12,346", "-0.5", "-", "7"]


def test_the_committed_results_md_is_what_the_committed_results_json_renders_to():
    committed = REPO / "benchmarks" / "results.json"
    if not committed.exists():
        pytest.skip("no benchmarks/results.json committed yet (the full suite writes it)")
    md_path, _ = render.output_paths(committed)
    assert md_path.exists(), f"{md_path.name} missing: run python benchmarks/render.py"
    assert md_path.read_text() == render.markdown_for(committed), \
        f"{md_path.name} is not what {committed.name} renders to: run python benchmarks/render.py"


# ------------------------------------------------------------------------------------------------ command lines


def test_lepton_ray_bench_delegates_to_the_suite(capsys):
    from lepton_ray.cli import main

    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in suite.PARTS) and "min" in out
    assert main(["bench", "nosuchpart"]) == 2
    assert "lepton-ray bench: unknown benchmark 'nosuchpart'" in capsys.readouterr().err


def test_the_help_states_each_parts_expected_minutes_and_the_total(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--update" in out
    assert f"~{sum(p.minutes for p in suite.PARTS):g} min" in out
    assert all(f"{p.name}" in out for p in suite.PARTS)


def test_the_suites_docstring_examples_hold():
    import doctest

    from benchmarks import rows

    for mod in (rows, suite, render):
        failed, tried = doctest.testmod(mod, raise_on_error=False, verbose=False)
        assert failed == 0 and tried > 0, mod.__name__
