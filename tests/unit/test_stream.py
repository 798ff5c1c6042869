"""WorkerStream: the per-worker order is exactly-once, seeded, resumable, and independent of timing."""

from __future__ import annotations

import queue
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lepton_ray.config import DataConfig
from lepton_ray.data.plan import epoch_units, steps_in_epoch
from lepton_ray.data.stream import WorkerStream
from lepton_ray.data.table import describe


def write_ids(root, files=4, groups=4, rows=64, features=3):
    """files x groups x rows rows; feature 0 is the row id, the label is id % 10."""
    root.mkdir(parents=True, exist_ok=True)
    rid = 0
    for f in range(files):
        ids = np.arange(rid, rid + groups * rows)
        rid += groups * rows
        cols = {"id": ids.astype(np.float32), **{f"f{i}": np.full(len(ids), i, np.float32) for i in range(1, features)}, "label": ids % 10}
        pq.write_table(pa.table(cols), root / f"part-{f}.parquet", row_group_size=rows)
    return rid


def streams(root, world, local_batch=32, seed=3, **data):
    cfg = DataConfig(train=str(root), **data)
    info = describe("data.train", str(root), cfg)
    return [WorkerStream(info, cfg, rank=r, world_size=world, local_batch=local_batch, seed=seed) for r in range(world)]


def ids_of(stream, epoch, start=0):
    return [xb[:, 0].long().tolist() for xb in (b["x"] for b in stream.epoch(epoch, start))]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_epoch_uses_every_row_exactly_once(tmp_path, world):
    n = write_ids(tmp_path / "d")
    ss = streams(tmp_path / "d", world, local_batch=32)
    steps = ss[0].steps(0)
    assert steps == n // (32 * world)  # equal row groups: nothing is dropped
    seen = []
    for s in ss:
        batches = ids_of(s, 0)
        assert len(batches) == steps and all(len(b) == 32 for b in batches)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(n))


def test_labels_stay_with_their_rows(tmp_path):
    write_ids(tmp_path / "d")
    (s,) = streams(tmp_path / "d", 1)
    for b in s.epoch(0):
        xb, yb = b["x"], b["label"]
        assert torch.equal(xb[:, 0].long() % 10, yb)
        assert yb.dtype == torch.int64 and xb.dtype == torch.float32


def test_same_seed_same_order_other_epoch_or_seed_other_order(tmp_path):
    write_ids(tmp_path / "d")
    a, b = streams(tmp_path / "d", 2)[0], streams(tmp_path / "d", 2)[0]
    assert ids_of(a, 0) == ids_of(b, 0)
    assert ids_of(a, 0) != ids_of(a, 1)
    assert ids_of(a, 0) != ids_of(streams(tmp_path / "d", 2, seed=4)[0], 0)


def test_no_shuffle_reads_in_file_order(tmp_path):
    write_ids(tmp_path / "d", files=1, groups=4, rows=64)
    (s,) = streams(tmp_path / "d", 1, shuffle=False)
    flat = [i for b in ids_of(s, 0) for i in b]
    assert flat == list(range(256))


