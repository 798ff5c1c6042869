"""Unit tests for lepton_ray.train.optim.make_optimizer: fused kernels where torch has them, same updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lepton_ray.config import load_config
from lepton_ray.train.optim import make_optimizer


def cfg(scaling=None, **train):
    train = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, **train}
    return load_config({"data": {"train": "x"}, "train": train, "scaling": scaling or {}})


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fp32_on_cpu_uses_the_fused_kernel(name):
    opt = make_optimizer(cfg(optimizer=name), list(model().parameters()))
    assert opt.param_groups[0]["fused"] is True


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_updates_match_the_default_implementation(name):
    """Ten steps of the fused optimizer land where torch's default (for-loop) implementation lands."""
    fused_model, plain_model = model(), model()
    fused = make_optimizer(cfg(optimizer=name), list(fused_model.parameters()))
    plain_cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    kw = {"momentum": 0.9} if name == "sgd" else {}
    plain = plain_cls(plain_model.parameters(), lr=0.1, weight_decay=0.01, foreach=False, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(32, 7, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        for m, o in ((fused_model, fused), (plain_model, plain)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert (a - b).abs().max().item() < 1e-6


def test_fp16_gradient_scaling_keeps_the_default_kernel():
    opt = make_optimizer(cfg(precision="fp16", scaling={"use_gpu": True}), list(model().parameters()))
    assert not opt.param_groups[0]["fused"]


def test_sparse_embedding_tables_keep_the_default_kernel():
    """Fused kernels take no sparse gradients; a table set sparse (as the PS strategies do) must still train."""
    emb = nn.Embedding(10, 4, sparse=True)
    opt = make_optimizer(cfg(weight_decay=0.0), list(emb.parameters()), sparse=True)  # torch: no weight decay on sparse gradients
    assert not opt.param_groups[0]["fused"]
    emb(torch.tensor([1, 3])).sum().backward()
    before = emb.weight.detach().clone()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 3) for i in range(10)]
