"""A local disk cache of remote shards: read once per machine, verified before every first use.

Shards fetched from remote storage are kept as whole files under ``cache_dir``
(LRU by last use, bounded by ``cache_max_bytes``). A cached file is checked
against the manifest's SHA-256 the first time a process uses it; a mismatch
(corruption, tampering, a partial write) deletes it and fetches it again.
Files land under a temporary name and are renamed into place, so a reader
never sees a partial file, and several workers on one machine can share the
directory.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import fsspec

from lepton_ray.storage import atomic_write

__all__ = ["ShardCache"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardCache:
    """Whole-file cache of remote shards, keyed by their SHA-256.

    >>> import tempfile
    >>> cache = ShardCache(tempfile.mkdtemp(), max_bytes=1 << 20)
    >>> data = b"parquet bytes"
    >>> sha = hashlib.sha256(data).hexdigest()
    >>> p = cache.get(sha, len(data), lambda: data)
    >>> p.read_bytes() == data, cache.stats["misses"], cache.get(sha, len(data), lambda: b"").read_bytes() == data, cache.stats["hits"]
    (True, 1, True, 1)
    """

    def __init__(self, directory: str, max_bytes: int):
        self.dir = Path(directory).expanduser()
        self.fs = fsspec.filesystem("file")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._verified: set[str] = set()
        self.stats = {"hits": 0, "misses": 0, "refetched": 0, "fetched_bytes": 0}

    def _path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.parquet"

    def get(self, sha256: str, size: int, fetch: Callable[[], bytes]) -> Path:
        """Local path of the shard with this checksum, fetching it with ``fetch()`` if absent or bad."""
        path = self._path(sha256)
        if path.exists():
            if sha256 in self._verified or _sha256(path) == sha256:
                self._verified.add(sha256)
                self.stats["hits"] += 1
                os.utime(path)  # LRU: last use
                return path
            path.unlink(missing_ok=True)  # corrupt or tampered: fetch again
            self.stats["refetched"] += 1
        self.stats["misses"] += 1
        data = fetch()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise IOError(f"fetched shard does not match its manifest (expected {size} bytes, sha256 {sha256[:12]}...)")
        self._evict(len(data))
        atomic_write(self.fs, str(path), data)
        self._verified.add(sha256)
        self.stats["fetched_bytes"] += len(data)
        return path

    def _evict(self, incoming: int) -> None:
        """Delete least-recently-used shards until ``incoming`` more bytes fit."""
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.dir.glob("*.parquet")]
        total = sum(size for _, size, _ in files) + incoming
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            self._verified.discard(p.stem)
            total -= size

    def describe(self) -> dict[str, Any]:
        return {"dir": str(self.dir), **self.stats, "at": time.time()}
