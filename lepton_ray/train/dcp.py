"""``torch.distributed.checkpoint`` (DCP) over the run's fsspec filesystem: the sharded half of
:mod:`lepton_ray.train.checkpoint`, imported only where a run saves or loads sharded state (DCP's imports cost
~1.5 s of every worker's start-up otherwise)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lepton_ray.train.checkpoint import _Hashing

__all__ = ["load", "load_full", "save"]


class _DCPFileSystem(FileSystemBase):
    """DCP's file-system interface over the run's fsspec filesystem (local disk or ``s3://``): every file a rank
    writes is hashed as it streams out and recorded in ``written`` (relative to ``root``) for the manifest."""

    def __init__(self, fs: Any, root: str, written: Optional[dict[str, dict[str, Any]]] = None):
        self.fs, self.root, self.written = fs, root, written if written is not None else {}

    def _rel(self, path: Any) -> str:
        return str(path)[len(self.root) + 1:]

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self.fs.open(str(path), mode) as fh:
            if "r" in mode:
                yield fh
                return
            stream = _Hashing(fh)
            yield stream
        self.written[self._rel(path)] = {"bytes": stream.n, "sha256": stream.sha.hexdigest()}

    def concat_path(self, path: Any, suffix: str) -> str:
        return f"{path}/{suffix}"

    def rename(self, path: Any, new_path: Any) -> None:
        self.fs.mv(str(path), str(new_path))
        self.written[self._rel(new_path)] = self.written.pop(self._rel(path))

    def init_path(self, path: Any) -> str:
        return str(path)

    def mkdir(self, path: Any) -> None:
        self.fs.makedirs(str(path), exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def exists(self, path: Any) -> bool:
        return self.fs.exists(str(path))

    def rm_file(self, path: Any) -> None:
        self.fs.rm_file(str(path))

    def ls(self, path: Any) -> list[str]:
        return self.fs.ls(str(path), detail=False)


class _Writer(FileSystemWriter):
    """DCP's file writer with the storage swapped for :class:`_DCPFileSystem` (``fs`` is the documented
    extension point: torch's own fsspec writer is built the same way)."""

    def __init__(self, dcp_fs: _DCPFileSystem, path: str):
        super().__init__(path, sync_files=False)
        self.fs, self.path = dcp_fs, path


class _Reader(FileSystemReader):
    def __init__(self, dcp_fs: _DCPFileSystem, path: str):
        super().__init__(path)
        self.fs, self.path = dcp_fs, path


def save(fs: Any, root: str, name: str, state: dict[str, Any], written: dict[str, dict[str, Any]]) -> None:
    """Every rank's shards of ``state`` into ``root/name/`` (a collective); each file's size and SHA-256 into ``written``."""
    dcp.save(state, storage_writer=_Writer(_DCPFileSystem(fs, root, written), f"{root}/{name}"))


def load(fs: Any, root: str, name: str, state: dict[str, Any]) -> None:
    """``root/name/`` into ``state`` in place, resharded to this world size (a collective where a process group is up)."""
    dcp.load(state, storage_reader=_Reader(_DCPFileSystem(fs, root), f"{root}/{name}"))


def load_full(fs: Any, root: str, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``root/name/``, whole, on CPU, in this process alone (no process group)."""
    reader = _Reader(_DCPFileSystem(fs, root), f"{root}/{name}")
    meta = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state
