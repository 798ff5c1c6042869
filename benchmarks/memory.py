#!/usr/bin/env python
"""What each worker holds with ``allreduce``, ``allreduce`` + ZeRO-1 and ``fsdp``, and the largest model each trains.

Every run is lepton_ray's own training loop (``lepton_ray.train.loop.train_loop``: the strategy, the optimizer,
checkpoints) in ``--workers`` processes over gloo, started with ``torch.multiprocessing`` (no Ray: the figures are
the workers', not Ray's), on seeded synthetic byte sequences, with the built-in ``gpt``, AdamW (fused), fp32, one
thread per worker, the same global batch and sequence length everywhere.

1. A gpt of >= 200 M parameters (``--layers`` x ``--width``), 3 steps, per strategy: each worker's parameter,
   gradient and optimizer-state bytes after the first step (the maximum over ranks, from the run's ``first_step``
   record) and each worker's measured peak RSS (``getrusage`` high-water mark, maximum over ranks) at that point;
   the end-of-run peak, which includes the final checkpoint, is shown for information. Bars: fsdp peak RSS <= 0.65 x
   allreduce's; ZeRO-1 optimizer-state bytes <= 0.55 x allreduce's and peak RSS <= 0.85 x allreduce's.

2. Under a real per-worker memory cap (``--cap-gib``: each worker process moves itself into a cgroup of its own
   whose ``memory.limit_in_bytes`` is the cap: it is started from inside it, so everything it holds counts; over the
   cap the kernel kills it), the
   deepest gpt of width ``--search-width`` that trains 3 steps and checkpoints, for allreduce and for fsdp, with the
   same activation checkpointing (``[Block]``), by a bisection over depth. Bar: fsdp's parameters >= 1.8 x
   allreduce's at 2 workers (ideal 2: AdamW's 16 bytes per parameter, 8 sharded over 2); reported at 4 logical
   workers too (ideal 4). A search starts no new probe after ``--search-budget-s`` (300 s): its depth is then a
   lower bound, and the table says so (4 processes on 2 cores make each deep probe of the 4-worker fsdp search
   several minutes long).

    .venv/bin/python benchmarks/memory.py [--cap-gib 1.5] [--skip-search] [--search-workers 2,4] [--search-budget-s 300]

Needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory (``--cgroup-root``) for part 2. On the
2-core test machine part 1 takes ~2 min and the 2-worker search ~7; the 4-worker one stops at its budgets (part 1 and
the 4-worker search at 240 s took 596 s), so a default run is ~20 min. Exit 0
whether or not the bars are met (``--strict``: 1 if not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

GiB = 2**30
SEQ, VOCAB = 64, 256
RSS_FSDP_BAR, OPT_ZERO_BAR, RSS_ZERO_BAR, SEARCH_BAR = 0.65, 0.55, 0.85, 1.8


def write_tokens(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    seq = rng.integers(0, VOCAB, size=(rows, SEQ + 1), dtype=np.uint8)
    col = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), SEQ)  # noqa: E731
    pq.write_table(pa.table({"input": col(seq[:, :-1]), "target": col(seq[:, 1:])}), path)


def gpt_params(layers: int, width: int) -> int:
    """Parameters of the built-in gpt (no biases): blocks, token and position embeddings, final norm."""
    return layers * (12 * width * width + 4 * width) + (VOCAB + SEQ) * width + width


def config(data: str, tmp: Path, name: str, strategy: str, layers: int, width: int, workers: int, batch: int,
           zero: bool = False, recompute: bool = False) -> dict[str, Any]:
    sync: dict[str, Any] = {"strategy": strategy}
    if zero:
        sync["allreduce"] = {"shard_optimizer": True}
    return {
        "model": {"name": "gpt", "kwargs": {"n_layer": layers, "n_head": 8, "n_embd": width}, "loss": "cross_entropy"},
        "data": {"train": data, "inputs": {"tokens": "input"}, "targets": {"next": "target"}, "shuffle": False},
        "train": {"max_steps": 3, "batch_size": batch, "optimizer": "adamw", "lr": 1e-4, "schedule": "constant",
                  "seed": 0, "activation_checkpointing": ["Block"] if recompute else None},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        "sync": sync,
        "checkpoint": {"every_n_steps": 0, "keep_last": 1, "dir": str(tmp / "checkpoints")},
        "run": {"name": name, "dir": str(tmp / "runs")},
    }


def _worker(rank: int, world: int, port: int, spec: Any) -> None:
    import torch.distributed as dist

    from lepton_ray.train.context import WorkerContext
    from lepton_ray.train.loop import train_loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_loop(spec, WorkerContext(rank, world))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(procs: list) -> bool:
    """Wait for every worker; when one fails (killed over the cap), stop the others (they would wait in a collective)."""
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
        time.sleep(0.2)
    return all(p.exitcode == 0 for p in procs)


def _rmdir_when_empty(path: Path, timeout: float = 10.0) -> None:
    """Remove a cgroup; the kernel refuses (EBUSY) until the last process that was in it has fully exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.rmdir(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run(raw: dict[str, Any], tmp: Path, cap: Optional[int] = None, cgroup_root: str = "") -> Optional[dict[str, Any]]:
    """One run of the loop in ``scaling.num_workers`` processes; its records, or None when a worker died (over the cap)."""
    import torch.multiprocessing as mp
    from multiprocessing import resource_tracker

    from lepton_ray import Trainer, load_config
    from lepton_ray.train.loop import LoopSpec
    from lepton_ray.train.metrics import Sink

    cfg = load_config(raw)
    trainer = Trainer(cfg, progress=False)
    log = tmp / f"{raw['run']['name']}.jsonl"
    spec = LoopSpec(cfg.to_dict(), trainer.train_info, None, trainer.checkpoint_uri, sink=Sink(str(log)))
    cgroup, home = None, ""
    if cap is not None:
        here = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.split(":")[1] == "memory")
        home = cgroup_root + here.rstrip("/")  # this process's own memory cgroup, to return to
        cgroup = tempfile.mkdtemp(prefix="lepton_memory_", dir=cgroup_root)
        for r in range(cfg.scaling.num_workers):
            Path(cgroup, f"rank{r}").mkdir()
            Path(cgroup, f"rank{r}", "memory.limit_in_bytes").write_text(str(cap))
    t0 = time.monotonic()
    resource_tracker.ensure_running()  # spawn starts it on first use: here, not inside a worker's cgroup
    ctx, port, procs = mp.get_context("spawn"), _free_port(), []
    try:
        for r in range(cfg.scaling.num_workers):
            # a worker is started from inside its cgroup: it is in it from its first byte (the cgroup v1 charge of a
            # page goes to the cgroup of the process that allocates it; this process goes back out right after)
            if cgroup:
                Path(cgroup, f"rank{r}", "cgroup.procs").write_text(str(os.getpid()))
            try:
                procs.append(ctx.Process(target=_worker, args=(r, cfg.scaling.num_workers, port, spec)))
                procs[-1].start()
            finally:
                if cgroup:
                    Path(home, "cgroup.procs").write_text(str(os.getpid()))
        ok = _join(procs)
    finally:
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        for p in procs:
            p.join()
        if cgroup:
            for r in range(cfg.scaling.num_workers):
                _rmdir_when_empty(Path(cgroup, f"rank{r}"))
            _rmdir_when_empty(Path(cgroup))
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not ok:
        return None
    first = next(r for r in records if r.get("event") == "first_step")
    end = next(r for r in records if r.get("event") == "end")
    return {**first, "end_peak": end["peak_memory_bytes"], "seconds": time.monotonic() - t0}


