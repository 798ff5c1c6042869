"""The mutation check: does each guarantee's test catch a break of that guarantee?

For each mutation below, one at a time: copy the repository's files (tracked and untracked, not ignored) to a scratch
directory, apply one small break there (a string replacement that must match exactly once: a missing or ambiguous
anchor stops the script before anything runs), run the one test that should catch it against the scratch copy
(``PYTHONPATH`` at it, its own Ray cluster and S3 server, a timeout), and print a table. Nothing in the repository
itself is touched.

    python tests/mutations.py                 # every mutation; each test first passes unmutated (the baseline)
    python tests/mutations.py --no-baseline   # skip the baseline runs
    python tests/mutations.py -k deadlock     # only the mutations whose name contains "deadlock"

Exit status 0 only when every break was caught (and every baseline passed); 1 otherwise; 2 on a bad anchor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    test: str
    timeout_s: int = 600


MUTATIONS = [
    Mutation(
        "resume from the oldest checkpoint, not the newest",
        "lepton_ray/train/checkpoint.py",
        "        for step in reversed(self.steps()):\n            why = \"\"",
        "        for step in self.steps():\n            why = \"\"",
        "tests/faults/test_storage_faults.py::test_checkpoint_store_skips_torn_and_corrupt_checkpoints",
    ),
    Mutation(
        "never retry a read (attempts = 1)",
        "lepton_ray/data/source.py",
        "        attempts = self.cfg.read_retries + 1\n",
        "        attempts = 1\n",
        "tests/faults/test_storage_faults.py::test_s3_outage_of_seconds_mid_epoch_is_ridden_out_with_every_row_once_per_epoch",
    ),
    Mutation(
        "a worker never writes its stack dump",
        "lepton_ray/train/watchdog.py",
        "                if wanted:\n                    ray.get(self.board.put_stacks.remote(",
        "                if False:\n                    ray.get(self.board.put_stacks.remote(",
        "tests/faults/test_hangs.py::test_frozen_worker_fails_the_run_naming_it",
    ),
    Mutation(
        "the deadlock branch returns [] (unit)",
        "lepton_ray/train/watchdog.py",
        "        return sorted(r for r, b in started.items() if b[\"step\"] == low)\n",
        "        return []\n",
        "tests/unit/test_watchdog.py",
    ),
    Mutation(
        "the deadlock branch returns [] (a real two-rank hang)",
        "lepton_ray/train/watchdog.py",
        "        return sorted(r for r, b in started.items() if b[\"step\"] == low)\n",
        "        return []\n",
        "tests/faults/test_hangs.py::test_a_collective_that_never_completes_is_a_deadlock_whose_ranks_are_killed_and_restarted",
    ),
    Mutation(
        "deadlocked ranks dump no stacks (only ranks not stuck do)",
        "lepton_ray/train/watchdog.py",
        "        live = [r for r in beats if beats[r][\"age\"] <= self.timeout_s / 2]\n",
        "        live = [r for r in beats if r not in stuck and beats[r][\"age\"] <= self.timeout_s / 2]\n",
        "tests/faults/test_hangs.py::test_a_collective_that_never_completes_is_a_deadlock_whose_ranks_are_killed_and_restarted",
    ),
    Mutation(
        "deal one row twice after a resize (shares overlap by one row)",
        "lepton_ray/data/plan.py",
        "        return _slice(rest, lo, lo + base + (rank < extra))\n",
        "        return _slice(rest, max(lo - 1, 0), lo + base + (rank < extra))\n",
        "tests/unit/test_stream.py::test_a_resize_mid_epoch_reads_every_row_at_most_once",
    ),
    Mutation(
        "let a 5xx through in serving (a bad request answered 500)",
        "lepton_ray/serve/app.py",
        "        except BadRequest as exc:\n            return _json(exc.status, {\"error\": str(exc)})\n        except ModelFailed",
        "        except BadRequest as exc:\n            return _json(500, {\"error\": str(exc)})\n        except ModelFailed",
        "tests/faults/test_serve_faults.py::test_random_requests_to_every_endpoint_never_get_a_5xx",
    ),
    Mutation(
        "a restarted PS shard does not restore from the checkpoint",
        "lepton_ray/sync/ps_shard.py",
        "        if checkpoint_uri:\n            self._restore_from_checkpoint(",
        "        if False:\n            self._restore_from_checkpoint(",
        "tests/unit/test_ps_shard.py::test_a_shard_started_over_a_checkpoint_restores_its_part",
    ),
]


def _check_anchors(mutations: list[Mutation]) -> None:
    bad = []
    for m in mutations:
        n = (REPO / m.path).read_text().count(m.old)
        if n != 1:
            bad.append(f"{m.name}: the anchor occurs {n} times in {m.path} (must be exactly once):\n{m.old}")
    if bad:
        sys.exit("mutations: the code moved; fix these anchors first:\n" + "\n".join(bad))


def _scratch_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run_test(root: Path, test: str, timeout_s: int) -> tuple[str, float, str]:
    """``(outcome, seconds, last lines)``: outcome passed / failed / timed out. A timed-out run gets SIGINT first
    (pytest then tears its fixtures down: the Ray cluster and S3 server it started), SIGKILL to its group 60 s later."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    where = subprocess.run([sys.executable, "-c", "import lepton_ray; print(lepton_ray.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):  # an installed copy first on the path would test the unmutated code
        sys.exit(f"mutations: lepton_ray imports from {where!r}, not from the scratch copy {root}")
    cmd = [sys.executable, "-m", "pytest", test, "-x", "-q", "-m", "", "-p", "no:cacheprovider"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        outcome = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        outcome = "timed out"
    tail = [line for line in out.splitlines() if line.strip()][-3:]
    return outcome, time.monotonic() - t0, " | ".join(tail)[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-baseline", action="store_true", help="do not first run each test on the unmutated copy")
    parser.add_argument("-k", default="", help="only the mutations whose name contains this")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if args.k in m.name]
    _check_anchors(mutations)

    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="lepton-mutations-") as tmp:
        if not args.no_baseline:
            base = Path(tmp) / "baseline"
            _scratch_copy(base)
            for test in dict.fromkeys(m.test for m in mutations):
                outcome, secs, tail = _run_test(base, test, max(m.timeout_s for m in mutations if m.test == test))
                print(f"baseline {outcome:9} {secs:6.0f} s  {test}" + ("" if outcome == "passed" else f"\n    {tail}"), flush=True)
                if outcome != "passed":
                    ok = False
                    rows.append(("(no mutation: baseline)", test, f"BASELINE {outcome.upper()}", secs))
            shutil.rmtree(base)
        for i, m in enumerate(mutations):
            root = Path(tmp) / f"m{i}"
            _scratch_copy(root)
            target = root / m.path
            target.write_text(target.read_text().replace(m.old, m.new))
            outcome, secs, tail = _run_test(root, m.test, m.timeout_s)
            verdict = "NOT CAUGHT" if outcome == "passed" else f"caught ({outcome})"
            ok &= outcome != "passed"
            rows.append((m.name, m.test, verdict, secs))
            print(f"{verdict:20} {secs:6.0f} s  {m.name}  [{m.test}]\n    {tail}", flush=True)
            shutil.rmtree(root)

    w1, w2 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'mutation':{w1}}  {'test':{w2}}  {'verdict':18}  time")
    for name, test, verdict, secs in rows:
        print(f"{name:{w1}}  {test:{w2}}  {verdict:18}  {secs:4.0f} s")
    print("\nevery break was caught" if ok else "\nSOME BREAK WENT UNNOTICED (or a baseline failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
