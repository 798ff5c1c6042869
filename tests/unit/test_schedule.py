"""Unit tests for the learning-rate schedule (train/optim.py) and the built-in losses (train/losses.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lepton_ray.config import load_config
from lepton_ray.train.losses import cross_entropy, mse
from lepton_ray.train.optim import make_scheduler


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(out, y) if task == "classification" else mse(out, y)

LR = 0.4


def lrs(steps: int, total: int, **train) -> list[float]:
    """The learning rate each of ``steps`` optimizer steps uses, plus the one after the last."""
    cfg = load_config({"data": {"train": "x"}, "train": {"lr": LR, **train}})
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.train.lr)
    sched = make_scheduler(cfg, opt, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    assert sched.get_last_lr()[0] == out[-1]
    return out


def test_warmup_is_linear_up_to_peak():
    seq = lrs(10, total=100, warmup_steps=5, schedule="cosine")
    assert seq[:5] == pytest.approx([LR * k / 5 for k in (1, 2, 3, 4, 5)])
    diffs = [b - a for a, b in zip(seq[:5], seq[1:5])]
    assert diffs == pytest.approx([LR / 5] * 4)
    assert seq[5] == pytest.approx(LR)  # cosine starts at the peak right after warm-up
    assert all(b <= a for a, b in zip(seq[5:], seq[6:]))


def test_warmup_then_constant():
    seq = lrs(30, total=30, warmup_steps=4, schedule="constant")
    assert seq[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert seq[4:] == pytest.approx([LR] * 27)


def test_constant_without_warmup_stays():
    assert lrs(20, total=5, schedule="constant") == pytest.approx([LR] * 21)


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_ends_at_min_lr_at_total_steps(min_lr_ratio, warmup):
    total = 20
    seq = lrs(total + 5, total=total, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    floor = LR * min_lr_ratio
    assert seq[warmup] == pytest.approx(LR)
    assert seq[total] == pytest.approx(floor)
    assert seq[total:] == pytest.approx([floor] * 6)  # stays at the floor after total_steps
    assert all(floor - 1e-12 <= v <= LR + 1e-12 for v in seq[warmup:])
    mid = warmup + (total - warmup) / 2
    if mid.is_integer():
        assert seq[int(mid)] == pytest.approx(floor + (LR - floor) * 0.5)
    for s in range(warmup, total + 1):  # the closed form
        progress = (s - warmup) / (total - warmup)
        assert seq[s] == pytest.approx(floor + (LR - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_is_strictly_decreasing_after_warmup():
    seq = lrs(16, total=16, warmup_steps=0, min_lr_ratio=0.0)
    assert seq[0] == pytest.approx(LR)
    assert all(b < a for a, b in zip(seq[:16], seq[1:17]))
    assert seq[16] == pytest.approx(0.0, abs=1e-12)


def test_warmup_longer_than_total_never_reaches_cosine():
    seq = lrs(6, total=4, warmup_steps=8)
    assert seq == pytest.approx([LR * k / 8 for k in range(1, 8)])


def test_scheduler_state_resumes_the_same_sequence():
    cfg = load_config({"data": {"train": "x"}, "train": {"lr": LR, "warmup_steps": 3, "min_lr_ratio": 0.1}})
    full = lrs(12, total=12, warmup_steps=3, min_lr_ratio=0.1)

    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([p], lr=LR)
        return o, make_scheduler(cfg, o, 12)

    opt, sched = make()
    for _ in range(5):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for _ in range(7):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == pytest.approx(full[5:])


# --------------------------------------------------------------------------- loss


def test_classification_loss_is_cross_entropy():
    out = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    expected = -(torch.log_softmax(out, -1)[0, 0] + torch.log_softmax(out, -1)[1, 2]) / 2
    loss = loss_fn("classification", out, y)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item())


def test_classification_loss_upcasts_low_precision_logits():
    out = torch.tensor([[3.0, -3.0], [-3.0, 3.0]], dtype=torch.bfloat16)
    loss = loss_fn("classification", out, torch.tensor([0, 1]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log1p(math.exp(-6.0)), rel=1e-3)
    assert loss_fn("classification", out, torch.tensor([1, 0])).item() > 5.0


def test_regression_loss_is_mse_without_broadcasting():
    out = torch.tensor([[1.0], [2.0], [4.0]])  # the model's [N, 1] output
    y = torch.tensor([1.0, 0.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a [N,1] vs [N] broadcast would warn
        loss = loss_fn("regression", out, y)
    assert loss.shape == ()
    assert loss.item() == pytest.approx((0.0 + 4.0 + 9.0) / 3)  # not the N x N broadcast mean


def test_regression_loss_upcasts_and_is_zero_on_a_perfect_fit():
    y = torch.tensor([0.5, -1.25])
    loss = loss_fn("regression", y.unsqueeze(-1).to(torch.bfloat16), y)
    assert loss.dtype == torch.float32 and loss.item() == 0.0


def test_loss_gradients_flow():
    out = torch.zeros(4, 3, requires_grad=True)
    loss_fn("classification", out, torch.tensor([0, 1, 2, 0])).backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    reg = torch.zeros(4, 1, requires_grad=True)
    loss_fn("regression", reg, torch.ones(4)).backward()
    assert reg.grad.squeeze(-1).tolist() == pytest.approx([-0.5] * 4)


# --------------------------------------------------------------------------- when to log, evaluate, checkpoint (train/schedule.py)

from lepton_ray.train.schedule import Due, Schedule  # noqa: E402


def _run_lockstep(s: Schedule, epoch_steps: int) -> tuple[list[int], list[int], list[int]]:
    """The steps at which a lock-step run logs, evaluates and saves, epoch by epoch."""
    logs, evals, saves = [], [], []
    for step in range(1, s.total_steps + 1):
        if s.log(step - 1, step):
            logs.append(step)
        due = s.at_step(step, end_of_epoch=step % epoch_steps == 0)
        evals += [step] if due.evaluate else []
        saves += [step] if due.save else []
    return logs, evals, saves


def test_lockstep_schedule_evaluates_each_epoch_end_and_saves_every_n_and_at_the_end():
    logs, evals, saves = _run_lockstep(Schedule(total_steps=25, log_every=10, eval_every=None, save_every=10), epoch_steps=8)
    assert logs == [10, 20, 25]  # and the last step, whatever log_every says
    assert evals == [8, 16, 24, 25]
    assert saves == [10, 20, 25]


def test_eval_every_n_steps_replaces_the_epoch_ends():
    _, evals, saves = _run_lockstep(Schedule(total_steps=25, eval_every=6, save_every=None), epoch_steps=8)
    assert evals == [6, 12, 18, 24, 25]
    assert saves == [25]


def test_epoch_end_schedule_does_what_fell_due_inside_the_epoch():
    s = Schedule(total_steps=100, eval_every=30, save_every=45)
    assert s.at_epoch_end(0, 25, last=False) == Due()
    assert s.at_epoch_end(25, 50, last=False) == Due(evaluate=True, save=True)  # 30 and 45 fell inside
    assert s.at_epoch_end(50, 75, last=False) == Due(evaluate=True, save=False)  # 60
    assert s.at_epoch_end(75, 90, last=True) == Due(evaluate=True, save=True)  # the run's end: always both
    assert Schedule(total_steps=100).at_epoch_end(0, 25, last=False) == Due(evaluate=True, save=False)  # eval every epoch


def test_a_log_needs_progress():
    s = Schedule(total_steps=10, log_every=1)
    assert not s.log(4, 4)  # a deferred step (held by the strategy) logs nothing
    assert s.log(4, 6)  # an elastic step may advance by more than one
    assert not s.done(9) and s.done(10)
