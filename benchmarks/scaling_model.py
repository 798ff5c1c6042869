#!/usr/bin/env python
"""A communication cost model of lepton_ray's strategies, fitted and checked on this machine.

The model (alpha-beta: a message costs ``alpha`` seconds, a byte through one worker's link ``beta``), per step:

- ``allreduce`` (DDP): ring all-reduce of every gradient, ``2(p-1)/p * S * beta + 2(p-1) * alpha`` per bucket;
  an embedding table's gradient is dense here, so S includes the whole table;
- ``ps``: each worker pushes its dense gradients plus the rows its batch touched (values + int64 ids), split over
  ``shards`` servers, then pulls as many bytes back; a shard's link carries ``p / shards`` workers' shares, so each
  direction costs ``alpha + max(1, p / shards) * (dense + sparse) * beta`` (shards on links of their own; push
  then pull, as lepton_ray's sync mode does);
- ``hybrid``: the ring all-reduce of the dense parameters plus the PS for the touched rows only;
- ``fsdp`` (FSDP2): all-gather (forward), all-gather (backward), reduce-scatter: ``3(p-1)/p * S * beta + 3(p-1) *
  alpha`` per unit;
- a step is ``compute + max(0, comm - overlap * compute)``: ``overlap`` is the share of the compute that
  communication can hide behind (0: none; DDP's buckets can hide at most behind backward, ~2/3);
- scaling efficiency = single-worker step / step at p workers, the per-worker batch fixed (weak scaling), so the
  single-worker step is the compute alone.

Calibration (this machine: 2 CPU cores, no GPU): all-reduces of 1 KiB-16 MiB timed with ``torch.distributed``
over gloo (2 processes, ``torch.multiprocessing``, a FileStore rendezvous in a temporary directory, loopback only)
and through lepton_ray's shared-memory transport (``lepton_ray.sync.shm``) at 2 workers, medians of repeats, fit
alpha and beta per transport (least relative squares, non-negative); one training step of an MLP alone at three
batch sizes fits the compute per sample. Validation, on points that were NOT fitted: a held-out size each side of
the fitted range, both transports at 4 processes, FSDP's all-gathers and reduce-scatter and the PS push/pull
pattern (2 workers, 2 shards, gloo point-to-point) predicted from the gloo all-reduce fit, and a whole DDP step
(gloo and shm) from the compute fit plus the transport fit. Four processes share the 2 cores here: the table says
so, and the error there is mostly that sharing.

The strategy table and the published anchors are predictions for accelerator clusters: their compute times come
from FLOPs at an assumed sustained rate (:data:`TABLE_FLOPS`, the anchors' own), their latency is
:data:`NETWORK_ALPHA_S`; both are assumptions, not measurements. Not here: NCCL. Where a GPU is lent, NCCL's bus
bandwidth (``nccl-tests`` ``all_reduce_perf``, or ``torch.distributed`` over ``nccl``) would be fitted the same way
as a third transport; nothing in this file needs a GPU.

    PYTHONPATH=. .venv/bin/python benchmarks/scaling_model.py [--quick]

``run(quick)`` returns the four tables as JSON-serialisable rows (the benchmark suite renders them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

GBIT = 1e9 / 8
"""Bytes per second in one Gbit/s."""
NETWORK_ALPHA_S = 10e-6
"""Per-message latency assumed for a datacenter network (RDMA/NCCL: a few to tens of microseconds). Not measured."""
DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket (``bucket_cap_mb=25``): every bucket pays the latency term once."""
STRATEGIES = ("allreduce", "ps", "hybrid", "fsdp")
BANDWIDTHS_GBIT = (10, 25, 100, 400)
TABLE_WORKERS = (2, 8, 32, 128, 256)
TABLE_FLOPS = 200e12
"""Sustained FLOP/s assumed for one table worker (an H100-class GPU at ~20 % of its dense bf16 peak)."""
TABLE_OVERLAP = 0.0
"""The table's overlap: none, so its efficiencies are lower bounds (the anchors show 2/3 too)."""
OVERLAP_MAX = 2 / 3
"""Backward's share of a step, the most that DDP's gradient buckets can hide behind."""

Terms = tuple[float, float]
"""(messages, bytes) on the critical path of one worker: the cost is ``messages * alpha + bytes * beta``."""


