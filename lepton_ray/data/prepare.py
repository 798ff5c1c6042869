"""``lepton-ray data prepare``: rows in, sharded Parquet plus a committed ``_manifest.json`` out.

Layout of a prepared split (``DEST`` or ``DEST/<split>`` with eval_fraction)::

    shard-00000.parquet ... shard-<N-1>.parquet     row groups of row_group_rows rows
    _manifest.json                                  written last: it commits the split

The manifest names every shard with its rows, per-row-group rows, bytes and
SHA-256, plus the schema (each column's Arrow type, and the dtype and per-row shape it reads
as in a batch) and the split name. It is written only after every
shard is in place (one PUT on object storage, a rename on a local disk), so a
reader never sees a half-written data set: a directory of ``shard-*.parquet``
without a manifest is refused as unfinished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lepton_ray.config import ConfigError
from lepton_ray.console import progress_bar
from lepton_ray.data.schema import field_info
from lepton_ray.storage import atomic_write, filesystem, join

__all__ = ["MANIFEST", "FORMAT", "prepare", "read_manifest", "SHARD_PREFIX"]

MANIFEST = "_manifest.json"
FORMAT = "lepton_ray.dataset/1"
SHARD_PREFIX = "shard-"
_COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "none")


def _read_source(source: Union[str, os.PathLike, pa.Table]) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"prepare: source '{path}' does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".csv")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"prepare: source directory '{path}' holds no .parquet or .csv files")
    tables = []
    for f in files:
        if f.suffix == ".csv":
            tables.append(pacsv.read_csv(f))
        elif f.suffix == ".parquet":
            tables.append(pq.read_table(f))
        else:
            raise ConfigError(f"prepare: source '{f}' is neither .parquet nor .csv")
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"prepare: the files under '{path}' do not share one schema: {exc}") from None


def _write_split(table: pa.Table, dest: str, split: str, num_shards: int, row_group_rows: int,
                 compression: str, storage_options: Optional[dict], bar: Any) -> dict[str, Any]:
    fs, root = filesystem(dest, storage_options)
    fs.makedirs(root, exist_ok=True)
    try:
        fs.rm_file(f"{root}/{MANIFEST}")  # re-preparing: un-commit the old split before touching its shards
    except FileNotFoundError:
        pass
    bounds = np.linspace(0, table.num_rows, num_shards + 1).astype(np.int64)
    shards = []
    for i in range(num_shards):
        part = table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
        buf = io.BytesIO()
        pq.write_table(part, buf, row_group_size=row_group_rows, compression=None if compression == "none" else compression)
        data = buf.getvalue()
        name = f"{SHARD_PREFIX}{i:05d}.parquet"
        atomic_write(fs, f"{root}/{name}", data)
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        shards.append({
            "path": name,
            "num_rows": part.num_rows,
            "row_groups": [meta.row_group(g).num_rows for g in range(meta.num_row_groups)],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        })
        bar.update(part.num_rows)
    manifest = {
        "format": FORMAT,
        "split": split,
        "num_rows": table.num_rows,
        "schema": [field_info(f) for f in table.schema],  # every column's Arrow type, batch dtype and per-row shape
        "shards": shards,
        "created": time.time(),
    }
    atomic_write(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=1).encode())  # commits the split
    return manifest


def prepare(
    source: Union[str, os.PathLike, pa.Table],
    dest: str,
    *,
    num_shards: int,
    row_group_rows: int = 65536,
    compression: str = "zstd",
    eval_fraction: float = 0.0,
    seed: int = 0,
    shuffle: bool = True,
    storage_options: Optional[dict] = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write ``source`` (Parquet/CSV file or directory, or a ``pyarrow.Table``) as ``num_shards`` Parquet shards.

    Rows are shuffled with ``seed`` first (so every shard is a fair sample). With
    ``eval_fraction > 0`` the rows are split into ``DEST/train`` and ``DEST/eval``,
    each a prepared split with its own manifest. Returns ``{split: manifest}``. ``progress``: a bar of the rows
    written on stderr (the CLI's default).

    >>> import pyarrow as pa, tempfile
    >>> out = prepare(pa.table({"x": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 0, 1]}), tempfile.mkdtemp(), num_shards=2)
    >>> [s["num_rows"] for s in out["train"]["shards"]]
    [2, 2]
    """
    if num_shards < 1:
        raise ConfigError(f"prepare: --num-shards must be >= 1, got {num_shards}")
    if row_group_rows < 1:
        raise ConfigError(f"prepare: --row-group-rows must be >= 1, got {row_group_rows}")
    if compression not in _COMPRESSIONS:
        raise ConfigError(f"prepare: --compression {compression!r} is not one of {', '.join(_COMPRESSIONS)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"prepare: --eval-fraction must be in [0, 1), got {eval_fraction}")
    table = _read_source(source)
    if table.num_rows == 0:
        raise ConfigError("prepare: the source has no rows")
    if shuffle:
        table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    n_eval = int(round(table.num_rows * eval_fraction))
    splits = {"train": table.slice(n_eval)} if n_eval == 0 else {"train": table.slice(n_eval), "eval": table.slice(0, n_eval)}
    for split, part in splits.items():
        if part.num_rows < num_shards:
            raise ConfigError(f"prepare: the {split} split has {part.num_rows} rows, fewer than --num-shards {num_shards}")
    out = {}
    with progress_bar(table.num_rows, "prepare", "row", enabled=progress, unit_scale=True) as bar:
        for split, part in splits.items():
            target = dest if n_eval == 0 else join(dest, split)
            out[split] = _write_split(part, target, split, num_shards, row_group_rows, compression, storage_options, bar)
    return out


def read_manifest(fs: Any, root: str, uri: str, key: str) -> Optional[dict[str, Any]]:
    """The committed manifest of a prepared split, None for a plain Parquet directory.

    Raises ConfigError for an unfinished prepare (shards without a manifest) or a
    manifest that does not match the files next to it.
    """
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        if any(n.startswith(SHARD_PREFIX) and n.endswith(".parquet") for n in names):
            raise ConfigError(
                f"{key}: '{uri}' has {SHARD_PREFIX}*.parquet files but no {MANIFEST}: an unfinished `lepton-ray data prepare`; prepare it again"
            ) from None
        return None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{key}: '{uri}/{MANIFEST}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
    sizes = {d["name"].rsplit("/", 1)[-1]: d["size"] for d in fs.ls(root, detail=True)}
    for shard in manifest["shards"]:
        size = sizes.get(shard["path"])
        if size is None:
            raise ConfigError(f"{key}: '{uri}/{MANIFEST}' names {shard['path']}, which is missing")
        if size != shard["bytes"]:
            raise ConfigError(f"{key}: '{uri}/{shard['path']}' has {size} bytes but the manifest says {shard['bytes']}; the data set changed after it was prepared")
    return manifest
