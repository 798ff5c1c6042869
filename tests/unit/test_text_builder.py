"""Unit tests for the ``text`` builder: any directory of text files, split by file, shifted targets, skips, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lepton_ray.config import ConfigError
from lepton_ray.data.builders import BUILDERS, build_data
from lepton_ray.data.text import read_corpus


def corpus(root: Path, files: int = 12) -> dict[str, bytes]:
    """Text files whose bytes name their file (``<name>:<i>;`` repeated), in nested folders."""
    out = {}
    for i in range(files):
        name = f"d{i % 3}/f{i:02d}.txt"
        data = "".join(f"f{i:02d}:{j};" for j in range(40 + 13 * i)).encode()
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        out[name] = data
    return out


def build(root: Path, out: Path, **kw) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, eval rows)`` of ``input ++ last target byte``: each row's block + 1 bytes."""
    build_data("text", str(out / "train.parquet"), str(out / "eval.parquet"), {}, {"root": str(root), **kw})
    return tuple(rows(out / f"{split}.parquet") for split in ("train", "eval"))


def rows(path: Path) -> np.ndarray:
    t = pq.read_table(path)
    block = t.schema.field("input").type.list_size
    x = np.array(t.column("input").combine_chunks().flatten(), np.uint8).reshape(-1, block)
    y = np.array(t.column("target").combine_chunks().flatten(), np.uint8).reshape(-1, block)
    assert (x[:, 1:] == y[:, :-1]).all()  # the target is the input shifted by one byte
    return np.concatenate([x, y[:, -1:]], axis=1)


def test_any_directory_of_text_files_is_cut_into_shifted_blocks(tmp_path):
    files = corpus(tmp_path / "src")
    build_data("text", str(tmp_path / "out/train.parquet"), None, {}, {"root": str(tmp_path / "src"), "block": 16})
    t = pq.read_table(tmp_path / "out/train.parquet")
    assert t.column_names == ["input", "target"]
    assert [str(t.schema.field(c).type.value_type) for c in t.column_names] == ["uint8", "uint8"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.parquet"]  # nothing else written
    data = rows(tmp_path / "out/train.parquet").tobytes()
    total = sum(len(b) + 1 for b in files.values())  # each file followed by b"\n"
    assert len(data) == total // 17 * 17  # non-overlapping rows of block + 1 bytes, the short tail dropped
    stream = b"".join(b + b"\n" for _, b in read_corpus(str(tmp_path / "src")))  # the files in the seeded order (seed 0)
    assert data == stream[: len(data)]
    assert pq.ParquetFile(tmp_path / "out/train.parquet").metadata.num_row_groups >= 2  # two workers can share it


def test_split_is_by_file_and_deterministic(tmp_path):
    files = corpus(tmp_path / "src")
    train, ev = build(tmp_path / "src", tmp_path / "a", block=8, eval_fraction=0.25, seed=3)
    text = {s: r.tobytes() for s, r in (("train", train), ("eval", ev))}
    names = {s: set(re.findall(rb"f\d\d(?=:)", b)) for s, b in text.items()}
    assert names["train"] and names["eval"] and not names["train"] & names["eval"]  # no file in both splits
    assert len(names["train"] | names["eval"]) == len(files)
    assert 0.1 < len(text["eval"]) / (len(text["eval"]) + len(text["train"])) < 0.45

    again = build(tmp_path / "src", tmp_path / "b", block=8, eval_fraction=0.25, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], ev)
    other = build(tmp_path / "src", tmp_path / "c", block=8, eval_fraction=0.25, seed=4)
    assert not np.array_equal(other[1], ev)  # the seed picks the files


def test_binary_empty_and_unmatched_files_are_skipped(tmp_path):
    src = tmp_path / "src"
    corpus(src, files=3)
    (src / "blob.bin").write_bytes(b"abc\0def" * 50)
    (src / "empty.txt").write_bytes(b"")
    assert sorted(p for p, _ in read_corpus(str(src))) == ["d0/f00.txt", "d1/f01.txt", "d2/f02.txt"]
    assert [p for p, _ in read_corpus(str(src), "d1/*.txt")] == ["d1/f01.txt"]
    train, ev = build(src, tmp_path / "out", block=8)
    assert b"\0" not in train.tobytes() + ev.tobytes()


def test_max_bytes_caps_what_is_read(tmp_path):
    corpus(tmp_path / "src")
    files = read_corpus(str(tmp_path / "src"), max_bytes=1000, seed=1)
    assert sum(len(b) for _, b in files) == 1000
    full = dict(read_corpus(str(tmp_path / "src"), seed=1))
    assert [p for p, _ in files] == [p for p, _ in read_corpus(str(tmp_path / "src"), seed=1)][: len(files)]  # the seeded order
    assert all(full[p].startswith(b) for p, b in files)


def raises(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


def test_errors_name_the_option(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/bin.dat").write_bytes(b"\0\1\2")
    with raises(f"data.builder_kwargs.root: '{tmp_path / 'empty'}' has no readable text files matching '**/*' "
                f"(data.builder_kwargs.pattern; binary and empty files are skipped)"):
        build(tmp_path / "empty", tmp_path / "out")
    with raises(f"data.builder_kwargs.root: '{tmp_path / 'nope'}' is not a directory (a local directory of text files)"):
        build(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "one").mkdir()
    (tmp_path / "one/a.txt").write_text("hello " * 100)
    with raises("data.builder: 'text' splits by file, and found only 1 text file (a.txt); add files under "
                "data.builder_kwargs.root or omit data.eval"):
        build(tmp_path / "one", tmp_path / "out")
    with raises("data.builder: 'text' train split has 601 bytes, fewer than one row of block + 1 = 1001; lower "
                "data.builder_kwargs.block or raise max_bytes / eval_fraction"):
        build_data("text", str(tmp_path / "out/train.parquet"), None, {}, {"root": str(tmp_path / "one"), "block": 1000})
    with raises("data.builder_kwargs: builder 'text' rejected them: text() got an unexpected keyword argument 'blok'"):
        build(tmp_path / "one", tmp_path / "out", blok=3)
    with pytest.raises(ConfigError, match=r"^data\.builder_kwargs\.pattern: '/abs/\*' is not a glob relative to root"):
        read_corpus(str(tmp_path / "one"), "/abs/*")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_default_root_is_the_standard_librarys_python_sources(tmp_path):
    assert "text" in BUILDERS
    build_data("text", str(tmp_path / "train.parquet"), str(tmp_path / "eval.parquet"), {}, {"block": 32, "max_bytes": 20_000})
    train, ev = rows(tmp_path / "train.parquet"), rows(tmp_path / "eval.parquet")
    files = read_corpus(max_bytes=20_000)
    assert all(p.endswith(".py") and "site-packages" not in p for p, _ in files)
    total = 20_000 + len(files)  # each file followed by b"\n"
    assert total - 2 * 33 < (len(train) + len(ev)) * 33 <= total  # each split drops its short tail
    assert b"def " in train.tobytes() + ev.tobytes()
