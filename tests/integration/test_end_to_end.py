"""The end-to-end example, reduced (``--quick``), as a user runs it: its own moto bucket, its own 2-node Ray cluster
with token authentication, every stage through the CLI and ``ray job submit``; then nothing it started is left.

It starts its own cluster (not the session's ``ray_cluster``): the example is the whole path, set-up included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_end_to_end_example_from_a_bucket_to_a_served_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "end_to_end.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    prepared = out["prepare"]
    assert prepared["train"].startswith("s3://") and prepared["eval"].startswith("s3://")
    assert prepared["printed"] == ["train: 1438 rows in 4 shards", "eval: 359 rows in 4 shards"]

    trained = out["train"]  # a job on the 2-node cluster: one worker on each node, checkpoint in the bucket
    assert len(set(trained["worker_nodes"])) == 2, trained["worker_nodes"]
    assert trained["checkpoint"].startswith("s3://")
    assert {"MANIFEST.json", "model.pt", "optimizer.pt"} <= set(trained["checkpoint_files"]), trained["checkpoint_files"]
    assert trained["eval_accuracy"] > 0.85

    swept = out["sweep"]
    assert swept["num_trials"] == 4
    assert set(swept["params"]) >= {"train.lr", "train.batch_size"}
    assert swept["checkpoint"].startswith("s3://")

    optimized = out["optimize"]
    assert optimized["chosen"] in optimized["forms"]
    assert optimized["forms"][optimized["chosen"]]["accurate"] is True
    assert optimized["bundle"].startswith("s3://")

    predicted = out["predict"]
    assert predicted["rows"] == 359 and predicted["every_eval_row_once"] is True
    assert predicted["ids"] == sorted(predicted["ids"]) and len(predicted["ids"]) == 5

    served = out["serve"]  # v1 and v2 answer what the batch prediction wrote for the same ids
    assert served["ids"] == predicted["ids"]
    assert served["v1_labels"] == predicted["labels"] == served["v2_labels"]
    # fp32 answers a row the same alone or in a batch; int8 scales activations per model call (README: Serving)
    assert served["max_abs_diff_vs_batch"] < (1e-5 if optimized["chosen"] == "fp32" else 2e-2), optimized["chosen"]

    pids = out["setup"]["pids"]
    assert [p for p in pids.values() if _alive(p)] == []  # moto and both `ray start` are gone