def search(data: str, tmp: Path, strategy: str, width: int, workers: int, batch: int, cap: int, cgroup_root: str,
           hi_guess: int, budget_s: float = float("inf")) -> tuple[int, list[tuple[int, bool]], bool]:
    """The most layers of width ``width`` that train 3 steps under ``cap`` per worker: an exponential bracket from
    ``hi_guess``, then bisection, no new probe after ``budget_s``. Returns (layers, [(layers, trained), ...],
    complete): with ``complete`` False the answer is a lower bound (the most layers seen training)."""
    tried: list[tuple[int, bool]] = []
    deadline = time.monotonic() + budget_s

    def fits(layers: int) -> bool:
        name = f"search-{strategy}-{workers}-{layers}"
        ok = run(config(data, tmp, name, strategy, layers, width, workers, batch, recompute=True), tmp, cap, cgroup_root) is not None
        tried.append((layers, ok))
        print(f"    {strategy:<9} {workers} workers, {layers:3d} layers ({gpt_params(layers, width) / 1e6:6.1f} M): "
              f"{'trains' if ok else 'killed over the cap'}", flush=True)
        return ok

    lo, hi = 0, max(1, hi_guess)
    while fits(hi):  # grow until a depth does not fit
        lo, hi = hi, hi * 2
        if time.monotonic() > deadline:
            return lo, tried, False
    while hi - lo > 1:
        if time.monotonic() > deadline:
            return lo, tried, False
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, tried, True


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16, help="depth of the large gpt (default 16: 201.9 M parameters at width 1024)")
    ap.add_argument("--width", type=int, default=1024, help="n_embd of the large gpt (default 1024)")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch of sequences of 64 bytes (default 4)")
    ap.add_argument("--cap-gib", type=float, default=1.5, help="per-worker memory cap of the search (default 1.5 GiB)")
    ap.add_argument("--search-width", type=int, default=512, help="n_embd of the searched gpts (default 512)")
    ap.add_argument("--search-workers", default="2,4", help="worker counts of the search (default 2,4)")
    ap.add_argument("--search-budget-s", type=float, default=300,
                    help="no new probe of a search after this many seconds; its answer is then a lower bound (default 300)")
    ap.add_argument("--cgroup-root", default="/sys/fs/cgroup/memory", help="cgroup v1 memory hierarchy (default /sys/fs/cgroup/memory)")
    ap.add_argument("--skip-search", action="store_true", help="part 1 only")
    ap.add_argument("--only-search", action="store_true", help="part 2 only")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    return ap


