"""The shared-memory gradient all-reduce (lepton_ray.sync.shm) among real processes over a real gloo group:
exact means, bitwise-equal replicas, DDP's result unchanged, clear errors, nothing left in /dev/shm."""

from __future__ import annotations

import glob
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import spawn

from lepton_ray.sync.shm import SharedMemoryAllReduce, SharedMemoryUnavailable, bucket_capacity
from lepton_ray.train.breakdown import SyncTimer

SIZES = [1000, 7, 1000, 513, 1, 2500, 1000]  # calls in a row: both halves, several times; 2500 goes in 3 chunks


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _inputs(call: int, rank: int) -> torch.Tensor:
    return torch.randn(SIZES[call], generator=torch.Generator().manual_seed(100 * call + rank))


def _average_worker(rank: int, world: int, store: str, out: str, directory: str) -> None:
    _init(rank, world, store)
    shm = SharedMemoryAllReduce(rank, world, capacity=1000, directory=directory)
    got = []
    for call in range(len(SIZES)):
        if rank == call % world:
            time.sleep(0.05)  # a late rank every call: the others must not read its slot before it is written
        got.append(shm.average_(_inputs(call, rank)))
    torch.save(got, f"{out}/rank{rank}.pt")
    shm.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_average_is_the_exact_mean_on_every_rank(tmp_path, world):
    spawn(_average_worker, (world, str(tmp_path / "store"), str(tmp_path), str(tmp_path)), world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for call in range(len(SIZES)):
        parts = [_inputs(call, r) / world for r in range(world)]
        expected = parts[0] + parts[1]
        for p in parts[2:]:
            expected = expected + p  # the documented order: rank 0 + rank 1 + rank 2 ...
        for r in range(world):
            assert torch.equal(results[r][call], expected), (call, r)
        assert not torch.equal(expected, parts[0] * world)  # the ranks' inputs differ: the check is not vacuous
    assert glob.glob(str(tmp_path / "lepton_allreduce_*")) == []  # rank 0 unlinked the mapping


def _stuck_peer_worker(rank: int, world: int, store: str, out: str, directory: str) -> None:
    """Rank 1 never joins the average: rank 0's wait in the transport's barrier ends at the default group's timeout."""
    import datetime
    import os

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=3))
    shm = SharedMemoryAllReduce(rank, world, capacity=1000, directory=directory)
    done = f"{out}/rank0.txt"
    if rank == 0:
        started = time.monotonic()
        try:
            shm.average_(torch.ones(10))
            what = "returned"
        except RuntimeError as exc:
            what = f"raised after {time.monotonic() - started:.0f} s: {exc}"
        with open(done + ".tmp", "w") as fh:
            fh.write(what)
        os.replace(done + ".tmp", done)
    else:
        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(0)  # no teardown collective with a peer that left


def test_a_peer_that_never_arrives_fails_the_barrier_at_the_default_groups_timeout(tmp_path):
    """torch gives a new group its backend's default timeout (30 min); the transport's barrier group waits as long as
    the default group does (the run's ``train.process_group_timeout_s``), here 3 s."""
    spawn(_stuck_peer_worker, (2, str(tmp_path / "store"), str(tmp_path), str(tmp_path)), 2)
    what = (tmp_path / "rank0.txt").read_text()
    assert re.match(r"raised after (\d+) s: ", what), what
    assert int(re.match(r"raised after (\d+) s", what).group(1)) < 60, what  # 3 s, not torch's 30-min default


def _ddp_worker(rank: int, world: int, store: str, out: str, capacity: int, dtype: torch.dtype) -> None:
    """The same model trained twice from the same start on the same batches: DDP's gloo hook vs the shm hook."""
    _init(rank, world, store)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)

    gloo = DistributedDataParallel(model(), bucket_cap_mb=0.001)  # ~260 floats a bucket: several buckets a step
    mine = DistributedDataParallel(model(), bucket_cap_mb=0.001, gradient_as_bucket_view=True)
    shm = SharedMemoryAllReduce(rank, world, capacity=capacity, directory=out)
    mine.register_comm_hook(shm, SharedMemoryAllReduce.hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (gloo, mine)]
    for step in range(6):
        g = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(16, 8, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)
        for m, opt in zip((gloo, mine), opts):
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    torch.save({"gloo": gloo.module.state_dict(), "shm": mine.module.state_dict(), "fallbacks": shm.fallbacks}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("capacity,dtype", [
    (bucket_capacity(list(nn.Linear(8, 32).parameters()) + list(nn.Linear(32, 4).parameters()), 0.001), torch.float32),
    (100, torch.float32),  # every bucket (~260 floats) in chunks
    (1000, torch.float64),  # not float32: DDP's gloo hook
], ids=["whole-buckets", "chunked", "float64-via-gloo"])
def test_ddp_with_the_shm_hook_trains_exactly_like_gloo(tmp_path, capacity, dtype):
    """2 ranks: a/2 + b/2 either way, so the parameters are bitwise equal."""
    spawn(_ddp_worker, (2, str(tmp_path / "store"), str(tmp_path), capacity, dtype), 2)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype).state_dict()
    for s in states:
        assert all(torch.equal(s["gloo"][k], s["shm"][k]) for k in start)
        assert all(torch.equal(s["shm"][k], states[0]["shm"][k]) for k in start)  # replicas equal
        assert (s["fallbacks"] > 0) is (dtype != torch.float32)
    assert max((states[0]["shm"][k] - start[k]).abs().max().item() for k in start) > 1e-2  # training moved them