def test_shuffle_buffer_mixes_rows_of_several_row_groups(tmp_path):
    write_ids(tmp_path / "d", files=1, groups=8, rows=64)
    (s,) = streams(tmp_path / "d", 1, shuffle_buffer_rows=256)
    first = ids_of(s, 0)[0]
    groups = {i // 64 for i in first}
    assert len(groups) >= 3  # one batch draws from several row groups of its window
    assert first != sorted(first)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("k", [0, 1, 5, 7])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(tmp_path, world, k):
    write_ids(tmp_path / "d")
    for s in streams(tmp_path / "d", world, shuffle_buffer_rows=100):  # windows not aligned with batches
        full = ids_of(s, 2)
        assert ids_of(s, 2, start=k) == full[k:]


def test_tiny_single_row_group_is_cut_so_every_worker_gets_rows(tmp_path):
    write_ids(tmp_path / "d", files=1, groups=1, rows=1000)
    ss = streams(tmp_path / "d", 2, local_batch=16)
    assert ss[0].steps(0) > 0
    seen = [i for s in ss for b in ids_of(s, 0) for i in b]
    assert len(seen) == len(set(seen)) == ss[0].steps(0) * 2 * 16


def test_unequal_shares_take_the_shortest(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    ids = np.arange(300)
    pq.write_table(pa.table({"id": ids.astype(np.float32), "label": ids % 2}), d / "a.parquet", row_group_size=100)
    pq.write_table(pa.table({"id": (ids + 300)[:50].astype(np.float32), "label": ids[:50] % 2}), d / "b.parquet")
    cfg = DataConfig(train=str(d))
    info = describe("data.train", str(d), cfg)
    shares = [sum(u.rows for u in epoch_units(info, rank=r, world_size=2, epoch=0, seed=1)) for r in range(2)]
    assert steps_in_epoch(info, world_size=2, local_batch=10, epoch=0, seed=1) == min(shares) // 10


def test_a_corrupt_file_fails_the_stream_with_its_error(tmp_path):
    write_ids(tmp_path / "d", files=2)
    ss = streams(tmp_path / "d", 1)
    (tmp_path / "d" / "part-1.parquet").write_bytes(b"PAR1 garbage")  # corrupted after the plan was made
    bad = tmp_path / "d" / "part-1.parquet"
    with pytest.raises(IOError, match=f"data.train: opening '{re.escape(str(bad))}' failed \\(a damaged shard\\?\\): ArrowInvalid: Parquet magic"):
        ids_of(ss[0], 0)


def test_wait_time_is_counted(tmp_path):
    write_ids(tmp_path / "d")
    (s,) = streams(tmp_path / "d", 1)
    ids_of(s, 0)
    assert s.stats["rows"] == s.steps(0) * 32
    assert s.stats["wait_s"] > 0


def test_memory_cache_decodes_each_row_group_once_and_changes_nothing(tmp_path):
    write_ids(tmp_path / "d", files=2, groups=4, rows=64)  # 8 row groups
    (cached,) = streams(tmp_path / "d", 1, shuffle_buffer_rows=128)
    (uncached,) = streams(tmp_path / "d", 1, shuffle_buffer_rows=128, memory_cache_bytes=0)
    for epoch in range(3):
        assert ids_of(cached, epoch) == ids_of(uncached, epoch)
    assert cached.stats["row_groups_decoded"] == 8  # epoch 0 only: later epochs (and the read-ahead) come from memory
    assert uncached.stats["row_groups_decoded"] >= 3 * 8


def test_memory_cache_is_bounded(tmp_path):
    write_ids(tmp_path / "d", files=1, groups=8, rows=64, features=3)  # a row group decodes to 64 x 3 x 4 + 64 x 8 bytes
    one_group = 64 * 3 * 4 + 64 * 8
    (s,) = streams(tmp_path / "d", 1, shuffle_buffer_rows=64, memory_cache_bytes=3 * one_group)
    ids_of(s, 0)
    ids_of(s, 1)
    assert s.source._decoded_bytes <= 3 * one_group and len(s.source._decoded) == 3
    assert s.stats["row_groups_decoded"] > 8  # evicted row groups are read again in epoch 1


def test_a_row_group_cut_into_units_is_decoded_once_per_window(tmp_path):
    write_ids(tmp_path / "d", files=1, groups=1, rows=1024)  # one row group: cut into 16 units
    (s,) = streams(tmp_path / "d", 1, memory_cache_bytes=0)  # one window (default buffer) holds every unit
    out: queue.Queue = queue.Queue()
    s._produce(0, 0, 1024, out, threading.Event())  # the reading thread's work for epoch 0, run here (no read-ahead)
    cols, rows = out.get()
    assert out.get() is None and sorted(cols["x"][rows, 0].long().tolist()) == list(range(1024))
    assert s.stats["row_groups_decoded"] == 1


def test_the_next_epoch_is_read_ahead_and_identical_to_a_fresh_read(tmp_path):
    write_ids(tmp_path / "d")
    (ahead,) = streams(tmp_path / "d", 2)[:1]
    first = ids_of(ahead, 0)
    assert ahead._next is not None and ahead._next[0] == 1  # epoch 1 is being read while epoch 0 ends
    second = ids_of(ahead, 1)
    fresh = streams(tmp_path / "d", 2)[0]
    assert first == ids_of(fresh, 0) and second == ids_of(fresh, 1, 0)
    ahead.close()
    assert ahead._next is None


# --------------------------------------------------------------------------- the dynamic deal (sync.ps.balance: dynamic)


class Dealer:
    """What shard 0 does for the dynamic deal: the next undealt piece of each epoch (thread-safe)."""

    def __init__(self):
        self.next: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, epoch: int, pieces: int):
        with self.lock:
            i = self.next.get(epoch, 0)
            if i >= pieces:
                return None
            self.next[epoch] = i + 1
            return i


def test_dynamic_deal_gives_each_row_to_at_most_one_worker_and_a_fast_worker_more(tmp_path):
    """Two workers share one dealer; worker 1 stalls after its first batch until worker 0 has finished the epoch
    (an event, not a sleep: the same on a loaded machine). Every row is trained on at most once, only rows after a
    worker's last full batch are dropped (< 1 batch each), and the fast worker takes more."""
    n = write_ids(tmp_path / "d")
    cfg = DataConfig(train=str(tmp_path / "d"))
    info = describe("data.train", str(tmp_path / "d"), cfg)
    dealer = Dealer()
    ss = [WorkerStream(info, cfg, rank=r, world_size=2, local_batch=32, seed=3, claim=dealer) for r in range(2)]
    got: list[list[int]] = [[], []]

    fast_done = threading.Event()

    def run(rank):
        for i, b in enumerate(ss[rank].epoch(0)):
            xb, yb = b["x"], b["label"]
            assert xb.shape == (32, 3) and torch.equal(xb[:, 0].long() % 10, yb)
            got[rank] += xb[:, 0].long().tolist()
            if rank == 1 and i == 0:
                assert fast_done.wait(60)
        if rank == 0:
            fast_done.set()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    seen = got[0] + got[1]
    assert len(seen) == len(set(seen))
    dropped = [s.stats["rows_dropped"] for s in ss]
    assert all(d < 32 for d in dropped) and len(seen) + sum(dropped) == n
    assert len(got[0]) > len(got[1])
    assert ss[0].stats["pieces_claimed"] + ss[1].stats["pieces_claimed"] == 64  # 4x finer than the fixed deal's 16
    assert ss[0].steps(0) == n // 32 // 2


def test_dynamic_deal_order_is_seeded_and_resumes_only_at_epoch_start(tmp_path):
    write_ids(tmp_path / "d")
    cfg = DataConfig(train=str(tmp_path / "d"))
    info = describe("data.train", str(tmp_path / "d"), cfg)
    one = [ids_of(WorkerStream(info, cfg, rank=0, world_size=1, local_batch=32, seed=3, claim=Dealer()), 0) for _ in range(2)]
    assert one[0] == one[1] and sorted(i for b in one[0] for i in b) != [i for b in one[0] for i in b]
    stream = WorkerStream(info, cfg, rank=0, world_size=1, local_batch=32, seed=3, claim=Dealer())
    with pytest.raises(ValueError, match="the dynamic deal starts epochs at step 0, got start_step=2"):
        next(stream.epoch(0, 2))


# ---- elastic resize: the rest of an interrupted epoch at another world size

def _resized(root, segments, *, last_world, batch=60, epoch=1, **data):
    """Rows read in ``epoch`` when it runs ``segments`` ((world size, steps) each, in order), then finishes at
    ``last_world`` workers; the global batch stays ``batch``. Returns (rows read in order of segment, steps of the epoch)."""
    from lepton_ray.data.plan import Segment

    seen, history, done = [], [], 0
    for world, steps in [*segments, (last_world, None)]:
        ss = streams(root, world, local_batch=batch // world, **data)
        for s in ss:
            s.resume_after(epoch, tuple(history))
        total = ss[0].steps(epoch)
        stop = total if steps is None else done + steps
        assert all(s.steps(epoch) == total for s in ss) and stop <= total
        for s in ss:
            for b in ids_of(s, epoch, start=done)[:stop - done]:
                assert len(b) == batch // world
                seen += b
        history.append(Segment(world, batch // world, stop - done))
        done = stop
    return seen, done


@pytest.mark.parametrize("segments,last_world", [
    ([(2, 3)], 1),            # 2 -> 1
    ([(1, 5)], 2),            # 1 -> 2
    ([(2, 2), (1, 3)], 2),    # 2 -> 1 -> 2
    ([(4, 1)], 3),            # a share of rows that does not split evenly
    ([(2, 0)], 1),            # resized before the epoch's first step
], ids=["2to1", "1to2", "2to1to2", "4to3", "at-start"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_a_resize_mid_epoch_reads_every_row_at_most_once(tmp_path, segments, last_world, shuffle):
    """Across the resize each row of the epoch is read once; only the last world size's tail (fewer than a batch
    per worker, the drop_last rows every epoch has) is left unread."""
    n = write_ids(tmp_path / "d", files=3, groups=5, rows=70)  # windows not aligned with batches
    seen, steps = _resized(tmp_path / "d", segments, last_world=last_world, shuffle=shuffle, shuffle_buffer_rows=150)
    assert len(seen) == len(set(seen)) == steps * 60
    assert n - len(seen) < 60 + last_world, (n, len(seen))


def test_a_resize_is_a_pure_function_of_the_history(tmp_path):
    """Two resumes from the same cursor read the same batches; another seed reads others."""
    write_ids(tmp_path / "d")
    a, _ = _resized(tmp_path / "d", [(2, 3)], last_world=1)
    b, _ = _resized(tmp_path / "d", [(2, 3)], last_world=1)
    c, _ = _resized(tmp_path / "d", [(2, 3)], last_world=1, epoch=2)
    assert a == b and a != c


def test_the_cursor_names_the_segments_of_the_epoch(tmp_path):
    from lepton_ray.data.plan import Segment

    write_ids(tmp_path / "d")
    (s,) = streams(tmp_path / "d", 1, local_batch=64)
    s.resume_after(1, (Segment(2, 32, 3),))
    assert s.cursor(1, 5) == {"world_size": 1, "local_batch": 64, "step_in_segment": 2, "segments": [[2, 32, 3]]}
    assert s.cursor(2, 0) == {"world_size": 1, "local_batch": 64, "step_in_segment": 0, "segments": []}


def test_reading_begun_early_is_the_reading_the_epoch_uses(tmp_path):
    """``start(epoch, step)`` (the loop calls it before building the model) begins the same read ``epoch(epoch, step)``
    would: the same batches as a stream that did not start early, from the producer already running."""
    write_ids(tmp_path / "d")
    early, plain = streams(tmp_path / "d", 2)[0], streams(tmp_path / "d", 2)[0]
    early.start(1, 3)
    producer = early._next[2][2]
    assert producer.is_alive() or early._next[2][0].qsize() > 0  # reading already
    assert ids_of(early, 1, 3) == ids_of(plain, 1, 3)
    early.start(2, 0)
    unused = early._next[2][2]
    early.close()  # a start the loop never used (a failed model build) is stopped
    assert early._next is None and not unused.is_alive()
