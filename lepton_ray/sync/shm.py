"""Gradient all-reduce through shared memory, for DDP workers that share one host (a DDP comm hook).

On CPU, DDP's default all-reduce runs over gloo, i.e. TCP: between two processes on one host every
byte of every gradient bucket goes through the kernel's loopback sockets. On this project's 2-core
machine a 12.6 MB all-reduce (the 3.16 M-parameter MLP of ``benchmarks/train_overhead.py``) takes
9.5 ms over gloo and 3.1 ms through a shared mapping; a DDP step of that model took 33-39 ms instead of
39-42 ms (two measurements, a noisy machine).

Protocol for one bucket of ``n`` float32 gradients (W ranks, one mapped file of 2 x W x ``capacity`` floats;
a bucket larger than ``capacity`` goes through in chunks of ``capacity``, one barrier each):

1. each rank writes ``bucket / W`` (DDP's own averaging) into its slot of the current half;
2. barrier: a one-float gloo all-reduce on a process group of its own;
3. each rank sums the W slots, in rank order, into its bucket. Every rank computes the same
   elementwise sums in the same order, so the replicas stay bitwise identical; with 2 ranks the
   result is bitwise what gloo's all-reduce gives (``a/2 + b/2``).

The two halves alternate from call to call: a rank that runs ahead writes the other half, and it can
come back to this one only after the next barrier, which no rank passes before it has read this one.
Buckets that are not float32 on CPU go through gloo (DDP's default hook).

The mapping is a file in ``/dev/shm`` with a random name that rank 0 creates (space reserved with
``posix_fallocate``, so a full tmpfs is an error at start-up, not a SIGBUS mid-run) and writes into it;
every rank opens that name in its own ``/dev/shm`` and checks it (ranks on other hosts, or in containers
with their own ``/dev/shm``, do not find it), and rank 0 unlinks it as soon as everyone has it mapped:
nothing is left behind when the processes end.
"""

from __future__ import annotations

import contextlib
import datetime
import mmap
import os
import secrets
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SharedMemoryAllReduce", "SharedMemoryUnavailable", "bucket_capacity", "MAX_CHUNK"]

_HEADER = 64  # bytes before the slots: the token (keeps the float32 slots 64-byte aligned)
MAX_CHUNK = 4 * 2**20
"""Floats (16 MiB) per slot at most: the mapping stays at 2 x W x 16 MiB however large a bucket is
(a 1M x 32 embedding table is one 128 MB bucket: 8 chunks, 8 barriers of ~0.13 ms)."""


class SharedMemoryUnavailable(RuntimeError):
    """The ranks cannot share a mapping (other hosts, separate /dev/shm, no space); the message says which."""


def bucket_capacity(params: list[nn.Parameter], bucket_mb: float) -> int:
    """Slot size for ``params`` under ``bucket_cap_mb=bucket_mb``: the largest float32 bucket DDP can build
    (it closes a bucket once it holds at least the cap, so a bucket is below cap + one parameter),
    at most :data:`MAX_CHUNK`.

    >>> bucket_capacity([nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(5))], 25.0)
    15
    >>> bucket_capacity([nn.Parameter(torch.zeros(300_000))] * 4, 1.0)
    562144
    """
    numels = [p.numel() for p in params if p.requires_grad] or [1]
    return min(sum(numels), int(bucket_mb * 2**20) // 4 + max(numels), MAX_CHUNK)


def _default_group_timeout() -> datetime.timedelta:
    """The default process group's collective timeout (``train.process_group_timeout_s`` in a run)."""
    try:
        return dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):  # torch's internals moved: its default
        return dist.default_pg_timeout


