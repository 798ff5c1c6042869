"""Data builders: write a split pair (train, eval) when ``data.train`` does not exist yet.

``data.builder: digits`` makes the README's main job self-contained: it writes
scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes; no
download) as Parquet. A user builder is ``"package.module:function"`` with the
same signature as :func:`digits`.
"""

from __future__ import annotations

import importlib
import os
import uuid
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray.config import ConfigError
from lepton_ray.storage import arrow_filesystem, filesystem

__all__ = ["BUILDERS", "build_data", "digits", "write_table"]


def write_table(table: pa.Table, uri: str, storage_options: Optional[dict] = None) -> None:
    """Write one Parquet file atomically: a temporary name first, then a rename."""
    fs, path = filesystem(uri, storage_options)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
    pq.write_table(table, tmp, filesystem=arrow_filesystem(fs))
    fs.mv(tmp, path)


def digits(train: str, eval: Optional[str], storage_options: Optional[dict] = None, *, eval_fraction: float = 0.2, seed: int = 0) -> None:
    """Write scikit-learn's digits as Parquet: 64 float columns ``px0..px63`` in [0, 1] and ``label``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is in the dev extra
        raise ConfigError("data.builder: 'digits' needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_eval = int(round(len(y) * eval_fraction)) if eval else 0
    parts = {train: order[n_eval:]}
    if eval:
        parts[eval] = order[:n_eval]
    for uri, rows in parts.items():
        cols = {f"px{i}": x[rows, i] for i in range(x.shape[1])}
        cols["label"] = y[rows]
        write_table(pa.table(cols), uri, storage_options)


def _clicks(train: str, eval: Optional[str], storage_options: Optional[dict] = None) -> None:
    from lepton_ray.data.synthetic import clicks  # its own module; imported late (it imports write_table from here)

    clicks(train, eval, storage_options)


BUILDERS: dict[str, Callable[..., None]] = {"digits": digits, "clicks": _clicks}


def build_data(builder: str, train: str, eval: Optional[str], storage_options: dict[str, Any],
               kwargs: Optional[dict[str, Any]] = None) -> None:
    """Run a built-in or user builder to write ``train`` (and ``eval``); ``kwargs``: ``data.builder_kwargs``."""
    if builder in BUILDERS:
        fn = BUILDERS[builder]
    else:
        module, sep, name = builder.partition(":")
        if not sep:
            raise ConfigError(f"data.builder: '{builder}' is not one of {', '.join(BUILDERS)} nor 'package.module:function'")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"data.builder: cannot import '{builder}': {exc}") from None
    try:
        fn(train=train, eval=eval, storage_options=storage_options, **(kwargs or {}))
    except TypeError as exc:  # an unknown data.builder_kwargs key
        raise ConfigError(f"data.builder_kwargs: builder '{builder}' rejected them: {exc}") from None
