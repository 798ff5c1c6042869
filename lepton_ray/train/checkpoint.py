"""Atomic checkpoints on any storage URI, written by every rank, committed once.

A checkpoint is a directory ``<root>/step_<NNNNNNNN>/``. Every rank writes its own part into it in
parallel (:class:`CheckpointWriter`): whole objects as ``<name>.pt`` files (``torch.save``), and sharded
state dicts through ``torch.distributed.checkpoint`` (DCP) as a folder ``<name>/`` holding each rank's
shards and DCP's ``.metadata`` — no rank gathers a sharded model to save it. The ranks hand what they
wrote (names, sizes and SHA-256, hashed as written) to rank 0, which commits one ``MANIFEST.json`` naming
every file, in one atomic write (:func:`lepton_ray.storage.atomic_write`): a checkpoint without a
committed manifest does not exist, whatever files it has.

Loading (:class:`CheckpointReader`) checks every file's size against the manifest, and the ranks share the
SHA-256 checks (each file hashed by one rank) and agree before anyone loads, so every rank picks the same
checkpoint; a DCP folder is loaded in place, each rank reading only the byte ranges its shards need, at
any world size (DCP reshards). Objects are unpickled as tensors and plain containers only
(``torch.load(weights_only=True)``). :func:`model_state` turns either form into one full state dict on one
machine, without a cluster (what serving bundles need).
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

from lepton_ray.storage import atomic_write, filesystem, join

__all__ = ["CheckpointError", "CheckpointStore", "Checkpoint", "CheckpointReader", "CheckpointWriter", "MANIFEST",
           "load_model", "model_state", "open_checkpoint", "rng_state", "set_rng_state"]

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


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``inner``."""

    def __init__(self, inner: Any):
        self.inner, self.sha, self.n = inner, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.inner.write(view)
        self.sha.update(view)
        self.n += len(view)
        return len(view)

    def tell(self) -> int:
        return self.n


class CheckpointWriter:
    """One rank's part of the checkpoint of ``step``; :attr:`files` (name -> size and SHA-256) goes to the commit.

    ``put`` writes a whole object (typically on one rank); ``put_sharded`` is a collective: every rank passes its
    shards of the same state dict (DTensors of an FSDP2 model, a sharded optimizer), and DCP writes each rank's
    part and, from rank 0, the index of all of them."""

    def __init__(self, store: "CheckpointStore", step: int):
        self.store, self.step, self.dir = store, step, store._dir(step)
        self.files: dict[str, dict[str, Any]] = {}
        store.fs.makedirs(self.dir, exist_ok=True)

    def put(self, name: str, obj: Any) -> None:
        with self.store.fs.open(f"{self.dir}/{name}.pt", "wb") as fh:
            stream = _Hashing(fh)  # streamed to storage as serialised: no second copy of the state in memory
            torch.save(obj, stream)
        self.files[f"{name}.pt"] = {"bytes": stream.n, "sha256": stream.sha.hexdigest()}

    def put_sharded(self, name: str, state: dict[str, Any]) -> None:
        from lepton_ray.train import dcp  # torch.distributed.checkpoint: ~1.5 s of imports only sharded runs need

        dcp.save(self.store.fs, self.dir, name, state, self.files)


