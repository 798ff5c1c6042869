"""The built-in small decoder-only transformer, shaped like nanoGPT's ``model.py``.

One input of token ids ``[B, T]`` (uint8 bytes or any integer dtype), logits ``[B, T, vocab_size]`` out;
the framework's ``cross_entropy`` scores them against the next-token targets ``[B, T]``. The block size
is ``T`` from the schema. Differences from nanoGPT: the loss lives in the framework (``forward`` returns
logits only), and the output head is ``F.linear`` over the token embedding's weight instead of a
second module sharing it, so the state dict holds that tensor once (safetensors refuses shared tensors).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "gpt"]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of every head in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(self.n_embd, dim=2))
        # the fused kernel (flash / memory-efficient where available) with the causal mask built in
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings -> ``n_layer`` pre-norm blocks -> LayerNorm -> logits (head tied to ``wte``).

    >>> m = GPT(block_size=8, vocab_size=256, n_layer=1, n_head=2, n_embd=16)
    >>> m(torch.zeros(3, 8, dtype=torch.uint8)).shape
    torch.Size([3, 8, 256])
    >>> m.generate(torch.tensor([[104, 105]]), max_new_tokens=10).shape  # greedy: temperature 0
    torch.Size([1, 12])
    """

    def __init__(self, block_size: int, vocab_size: int = 256, *, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.n_layer, self.n_embd = n_layer, n_embd
        self.init_weights()

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) of one row of ``block_size`` tokens, as nanoGPT's ``estimate_mfu`` and
        PaLM's appendix B count them: ``6 N`` per token for the matmuls over the ``N`` parameters, plus
        ``12 L C T`` per token for attention (``L`` layers, ``C`` = n_embd, ``T`` tokens of context).

        >>> m = GPT(block_size=8, vocab_size=256, n_layer=1, n_head=2, n_embd=16)
        >>> n = sum(p.numel() for p in m.parameters())
        >>> m.flops_per_sample() == (6 * n + 12 * 1 * 16 * 8) * 8
        True
        """
        n = sum(p.numel() for p in self.parameters())
        T = self.block_size
        return float((6 * n + 12 * self.n_layer * self.n_embd * T) * T)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation, in place: here, and where a sharded strategy materialises the parameters shard by
        shard (``fsdp`` builds the model on the meta device)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections: the residual
            if name.endswith("c_proj.weight"):     # stream's variance stays ~constant however many blocks add to it
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"gpt: a sequence of {T} tokens is longer than the block size {self.block_size} (the input's T)")
        idx = idx.long()  # uint8 bytes (or int32 ids) index the embedding as int64
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        # weight tying: the output head is the token embedding, read as a [vocab, n_embd] projection
        return F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``idx [B, T0]`` followed by ``max_new_tokens`` sampled ids, as int64 ``[B, T0 + max_new_tokens]``.

        ``temperature`` 0 is greedy (argmax); otherwise sample from softmax(logits / temperature), over the
        ``top_k`` likeliest tokens when set. The context is cropped to the last ``block_size`` tokens. Call
        ``model.eval()`` first when the model has dropout.
        """
        idx = idx.long()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def gpt(schema: Any, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, vocab_size: int = 256,
        bias: bool = False) -> nn.Module:
    """Registry entry ``model.name: gpt``; every argument but ``schema`` is a ``model.kwargs`` key.

    >>> from lepton_ray.data.schema import Column, Schema
    >>> s = Schema(inputs=(Column("tokens", ("input",), "uint8", (32,)),), targets=(Column("next", ("target",), "uint8", (32,)),))
    >>> gpt(s, n_layer=1, n_embd=32).block_size
    32
    >>> gpt(s, n_embd=30)
    Traceback (most recent call last):
    ...
    ValueError: model.kwargs.n_embd: 30 is not divisible by model.kwargs.n_head 4 (each head gets n_embd / n_head dims)
    """
    if len(schema.inputs) != 1:
        raise ValueError(f"the gpt takes one input of token ids, data.inputs has {len(schema.inputs)} ({', '.join(c.name for c in schema.inputs)})")
    col = schema.inputs[0]
    shape = f"[{', '.join(map(str, col.shape))}]"
    if len(col.shape) != 1:
        raise ValueError(f"the gpt needs token ids of shape [T] per row; data.inputs.{col.name} is {col.dtype} {shape} "
                         f"(a fixed-size list of T ids, e.g. the text builder's 'input' column)")
    if col.dtype.startswith("float") or col.dtype in ("bfloat16", "bool"):
        raise ValueError(f"the gpt needs integer token ids; data.inputs.{col.name} is {col.dtype} {shape} (uint8 bytes or an int dtype)")
    for key, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd), ("vocab_size", vocab_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"model.kwargs.{key}: must be an integer >= 1, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"model.kwargs.n_embd: {n_embd} is not divisible by model.kwargs.n_head {n_head} (each head gets n_embd / n_head dims)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.kwargs.dropout: must be in [0, 1), got {dropout}")
    t = schema.target
    if t is not None and t.num_classes is not None and t.num_classes > vocab_size:
        raise ValueError(f"model.kwargs.vocab_size: {vocab_size} is smaller than the {t.num_classes} classes of data.targets.{t.name} "
                         f"(its ids go up to {t.num_classes - 1}); use vocab_size >= {t.num_classes}")
    return GPT(col.shape[0], vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout, bias=bias)
