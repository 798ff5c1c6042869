"""URI + options -> filesystem: the one place that resolves endpoints and credentials.

Every component (data, checkpoints, serving bundles) opens storage through
:func:`filesystem`, so there is exactly one answer to "which endpoint, which
keys". For S3 that answer is ``storage_options`` when given, else the standard
AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which s3fs
reads itself. pyarrow gets a view of the *same* fsspec filesystem
(:func:`arrow_filesystem`), never its own ``S3FileSystem`` (that one ignores
``AWS_ENDPOINT_URL`` and would disagree about the endpoint).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Mapping, Optional

import fsspec
import pyarrow.fs as pafs

__all__ = ["filesystem", "arrow_filesystem", "atomic_write", "join", "is_local", "redact", "redact_config"]

_SECRET_KEYS = ("key", "secret", "token", "password", "aws_secret_access_key", "aws_session_token")


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def filesystem(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``uri``: the fsspec filesystem and the path within it.

    Local paths are made absolute (workers may run in another directory).

    >>> fs, path = filesystem("/tmp")
    >>> fs.protocol[0], path
    ('file', '/tmp')
    """
    options = dict(storage_options or {})
    if is_local(uri):
        path = uri.removeprefix("file://")
        return fsspec.filesystem("file", **options), os.path.abspath(os.path.expanduser(path))
    protocol, _, rest = uri.partition("://")
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs = dict(options.pop("client_kwargs", {}) or {})
            client_kwargs.setdefault("endpoint_url", endpoint)
            options["client_kwargs"] = client_kwargs
        # bounded: an unreachable endpoint fails in seconds with its address, never hangs a run
        config_kwargs = dict(options.pop("config_kwargs", {}) or {})
        config_kwargs.setdefault("connect_timeout", 5)
        config_kwargs.setdefault("read_timeout", 60)
        config_kwargs.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        options["config_kwargs"] = config_kwargs
    # skip_instance_cache: options differ per caller; a cached instance could carry another endpoint
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    return fs, rest.rstrip("/")


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view of an fsspec filesystem (same endpoint, same credentials)."""
    if fs.protocol[0] in ("file", "local") or "file" in fs.protocol:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Commit ``data`` at ``path`` in one step, so a reader sees the whole file or none: written aside then
    renamed on a local disk (atomic on one file system), one PUT on object storage (never a partial object).
    The one commit every writer uses: checkpoint manifests, bundles, prepared shards and their manifest,
    built data sets, the shard cache.

    >>> import tempfile; fs, d = filesystem(tempfile.mkdtemp())
    >>> atomic_write(fs, f"{d}/a.json", b"{}"); fs.cat_file(f"{d}/a.json")
    b'{}'
    """
    if "file" in fs.protocol or "local" in fs.protocol:
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
        try:
            with fs.open(tmp, "wb") as fh:
                fh.write(data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)
    else:
        fs.pipe_file(path, data)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or a local path."""
    if is_local(uri):
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def redact(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``storage_options`` safe to print: secret values replaced by '***'."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping):
            out[key] = redact(value)
        elif any(s in key.lower() for s in _SECRET_KEYS):
            out[key] = "***"
        else:
            out[key] = value
    return out


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict safe to write next to results: every ``storage_options`` mapping redacted."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "storage_options" and isinstance(value, Mapping):
            out[key] = redact(value)
        elif isinstance(value, Mapping):
            out[key] = redact_config(value)
        else:
            out[key] = value
    return out
