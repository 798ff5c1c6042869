"""Unit tests for lepton_ray.train.checkpoint: atomic commit, pruning, verification, safe loading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lepton_ray.train.checkpoint import FORMAT, MANIFEST, Checkpoint, CheckpointError, CheckpointStore


def state(v: float) -> dict:
    return {
        "model": {"w": torch.full((3, 2), v), "b": torch.arange(4, dtype=torch.int64) + int(v)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2) * v}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": [{"torch": torch.get_rng_state(), "python": [3, list(range(5)), None]}],
    }


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def write_manifest(d: Path, step: int, files: dict[str, bytes], fmt: str = FORMAT) -> None:
    manifest = {
        "format": fmt,
        "step": step,
        "created": 0.0,
        "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()},
        "meta": {"step": step},
    }
    (d / MANIFEST).write_text(json.dumps(manifest))


def test_save_latest_load_round_trip(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert store.steps() == [] and store.latest() is None
    saved = store.save(10, state(1.5), meta={"epoch": 0, "step_in_epoch": 4, "metrics": {"eval_loss": 0.5}})
    assert saved == Checkpoint(uri=str(step_dir(tmp_path, 10)), step=10, meta={"epoch": 0, "step_in_epoch": 4, "metrics": {"eval_loss": 0.5}})
    assert sorted(p.name for p in step_dir(tmp_path, 10).iterdir()) == [MANIFEST, "model.pt", "optimizer.pt", "rng.pt"]
    latest = store.latest()
    assert latest == saved
    loaded = store.load(latest)
    expected = state(1.5)
    assert set(loaded) == {"model", "optimizer", "rng"}
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"]) and loaded["model"]["b"].dtype == torch.int64
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.full((2,), 1.5))
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert loaded["rng"][0]["python"] == [3, [0, 1, 2, 3, 4], None]
    assert torch.equal(loaded["rng"][0]["torch"], expected["rng"][0]["torch"])
    assert list(store.load(latest, names=["model"])) == ["model"]


def test_manifest_names_every_file_with_size_and_sha256(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(3, state(1.0), meta={"k": "v"})
    manifest = json.loads((step_dir(tmp_path, 3) / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["step"] == 3 and manifest["meta"] == {"k": "v"}
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "rng.pt"}
    for name, info in manifest["files"].items():
        data = (step_dir(tmp_path, 3) / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not list(step_dir(tmp_path, 3).glob(".*"))  # the manifest temporary was renamed away


def test_latest_is_the_highest_step_and_get_reads_meta(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=10)
    for step in (5, 20, 15):
        store.save(step, state(step), meta={"at": step})
    assert store.steps() == [5, 15, 20]
    assert store.latest().step == 20
    assert store.get(15).meta == {"at": 15}
    assert torch.equal(store.load(store.get(5))["model"]["w"], torch.full((3, 2), 5.0))


def test_uri_with_trailing_slash_and_file_scheme(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}/", keep_last=2)
    ckpt = store.save(1, {"m": torch.ones(1)}, meta={})
    assert ckpt.uri == f"file://{tmp_path}/step_00000001"
    assert CheckpointStore(str(tmp_path)).steps() == [1]


def test_keep_last_prunes_oldest(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    for step in (1, 2, 3, 4):
        store.save(step, state(step), meta={})
    assert store.steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    assert torch.equal(store.load(store.latest())["model"]["w"], torch.full((3, 2), 4.0))


def test_keep_last_one(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=1)
    store.save(1, state(1), meta={})
    store.save(2, state(2), meta={})
    assert store.steps() == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]


def test_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(1, state(1), meta={})
    orphan = step_dir(tmp_path, 2)
    orphan.mkdir()
    (orphan / "model.pt").write_bytes(b"partial")
    (orphan / f".{MANIFEST}.tmp").write_text("{}")  # an uncommitted manifest does not count either
    assert store.steps() == [1]
    assert store.latest().step == 1
    with pytest.raises(CheckpointError, match="^" + re.escape(f"no committed checkpoint at '{orphan}' ({MANIFEST} is missing)") + "$"):
        store.get(2)
    with pytest.raises(CheckpointError, match=re.escape(f"({MANIFEST} is missing)")):
        store.load(Checkpoint(uri=str(orphan), step=2, meta={}))


def test_steps_ignores_foreign_directories(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(7, {"m": torch.zeros(1)}, meta={})
    for name in ("step_7", "step_abc", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text("{}")
    assert store.steps() == [7]


def test_missing_root_has_no_checkpoints(tmp_path):
    store = CheckpointStore(str(tmp_path / "never" / "created"))
    assert store.steps() == [] and store.latest() is None


def test_failing_before_commit_leaves_previous_checkpoint_latest(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(1, state(1), meta={"n": 1})

    def boom():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="^disk full$"):
        store.save(2, state(2), meta={"n": 2}, before_commit=boom)
    assert store.steps() == [1]
    assert store.latest() == Checkpoint(uri=str(step_dir(tmp_path, 1)), step=1, meta={"n": 1})
    assert torch.equal(store.load(store.latest())["model"]["w"], torch.full((3, 2), 1.0))
    files = sorted(p.name for p in step_dir(tmp_path, 2).iterdir())
    assert files == ["model.pt", "optimizer.pt", "rng.pt"]  # data written, never committed

    # the next successful commit removes the dead write
    store.save(3, state(3), meta={"n": 3})
    assert store.steps() == [1, 3]
    assert not step_dir(tmp_path, 2).exists()


def test_before_commit_runs_after_data_files_and_before_manifest(tmp_path):
    store = CheckpointStore(str(tmp_path))
    seen = []
    store.save(4, state(4), meta={}, before_commit=lambda: seen.append(sorted(p.name for p in step_dir(tmp_path, 4).iterdir())))
    assert seen == [["model.pt", "optimizer.pt", "rng.pt"]]
    assert store.steps() == [4]


def test_tampered_file_is_detected(tmp_path):
    store = CheckpointStore(str(tmp_path))
    ckpt = store.save(8, state(8), meta={})
    path = step_dir(tmp_path, 8) / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    message = f"'{ckpt.uri}/optimizer.pt' does not match its manifest (size or SHA-256 differ)"
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        store.load(ckpt)
    # untouched files still load on their own
    assert torch.equal(store.load(ckpt, names=["model"])["model"]["w"], torch.full((3, 2), 8.0))


def test_truncated_file_is_detected(tmp_path):
    store = CheckpointStore(str(tmp_path))
    ckpt = store.save(9, state(9), meta={})
    path = step_dir(tmp_path, 9) / "model.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as exc:
        store.load(ckpt)
    size = len(path.read_bytes())
    assert str(exc.value) == f"'{ckpt.uri}/model.pt' does not match its manifest (size {size}, expected {size + 10})"


def test_manifest_of_another_format_is_refused(tmp_path):
    d = step_dir(tmp_path, 1)
    d.mkdir()
    write_manifest(d, 1, {}, fmt="something/9")
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError) as exc:
        store.latest()
    assert str(exc.value) == f"'{d}/{MANIFEST}' has format 'something/9', expected '{FORMAT}'"


class Payload:
    """Unpickling this runs os.mkdir(marker): what weights_only loading must never do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class Plain:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("kind", ["code", "class"])