class SharedMemoryAllReduce:
    """The comm hook's state: the mapping, this rank's place in it, and a barrier group.

    Collective: every rank of the default process group constructs it, with the same ``capacity``.
    Raises :class:`SharedMemoryUnavailable` on every rank when any rank cannot share the mapping.
    """

    def __init__(self, rank: int, world_size: int, capacity: int, directory: str = "/dev/shm"):
        if world_size < 2:
            raise ValueError(f"a shared-memory all-reduce needs at least 2 ranks, got world_size={world_size}")
        self.rank, self.world, self.capacity = rank, world_size, capacity
        # barriers of their own (never interleaved with DDP's collectives), waiting as long as the default group's do:
        # torch gives a new group its backend's default timeout (30 min), not the default group's
        self.group = dist.new_group(backend="gloo", timeout=_default_group_timeout())
        self.fallbacks = 0  # buckets that went through gloo instead
        self._flag = torch.zeros(1)
        self._parity = 0
        size = _HEADER + 2 * world_size * capacity * 4
        name, error = f"lepton_allreduce_{secrets.token_hex(16)}", None  # the name doubles as the token
        if rank == 0:
            try:
                fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)
                    os.pwrite(fd, name.encode(), 0)
                finally:
                    os.close(fd)
            except OSError as exc:
                error = f"rank 0 could not reserve {size:,} bytes in {directory}: {exc}"
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        shared: list[Any] = [(name, error)]
        dist.broadcast_object_list(shared, src=0, group=self.group)
        name, first_error = shared[0]
        path = os.path.join(directory, name)  # each rank looks in its own host's directory
        self._mm: Optional[mmap.mmap] = None
        error = None
        if first_error is None:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    self._mm = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
                if self._mm[: len(name)] != name.encode():
                    error = f"rank {rank} sees a different {path} (ranks in different containers?)"
            except (OSError, ValueError) as exc:  # ValueError: a shorter file of that name
                error = f"rank {rank} cannot open rank 0's {path} (ranks on different hosts?): {exc}"
        errors: list[Any] = [None] * world_size
        dist.all_gather_object(errors, error, group=self.group)  # doubles as the barrier before the unlink
        if rank == 0 and first_error is None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        problems = [e for e in [first_error, *errors] if e]
        if problems:
            self.close()
            raise SharedMemoryUnavailable("; ".join(problems))
        floats = torch.frombuffer(self._mm, dtype=torch.float32, offset=_HEADER, count=2 * world_size * capacity)
        self._halves = floats.view(2, world_size, capacity)

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP compares them with the real classes, these would be strings
        """The DDP comm hook: ``ddp.register_comm_hook(shm, SharedMemoryAllReduce.hook)``."""
        return state.allreduce_bucket(bucket)

    def allreduce_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        grads = bucket.buffer()
        if grads.dtype != torch.float32 or grads.device.type != "cpu":
            # the same decision on every rank: DDP's buckets are identical across ranks
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            self.fallbacks += 1
            return allreduce_hook(None, bucket)
        self.average_(grads)
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(grads)
        return done

    def average_(self, grads: torch.Tensor) -> torch.Tensor:
        """Replace ``grads`` (flat float32 CPU, same size on every rank) by the mean over the ranks, in place."""
        flat = grads.view(-1)
        for lo in range(0, flat.numel(), self.capacity):
            part = flat[lo : lo + self.capacity]
            slots = self._halves[self._parity, :, : part.numel()]
            self._parity ^= 1
            torch.div(part, self.world, out=slots[self.rank])
            dist.all_reduce(self._flag, group=self.group)  # every rank's slot is written
            torch.add(slots[0], slots[1], out=part)
            for r in range(2, self.world):
                part.add_(slots[r])
        return grads

    def close(self) -> None:
        self._halves = None
        if self.group is not None:  # its own gloo group: a warm worker group runs many of these over one default group
            dist.destroy_process_group(self.group)
            self.group = None
        if self._mm is not None:
            with contextlib.suppress(OSError, BufferError):
                self._mm.close()  # BufferError while a tensor still views it: the mapping goes with the process
            self._mm = None