def measure(args: argparse.Namespace) -> tuple[list[tuple], dict[str, Any], dict[int, dict[str, Any]], float, float]:
    """Part 1 (unless --only-search) and part 2 (unless --skip-search): (table rows, part 1's runs by label, part 2's
    findings by worker count, start time (monotonic), 1-min load average at start)."""
    wall0, load0 = time.monotonic(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="lepton_memory_"))
    rows: list[tuple[str, float, float, float, str]] = []
    big: dict[str, Any] = {}
    searched: dict[int, dict[str, Any]] = {}
    try:
        data = str(tmp / "tokens.parquet")
        write_tokens(Path(data), 256)
        if not args.only_search:
            params = gpt_params(args.layers, args.width)
            print(f"part 1: gpt {args.layers} x {args.width} ({params / 1e6:.1f} M parameters), AdamW, 2 workers, global batch "
                  f"{args.batch_size} x {SEQ} bytes, 3 steps", flush=True)
            for label, strategy, zero in (("allreduce", "allreduce", False), ("allreduce+zero1", "allreduce", True), ("fsdp", "fsdp", False)):
                big[label] = run(config(data, tmp, label, strategy, args.layers, args.width, 2, args.batch_size, zero=zero), tmp)
                r = big[label]
                print(f"  {label:<16} params {r['param_bytes'] / GiB:5.2f} GiB  grads {r['grad_bytes'] / GiB:5.2f}  optimizer "
                      f"{r['optimizer_bytes'] / GiB:5.2f}  peak RSS {r['peak_memory_bytes'] / GiB:5.2f} GiB (with the final checkpoint "
                      f"{r['end_peak'] / GiB:5.2f})  {r['seconds']:.0f}s", flush=True)
            a, z, f = big["allreduce"], big["allreduce+zero1"], big["fsdp"]
            rows += [("fsdp peak RSS / allreduce", f["peak_memory_bytes"] / a["peak_memory_bytes"], RSS_FSDP_BAR, 0, "<="),
                     ("zero1 optimizer bytes / allreduce", z["optimizer_bytes"] / a["optimizer_bytes"], OPT_ZERO_BAR, 0, "<="),
                     ("zero1 peak RSS / allreduce", z["peak_memory_bytes"] / a["peak_memory_bytes"], RSS_ZERO_BAR, 0, "<=")]

        if not args.skip_search:
            cap = int(args.cap_gib * GiB)
            print(f"part 2: the deepest gpt of width {args.search_width} that trains 3 steps under {args.cap_gib} GiB per worker"
                  f" (activation checkpointing [Block] for both)", flush=True)
            per_layer = 16 * gpt_params(1, args.search_width)  # AdamW's 16 bytes per parameter, whole
            for workers in [int(w) for w in args.search_workers.split(",")]:
                found, complete = {}, {}
                for strategy in ("allreduce", "fsdp"):
                    share = 1 if strategy == "allreduce" else workers
                    guess = max(1, int(0.5 * cap * share / per_layer))
                    found[strategy], _, complete[strategy] = search(data, tmp, strategy, args.search_width, workers,
                                                                    max(args.batch_size, workers), cap, args.cgroup_root, guess,
                                                                    args.search_budget_s)
                pa_, pf = gpt_params(found["allreduce"], args.search_width), gpt_params(found["fsdp"], args.search_width)
                ratio = pf / pa_ if pa_ else float("inf")
                # a bound: fsdp's depth at least (stopped early), allreduce's at least too (then the ratio is no bound at all)
                exact = complete["allreduce"] and complete["fsdp"]
                bound = "" if exact else (" (fsdp stopped at the search budget: a lower bound)" if complete["allreduce"]
                                          else " (allreduce stopped at the search budget: not a bound)")
                print(f"  {workers} workers: allreduce {found['allreduce']} layers ({pa_ / 1e6:.1f} M), fsdp {'>= ' * (not complete['fsdp'])}"
                      f"{found['fsdp']} layers ({pf / 1e6:.1f} M): {ratio:.2f}x{bound}", flush=True)
                searched[workers] = {"allreduce_params": pa_, "fsdp_params": pf, "layers": found, "exact": exact,
                                     "complete": complete}
                rows.append((f"largest fsdp / allreduce params, {workers} workers{'' if exact else ' (bound)'}", ratio,
                             SEARCH_BAR if workers == 2 else 0.0, workers, ">="))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return rows, big, searched, wall0, load0


