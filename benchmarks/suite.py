"""The benchmark suite: every benchmark of the project, each comparison measured in the same run, one command.

    python -m benchmarks [NAME ...] [--quick] [--update]      (or: lepton-ray bench [NAME ...] [--quick] [--update])

Each part runs in a process of its own (its own Ray instance, its own memory), one after the other, and returns rows
(``benchmarks/rows.py``). The suite writes ``benchmarks/results.json`` (atomically: a temporary file, then a rename):
the rows, each part's wall time and status (a failed part keeps its error's last lines and costs the others nothing),
the machine, the date and the load average at the start and the end; then ``benchmarks/render.py`` draws
``benchmarks/RESULTS.md`` and the charts from that file alone. ``--quick`` runs tiny sizes (it checks that every part
runs and returns well-formed rows; its figures mean nothing) into ``results.quick.json`` / ``RESULTS.quick.md``,
never the full results. ``--update`` merges the parts it runs into the existing results instead of starting afresh.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import difflib
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA = 1
ERROR_LINES = 40


@dataclass(frozen=True)
class Part:
    """One unit of the suite: one benchmark script's ``bench_rows(argv)`` with these arguments, in a process of its own."""

    name: str
    """``<script>.<part>``, or the script's name where it is one part."""
    script: str
    """The module under benchmarks/ whose ``bench_rows(argv)`` measures it."""
    full: tuple[str, ...]
    """Its command-line arguments in the full suite (the script's own flags: ``python benchmarks/SCRIPT.py ARGS``)."""
    quick: tuple[str, ...]
    """Its arguments with ``--quick``: tiny sizes, only checking that it runs and returns well-formed rows."""
    minutes: float
    """Expected wall time of the full part on the 2-core machine, in minutes."""
    what: str


# Full-mode arguments are chosen so that the whole suite fits in about an hour on the 2-core machine; each part's
# minutes are measured (quick) or scaled from the scripts' own documented timings (full). See the README.
PARTS: tuple[Part, ...] = (
    Part("train_overhead.mlp", "train_overhead", ("--parts", "mlp", "--repeats", "3"),
         ("--parts", "mlp", "--repeats", "1", "--steps", "30", "--warmup", "5", "--rows", "2048", "--batch-size", "64"),
         8, "MLP all-reduce samples/s vs plain DDP; time to first step vs bare Ray Train"),
    Part("train_overhead.gpt", "train_overhead", ("--parts", "gpt", "--repeats", "3", "--gpt-steps", "100"),
         ("--parts", "gpt", "--repeats", "1", "--gpt-steps", "12", "--gpt-warmup", "3", "--gpt-rows", "512"),
         9, "gpt tokens/s: allreduce vs plain DDP, fsdp vs plain FSDP2"),
    Part("train_overhead.start", "train_overhead", ("--parts", "start", "--repeats", "3"),
         ("--parts", "start", "--repeats", "1", "--rows", "2048", "--batch-size", "64", "--start-steps", "5", "--main-runs", "1"),
         5, "fresh driver's first step vs bare Ray Train; second fit(keep_warm); the main job as a process"),
    Part("data_pipeline.read", "data_pipeline", (),
         ("--rows", "40000", "--shards", "4", "--train-steps", "30"),
         5, "data stream rows/s vs one pyarrow process (moto S3); ray_data engine vs native and vs Ray Data's own path"),
    Part("data_pipeline.heavy", "data_pipeline", ("--heavy",),
         ("--heavy", "--heavy-rows", "20000", "--heavy-steps", "60"),
         4, "CPU-heavy transform on a 2-node local cluster: ray_data engine vs native"),
    Part("param_server.rec", "param_server", ("--parts", "rec"),
         ("--parts", "rec", "--steps", "25", "--warmup", "5", "--batch-size", "64"),
         5, "recommender 1M x 32 table: hybrid / ps vs allreduce"),
    Part("param_server.dense", "param_server", ("--parts", "dense"),
         ("--parts", "dense", "--steps", "25", "--warmup", "5"),
         3, "dense MLP: ps sync vs allreduce"),
    Part("param_server.straggler", "param_server", ("--parts", "straggler"),
         ("--parts", "straggler", "--epochs", "1", "--step-ms", "2"),
         4, "stragglers: ssp (static and dynamic deal) vs sync"),
    Part("sweep", "sweep", (), ("--samples", "2", "--epochs", "1", "--workers", "1"),
         2, "ASHA vs FIFO wall time and best metric; trial launch time"),
    Part("serve", "serve", (), ("--seconds", "1"),
         5, "lepton_ray serve vs plain uvicorn; chosen form (int8/bf16) vs fp32"),
    Part("memory.big", "memory", ("--skip-search",),
         ("--skip-search", "--layers", "2", "--width", "128"),
         3, "201.7 M gpt per worker: fsdp / ZeRO-1 peak memory vs allreduce"),
    Part("memory.search", "memory", ("--only-search", "--search-workers", "2", "--search-budget-s", "300"),
         ("--only-search", "--search-workers", "2", "--search-width", "128", "--cap-gib", "1.0", "--search-budget-s", "1"),
         6, "deepest gpt under a 1.5 GiB cap per worker: fsdp vs allreduce"),
    Part("scaling_model", "scaling_model", (), ("--quick",),
         2, "fitted alpha-beta cost model: validation, strategy table, published anchors"),
)
BY_NAME = {p.name: p for p in PARTS}