def _error_worker(rank: int, world: int, store: str, out: str, directories: list[str]) -> None:
    _init(rank, world, store)
    try:
        SharedMemoryAllReduce(rank, world, capacity=1000, directory=directories[rank])
        message = "no error"
    except SharedMemoryUnavailable as exc:
        message = str(exc)
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_ranks_that_cannot_share_the_mapping_all_get_the_same_clear_error(tmp_path):
    """Rank 1 looks in another directory, as on another host: every rank raises, naming rank 1 and the file."""
    (tmp_path / "host0").mkdir()
    (tmp_path / "host1").mkdir()
    dirs = [str(tmp_path / "host0"), str(tmp_path / "host1")]
    spawn(_error_worker, (2, str(tmp_path / "store"), str(tmp_path), dirs), 2)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    path = re.escape(dirs[1]) + r"/lepton_allreduce_[0-9a-f]{32}"
    assert re.fullmatch(rf"rank 1 cannot open rank 0's {path} \(ranks on different hosts\?\): "
                        rf"\[Errno 2\] No such file or directory: '{path}'", messages[0]), messages[0]
    assert list((tmp_path / "host0").iterdir()) == []  # rank 0 removed its file anyway


def test_rank_0_without_space_for_the_mapping_is_a_clear_error_on_every_rank(tmp_path):
    missing = str(tmp_path / "no-such-dir")
    spawn(_error_worker, (2, str(tmp_path / "store"), str(tmp_path), [missing, missing]), 2)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    path = re.escape(missing) + r"/lepton_allreduce_[0-9a-f]{32}"
    assert re.fullmatch(rf"rank 0 could not reserve 16,064 bytes in {re.escape(missing)}: "
                        rf"\[Errno 2\] No such file or directory: '{path}'", messages[0]), messages[0]


def test_one_rank_is_refused():
    with pytest.raises(ValueError, match=r"^a shared-memory all-reduce needs at least 2 ranks, got world_size=1$"):
        SharedMemoryAllReduce(0, 1, capacity=10)


def _build_worker(rank: int, world: int, store: str, out: str, shm_dir: str) -> None:
    from lepton_ray.sync import WorkerInfo
    from lepton_ray.sync.allreduce import AllReduceConfig, build_ddp

    _init(rank, world, store)
    results = {}
    for transport in ("auto", "shm", "gloo"):
        model = nn.Linear(4, 2)
        try:
            _, shm, described = build_ddp(model, WorkerInfo(rank=rank, world_size=world, device=torch.device("cpu")),
                                          AllReduceConfig(cpu_transport=transport, shm_dir=shm_dir), list(model.parameters()),
                                          SyncTimer())
            results[transport] = {"described": described, "shm": shm is not None}
        except RuntimeError as exc:
            results[transport] = {"error": str(exc)}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("usable", [True, False], ids=["usable-dir", "missing-dir"])
def test_build_ddp_picks_the_transport_and_says_why(tmp_path, usable):
    """With a usable directory auto and shm map it; where rank 0 cannot create the mapping, auto falls back to
    gloo and names the reason, shm refuses to start with the reason and the alternatives; gloo never tries."""
    shm_dir = str(tmp_path) if usable else str(tmp_path / "missing")
    spawn(_build_worker, (2, str(tmp_path / "store"), str(tmp_path), shm_dir), 2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]
    got = results[0]
    assert got["gloo"] == {"described": {"allreduce_transport": "gloo"}, "shm": False}
    if usable:
        assert got["auto"] == got["shm"] == {"described": {"allreduce_transport": "shm"}, "shm": True}
        return
    reason = rf"rank 0 could not reserve [\d,]+ bytes in {re.escape(shm_dir)}: \[Errno 2\] No such file or directory: '[^']+'"
    assert got["auto"]["described"]["allreduce_transport"] == "gloo" and not got["auto"]["shm"]
    assert re.fullmatch(f"shared memory unavailable: {reason}", got["auto"]["described"]["allreduce_note"]), got
    assert re.fullmatch(rf"sync.allreduce.cpu_transport 'shm' needs every worker on one host, sharing {re.escape(shm_dir)}: "
                        rf"{reason}. Use 'auto' to fall back to gloo, or 'gloo'", got["shm"]["error"]), got


def _close_worker(rank: int, world: int, store: str, out: str) -> None:
    from lepton_ray import load_config
    from lepton_ray.sync import STRATEGIES, WorkerInfo

    _init(rank, world, store)
    cfg = load_config({"model": {"name": "mlp"}, "data": {"train": "unused.parquet"},
                       "sync": {"strategy": "allreduce", "allreduce": {"cpu_transport": "shm", "shm_dir": out}}})
    strategy = STRATEGIES["allreduce"](cfg, WorkerInfo(rank=rank, world_size=world, device=torch.device("cpu")))
    strategy.build(lambda: nn.Linear(4, 2))
    shm = strategy._shm
    opened = shm is not None and shm.group is not None
    strategy.close()
    torch.save({"opened": opened, "group": shm.group, "mapped": shm._mm is not None}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_allreduce_strategy_closes_its_transport(tmp_path):
    """``close()`` (the loop's last call) gives back the transport's gloo group and mapping: a warm worker group
    builds one per run (it was dead code inside a module function for a while, and nothing noticed)."""
    spawn(_close_worker, (2, str(tmp_path / "store"), str(tmp_path)), 2)
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt") == {"opened": True, "group": None, "mapped": False}