def bench_rows(argv: list[str]) -> list:
    """The suite's entry point: this script run with ``argv``, as rows (bytes in GiB, parameters in millions)."""
    from benchmarks.rows import row

    args = _parser().parse_args(argv)
    _, big, searched, _, _ = measure(args)
    out = []
    if big:
        a, z, f = big["allreduce"], big["allreduce+zero1"], big["fsdp"]
        size = f"gpt {args.layers} x {args.width} ({gpt_params(args.layers, args.width) / 1e6:.1f} M)"
        out += [row("memory", f"fsdp peak RSS per worker, {size}", f["peak_memory_bytes"] / GiB, "GiB", "allreduce",
                    a["peak_memory_bytes"] / GiB, bar=f"<= {RSS_FSDP_BAR:g}"),
                row("memory", f"ZeRO-1 optimizer state per worker, {size}", z["optimizer_bytes"] / GiB, "GiB", "allreduce",
                    a["optimizer_bytes"] / GiB, bar=f"<= {OPT_ZERO_BAR:g}"),
                row("memory", f"ZeRO-1 peak RSS per worker, {size}", z["peak_memory_bytes"] / GiB, "GiB", "allreduce",
                    a["peak_memory_bytes"] / GiB, bar=f"<= {RSS_ZERO_BAR:g}"),
                row("memory", f"fsdp peak RSS with the final checkpoint, {size}", f["end_peak"] / GiB, "GiB", "allreduce",
                    a["end_peak"] / GiB)]
    for workers, r in searched.items():
        note = "" if r["exact"] else ("fsdp stopped at the search budget: a lower bound" if r["complete"]["allreduce"]
                                      else "allreduce stopped at the search budget: not a bound")
        out.append(row("memory", f"largest fsdp gpt under {args.cap_gib:g} GiB per worker, {workers} workers",
                       r["fsdp_params"] / 1e6, "M params", "allreduce", r["allreduce_params"] / 1e6,
                       bar=f">= {SEARCH_BAR:g}" if workers == 2 else None, note=note, extra={"layers": r["layers"]}))
    return out


def main() -> int:
    args = _parser().parse_args()
    rows, _, _, wall0, load0 = measure(args)
    print()
    print(f"{'measure':<46}{'value':>8}{'bar':>9}  result")
    failed = False
    for name, value, bar, _, op in rows:
        if not bar:
            print(f"{name:<46}{value:>8.3f}{'(info)':>9}")
            continue
        ok = value <= bar if op == "<=" else value >= bar
        failed |= not ok
        print(f"{name:<46}{value:>8.3f}{op + ' ' + str(bar):>9}  {'PASS' if ok else 'FAIL'}")
    print(f"total wall time {time.monotonic() - wall0:.0f}s; 1-min load average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}"
          f" ({os.cpu_count()} cores)")
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
