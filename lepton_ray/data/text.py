"""A byte-level language-modelling corpus from a directory of text files (``data.builder: text``).

Default corpus: the Python standard library's own ``.py`` sources (on every machine, no download).
The split is by file (a seeded permutation), so no file's bytes are in both splits: an eval that
shares files with training would score memorised text. Each split's files are concatenated (each
followed by ``b"\\n"``) and cut into non-overlapping rows of ``block + 1`` bytes, written as
``input`` (bytes ``0..block-1``) and ``target`` (bytes ``1..block``), both ``fixed_size_list<uint8>[block]``:
the next-byte targets of the ``gpt`` (``data.inputs: {tokens: input}``, ``data.targets: {next: target}``).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from lepton_ray.config import ConfigError
from lepton_ray.data.builders import write_table

__all__ = ["read_corpus", "text", "text_table"]

_SKIP_IN_STDLIB = {"site-packages", "dist-packages", "test", "tests", "idle_test"}  # installed packages, test fixtures


def read_corpus(root: Optional[str] = None, pattern: Optional[str] = None, *, seed: int = 0,
                max_bytes: Optional[int] = None) -> list[tuple[str, bytes]]:
    """``(relative path, bytes)`` of the text files under ``root`` matching ``pattern``, in a seeded order.

    Binary files (a NUL byte) and unreadable ones are skipped. With ``max_bytes`` files are read in that
    order until that many bytes are held (the last one cut short). ``root`` omitted: the standard library.

    >>> files = read_corpus(max_bytes=1000)
    >>> sum(len(b) for _, b in files), all(p.endswith(".py") for p, _ in files)
    (1000, True)
    """
    stdlib = root is None
    base = Path(sysconfig.get_paths()["stdlib"] if stdlib else root).expanduser()
    if pattern is None:
        pattern = "**/*.py" if stdlib else "**/*"
    if not base.is_dir():
        raise ConfigError(f"data.builder_kwargs.root: '{base}' is not a directory (a local directory of text files)")
    try:
        paths = sorted(p for p in base.glob(pattern)  # sorted: the seeded order must not depend on the filesystem's
                       if p.is_file() and not (stdlib and _SKIP_IN_STDLIB.intersection(p.relative_to(base).parts)))
    except (NotImplementedError, ValueError) as exc:  # an absolute or malformed glob
        raise ConfigError(f"data.builder_kwargs.pattern: {pattern!r} is not a glob relative to root (e.g. '**/*.txt'): {exc}") from None
    out: list[tuple[str, bytes]] = []
    total = 0
    for i in np.random.default_rng(seed).permutation(len(paths)):
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            data = paths[i].read_bytes()
        except OSError:  # unreadable (permissions, a broken link): not part of the corpus
            continue
        if not data or b"\0" in data:  # empty, or binary (text files hold no NUL byte)
            continue
        if max_bytes is not None:
            data = data[: max_bytes - total]
        out.append((paths[i].relative_to(base).as_posix(), data))
        total += len(data)
    if not out:
        raise ConfigError(f"data.builder_kwargs.root: '{base}' has no readable text files matching '{pattern}' "
                          f"(data.builder_kwargs.pattern; binary and empty files are skipped)")
    return out


def text_table(data: bytes, block: int) -> pa.Table:
    """``data`` cut into rows of ``block + 1`` bytes (the tail that fills no row dropped): ``input`` and ``target``.

    >>> t = text_table(b"abcdefgh", 3)
    >>> t.num_rows, bytes(t.column("input")[1].as_py()), bytes(t.column("target")[1].as_py())
    (2, b'efg', b'fgh')
    """
    rows = len(data) // (block + 1)
    arr = np.frombuffer(data, np.uint8, count=rows * (block + 1)).reshape(rows, block + 1)

    def column(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).ravel(), pa.uint8()), block)

    return pa.table({"input": column(arr[:, :block]), "target": column(arr[:, 1:])})


def text(train: str, eval: Optional[str], storage_options: Optional[dict] = None, *, root: Optional[str] = None,
         pattern: Optional[str] = None, block: int = 128, eval_fraction: float = 0.1, seed: int = 0,
         max_bytes: Optional[int] = None, row_group_rows: int = 1024) -> None:
    """Write the train (and eval) byte blocks of the text files under ``root`` (default: the standard library).

    ``pattern``: a glob relative to ``root`` (default ``**/*.py`` for the standard library, ``**/*`` otherwise);
    ``eval_fraction``: the share of the corpus's bytes held out, whole files (at least one);
    ``max_bytes``: read at most this many bytes (files in the seeded order), to keep a run small;
    ``row_group_rows``: rows per Parquet row group (the unit that workers share a split by).
    """
    if not (isinstance(block, int) and block >= 1):
        raise ConfigError(f"data.builder_kwargs.block: must be an integer >= 1 (bytes per row), got {block!r}")
    if eval and not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"data.builder_kwargs.eval_fraction: must be in (0, 1), got {eval_fraction!r}")
    if max_bytes is not None and not (isinstance(max_bytes, int) and max_bytes >= 1):
        raise ConfigError(f"data.builder_kwargs.max_bytes: must be an integer >= 1, got {max_bytes!r}")
    if not (isinstance(row_group_rows, int) and row_group_rows >= 1):
        raise ConfigError(f"data.builder_kwargs.row_group_rows: must be an integer >= 1, got {row_group_rows!r}")
    files = read_corpus(root, pattern, seed=seed, max_bytes=max_bytes)
    n_eval = 0
    if eval:
        if len(files) < 2:
            raise ConfigError(f"data.builder: 'text' splits by file, and found only {len(files)} text file ({files[0][0]}); "
                              f"add files under data.builder_kwargs.root or omit data.eval")
        sizes = np.cumsum([len(b) + 1 for _, b in files])
        # the fewest leading files holding eval_fraction of the bytes, leaving train at least one
        n_eval = min(int(np.searchsorted(sizes, eval_fraction * sizes[-1])) + 1, len(files) - 1)
    splits = [(eval, "eval", files[:n_eval]), (train, "train", files[n_eval:])] if eval else [(train, "train", files)]
    for uri, name, part in splits:
        table = text_table(b"".join(b + b"\n" for _, b in part), block)
        if table.num_rows == 0:
            raise ConfigError(f"data.builder: 'text' {name} split has {sum(len(b) + 1 for _, b in part)} bytes, fewer than one row "
                              f"of block + 1 = {block + 1}; lower data.builder_kwargs.block or raise max_bytes / eval_fraction")
        write_table(table, uri, storage_options, row_group_size=min(row_group_rows, max(1, math.ceil(table.num_rows / 2))))
