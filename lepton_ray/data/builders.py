"""Data builders: write a split pair (train, eval) when ``data.train`` does not exist yet.

``data.builder: digits`` makes the README's main job self-contained: it writes
scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes; no
download) as Parquet. ``digits_images`` writes the same rows as uint8 images for
the ``cnn``; ``clicks`` (:mod:`lepton_ray.data.synthetic`) seeded click logs for the
``recommender``; ``text`` (:mod:`lepton_ray.data.text`) byte blocks of a directory
of text files for the ``gpt``. A user builder is ``"package.module:function"``
with the same signature as :func:`digits`.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray.config import ConfigError
from lepton_ray.imports import import_object
from lepton_ray.storage import atomic_write, filesystem

__all__ = ["BUILDERS", "build_data", "digits", "digits_images", "write_table"]


def write_table(table: pa.Table, uri: str, storage_options: Optional[dict] = None, *, row_group_size: Optional[int] = None) -> None:
    """Write one Parquet file atomically (:func:`~lepton_ray.storage.atomic_write`).

    ``row_group_size``: rows per row group (the unit workers share a split by); omitted = pyarrow's default.
    """
    fs, path = filesystem(uri, storage_options)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    atomic_write(fs, path, buf.getvalue())


def _load_digits(builder: str, eval: Optional[str], eval_fraction: float, seed: int) -> tuple[Any, dict[str, np.ndarray]]:
    """scikit-learn's digits and the rows of each split: a seeded permutation, the first ``eval_fraction`` held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is in the dev extra
        raise ConfigError(f"data.builder: '{builder}' needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    n_eval = int(round(len(order) * eval_fraction)) if eval else 0
    return bunch, {"train": order[n_eval:], "eval": order[:n_eval]}


def digits(train: str, eval: Optional[str], storage_options: Optional[dict] = None, *, eval_fraction: float = 0.2, seed: int = 0) -> None:
    """Write scikit-learn's digits as Parquet: 64 float columns ``px0..px63`` in [0, 1] and ``label``."""
    bunch, rows = _load_digits("digits", eval, eval_fraction, seed)
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    for uri, idx in ((train, rows["train"]), (eval, rows["eval"])):
        if uri:
            cols = {f"px{i}": x[idx, i] for i in range(x.shape[1])}
            cols["label"] = y[idx]
            write_table(pa.table(cols), uri, storage_options)


def digits_images(train: str, eval: Optional[str], storage_options: Optional[dict] = None, *, eval_fraction: float = 0.2,
                  seed: int = 0) -> None:
    """The rows of :func:`digits` (same split) as ``image: fixed_size_list<uint8>[64]`` (0..16 scaled to 0..255) and ``label``.

    Read it as ``[1, 8, 8]`` images with ``data.inputs: {image: {column: image, shape: [1, 8, 8]}}``.

    >>> import tempfile, pyarrow.parquet as pq
    >>> with tempfile.TemporaryDirectory() as d:
    ...     digits_images(f"{d}/train.parquet", f"{d}/eval.parquet")
    ...     t = pq.read_table(f"{d}/eval.parquet")
    >>> image = t.schema.field("image").type
    >>> t.num_rows, image.value_type, image.list_size, max(t.column("image").combine_chunks().flatten().to_pylist())
    (359, DataType(uint8), 64, 255)
    """
    bunch, rows = _load_digits("digits_images", eval, eval_fraction, seed)
    pixels = np.rint(bunch.data * (255 / 16)).astype(np.uint8)  # 16 -> 255 exactly; uint8 is a quarter of float32
    y = bunch.target.astype(np.int64)
    for uri, idx in ((train, rows["train"]), (eval, rows["eval"])):
        if uri:
            image = pa.FixedSizeListArray.from_arrays(pa.array(pixels[idx].ravel(), pa.uint8()), pixels.shape[1])
            write_table(pa.table({"image": image, "label": y[idx]}), uri, storage_options)


def _clicks(train: str, eval: Optional[str], storage_options: Optional[dict] = None, **kwargs: Any) -> None:
    from lepton_ray.data.synthetic import clicks  # its own module; imported late (it imports write_table from here)

    clicks(train, eval, storage_options, **kwargs)


def _text(train: str, eval: Optional[str], storage_options: Optional[dict] = None, **kwargs: Any) -> None:
    from lepton_ray.data.text import text  # likewise

    text(train, eval, storage_options, **kwargs)


BUILDERS: dict[str, Callable[..., None]] = {"digits": digits, "digits_images": digits_images, "clicks": _clicks, "text": _text}


def build_data(builder: str, train: str, eval: Optional[str], storage_options: dict[str, Any],
               kwargs: Optional[dict[str, Any]] = None) -> None:
    """Run a built-in or user builder to write ``train`` (and ``eval``); ``kwargs``: ``data.builder_kwargs``."""
    if builder in BUILDERS:
        fn = BUILDERS[builder]
    else:
        if ":" not in builder:
            raise ConfigError(f"data.builder: '{builder}' is not one of {', '.join(BUILDERS)} nor 'package.module:function'")
        fn = import_object(builder, "data.builder")
    try:
        fn(train=train, eval=eval, storage_options=storage_options, **(kwargs or {}))
    except TypeError as exc:  # an unknown data.builder_kwargs key
        raise ConfigError(f"data.builder_kwargs: builder '{builder}' rejected them: {exc}") from None
