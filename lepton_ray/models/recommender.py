"""The built-in click-through recommender: embedding tables for categorical ids + an MLP.

Input layout: the data pipeline hands every model one float32 matrix (numeric
columns, concatenated). The recommender reads its first ``num_categorical``
columns as categorical ids and the rest as dense features. float32 holds every
integer below 2**24 exactly, so ids are exact up to 16,777,215 rows per table
(``num_embeddings`` above that is refused). Each categorical column ``f`` has
its own id range ``[0, num_embeddings)`` in one shared table (row = id); use a
different id range per field (as :func:`lepton_ray.data.synthetic.clicks` does)
when the fields should not share rows.

Output: ``num_outputs`` logits (2 for click / no click: softmax cross-entropy over
two logits is binary cross-entropy on their difference; the loop reports
``eval_accuracy`` and ``eval_auc``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Recommender", "recommender"]

MAX_EXACT_ID = 2**24


class Recommender(nn.Module):
    """``[ids (num_categorical) | dense features]`` -> embeddings (mean over fields) ++ dense -> MLP -> logits.

    >>> m = Recommender(input_dim=5, num_outputs=2, num_categorical=3, num_embeddings=100, embedding_dim=8, hidden=[16])
    >>> m(torch.tensor([[1., 7., 99., 0.5, -0.5]])).shape
    torch.Size([1, 2])
    """

    def __init__(self, input_dim: int, num_outputs: int, *, num_categorical: int, num_embeddings: int,
                 embedding_dim: int = 16, hidden: list[int] = (64, 32)):
        super().__init__()
        if not 1 <= num_categorical <= input_dim:
            raise ValueError(f"model.kwargs.num_categorical: must be in 1..{input_dim} (the feature width), got {num_categorical}")
        if not 1 <= num_embeddings <= MAX_EXACT_ID:
            raise ValueError(f"model.kwargs.num_embeddings: must be in 1..{MAX_EXACT_ID} (ids travel as float32), got {num_embeddings}")
        self.num_categorical = num_categorical
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.01)
        layers: list[nn.Module] = []
        width = num_categorical * embedding_dim + input_dim - num_categorical
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, : self.num_categorical].long()  # exact: float32 represents integers < 2**24
        emb = self.embedding(ids).flatten(1)  # [B, num_categorical * dim]
        return self.mlp(torch.cat([emb, x[:, self.num_categorical :]], dim=1))


def recommender(input_dim: int, num_outputs: int, num_categorical: int = 8, num_embeddings: int = 100_000,
                embedding_dim: int = 16, hidden: list[int] = (64, 32)) -> nn.Module:
    """Registry entry ``model.name: recommender``; settings via ``model.kwargs`` (``model.hidden`` sets the MLP)."""
    return Recommender(input_dim, num_outputs, num_categorical=num_categorical, num_embeddings=num_embeddings,
                       embedding_dim=embedding_dim, hidden=list(hidden))