class SelectionError(ValueError):
    """A NAME that is neither a part nor a benchmark script."""


def select(names: Sequence[str], parts: Sequence[Part] = PARTS) -> list[Part]:
    """The parts NAMEs pick, in the suite's order: a part's full name, or a script's name for all its parts; none: all.

    >>> [p.name for p in select(["memory", "sweep"])]
    ['sweep', 'memory.big', 'memory.search']
    """
    if not names:
        return list(parts)
    chosen: set[str] = set()
    valid = sorted({p.name for p in parts} | {p.script for p in parts})
    for n in names:
        hit = {p.name for p in parts if n in (p.name, p.script)}
        if not hit:
            close = difflib.get_close_matches(n, valid, n=1)
            raise SelectionError(f"unknown benchmark {n!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; valid: {', '.join(valid)}")
        chosen |= hit
    return [p for p in parts if p.name in chosen]


# ------------------------------------------------------------------------------------------------ the machine


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, memory, CPU model, GPUs (or none), torch and Ray versions."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    cpu, mem = platform.processor() or platform.machine(), None
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    with contextlib.suppress(OSError, StopIteration, ValueError):
        kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
        mem = round(kib / 2**20, 1)
    gpus: list[str] = []
    with contextlib.suppress(Exception):  # no torch, no driver: no GPU to name
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cores": os.cpu_count(), "memory_gib": mem, "cpu": cpu, "gpu": ", ".join(gpus) if gpus else "none",
            "torch": ver("torch"), "ray": ver("ray"), "python": platform.python_version(), "os": platform.platform()}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------ one part


def run_child(part_name: str, quick: bool, out: str) -> int:
    """In the part's own process: import its script, call ``bench_rows(argv)``, write the rows (and the script's
    ``bench_tables()``, where it has one) to ``out`` as JSON."""
    from benchmarks.rows import Row

    part = BY_NAME[part_name]
    mod = importlib.import_module(f"benchmarks.{part.script}")
    rows = mod.bench_rows(list(part.quick if quick else part.full))
    bad = [r for r in rows if not isinstance(r, Row)]
    if bad or not rows:
        raise TypeError(f"{part.script}.bench_rows returned {len(rows)} rows, {len(bad)} of them not benchmarks.rows.Row")
    tables = mod.bench_tables() if hasattr(mod, "bench_tables") else {}
    payload = {"rows": [{**r.to_dict(), "part": part.name} for r in rows], "tables": tables}
    Path(out).write_text(json.dumps(payload, allow_nan=True))
    return 0


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + ([path] if path else [])),
            "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def run_part(part: Part, quick: bool, *, timeout_s: float, echo: Callable[[str], None] = print,
             command: Optional[Callable[[Path], list[str]]] = None) -> dict[str, Any]:
    """Run one part in a process (and session) of its own; returns its entry: status, wall time, rows, the last lines of
    its output where it failed. ``command(out)``: the child's command line instead of the part's, given the file the child
    writes its rows to (tests)."""
    started, load0 = now(), load_avg()
    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmp:
        out = Path(tmp) / "rows.json"
        own = [sys.executable, "-m", "benchmarks", "--child", part.name, "--child-out", str(out)] + ["--quick"] * quick
        cmd = command(out) if command else own
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        tail: collections.deque[str] = collections.deque(maxlen=ERROR_LINES)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                echo(f"  | {line.rstrip()}")
            rc = proc.wait()
        except BaseException:  # Ctrl-C: take the part's whole session down with us
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            timer.cancel()
        with contextlib.suppress(ProcessLookupError):  # anything the part left behind in its session
            os.killpg(proc.pid, signal.SIGKILL)
        wall = round(time.monotonic() - t0, 1)
        entry: dict[str, Any] = {"status": "ok", "wall_s": wall, "date": started, "load_avg_start": load0,
                                 "load_avg_end": load_avg(), "argv": list(part.quick if quick else part.full),
                                 "expected_min": part.minutes, "error": None, "tables": {}}
        rows: list[dict[str, Any]] = []
        if rc == 0 and out.exists():
            try:
                payload = json.loads(out.read_text())
                rows, entry["tables"] = payload["rows"], payload.get("tables", {})
            except (ValueError, KeyError) as exc:
                rc, tail = 1, collections.deque([f"unreadable rows: {exc}"])
        if rc != 0 or not out.exists():
            why = f"timed out after {timeout_s:.0f} s" if timed_out.is_set() else f"exit status {rc}"
            entry.update(status="failed", error="\n".join([why, *tail]))
            rows = []
    return {**entry, "rows": rows}


