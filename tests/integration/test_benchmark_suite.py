"""The benchmark suite end to end on one real part: ``python -m benchmarks scaling_model --quick`` (no Ray: all-reduces
timed in 2 and 4 local processes, the cost model fitted and checked), its results file and its rendering."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import render  # noqa: E402
from benchmarks.rows import Row  # noqa: E402


def test_a_quick_part_runs_end_to_end_into_its_results_file_and_renders(tmp_path):
    out = tmp_path / "results.quick.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "scaling_model", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and list(res["parts"]) == ["scaling_model"]
    part = res["parts"]["scaling_model"]
    assert part["status"] == "ok" and part["error"] is None and part["wall_s"] > 0 and part["argv"] == ["--quick"]
    assert res["machine"]["cores"] == os.cpu_count() and res["machine"]["torch"]
    assert len(res["load_avg"]["start"]) == 3 and len(res["load_avg"]["end"]) == 3

    rows = [Row.from_dict(r) for r in res["rows"]]
    assert rows and {r.part for r in rows} == {"scaling_model"}
    for r in rows:  # well formed: a finite figure against a finite baseline, the ratio theirs, no bar (information)
        assert math.isfinite(r.figure["value"]) and r.figure["unit"] and r.baseline["name"]
        assert r.ratio == r.figure["value"] / r.baseline["value"] and r.bar is None and r.met is None
    anchors = {a["model"]: a["published_efficiency"] for a in part["tables"]["anchors"]}
    assert anchors["Inception V3"] == 0.9 and anchors["BERT-large, BytePS"] == 0.9  # Horovod at 512 GPUs, BytePS at 256
    assert part["tables"]["table"]

    md = out.with_name("RESULTS.quick.md").read_text()
    assert md == render.markdown_for(out)
    assert "Quick mode" in md and "BERT-large, BytePS" in md and "| scaling_model | ok |" in md
    assert (tmp_path / "charts.quick" / "scaling_model.png").stat().st_size > 0
