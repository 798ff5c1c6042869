"""The built-in click-through recommender: hashed categorical ids -> one embedding table, ++ dense -> MLP.

Inputs by name: ``ids`` (integers ``[F]``, one per categorical field: raw or 64-bit hashed ids, any value
of int64) and, optionally, ``dense`` (floats ``[D]``); ``model.kwargs.ids_input`` / ``dense_input``
rename them. A schema with one input is the ids alone. Each id is hashed with its field index into one of
``num_embeddings`` rows of ONE ``nn.Embedding`` (the hashing trick: the table's size is chosen, not the
id space), so two fields never share a row by construction, only by a hash collision.

The hash (:func:`hash_rows`) is exact integer arithmetic in int64: ids never pass through a float
(float32 is exact only below 2**24, float64 below 2**53), and every intermediate stays below 2**63, so
nothing relies on signed overflow wrapping. The embedding is called with the row ids, a LongTensor, as
the parameter server's forward pre-hook expects (it pulls exactly those rows).

Output: ``num_classes`` logits of the target (2 for click / no click: softmax cross-entropy over two
logits is binary cross-entropy on their difference; the loop reports ``eval_accuracy`` and ``eval_auc``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["MAX_ROWS", "Recommender", "hash_rows", "recommender"]

_P = 2**31 - 1  # a Mersenne prime: the hash works in Z_P, so products of two residues stay below 2**62
_A, _B = 1_588_635_695, 950_706_376  # L'Ecuyer's multipliers modulo 2**31 - 1 (full period, well mixed)
_CHUNK = 21  # the id is fed in 21-bit pieces (the top one 22 bits, sign included): h * A + piece < 2**63
MAX_ROWS = _P
"""The most rows ``num_embeddings`` may have (the hash's range)."""


def hash_rows(ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Rows ``[0, num_embeddings)`` of int64 ``ids [B, F]``, hashed with each column's field index.

    A polynomial hash modulo 2**31 - 1 over the id's 64 bits (pieces of 21, 21 and 22 bits), seeded by
    the field and scrambled by a final multiply, so ids differing anywhere (above bit 24, above bit 53)
    land on independent rows, and sequential ids spread over the table.

    >>> hash_rows(torch.tensor([[2**40], [2**40 + 2**30], [2**62 + 1], [2**62 + 2]]), 1000).flatten().tolist()
    [834, 979, 46, 775]
    >>> hash_rows(torch.tensor([[7, 7]]), 1000).tolist()  # the same id in two fields: two rows
    [[984, 630]]
    """
    x = ids.long()
    mask = (1 << _CHUNK) - 1
    field = torch.arange(1, x.shape[-1] + 1, dtype=torch.long, device=x.device)
    h = field.expand_as(x)
    for piece in ((x >> 2 * _CHUNK) & ((mask << 1) | 1), (x >> _CHUNK) & mask, x & mask):  # >> is arithmetic: & keeps the bits
        h = (h * _A + piece) % _P
    return (h * _B) % _P % num_embeddings


class Recommender(nn.Module):
    """``ids [B, F]`` -> hashed rows -> embeddings (concatenated over fields) ++ ``dense [B, D]`` -> MLP -> logits.

    >>> m = Recommender(3, 2, 2, num_embeddings=100, embedding_dim=8, hidden=[16])
    >>> m({"ids": torch.tensor([[1, 2**40, 2**62]]), "dense": torch.tensor([[0.5, -0.5]])}).shape
    torch.Size([1, 2])
    """

    def __init__(self, num_fields: int, num_dense: int, num_outputs: int, *, num_embeddings: int, embedding_dim: int = 16,
                 hidden: list[int] = (64, 32), ids_input: str = "ids", dense_input: Optional[str] = "dense"):
        super().__init__()
        self.ids_input, self.dense_input, self.num_embeddings = ids_input, dense_input if num_dense else None, num_embeddings
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.01)
        layers: list[nn.Module] = []
        width = num_fields * embedding_dim + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Union[torch.Tensor, dict[str, torch.Tensor]]) -> torch.Tensor:
        ids = x[self.ids_input] if isinstance(x, dict) else x
        ids = ids.reshape(ids.shape[0], -1)  # a scalar ids column is one field
        emb = self.embedding(hash_rows(ids, self.num_embeddings)).flatten(1)  # [B, F * dim]
        if self.dense_input is None:
            return self.mlp(emb)
        dense = x[self.dense_input].reshape(ids.shape[0], -1)
        return self.mlp(torch.cat([emb, dense.to(emb.dtype)], dim=1))


def recommender(schema: Any, hidden: list[int] = (64, 32), num_embeddings: int = 100_000, embedding_dim: int = 16,
                ids_input: str = "ids", dense_input: str = "dense") -> nn.Module:
    """Registry entry ``model.name: recommender``; settings via ``model.kwargs`` (``model.hidden`` sets the MLP).

    >>> from lepton_ray.data.schema import Column, Schema
    >>> y = (Column("label", ("label",), "int64", (), 2),)
    >>> recommender(Schema(inputs=(Column("ids", ("ids",), "int64", (8,)),), targets=y), num_embeddings=64).mlp[0]
    Linear(in_features=128, out_features=64, bias=True)
    >>> recommender(Schema(inputs=(Column("x", ("a", "b"), "float32", (2,)),), targets=y))
    Traceback (most recent call last):
    ...
    ValueError: the recommender needs integer ids; data.inputs.x is float32 [2] (name an int64 column in data.inputs, e.g. {ids: ids, dense: dense})
    """
    inputs = {c.name: c for c in schema.inputs}
    if ids_input in inputs:
        ids = inputs[ids_input]
    elif len(inputs) == 1:
        ids = schema.inputs[0]
    else:
        raise ValueError(f"the recommender's ids input '{ids_input}' (model.kwargs.ids_input) is not in data.inputs "
                         f"({', '.join(inputs)})")
    dense = inputs.get(dense_input) if dense_input != ids.name else None
    shape = lambda c: f"[{', '.join(map(str, c.shape))}]"  # noqa: E731
    for name in inputs:
        if name not in (ids.name, dense_input):
            raise ValueError(f"data.inputs.{name}: the recommender takes ids ('{ids.name}', model.kwargs.ids_input) and dense "
                             f"features ('{dense_input}', model.kwargs.dense_input); '{name}' is neither")
    if not (ids.dtype.startswith(("int", "uint"))):
        raise ValueError(f"the recommender needs integer ids; data.inputs.{ids.name} is {ids.dtype} {shape(ids)} "
                         f"(name an int64 column in data.inputs, e.g. {{ids: ids, dense: dense}})")
    if len(ids.shape) > 1:
        raise ValueError(f"the recommender needs ids of shape [F] (one per field); data.inputs.{ids.name} is {ids.dtype} {shape(ids)}")
    if not (isinstance(num_embeddings, int) and 1 <= num_embeddings <= MAX_ROWS):
        raise ValueError(f"model.kwargs.num_embeddings: must be an integer in 1..{MAX_ROWS} (hash buckets), got {num_embeddings!r}")
    if not (isinstance(embedding_dim, int) and embedding_dim >= 1):
        raise ValueError(f"model.kwargs.embedding_dim: must be an integer >= 1, got {embedding_dim!r}")
    t = schema.target
    num_outputs = 1 if t is None else (t.num_classes or math.prod(t.shape))
    return Recommender(math.prod(ids.shape), math.prod(dense.shape) if dense is not None else 0, num_outputs,
                       num_embeddings=num_embeddings, embedding_dim=embedding_dim, hidden=list(hidden), ids_input=ids.name,
                       dense_input=dense_input if dense is not None else None)