# ------------------------------------------------------------------------------------------------ the results file


def empty_results(mode: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "mode": mode, "date": None, "machine": None, "load_avg": None, "parts": {}, "rows": []}


def merge(results: dict[str, Any], name: str, entry: dict[str, Any], order: Sequence[str] = tuple(BY_NAME)) -> dict[str, Any]:
    """``results`` with part ``name``'s entry and rows replaced by ``entry`` (its ``rows`` key), the parts and rows in
    the suite's order. Pure: returns a new dict."""
    rank = {n: i for i, n in enumerate(order)}
    parts = {**results.get("parts", {}), name: {k: v for k, v in entry.items() if k != "rows"}}
    rows = [r for r in results.get("rows", []) if r.get("part") != name] + [{**r, "part": name} for r in entry["rows"]]
    key = lambda n: (rank.get(n, len(rank)), n)  # noqa: E731 - parts the suite no longer has go last, by name
    ordered = {n: parts[n] for n in sorted(parts, key=key)}
    rows = sorted(rows, key=lambda r: key(r["part"]))  # stable: each part's rows keep their order
    return {**results, "parts": ordered, "rows": rows}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename: readers see the old file
    or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary file, not the results
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def default_paths(quick: bool) -> Path:
    return HERE / ("results.quick.json" if quick else "results.json")


def run_suite(parts: Sequence[Part], *, quick: bool, update: bool, out: Path, timeout_scale: float = 3.0,
              echo: Callable[[str], None] = print, runner: Callable[..., dict[str, Any]] = run_part) -> dict[str, Any]:
    """Run ``parts`` one at a time, writing ``out`` after each part (so an interrupted suite keeps what it measured),
    then render. ``update``: merge into ``out``'s existing results instead of starting afresh."""
    mode = "quick" if quick else "full"
    results = empty_results(mode)
    if update and out.exists():
        results = json.loads(out.read_text())
        if results.get("mode") != mode:
            raise SystemExit(f"--update: {out} holds {results.get('mode')} results, this run is {mode}")
    elif out.exists() and not update and set(json.loads(out.read_text()).get("parts", {})) - {p.name for p in parts}:
        raise SystemExit(f"{out} holds parts this run would drop; pass --update to merge into it, or --out FILE")
    here = machine()
    if results.get("machine") not in (None, here):
        echo(f"note: {out} was measured on another machine ({results['machine']}); its other parts keep those figures")
        results.setdefault("notes", []).append(f"{now()}: parts updated on {here['cpu']}, {here['cores']} cores")
    results.update(machine=here, date=now(), load_avg={"start": load_avg(), "end": None})
    expected = sum(p.minutes for p in parts)
    echo(f"benchmark suite ({mode}): {len(parts)} part(s)" + ("" if quick else f", expected ~{expected:.0f} min") + f" -> {out}")
    for i, part in enumerate(parts, 1):
        echo(f"[{i}/{len(parts)}] {part.name}: {part.what}" + ("" if quick else f" (~{part.minutes:g} min)"))
        timeout = 900 if quick else max(600, timeout_scale * 60 * part.minutes)
        entry = runner(part, quick, timeout_s=timeout, echo=echo)
        results = merge(results, part.name, entry)
        results["load_avg"]["end"] = load_avg()
        write_json_atomic(out, results)
        state = "ok" if entry["status"] == "ok" else "FAILED"
        echo(f"[{i}/{len(parts)}] {part.name}: {state} in {entry['wall_s']:.0f} s, {len(entry['rows'])} row(s)")
    from benchmarks.render import render_files

    for path in render_files(out):
        echo(f"wrote {path}")
    return results


# ------------------------------------------------------------------------------------------------ command line


def _epilog() -> str:
    lines = ["parts (expected minutes of the full run on the 2-core machine):"]
    lines += [f"  {p.name:<24} {f'~{p.minutes:g} min':>8}  {p.what}" for p in PARTS]
    lines.append(f"  {'all':<24} {f'~{sum(p.minutes for p in PARTS):g} min':>8}")
    lines.append("NAME: a part, or a script for all its parts (e.g. train_overhead, memory.search).")
    return "\n".join(lines)


def parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="parts to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: checks every part runs and returns well-formed rows (results.quick.json)")
    p.add_argument("--update", action="store_true", help="merge the parts run into the existing results instead of replacing them")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default benchmarks/results.json, or results.quick.json with --quick)")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m benchmarks") -> int:
    args = parser(prog).parse_args(argv)
    if args.child:
        return run_child(args.child, args.quick, args.child_out)
    if args.list:
        print(_epilog())
        return 0
    try:
        parts = select(args.names)
    except SelectionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    out = args.out or default_paths(args.quick)
    results = run_suite(parts, quick=args.quick, update=args.update, out=out)
    failed = [n for n in (p.name for p in parts) if results["parts"][n]["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (their errors are in {out})", file=sys.stderr)
    return 1 if failed else 0