@dataclass(frozen=True)
class Link:
    """A transport's latency per message and time per byte through one worker's link."""

    alpha_s: float
    beta_s_per_byte: float

    @classmethod
    def gbit(cls, gbit_per_s: float, alpha_s: float = NETWORK_ALPHA_S) -> "Link":
        """``Link.gbit(25)``: a 25 Gbit/s link with the assumed network latency."""
        if gbit_per_s <= 0:
            raise ValueError(f"bandwidth must be > 0 Gbit/s, got {gbit_per_s}")
        return cls(alpha_s, 1 / (gbit_per_s * GBIT))

    @property
    def gbit_per_s(self) -> float:
        return math.inf if self.beta_s_per_byte == 0 else 1 / (self.beta_s_per_byte * GBIT)

    def seconds(self, terms: Terms) -> float:
        messages, nbytes = terms
        return messages * self.alpha_s + nbytes * self.beta_s_per_byte


def _check_world(p: int, name: str = "workers") -> None:
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {p!r}")


def add(*terms: Terms) -> Terms:
    """Costs paid one after the other."""
    return sum(t[0] for t in terms), sum(t[1] for t in terms)


def ring_allreduce(nbytes: float, p: int, buckets: int = 1) -> Terms:
    """Ring all-reduce of ``nbytes`` in ``buckets`` collectives: reduce-scatter then all-gather, p-1 steps each."""
    _check_world(p)
    return 2 * (p - 1) * buckets, 2 * (p - 1) / p * nbytes


def ring_allgather(nbytes: float, p: int, units: int = 1) -> Terms:
    """All-gather (or reduce-scatter) of a buffer whose full size is ``nbytes``: p-1 steps of nbytes/p."""
    _check_world(p)
    return (p - 1) * units, (p - 1) / p * nbytes


def fsdp(nbytes: float, p: int, units: int = 1) -> Terms:
    """FSDP per step: all-gather before forward, again before backward, reduce-scatter of the gradients."""
    gather = ring_allgather(nbytes, p, units)
    return add(gather, gather, gather)  # a reduce-scatter moves what an all-gather does


def ps_push_pull(dense_bytes: float, sparse_bytes: float, p: int, shards: int) -> Terms:
    """One push (gradients) then one pull (parameters) per step; each direction waits for the busiest link:
    a worker's (all its bytes) or a shard's (``p / shards`` workers' shares)."""
    _check_world(p)
    _check_world(shards, "shards")
    return 2, 2 * max(1.0, p / shards) * (dense_bytes + sparse_bytes)


def shm_allreduce(nbytes: float, world: int, capacity_bytes: float) -> Terms:
    """lepton_ray's shared-memory average (:mod:`lepton_ray.sync.shm`) per rank, in chunks of ``capacity_bytes``:
    one barrier (a one-float gloo all-reduce: 2(W-1) messages) per chunk, and memory traffic of (3W-1) x nbytes:
    write bucket/W into its slot (read + write), then ``slot0 + slot1`` into the bucket (2 reads + 1 write) and
    ``+= slot_r`` for each further rank (2 reads + 1 write)."""
    _check_world(world, "world")
    chunks = max(1, math.ceil(nbytes / capacity_bytes))
    return chunks * 2 * (world - 1), (3 * world - 1) * nbytes


@dataclass(frozen=True)
class Workload:
    """One worker's step: what it computes and what its gradients weigh."""

    name: str
    dense_params: float
    compute_s: float
    """Forward + backward + update of one worker's batch."""
    embedding_rows: float = 0
    embedding_dim: int = 0
    sparsity: float = 0.0
    """Fraction of the embedding rows that one worker's step touches."""
    grad_bytes: int = 4
    """Bytes per gradient (and parameter) element on the wire."""
    bucket_bytes: float = DDP_BUCKET_BYTES

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"{self.name}: sparsity is a fraction of the embedding rows, in [0, 1]; got {self.sparsity}")
        if self.compute_s <= 0:
            raise ValueError(f"{self.name}: compute_s must be > 0, got {self.compute_s}")

    @property
    def dense_bytes(self) -> float:
        return self.dense_params * self.grad_bytes

    @property
    def embedding_bytes(self) -> float:
        return self.embedding_rows * self.embedding_dim * self.grad_bytes

    @property
    def touched_bytes(self) -> float:
        """Rows one step touches, each with its int64 id: what the PS moves per direction for the embeddings."""
        return self.sparsity * self.embedding_rows * (self.embedding_dim * self.grad_bytes + 8)

    def buckets(self, nbytes: float) -> int:
        return max(1, math.ceil(nbytes / self.bucket_bytes))


