"""lepton_ray.train.memory and train.compile: activation checkpointing, what a worker holds, the compile fallback."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lepton_ray.config import ConfigError
from lepton_ray.models.gpt import GPT
from lepton_ray.train.memory import checkpoint_activations, memory_bytes
from lepton_ray.train.step import Compiled


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x).transpose(1, 2), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients_and_state_dict():
    torch.manual_seed(0)
    plain = GPT(16, 256, n_layer=3, n_head=2, n_embd=32, dropout=0.1)
    recomputed = GPT(16, 256, n_layer=3, n_head=2, n_embd=32, dropout=0.1)
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_activations(recomputed, ["Block"])
    assert {type(b).__name__ for b in recomputed.transformer.h} == {"Block"} and list(recomputed.state_dict()) == list(plain.state_dict())
    assert type(recomputed.transformer.h[0]) is not type(plain.transformer.h[0])  # the recomputing subclass
    x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    torch.manual_seed(1)
    want = _grads(plain, x, y)
    torch.manual_seed(1)  # dropout: the recomputation replays the forward's random draws (torch.utils.checkpoint)
    got = _grads(recomputed, x, y)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert max(v.abs().max().item() for v in want.values()) > 0  # not vacuous


def test_activation_checkpointing_of_a_class_the_model_lacks_names_its_classes():
    with pytest.raises(ConfigError, match=re.escape("train.activation_checkpointing: 'Blok' is not a module class of the model;"
                                                    " its classes are: Linear, ReLU, Sequential")):
        checkpoint_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["Blok"])


def test_memory_bytes_counts_parameters_gradients_and_optimizer_state():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))
    opt = torch.optim.AdamW(model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert memory_bytes(model, opt) == {"param_bytes": 4 * n, "grad_bytes": 0, "optimizer_bytes": 0}
    model(torch.ones(2, 10)).sum().backward()
    opt.step()
    # AdamW: exp_avg and exp_avg_sq per parameter (8 bytes) and a float32 step per tensor
    assert memory_bytes(model, opt) == {"param_bytes": 4 * n, "grad_bytes": 4 * n, "optimizer_bytes": 8 * n + 4 * 4}


def test_compiled_matches_eager_and_falls_back_to_it_when_compiling_fails(caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    compiled = Compiled(net)
    assert list(compiled.state_dict()) == [f"eager.{k}" for k in net.state_dict()]  # one set of parameters

    def broken(*args, **kwargs):  # what a failed compilation raises on the first call
        raise RuntimeError("backend compiler failed: no C++ compiler")

    object.__setattr__(compiled, "_fast", broken)
    with caplog.at_level(logging.WARNING):
        out = compiled(x)
    assert torch.equal(out, net(x)) and compiled.compiled is False
    assert "train.compile: torch.compile failed, training the model uncompiled: RuntimeError: backend compiler failed" in caplog.text


def test_a_forward_that_fails_eagerly_too_raises_its_own_error():
    class Bad(nn.Module):
        def forward(self, x):
            raise ValueError("the model's own error")

    compiled = Compiled(Bad())
    object.__setattr__(compiled, "_fast", Bad())
    with pytest.raises(ValueError, match="the model's own error"):
        compiled(torch.ones(1))