def test_load_refuses_non_tensor_pickles(tmp_path, kind):
    root, marker = tmp_path / "ckpts", tmp_path / "pwned"
    d = step_dir(root, 5)
    d.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "evil": Payload(str(marker)) if kind == "code" else Plain()}, buf)
    data = buf.getvalue()
    (d / "model.pt").write_bytes(data)
    write_manifest(d, 5, {"model.pt": data})
    store = CheckpointStore(str(root))
    ckpt = store.latest()
    assert ckpt is not None and ckpt.step == 5  # a committed, checksum-valid checkpoint ...
    with pytest.raises(CheckpointError, match=r"model\.pt' holds objects other than tensors and plain data; refusing to load it: Weights only load failed"):
        store.load(ckpt)  # ... that still must not be unpickled
    assert not marker.exists()
    if kind == "code":  # the payload does run under an unrestricted unpickler: the test is meaningful
        torch.load(io.BytesIO(data), weights_only=False)
        assert marker.is_dir()


def test_sigkill_between_data_files_and_manifest(tmp_path):
    root = tmp_path / "ckpts"
    store = CheckpointStore(str(root))
    store.save(100, state(1), meta={"step": 100})
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        from lepton_ray.train.checkpoint import CheckpointStore
        store = CheckpointStore({str(root)!r})
        state = {{"model": {{"w": torch.full((3, 2), 2.0)}}, "optimizer": {{"lr": torch.tensor(0.5)}}}}
        store.save(200, state, {{"step": 200}}, before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))
        print("survived")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert "survived" not in proc.stdout
    killed = step_dir(root, 200)
    assert sorted(p.name for p in killed.iterdir()) == ["model.pt", "optimizer.pt"]  # data files, no MANIFEST.json
    fresh = CheckpointStore(str(root))
    assert fresh.steps() == [100]
    assert fresh.latest() == Checkpoint(uri=str(step_dir(root, 100)), step=100, meta={"step": 100})
    assert torch.equal(fresh.load(fresh.latest())["model"]["w"], torch.full((3, 2), 1.0))
