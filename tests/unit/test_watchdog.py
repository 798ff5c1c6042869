"""The hang watchdog's verdict, :func:`lepton_ray.train.watchdog.find_stuck`: a pure function of the board's beats
(seconds on one clock), so every branch is checked here without a clock or a cluster. The real-time side (a frozen
rank, a two-rank deadlock) is ``tests/faults/test_hangs.py``."""

from __future__ import annotations

from lepton_ray.train.watchdog import find_stuck

T = 10.0  # train.collective_timeout_s


def beat(age: float, stalled: float, step):
    return {"age": age, "stalled": stalled, "step": step}


def test_nothing_is_stuck_while_ranks_beat_and_advance():
    assert find_stuck({0: beat(0.5, 1.0, 7), 1: beat(0.5, 1.0, 7)}, T) == []
    assert find_stuck({}, T) == []


def test_a_rank_silent_for_half_the_timeout_is_stuck():
    assert find_stuck({0: beat(1.0, 2.0, 7), 1: beat(T / 2 + 0.1, 2.0, 7)}, T) == [1]
    assert find_stuck({0: beat(1.0, 2.0, 7), 1: beat(T / 2, 2.0, 7)}, T) == []  # exactly half: not yet


def test_silent_ranks_win_over_a_deadlock():
    """Every rank stalled past the timeout and rank 0 at the lowest step, but rank 2 is silent: the silent one is the
    cause (its heartbeat thread stopped: frozen or gone), the others only wait for it."""
    beats = {0: beat(1.0, 30.0, 5), 1: beat(1.0, 30.0, 6), 2: beat(9.0, 30.0, 6)}
    assert find_stuck(beats, T) == [2]
    beats[1] = beat(8.0, 30.0, 6)
    assert find_stuck(beats, T) == [1, 2]


def test_a_deadlock_kills_the_ranks_at_the_lowest_step():
    """Every heartbeat alive, no rank advanced for more than the timeout: the ranks at the lowest step."""
    beats = {0: beat(1.0, 11.0, 8), 1: beat(0.2, 12.0, 7), 2: beat(0.7, 10.5, 9), 3: beat(1.0, 11.0, 7)}
    assert find_stuck(beats, T) == [1, 3]
    same = {0: beat(1.0, 11.0, 4), 1: beat(1.0, 11.0, 4)}  # lock-step ranks deadlocked in one step: all of them
    assert find_stuck(same, T) == [0, 1]
    assert find_stuck({0: beat(1.0, 11.0, 0), 1: beat(1.0, 11.0, 3)}, T) == [0]  # step 0 is a step, not "none yet"


def test_a_rank_still_starting_prevents_the_deadlock_verdict():
    """A rank with no step yet (still building its model, reading its first batch) is not deadlocked, and the others
    may be waiting for it in their first collective: no verdict until it has a step or goes silent."""
    beats = {0: beat(1.0, 60.0, 8), 1: beat(1.0, 60.0, None)}
    assert find_stuck(beats, T) == []
    assert find_stuck({0: beat(1.0, 60.0, None), 1: beat(1.0, 60.0, None)}, T) == []
    beats[1] = beat(6.0, 60.0, None)  # ... unless it goes silent
    assert find_stuck(beats, T) == [1]


def test_not_stalled_long_enough_is_no_deadlock():
    """One rank advanced within the timeout (or the stall is exactly the timeout): nothing to kill."""
    assert find_stuck({0: beat(1.0, 11.0, 8), 1: beat(1.0, 3.0, 9)}, T) == []
    assert find_stuck({0: beat(1.0, T, 8), 1: beat(1.0, T, 8)}, T) == []
    assert find_stuck({0: beat(1.0, 9.9, 8), 1: beat(1.0, 9.9, 7)}, T) == []
