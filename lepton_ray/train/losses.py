"""The model/loss contract: what the model is called with, which loss it trains on, which metrics evaluate it.

* The model gets the batch's one input tensor, or a dict of input tensors when there are several
  (:func:`model_inputs`); with ``model.loss: model`` it gets the whole batch, targets included.
* The loss is a built-in (:data:`LOSSES`), the model's own (``forward`` returns the loss, or a dict with
  ``loss`` plus metrics to log), or a function ``pkg.mod:fn(output, target)``.
* Evaluation sums every metric over the rank's rows (:class:`Evaluator`), so ranks combine with one
  all-reduce, and a split evaluates the same in one pass or in many chunks.

>>> out, y = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]), torch.tensor([[0, 1]])  # [B=1, T=2, C=2] against [B, T]
>>> round(cross_entropy(out, y).item(), 4)
0.1269
>>> cross_entropy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
Traceback (most recent call last):
...
lepton_ray.train.losses.ShapeError: cross_entropy: the model's output [4, 3] does not fit the target [5]: expected logits [B, C, ...] or [B, ..., C] against class ids [B, ...]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

from lepton_ray.config import Config, ConfigError
from lepton_ray.imports import import_object
from lepton_ray.train.metrics import binary_auc

__all__ = ["LOSSES", "METRICS", "check_config", "Evaluator", "Loss", "ShapeError", "cross_entropy", "default_metrics", "make_loss",
           "model_inputs", "targets_of", "default_loss"]

Batch = dict[str, torch.Tensor]


class ShapeError(ValueError):
    """The model's output does not fit its loss (the message shows both shapes)."""


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(map(str, t.shape))}]"


def _class_last(out: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C], ids [N])`` from ``[B, ..., C]`` / ``[B, C, ...]`` logits against ``[B, ...]`` ids."""
    if out.dim() == y.dim() + 1 and out.shape[:-1] == y.shape:
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    if out.dim() == y.dim() + 1 and out.shape[0] == y.shape[0] and out.shape[2:] == y.shape[1:]:
        return out.movedim(1, -1).reshape(-1, out.shape[1]), y.reshape(-1)
    raise ShapeError(f"{loss}: the model's output {_shape(out)} does not fit the target {_shape(y)}: expected logits "
                     f"[B, C, ...] or [B, ..., C] against class ids [B, ...]")


def _same_shape(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``out`` as ``y``'s shape (a trailing 1 is dropped: ``[B, 1]`` against ``[B]``)."""
    if out.shape == y.shape:
        return out
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1 and out.shape[:-1] == y.shape:
        return out.squeeze(-1)
    raise ShapeError(f"{loss}: the model's output {_shape(out)} does not fit the target {_shape(y)}: expected the same shape")