class CheckpointReader:
    """A committed, verified checkpoint, read by name: ``get`` for whole objects, ``load_sharded`` for DCP folders."""

    def __init__(self, store: "CheckpointStore", checkpoint: Checkpoint, files: dict[str, dict[str, Any]]):
        self.store, self.checkpoint, self.files = store, checkpoint, files
        self.dir = store._dir(checkpoint.step)

    def has(self, name: str) -> bool:
        return f"{name}.pt" in self.files

    def has_sharded(self, name: str) -> bool:
        return f"{name}/.metadata" in self.files

    def get(self, name: str) -> Any:
        fname = f"{name}.pt"
        if fname not in self.files:
            raise CheckpointError(f"'{self.checkpoint.uri}' has no '{fname}' (it holds {', '.join(sorted(self.names()))})")
        data = self.store._read_verified(self.checkpoint, fname, self.files[fname])
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"'{self.checkpoint.uri}/{fname}' holds objects other than tensors and plain data; refusing to load it: {exc}") from None

    def objects(self, names: Optional[list[str]] = None) -> dict[str, Any]:
        """The whole objects (all, or ``names``), read and verified, by name."""
        return {n: self.get(n) for n in sorted(self.names()) if self.has(n) and (names is None or n in names)}

    def names(self) -> set[str]:
        return {f.split("/", 1)[0].removesuffix(".pt") for f in self.files}

    def _sharded(self, name: str) -> None:
        if not self.has_sharded(name):
            raise CheckpointError(f"'{self.checkpoint.uri}' has no sharded '{name}/' (it holds {', '.join(sorted(self.names()))})")

    def load_sharded(self, name: str, state: dict[str, Any]) -> None:
        """Load the DCP folder ``name`` into ``state`` in place (a collective where a process group is up): each
        rank reads the byte ranges its tensors (shards at this world size) need."""
        from lepton_ray.train import dcp

        self._sharded(name)
        dcp.load(self.store.fs, self.dir, name, state)

    def load_full(self, name: str) -> dict[str, torch.Tensor]:
        """The whole of a DCP folder's tensors as plain CPU tensors, in this process alone (no process group):
        how a sharded model is consolidated for serving."""
        from lepton_ray.train import dcp

        self._sharded(name)
        return dcp.load_full(self.store.fs, self.dir, name)