def comm(strategy: str, w: Workload, p: int, shards: int | None = None) -> Terms:
    """A step's communication under ``strategy`` at ``p`` workers (``shards``: PS servers, default one per worker)."""
    shards = p if shards is None else shards
    every = w.dense_bytes + w.embedding_bytes
    if strategy == "allreduce":
        return ring_allreduce(every, p, w.buckets(every))
    if strategy == "ps":
        return ps_push_pull(w.dense_bytes, w.touched_bytes, p, shards)
    if strategy == "hybrid":
        return add(ring_allreduce(w.dense_bytes, p, w.buckets(w.dense_bytes)), ps_push_pull(0, w.touched_bytes, p, shards))
    if strategy == "fsdp":
        return fsdp(every, p, w.buckets(every))
    raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


def step_s(compute_s: float, comm_s: float, overlap: float) -> float:
    """Compute plus the communication that does not fit under ``overlap`` x compute."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap is the share of compute that communication can hide behind, in [0, 1]; got {overlap}")
    return compute_s + max(0.0, comm_s - overlap * compute_s)


def predict(strategy: str, w: Workload, p: int, link: Link, overlap: float = 0.0, shards: int | None = None) -> dict[str, float]:
    """Step time and scaling efficiency (single-worker step, i.e. compute alone, / step at ``p`` workers).

    100 MB of gradients in 4 buckets, 8 workers, 100 Gbit/s: 2 x 7/8 x 100 MB / 12.5 GB/s + 2 x 7 x 4 x 10 us:

    >>> r = predict("allreduce", Workload("m", dense_params=25e6, compute_s=0.1), 8, Link.gbit(100))
    >>> round(r["comm_s"], 5), round(r["efficiency"], 3)
    (0.01456, 0.873)
    """
    comm_s = link.seconds(comm(strategy, w, p, shards))
    step = step_s(w.compute_s, comm_s, overlap)
    return {"comm_s": comm_s, "step_s": step, "efficiency": w.compute_s / step}


def fit_nonneg(design: Sequence[Sequence[float]], seconds: Sequence[float]) -> list[float]:
    """Non-negative coefficients x of ``design @ x ~ seconds``, least squares of the RELATIVE errors (the points
    span four orders of magnitude: plain least squares would fit the largest and ignore the latency)."""
    from scipy.optimize import nnls

    t = np.asarray(seconds, dtype=float)
    a = np.asarray(design, dtype=float)
    if a.ndim != 2 or len(a) != len(t) or len(t) < a.shape[1]:
        raise ValueError(f"need at least {a.shape[-1]} points with one time each; got {len(a)} design rows, {len(t)} times")
    x, _ = nnls(a / t[:, None], np.ones_like(t))
    return [float(v) for v in x]


def fit_link(points: Sequence[tuple[Terms, float]]) -> Link:
    """alpha and beta from (terms, measured seconds) points."""
    alpha, beta = fit_nonneg([terms for terms, _ in points], [t for _, t in points])
    return Link(alpha, beta)


# --------------------------------------------------------------------------------------------- measurements here

FIT_SIZES = (2**8, 2**12, 2**16, 2**19, 2**22)  # float32 elements: 1 KiB .. 16 MiB
HELD_OUT_SIZES = (2**14, 2**23)  # 64 KiB (inside the fitted range), 32 MiB (twice the largest fitted)
WORLD4_SIZES = (2**16, 2**22)
COLLECTIVE_SIZES = (2**20, 2**22)  # FSDP's collectives and the PS pattern: 4 MiB, 16 MiB
MLP = (512, 1024, 1024, 10)
FIT_BATCHES, DDP_BATCH = (8, 32, 128), 64
HOST_CORES = os.cpu_count() or 1


def _inner(nbytes: float) -> int:
    return int(min(50, max(2, 4e6 / nbytes)))


def _mlp_step(batch: int, ddp: str | None = None) -> Callable[[], None]:
    """One SGD step of the MLP on a fixed batch: alone, or under DDP averaging over ``ddp`` ("gloo" or "shm")."""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(MLP, MLP[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model: nn.Module = nn.Sequential(*layers[:-1])
    if ddp is not None:
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)  # as lepton_ray builds it
        if ddp == "shm":
            from lepton_ray.sync.shm import SharedMemoryAllReduce, bucket_capacity
            import torch.distributed as dist

            shm = SharedMemoryAllReduce(dist.get_rank(), dist.get_world_size(), bucket_capacity(list(model.parameters()), 25.0))
            model.register_comm_hook(shm, SharedMemoryAllReduce.hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, MLP[0]), torch.randint(0, MLP[-1], (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _ps_round(rank: int, nfloat: int) -> Callable[[], None]:
    """Ranks 0, 1 push half their gradient to each of shards 2, 3; each shard sums, sends the result back."""
    import torch
    import torch.distributed as dist

    half = nfloat // 2
    if rank < 2:
        grads, back = torch.ones(nfloat), torch.empty(nfloat)

        def worker() -> None:
            ops = [dist.isend(grads[s * half:(s + 1) * half], 2 + s) for s in range(2)]
            ops += [dist.irecv(back[s * half:(s + 1) * half], 2 + s) for s in range(2)]
            for op in ops:
                op.wait()

        return worker
    got = [torch.empty(half) for _ in range(2)]
    total = torch.empty(half)

    def shard() -> None:
        for op in [dist.irecv(got[w], w) for w in range(2)]:
            op.wait()
        torch.add(got[0], got[1], out=total)
        for op in [dist.isend(total, w) for w in range(2)]:
            op.wait()

    return shard


def _measure(rank: int, world: int, store: str, out: str, reps: int) -> None:
    """One process of the measurement group; rank 0 writes what it timed to ``out``.

    Every probe runs once to warm up, then ``reps`` rounds run every probe in turn (each: a barrier, then ``inner``
    calls back to back, timed): a machine whose load changes meanwhile slows all probes alike, not the ones that
    happened to run then. A probe's time is the median over the rounds of its mean call."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    import torch
    import torch.distributed as dist

    from lepton_ray.sync.shm import MAX_CHUNK, SharedMemoryAllReduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    shm = SharedMemoryAllReduce(rank, world, MAX_CHUNK)
    probes: dict[str, tuple[Callable[[], Any], int]] = {}  # "kind/key" -> (call, calls per round)
    for n in FIT_SIZES + HELD_OUT_SIZES if world == 2 else WORLD4_SIZES:
        x = torch.ones(n)
        probes[f"gloo/{n}"] = (lambda x=x: dist.all_reduce(x), _inner(4 * n))
        probes[f"shm/{n}"] = (lambda x=x: shm.average_(x), _inner(4 * n))
    for n in COLLECTIVE_SIZES:
        if world == 2:
            full, part = torch.ones(n), torch.ones(n // world)

            def fsdp_step(full: torch.Tensor = full, part: torch.Tensor = part) -> None:
                dist.all_gather_single(full, part)
                dist.all_gather_single(full, part)
                dist.reduce_scatter_single(part, full)

            probes[f"fsdp/{n}"] = (fsdp_step, _inner(4 * n))
        else:
            probes[f"ps/{n}"] = (_ps_round(rank, n), _inner(4 * n))
    if world == 2:
        probes |= {f"compute/{b}": (_mlp_step(b), 5) for b in FIT_BATCHES + (DDP_BATCH,)}
        probes |= {f"ddp/{transport}": (_mlp_step(DDP_BATCH, transport), 5) for transport in ("gloo", "shm")}
    times: dict[str, list[float]] = {name: [] for name in probes}
    for call, _ in probes.values():
        call()
    for _ in range(reps):
        for name, (call, inner) in probes.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            times[name].append((time.perf_counter() - t0) / inner)
    if rank == 0:
        got: dict[str, Any] = {"load_avg_1m": os.getloadavg()[0]}
        for name, ts in times.items():
            kind, key = name.split("/")
            got.setdefault(kind, {})[int(key) if key.isdigit() else key] = statistics.median(ts)
        if world == 2:
            got["model_bytes"] = 4 * sum(a * b + b for a, b in zip(MLP, MLP[1:]))
        Path(out).write_text(json.dumps(got))
    shm.close()
    dist.destroy_process_group()


def measure(world: int, reps: int) -> dict[str, Any]:
    """Run :func:`_measure` in ``world`` processes, forked from a server that has torch imported already."""
    import multiprocessing

    import torch.multiprocessing as mp

    # a no-op once this process's forkserver runs; else it imports these once instead of once per process
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "lepton_ray.sync.shm"])
    with tempfile.TemporaryDirectory(prefix="lepton_scaling_") as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(_measure, args=(world, os.path.join(tmp, "store"), out, reps), nprocs=world, join=True,
                           start_method="forkserver")
        raw = json.loads(Path(out).read_text())
    return {k: ({int(n) if n.isdigit() else n: t for n, t in v.items()} if isinstance(v, dict) else v) for k, v in raw.items()}


