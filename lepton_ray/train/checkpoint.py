"""Atomic checkpoints on any storage URI.

A checkpoint is a directory ``<root>/step_<NNNNNNNN>/`` holding one file per
state object and a ``MANIFEST.json`` naming every file with its size and
SHA-256. The manifest is written last, in one atomic operation (rename on a
local disk, a single PUT on object storage): a checkpoint without a committed
manifest does not exist, whatever files it has. Loading re-checks every
checksum and unpickles nothing beyond tensors and plain containers
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from lepton_ray.storage import filesystem, is_local, join

__all__ = ["CheckpointError", "CheckpointStore", "Checkpoint", "MANIFEST", "rng_state", "set_rng_state"]

MANIFEST = "MANIFEST.json"
FORMAT = "lepton_ray.checkpoint/1"
_STEP_DIR = re.compile(r"step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its URI, step and manifest metadata."""

    uri: str
    step: int
    meta: dict[str, Any]


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class CheckpointStore:
    """Committed checkpoints under one root URI.

    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep_last=2)
    >>> store.save(10, {"model": {"w": torch.ones(2)}}, meta={"epoch": 0}).step
    10
    >>> store.load(store.latest())["model"]["w"].tolist()
    [1.0, 1.0]
    """

    def __init__(self, uri: str, storage_options: Optional[dict] = None, keep_last: int = 3):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.keep_last = keep_last
        self.fs, self.path = filesystem(self.uri, self.storage_options)

    def _dir(self, step: int) -> str:
        return f"{self.path}/step_{step:08d}"

    def _uri(self, step: int) -> str:
        return join(self.uri, f"step_{step:08d}")

    def save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        *,
        before_commit: Optional[Callable[[], None]] = None,
    ) -> Checkpoint:
        """Write every state object, then commit the manifest; prune beyond ``keep_last``.

        ``before_commit`` runs between the data files and the manifest (fault-injection tests use it).
        """
        d = self._dir(step)
        self.fs.makedirs(d, exist_ok=True)
        files = {}
        for name, obj in state.items():
            data = _to_bytes(obj)
            with self.fs.open(f"{d}/{name}.pt", "wb") as fh:
                fh.write(data)
            files[f"{name}.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if before_commit is not None:
            before_commit()
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, "meta": meta}
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if is_local(self.uri):  # write aside, then rename: atomic on one file system
            tmp = f"{d}/.{MANIFEST}.tmp"
            with self.fs.open(tmp, "wb") as fh:
                fh.write(body)
            self.fs.mv(tmp, f"{d}/{MANIFEST}")
        else:  # one PUT: object stores never show a partial object
            self.fs.pipe_file(f"{d}/{MANIFEST}", body)
        self._prune(step)
        return Checkpoint(uri=self._uri(step), step=step, meta=meta)

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first."""
        try:
            found = self.fs.glob(f"{self.path}/step_*/{MANIFEST}")
        except FileNotFoundError:
            return []
        steps = []
        for p in found:
            m = _STEP_DIR.search(p.rsplit("/", 1)[0])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> Optional[Checkpoint]:
        """The newest committed checkpoint, or None."""
        steps = self.steps()
        return self.get(steps[-1]) if steps else None

    def load_latest(self, names: Optional[list[str]] = None) -> tuple[Optional[Checkpoint], dict[str, Any], list[str]]:
        """``(checkpoint, state, skipped)``: the newest committed checkpoint whose files all match its manifest, its
        state objects (all, or ``names``), and why each newer one was skipped (a torn or corrupted file). Every file is
        verified whatever ``names`` says, so every reader (each worker, each parameter-server shard) picks the same one.
        ``(None, {}, [])`` when nothing is committed; a :class:`CheckpointError` when nothing committed verifies."""
        skipped: list[str] = []
        for step in reversed(self.steps()):
            try:
                checkpoint = self.get(step)
                return checkpoint, self.load(checkpoint, names, check_all=True), skipped
            except CheckpointError as exc:
                skipped.append(f"skipped the checkpoint of step {step}: {exc}")
        if skipped:
            raise CheckpointError(f"no checkpoint under '{self.uri}' matches its manifest: " + "; ".join(skipped))
        return None, {}, skipped

    def get(self, step: int) -> Checkpoint:
        manifest = self._manifest(step)
        return Checkpoint(uri=self._uri(step), step=step, meta=manifest["meta"])

    def _manifest(self, step: int) -> dict[str, Any]:
        try:
            manifest = json.loads(self.fs.cat_file(f"{self._dir(step)}/{MANIFEST}"))
        except FileNotFoundError:
            raise CheckpointError(f"no committed checkpoint at '{self._uri(step)}' ({MANIFEST} is missing)") from None
        except ValueError as exc:  # a manifest is one atomic write; unreadable means damaged afterwards
            raise CheckpointError(f"'{self._uri(step)}/{MANIFEST}' is not valid JSON: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"'{self._uri(step)}/{MANIFEST}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
        return manifest

    def load(self, checkpoint: Checkpoint, names: Optional[list[str]] = None, *, check_all: bool = False) -> dict[str, Any]:
        """Read and verify the state objects of ``checkpoint`` (all, or ``names``; ``check_all``: verify the others too)."""
        manifest = self._manifest(checkpoint.step)
        out = {}
        for fname, info in manifest["files"].items():
            name = fname.removesuffix(".pt")
            wanted = names is None or name in names
            if not (wanted or check_all):
                continue
            try:
                data = self.fs.cat_file(f"{self._dir(checkpoint.step)}/{fname}")
            except FileNotFoundError:
                raise CheckpointError(f"'{checkpoint.uri}/{fname}' is missing (named in its manifest)") from None
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CheckpointError(f"'{checkpoint.uri}/{fname}' does not match its manifest (size or SHA-256 differ)")
            if not wanted:
                continue
            try:
                out[name] = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain containers
                raise CheckpointError(f"'{checkpoint.uri}/{fname}' holds objects other than tensors and plain data; refusing to load it: {exc}") from None
        return out

    def _prune(self, newest: int) -> None:
        committed = self.steps()
        for step in committed[: max(0, len(committed) - self.keep_last)]:
            self.fs.rm_file(f"{self._dir(step)}/{MANIFEST}")  # un-commit first, then delete
            self.fs.rm(self._dir(step), recursive=True)
        # directories left by writes that died before their manifest, older than the newest commit
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return
        keep = set(committed)
        for entry in entries:
            m = _STEP_DIR.search(entry.rstrip("/"))
            if m and int(m.group(1)) < newest and int(m.group(1)) not in keep:
                self.fs.rm(entry, recursive=True)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (torch, Python, numpy, CUDA), as checkpointable tensors and lists."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
