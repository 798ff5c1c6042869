"""The inference core shared by the HTTP app and batch prediction: rows in, predictions out.

>>> import numpy as np
>>> from lepton_ray.serve.bundle import Bundle
>>> p = Predictor(Bundle(model={"name": "mlp", "hidden": [4]}, input_dim=3, num_outputs=2,
...                      features=["a", "b", "c"], state=None))
>>> out = p.predict(np.zeros((2, 3), np.float32))
>>> out["label"].shape, out["probabilities"].shape
((2,), (2, 2))
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from lepton_ray.serve.bundle import Bundle
from lepton_ray.serve.forms import make_form

__all__ = ["Predictor"]


class Predictor:
    """The bundle's model in its chosen form, with the task's post-processing."""

    def __init__(self, bundle: Bundle, form: Optional[str] = None, threads: Optional[int] = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.form = form or bundle.form
        self.fn = make_form(self.form, bundle.build_fp32())
        self.labels = np.asarray(bundle.labels) if bundle.labels else None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs float32 [N, num_outputs] for features float32 [N, input_dim]."""
        with torch.inference_mode():
            return self.fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Classification: ``label`` [N] and ``probabilities`` [N, C]; regression: ``value`` [N] or [N, K]."""
        out = self.logits(x)
        if self.bundle.task == "classification":
            z = out - out.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            idx = out.argmax(axis=1)
            return {"label": self.labels[idx] if self.labels is not None else idx, "probabilities": p}
        return {"value": out[:, 0] if out.shape[1] == 1 else out}

    def to_json(self, pred: dict[str, np.ndarray], start: int = 0, stop: Optional[int] = None) -> list[Any]:
        """Rows ``start:stop`` of :meth:`predict`'s output as JSON-able predictions."""
        if "label" in pred:
            labels = pred["label"][start:stop].tolist()
            probs = pred["probabilities"][start:stop].tolist()
            return [{"label": lab, "probabilities": pr} for lab, pr in zip(labels, probs)]
        return pred["value"][start:stop].tolist()