def model_state(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """The checkpoint's full model state dict, whichever way it was saved (whole, or sharded by DCP)."""
    return reader.get("model") if reader.has("model") else reader.load_full("model")


def load_model(reader: CheckpointReader, model: torch.nn.Module) -> None:
    """Load the checkpoint's model weights into ``model`` as built (whole or FSDP-sharded; every rank calls it): a
    whole ``model.pt`` is distributed to the shards, a sharded one is read in place (resharded as needed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    if reader.has("model"):
        set_model_state_dict(model, reader.get("model"), options=StateDictOptions(full_state_dict=True))
        return
    state = get_model_state_dict(model)
    reader.load_sharded("model", state)
    set_model_state_dict(model, state)


def open_checkpoint(uri: str, storage_options: Optional[dict] = None) -> CheckpointReader:
    """A reader of one committed checkpoint: ``uri`` is its folder (``.../step_NNNNNNNN``) or a checkpoint root (its
    newest). A :class:`CheckpointError` names what is missing."""
    uri = uri.rstrip("/")
    root, _, leaf = uri.rpartition("/")
    m = _STEP_DIR.fullmatch(leaf)
    store = CheckpointStore(root if m else uri, storage_options)
    checkpoint = store.get(int(m.group(1))) if m else store.latest()
    if checkpoint is None:
        raise CheckpointError(f"no committed checkpoint at '{uri}' (no {MANIFEST}, no step_* checkpoint under it)")
    return store.open(checkpoint)


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

    def writer(self, step: int) -> CheckpointWriter:
        """This rank's writer into the (uncommitted) folder of ``step``."""
        return CheckpointWriter(self, step)

    def commit(self, step: int, files: dict[str, dict[str, Any]], meta: dict[str, Any], *,
               before_commit: Optional[Callable[[], None]] = None) -> Checkpoint:
        """Commit the files every rank wrote (merged ``CheckpointWriter.files``): the manifest, in one atomic write;
        then prune beyond ``keep_last``. ``before_commit`` runs just before (fault-injection tests use it)."""
        if before_commit is not None:
            before_commit()
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, "meta": meta}
        atomic_write(self.fs, f"{self._dir(step)}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._prune(step)
        return Checkpoint(uri=self._uri(step), step=step, meta=meta)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], *,
             before_commit: Optional[Callable[[], None]] = None) -> Checkpoint:
        """One process's whole checkpoint: every object of ``state`` as a file, then the commit."""
        writer = self.writer(step)
        for name, obj in state.items():
            writer.put(name, obj)
        return self.commit(step, writer.files, meta, before_commit=before_commit)

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

    def open_latest(self, rank: int = 0, world: int = 1, agree: Callable[[bool], bool] = lambda ok: ok
                    ) -> tuple[Optional[CheckpointReader], list[str]]:
        """``(reader, skipped)``: the newest committed checkpoint whose files all match its manifest, and why each newer
        one was skipped (a torn or damaged file). Every file's size is checked here; its SHA-256 by one of the ``world``
        readers (file ``i`` by rank ``i % world``), and ``agree(ok)`` (all ranks: every rank's check passed) decides, so
        every rank picks the same checkpoint. ``(None, [])`` when nothing is committed; a :class:`CheckpointError` when
        nothing committed verifies."""
        skipped: list[str] = []
        for step in reversed(self.steps()):
            why = ""
            try:
                manifest = self._manifest(step)
                self._check(step, manifest["files"], rank, world)
            except CheckpointError as exc:
                why = str(exc)
            if agree(not why):
                checkpoint = Checkpoint(uri=self._uri(step), step=step, meta=manifest["meta"])
                return CheckpointReader(self, checkpoint, manifest["files"]), skipped
            skipped.append(f"skipped the checkpoint of step {step}: {why or 'another worker found a file that does not match the manifest'}")
        if skipped:
            raise CheckpointError(f"no checkpoint under '{self.uri}' matches its manifest: " + "; ".join(skipped))
        return None, skipped

    def load_latest(self, names: Optional[list[str]] = None) -> tuple[Optional[Checkpoint], dict[str, Any], list[str]]:
        """One reader alone: ``(checkpoint, {name: object}, skipped)`` of the newest checkpoint that verifies (every file
        checked); ``names`` limits the objects loaded. ``(None, {}, [])`` when nothing is committed."""
        reader, skipped = self.open_latest()
        if reader is None:
            return None, {}, skipped
        return reader.checkpoint, reader.objects(names), skipped

    def open(self, checkpoint: Checkpoint) -> CheckpointReader:
        """A reader of ``checkpoint`` (sizes checked; each object's SHA-256 when it is read)."""
        manifest = self._manifest(checkpoint.step)
        self._check(checkpoint.step, manifest["files"], 0, 1, hashes=False)
        return CheckpointReader(self, checkpoint, manifest["files"])

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

    def _check(self, step: int, files: dict[str, dict[str, Any]], rank: int, world: int, hashes: bool = True) -> None:
        """Every file of the manifest is there with its size; this rank's share of them (``i % world == rank``) hashes right."""
        d, uri = self._dir(step), self._uri(step)
        try:
            sizes = {p[len(d) + 1:]: info["size"] for p, info in self.fs.find(d, detail=True).items()}
        except FileNotFoundError:
            sizes = {}
        for i, (fname, info) in enumerate(sorted(files.items())):
            if fname not in sizes:
                raise CheckpointError(f"'{uri}/{fname}' is missing (named in its manifest)")
            if sizes[fname] != info["bytes"]:
                raise CheckpointError(f"'{uri}/{fname}' does not match its manifest (size {sizes[fname]}, expected {info['bytes']})")
            if hashes and i % world == rank:
                self._read_verified(Checkpoint(uri, step, {}), fname, info)

    def _read_verified(self, checkpoint: Checkpoint, fname: str, info: dict[str, Any]) -> bytes:
        try:
            data = self.fs.cat_file(f"{self._dir(checkpoint.step)}/{fname}")
        except FileNotFoundError:
            raise CheckpointError(f"'{checkpoint.uri}/{fname}' is missing (named in its manifest)") from None
        if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CheckpointError(f"'{checkpoint.uri}/{fname}' does not match its manifest (size or SHA-256 differ)")
        return data

    def load(self, checkpoint: Checkpoint, names: Optional[list[str]] = None) -> dict[str, Any]:
        """Read and verify the whole objects of ``checkpoint`` (all, or ``names``)."""
        return self.open(checkpoint).objects(names)

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
