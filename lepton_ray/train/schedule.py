"""When to log, evaluate and checkpoint: pure functions of the step, unit-tested without a run.

Lock-step strategies may evaluate and checkpoint at any step (:meth:`Schedule.at_step`); strategies whose
workers take different numbers of batches (the elastic parameter server) only at epoch ends, where every
worker meets (:meth:`Schedule.at_epoch_end`): there, what was due anywhere inside the epoch is done.

>>> s = Schedule(total_steps=100, log_every=10, eval_every=None, save_every=40)
>>> s.at_step(40), s.at_step(41), s.at_step(60, end_of_epoch=True), s.at_step(100)
(Due(evaluate=False, save=True), Due(evaluate=False, save=False), Due(evaluate=True, save=False), Due(evaluate=True, save=True))
>>> s.at_epoch_end(begin=30, end=60, last=False)  # elastic: the save due at 40 happens at the epoch's end
Due(evaluate=True, save=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Due", "Schedule", "crossed"]


def crossed(every: Optional[int], before: int, after: int) -> bool:
    """A multiple of ``every`` lies in ``(before, after]``.

    >>> crossed(10, 9, 10), crossed(10, 10, 19), crossed(None, 0, 5)
    (True, False, False)
    """
    return bool(every) and after // every > before // every


@dataclass(frozen=True)
class Due:
    evaluate: bool = False
    save: bool = False

    def __bool__(self) -> bool:
        return self.evaluate or self.save


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    log_every: int = 1
    eval_every: Optional[int] = None
    """Evaluate every N steps; None = at each epoch end. Always at the last step."""
    save_every: Optional[int] = None
    """Checkpoint every N steps; None = only at the last step."""

    def log(self, before: int, after: int) -> bool:
        """Write a train-loss record for the steps ``(before, after]``."""
        return after > before and (crossed(self.log_every, before, after) or after >= self.total_steps)

    def done(self, step: int) -> bool:
        return step >= self.total_steps

    def at_step(self, step: int, end_of_epoch: bool = False) -> Due:
        """Lock-step strategies, after optimizer step ``step`` (``end_of_epoch``: the epoch's last step)."""
        last = step >= self.total_steps
        every = crossed(self.eval_every, step - 1, step) if self.eval_every else end_of_epoch
        return Due(evaluate=last or every, save=last or crossed(self.save_every, step - 1, step))

    def at_epoch_end(self, begin: int, end: int, *, last: bool) -> Due:
        """Strategies whose workers meet only at epoch ends, after an epoch of nominal steps ``(begin, end]``:
        what was due anywhere inside it. ``last``: the run ends here."""
        return Due(evaluate=last or self.eval_every is None or crossed(self.eval_every, begin, end),
                   save=last or crossed(self.save_every, begin, end))