# ---------------------------------------------------------------------------------------------- calibrate, check

def _ms(s: float) -> float:
    return round(s * 1e3, 4)


def _err(predicted: float, measured: float) -> float:
    return round(100 * (predicted - measured) / measured, 1)


def calibrate(m2: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fit gloo, shm and the compute per sample on the 2-process points; the constants and one row per fit."""
    from lepton_ray.sync.shm import MAX_CHUNK

    cap = 4 * MAX_CHUNK
    shapes: dict[str, Callable[[float], Terms]] = {"gloo": lambda b: ring_allreduce(b, 2), "shm": lambda b: shm_allreduce(b, 2, cap)}
    labels = {"gloo": "gloo all-reduce, 2 processes (loopback TCP)",
              "shm": "shm all-reduce, 2 processes (beta per byte of memory traffic: 5 x the bucket at 2 ranks)"}
    links = {k: fit_link([(shape(4 * n), m2[k][n]) for n in FIT_SIZES]) for k, shape in shapes.items()}
    overhead, per_sample = fit_nonneg([(1, b) for b in FIT_BATCHES], [m2["compute"][b] for b in FIT_BATCHES])
    rows = []
    for k, link in links.items():
        pts = [(4 * n, m2[k][n], link.seconds(shapes[k](4 * n))) for n in FIT_SIZES]
        rows.append({"fit": labels[k], "alpha_us": round(link.alpha_s * 1e6, 2),
                     "beta_ns_per_byte": round(link.beta_s_per_byte * 1e9, 4), "gbit_per_s": round(link.gbit_per_s, 2),
                     "points": len(pts), "max_abs_error_pct": max(abs(_err(f, t)) for _, t, f in pts),
                     "load_avg_1m": round(m2["load_avg_1m"], 1),
                     "measured_ms": {b: _ms(t) for b, t, _ in pts}})
    fitted = {b: overhead + per_sample * b for b in FIT_BATCHES}
    rows.append({"fit": f"compute: MLP {'-'.join(map(str, MLP))} SGD step, 1 thread, 2 processes at once",
                 "overhead_ms": _ms(overhead), "per_sample_us": round(per_sample * 1e6, 2), "points": len(FIT_BATCHES),
                 "max_abs_error_pct": max(abs(_err(fitted[b], m2["compute"][b])) for b in FIT_BATCHES),
                 "load_avg_1m": round(m2["load_avg_1m"], 1),
                 "measured_ms": {b: _ms(m2["compute"][b]) for b in FIT_BATCHES}})
    return {"gloo": links["gloo"], "shm": links["shm"], "shm_capacity": cap, "compute": (overhead, per_sample)}, rows


def validate(c: dict[str, Any], m2: dict[str, Any], m4: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted vs measured on points the fit never saw."""
    gloo, shm, cap = c["gloo"], c["shm"], c["shm_capacity"]
    rows = []

    def row(check: str, world: int, nbytes: float, predicted: float, measured: float) -> None:
        rows.append({"check": check, "world": world, "bytes": int(nbytes), "predicted_ms": _ms(predicted),
                     "measured_ms": _ms(measured), "error_pct": _err(predicted, measured),
                     "processes_per_core": round(world / HOST_CORES, 2),
                     "load_avg_1m": round((m2 if world == 2 else m4)["load_avg_1m"], 1)})

    for n in HELD_OUT_SIZES:
        row("gloo all-reduce, held-out size", 2, 4 * n, gloo.seconds(ring_allreduce(4 * n, 2)), m2["gloo"][n])
        row("shm all-reduce, held-out size", 2, 4 * n, shm.seconds(shm_allreduce(4 * n, 2, cap)), m2["shm"][n])
    for n in WORLD4_SIZES:
        row("gloo all-reduce, 4 processes (fit at 2)", 4, 4 * n, gloo.seconds(ring_allreduce(4 * n, 4)), m4["gloo"][n])
        row("shm all-reduce, 4 processes (fit at 2)", 4, 4 * n, shm.seconds(shm_allreduce(4 * n, 4, cap)), m4["shm"][n])
    for n in COLLECTIVE_SIZES:
        row("fsdp 2 all-gathers + reduce-scatter (gloo fit)", 2, 4 * n, gloo.seconds(fsdp(4 * n, 2)), m2["fsdp"][n])
    for n in COLLECTIVE_SIZES:
        row("ps push+pull, 2 workers 2 shards (gloo fit)", 4, 4 * n, gloo.seconds(ps_push_pull(4 * n, 0, 2, 2)), m4["ps"][n])
    overhead, per_sample = c["compute"]
    compute = overhead + per_sample * DDP_BATCH
    row(f"compute alone, batch {DDP_BATCH} (compute fit)", 2, 0, compute, m2["compute"][DDP_BATCH])
    nbytes = m2["model_bytes"]
    for hook, link, terms in (("gloo", gloo, ring_allreduce(nbytes, 2)), ("shm", shm, shm_allreduce(nbytes, 2, cap))):
        row(f"DDP step over {hook}, batch {DDP_BATCH} (compute + {hook} fits)", 2, nbytes,
            step_s(compute, link.seconds(terms), 0.0), m2["ddp"][hook])
    return rows


# ------------------------------------------------------------------------------------------- predictions, anchors

def _table_workloads() -> list[Workload]:
    """The table's models; compute = training FLOPs of one worker's batch at :data:`TABLE_FLOPS`."""
    per = lambda flops: flops / TABLE_FLOPS  # noqa: E731
    rec = dict(dense_params=5e6, embedding_rows=1e8, embedding_dim=64, compute_s=per(6 * 5e6 * 8192))
    return [
        Workload("resnet50 25.6M, batch 256", dense_params=25.6e6, compute_s=per(3 * 2 * 4.1e9 * 256)),
        Workload("gpt 1.3B, 32k tokens", dense_params=1.3e9, compute_s=per(6 * 1.3e9 * 32768)),
        *(Workload(f"recsys 5M + 1e8x64 table, sparsity {s:g}", sparsity=s, **rec) for s in (1e-4, 1e-3, 1e-2)),
    ]


def table() -> list[dict[str, Any]]:
    """Predicted step time and efficiency per model x strategy x workers, one column pair per bandwidth."""
    rows = []
    for w in _table_workloads():
        for strategy in STRATEGIES:
            for p in TABLE_WORKERS:
                r: dict[str, Any] = {"model": w.name, "strategy": strategy, "workers": p}
                for g in BANDWIDTHS_GBIT:
                    got = predict(strategy, w, p, Link.gbit(g), TABLE_OVERLAP)
                    r[f"eff_{g}G"] = float(f"{got['efficiency']:.3g}")
                    r[f"step_ms_{g}G"] = round(got["step_s"] * 1e3, 2)
                rows.append(r)
    return rows


def anchors() -> list[dict[str, Any]]:
    """Published scaling efficiencies beside the model's prediction for the same setting (compute assumed: 6 x MACs
    x batch at 50 % of the GPU's peak)."""
    p100, v100_fp16 = 0.5 * 10.6e12, 0.5 * 125e12
    fusion = 64 * 2**20  # Horovod's tensor-fusion buffer
    horovod = "Horovod README/docs (Sergeev & Del Balso 2018): 128 servers x 4 P100, RoCE 25 Gbit/s, batch 64/GPU"
    cases = [
        (horovod, "Inception V3", 0.90, "allreduce", 512, 25,
         Workload("inception-v3", dense_params=23.8e6, compute_s=6 * 5.7e9 * 64 / p100, bucket_bytes=fusion), None),
        (horovod, "ResNet-101", 0.90, "allreduce", 512, 25,
         Workload("resnet-101", dense_params=44.5e6, compute_s=6 * 7.8e9 * 64 / p100, bucket_bytes=fusion), None),
        (horovod, "VGG-16", 0.68, "allreduce", 512, 25,
         Workload("vgg-16", dense_params=138e6, compute_s=6 * 15.5e9 * 64 / p100, bucket_bytes=fusion), None),
    ]
    bert = Workload("bert-large", dense_params=340e6, compute_s=6 * 340e6 * 64 * 128 / v100_fp16, grad_bytes=2,
                    bucket_bytes=fusion)
    byteps = "BytePS README (Jiang et al., OSDI 2020): 32 hosts x 8 V100 (NVLink), 100 Gbit/s RDMA, batch 64/GPU, fp16"
    cases += [
        (byteps, "BERT-large, BytePS", 0.90, "ps", 32, 100, bert, 32),
        (byteps, "BERT-large, Horovod+NCCL", 0.70, "allreduce", 256, 100, bert, None),
    ]
    rows = []
    for setting, model, published, strategy, p, g, w, shards in cases:
        at = {o: predict(strategy, w, p, Link.gbit(g), o, shards) for o in (0.0, OVERLAP_MAX)}
        # the overlap at which the model gives the published figure (< 0: more exposed communication than the model has)
        implied = (at[0.0]["comm_s"] - (w.compute_s / published - w.compute_s)) / w.compute_s
        rows.append({"setting": setting, "model": model, "published_efficiency": published,
                     "model_as": f"{strategy}, {p} workers" + (f", {shards} shards (a host's GPUs reduced first)" if shards else ""),
                     "compute_ms": round(w.compute_s * 1e3, 1), "grad_MB": round(w.dense_bytes / 1e6, 1),
                     "predicted_no_overlap": round(at[0.0]["efficiency"], 3),
                     "predicted_overlap_2_3": round(at[OVERLAP_MAX]["efficiency"], 3), "implied_overlap": round(implied, 2)})
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    """Measure here (2 then 4 processes), fit, check, predict. ``quick``: 3 repeats per point instead of 7.

    Returns ``{"calibration", "validation", "table", "anchors"}``, each a list of JSON-serialisable rows."""
    reps = 3 if quick else 7
    m2, m4 = measure(2, reps), measure(4, reps)
    constants, calibration = calibrate(m2)
    return {"calibration": calibration, "validation": validate(constants, m2, m4), "table": table(), "anchors": anchors()}


def bench_rows(argv: list[str]) -> list:
    """The suite's entry point: ``run`` (``--quick``: 3 repeats), its checks on held-out points (predicted vs measured)
    and the published anchors (predicted vs published efficiency) as rows, for information: no bars."""
    from benchmarks.rows import row

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    result = run(parser.parse_args(argv).quick)
    out = [row("scaling_model", f"{v['check']}, {v['world']} processes, {v['bytes']:,} B", v["predicted_ms"], "ms predicted",
               "measured", v["measured_ms"], extra={"load_avg_1m": v["load_avg_1m"]}) for v in result["validation"]]
    out += [row("scaling_model", f"anchor {a['model']} ({a['model_as']}), no overlap", a["predicted_no_overlap"],
                "efficiency predicted", "published", a["published_efficiency"],
                extra={"predicted_overlap_2_3": a["predicted_overlap_2_3"], "implied_overlap": a["implied_overlap"]})
            for a in result["anchors"]]
    return out


def bench_tables() -> dict[str, Any]:
    """The predictions the suite's RESULTS.md shows in full: the published anchors and the strategy table (pure: no
    measurement goes into either)."""
    return {"anchors": anchors(), "table": table()}


def _print_rows(title: str, rows: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> None:
    print(f"\n{title}")
    keys: list[str] = []
    for r in rows:
        if [k for k in r if k not in skip] != keys:  # a header whenever the columns change
            keys = [k for k in r if k not in skip]
            print(" | ".join(keys))
        print(" | ".join(str(r[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats per measured point instead of 7")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    t0 = time.monotonic()
    result = run(args.quick)
    _print_rows("calibration (fitted on these points)", result["calibration"])
    _print_rows("validation (points the fit never saw)", result["validation"])
    _print_rows(f"predicted scaling efficiency, overlap {TABLE_OVERLAP} (step ms in the JSON), compute at "
                f"{TABLE_FLOPS / 1e12:g} TFLOP/s, alpha {NETWORK_ALPHA_S * 1e6:g} us, PS shards = workers",
                result["table"], skip=tuple(f"step_ms_{g}G" for g in BANDWIDTHS_GBIT))
    _print_rows("published anchors vs the model", result["anchors"])
    print(f"\n({time.monotonic() - t0:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