def cross_entropy(out: torch.Tensor, y: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    logits, ids = _class_last(out, y, "cross_entropy")
    return F.cross_entropy(logits.float(), ids.long(), ignore_index=ignore_index, reduction=reduction)


def mse(out: torch.Tensor, y: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    return F.mse_loss(_same_shape(out, y, "mse").float(), y.float(), reduction=reduction)


def bce(out: torch.Tensor, y: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(_same_shape(out, y, "bce").float(), y.float(), reduction=reduction)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": cross_entropy, "mse": mse, "bce": bce}
"""Built-in losses: ``fn(output, target, *, ignore_index, reduction)``."""

METRICS = ("accuracy", "auc", "mse", "bits_per_byte")
"""Built-in eval metrics (``eval_loss`` is always reported)."""


def check_config(cfg: Config) -> None:
    """``model.loss`` and ``model.metrics`` name registered losses and metrics."""
    m = cfg.model
    if m.loss is not None and ":" not in m.loss and m.loss not in (*LOSSES, "model"):
        raise ConfigError(f"model.loss: must be one of {', '.join([*LOSSES, 'model'])} or 'package.module:function', got {m.loss!r}")
    for name in m.metrics or []:
        if name not in METRICS:
            raise ConfigError(f"model.metrics: {name!r} is not one of {', '.join(METRICS)}")


def model_inputs(batch: Batch, input_names: tuple[str, ...], loss: str) -> Union[torch.Tensor, Batch]:
    """What the model is called with: the whole batch (``loss: model``), the one input, or a dict of inputs."""
    if loss == "model":
        return batch
    if len(input_names) == 1:
        return batch[input_names[0]]
    return {n: batch[n] for n in input_names}


def targets_of(batch: Batch, target_names: tuple[str, ...]) -> Union[torch.Tensor, Batch, None]:
    if not target_names:
        return None
    if len(target_names) == 1:
        return batch[target_names[0]]
    return {n: batch[n] for n in target_names}


class Loss:
    """``loss(output, batch) -> (loss, extras)``: the configured loss of one batch, plus the model's extra metrics.

    ``output`` is what the model returned: logits for a built-in or function loss, the loss (or a dict
    holding ``loss``) for ``model``.
    """

    def __init__(self, name: str, target_names: tuple[str, ...], ignore_index: int = -100):
        self.name, self.target_names, self.ignore_index = name, target_names, ignore_index
        self.builtin = LOSSES.get(name)
        self.fn = import_object(name, "model.loss") if ":" in name else None
        if self.builtin is not None and len(target_names) != 1:
            raise ValueError(f"model.loss: '{name}' needs exactly one target, data.targets has {len(target_names)} "
                             f"({', '.join(target_names)}); use 'model' or 'package.module:function'")

    def __call__(self, output: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.builtin is not None:
            return self.builtin(output, batch[self.target_names[0]], ignore_index=self.ignore_index), {}
        if self.fn is not None:
            output = self.fn(output, targets_of(batch, self.target_names))
        if isinstance(output, dict):
            if "loss" not in output:
                raise ValueError(f"model.loss: '{self.name}' returned a dict without 'loss' (keys: {', '.join(output)})")
            return output["loss"], {k: v for k, v in output.items() if k != "loss"}
        if not isinstance(output, torch.Tensor) or output.dim() != 0:
            what = _shape(output) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ShapeError(f"model.loss: '{self.name}' must give a scalar loss tensor (or a dict with 'loss'), got {what}")
        return output, {}


def default_loss(task: str) -> str:
    """The loss of ``model.task`` when ``model.loss`` is omitted."""
    return "cross_entropy" if task == "classification" else "mse"


def make_loss(model_cfg: Any, schema: Any) -> Loss:
    """The configured loss (``model.loss``, default by ``model.task``) for ``schema``'s targets."""
    name = model_cfg.loss or default_loss(model_cfg.task)
    return Loss(name, tuple(c.name for c in schema.targets), model_cfg.ignore_index)


def default_metrics(model_cfg: Any, schema: Any) -> list[str]:
    """``model.metrics``, or by task: accuracy (+ auc for 2 classes of a scalar target) / mse."""
    if model_cfg.metrics is not None:
        return list(model_cfg.metrics)
    loss = model_cfg.loss or default_loss(model_cfg.task)
    target = schema.target
    if loss == "cross_entropy":
        binary = target is not None and target.num_classes == 2 and target.shape == ()
        return ["accuracy", "auc"] if binary else ["accuracy"]
    if loss == "bce":
        return ["auc"] if target is not None and target.shape == () else []
    return ["mse"] if loss == "mse" else []


class Evaluator:
    """Sums of the eval loss and metrics over batches; :meth:`result` combines ranks (one all-reduce, one gather for AUC).

    ``eval_loss`` is the mean per target element for a built-in loss (per token for a sequence model,
    padding skipped) and the row-weighted mean of the batches' losses for ``model`` / function losses.
    """

    def __init__(self, loss: Loss, metrics: list[str]):
        self.loss, self.metrics = loss, list(metrics)
        if "bits_per_byte" in self.metrics and loss.name != "cross_entropy":
            raise ValueError(f"model.metrics: 'bits_per_byte' needs model.loss 'cross_entropy', not '{loss.name}'")
        self.reset()

    def reset(self) -> None:
        """Forget the sums: the next :meth:`update` starts a new evaluation."""
        self.sums: dict[str, float] = {}
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def update(self, output: Any, batch: Batch) -> None:
        rows = len(next(iter(batch.values())))
        if self.loss.builtin is None:
            loss, extras = self.loss(output, batch)
            self._add("loss", loss.item() * rows)
            self._add("n_loss", rows)
            for k, v in extras.items():
                self._add(f"x_{k}", float(v) * rows)
            return
        y = batch[self.loss.target_names[0]]
        ignore = self.loss.ignore_index
        self._add("loss", self.loss.builtin(output, y, ignore_index=ignore, reduction="sum").item())
        counted = (y != ignore).sum().item() if self.loss.name == "cross_entropy" else y.numel()
        self._add("n_loss", counted)
        if "accuracy" in self.metrics:
            if self.loss.name == "cross_entropy":
                logits, ids = _class_last(output, y, self.loss.name)
                pred = logits.argmax(-1)
            else:  # bce: the logit's sign
                pred, ids = (_same_shape(output, y, self.loss.name) > 0).long().reshape(-1), y.long().reshape(-1)
            keep = ids != ignore
            self._add("correct", (pred[keep] == ids[keep]).sum().item())
            self._add("n_acc", keep.sum().item())
        if "mse" in self.metrics:
            self._add("se", mse(output, y, reduction="sum").item())
            self._add("n_se", y.numel())
        if "auc" in self.metrics:
            out = output.float()
            score = (out[..., 1] - out[..., 0]) if self.loss.name == "cross_entropy" else _same_shape(out, y, self.loss.name)
            self.scores.append(score.reshape(-1).detach().cpu().numpy())
            self.labels.append(y.reshape(-1).cpu().numpy())

    def result(self, world: int = 1, device: torch.device = torch.device("cpu")) -> dict[str, float]:
        """The metrics over every rank's rows (a collective when ``world > 1``: every rank calls it)."""
        import torch.distributed as dist

        keys = ["loss", "n_loss", "correct", "n_acc", "se", "n_se"]
        extra = sorted(k for k in self.sums if k.startswith("x_"))
        sums = torch.tensor([self.sums.get(k, 0.0) for k in keys + extra], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
        s = dict(zip(keys + extra, sums.tolist()))
        out: dict[str, float] = {"loss": s["loss"] / max(s["n_loss"], 1)}
        if "accuracy" in self.metrics:
            out["accuracy"] = s["correct"] / max(s["n_acc"], 1)
        if "mse" in self.metrics:
            out["mse"] = s["se"] / max(s["n_se"], 1)
        if "bits_per_byte" in self.metrics:
            out["bits_per_byte"] = out["loss"] / math.log(2)
        for k in extra:
            out[k[2:]] = s[k] / max(s["n_loss"], 1)
        if "auc" in self.metrics:
            mine = (np.concatenate(self.scores) if self.scores else np.zeros(0), np.concatenate(self.labels) if self.labels else np.zeros(0))
            parts = [mine]
            if world > 1:
                parts = [None] * world  # type: ignore[list-item]
                dist.all_gather_object(parts, mine)
            out["auc"] = binary_auc(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return out
