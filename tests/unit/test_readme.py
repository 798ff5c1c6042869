"""The README's fault-tolerance table names, for each guarantee, the tests that check it: each name must be a test."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _fault_table() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index("| fault | what is guaranteed | measured | tested by")
    return text[start:text.index("\n\n", start)].splitlines()[2:]


def test_every_guarantee_in_the_fault_table_names_tests_that_exist():
    defined = {m for path in (REPO / "tests").rglob("test_*.py") for m in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    rows = _fault_table()
    assert len(rows) >= 10
    for row in rows:
        tested_by = row.rstrip(" |").rsplit(" | ", 1)[1]
        named = set(re.findall(r"(test_\w+)(?:\[[\w-]+\])?`", tested_by)) - {n for n in re.findall(r"(test_\w+)\.py", tested_by)}
        assert named, f"a guarantee without a test: {row[:80]}"
        assert named <= defined, f"{sorted(named - defined)} named in the README but not defined under tests/"
