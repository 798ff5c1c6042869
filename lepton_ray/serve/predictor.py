"""The inference core shared by the HTTP app, batch prediction and the optimizer: typed inputs in, named outputs out.

What a model answers depends on its *head*, read from the bundle's loss and schema:

* ``classifier`` (cross-entropy on a scalar target): ``logits`` and ``probabilities`` float32 ``[N, C]``,
  ``label`` ``[N]`` (the class name of the arg-max: int64, or strings);
* ``language_model`` (cross-entropy on a token sequence ``[T]`` against one integer input ``[T]``, e.g.
  ``gpt``): ``logits`` and ``probabilities`` ``[N, V]`` of the *next* token (the last position), and with
  ``max_new_tokens = n`` the greedy ``continuation`` int64 ``[N, n]`` (the model's ``generate``);
* ``regression`` (mse): ``value`` float32 ``[N, *target shape]``;
* anything else: the model's ``output`` as float32.

The model is called as in training: the one input tensor, or a dict of them when there are several.

>>> import numpy as np
>>> from lepton_ray.data.schema import Column, Schema
>>> s = Schema(inputs=(Column("x", ("a", "b", "c"), "float32", (3,)),), targets=(Column("y", ("y",), "int64", (), 2),))
>>> p = Predictor(Bundle(model={"name": "mlp", "hidden": [4]}, schema=s, state=None))
>>> out = p.run({"x": np.zeros((2, 3), np.float32)})
>>> p.head, out["label"].shape, out["probabilities"].shape, [o.name for o in p.outputs]
('classifier', (2,), (2, 2), ['logits', 'probabilities', 'label'])
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional, Union

import numpy as np
import torch

from lepton_ray.data.schema import LEGACY_INPUT, Column
from lepton_ray.serve.bundle import Bundle, BundleError
from lepton_ray.serve.forms import make_form
from lepton_ray.serve.validate import OutputSpec, TensorSpec
from lepton_ray.train.losses import model_inputs

__all__ = ["Predictor", "head_of"]

_INT_DTYPES = ("uint8", "int8", "int16", "int32", "int64")


def head_of(bundle: Bundle) -> str:
    """``classifier | language_model | regression | raw`` from the bundle's loss and schema."""
    target, inputs = bundle.schema.target, bundle.schema.inputs
    if bundle.loss == "cross_entropy" and target is not None:
        if target.shape == ():
            return "classifier"
        if (len(inputs) == 1 and inputs[0].dtype in _INT_DTYPES and len(inputs[0].shape) == 1
                and target.shape == inputs[0].shape):
            return "language_model"
    if bundle.loss == "mse" and target is not None:
        return "regression"
    return "raw"


def _block_size(net: torch.nn.Module) -> Optional[int]:
    for owner in (net, getattr(net, "config", None)):
        size = getattr(owner, "block_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


class Predictor:
    """The bundle's model in its chosen form, with the head's post-processing.

    ``inputs`` / ``outputs`` describe the tensors it takes and gives (what the HTTP app validates
    against and the v2 metadata lists).
    """

    def __init__(self, bundle: Bundle, form: Optional[str] = None, threads: Optional[int] = None):
        if threads is not None:
            torch.set_num_threads(threads)
        if bundle.loss == "model":
            raise BundleError("model.loss 'model': the model's forward takes the targets and returns the loss, "
                              "so it cannot answer requests")
        self.bundle = bundle
        self.form = form or bundle.form
        self.head = head_of(bundle)
        self.input_names = tuple(c.name for c in bundle.schema.inputs)
        net = bundle.build_fp32()
        self.can_generate = self.head == "language_model" and callable(getattr(net, "generate", None))
        self.inputs = tuple(self._spec(c, net) for c in bundle.schema.inputs)
        with torch.inference_mode():  # one dry run: the output's shape decides the head's outputs
            y = self._float(net(model_inputs(self.tensors(self.example(2)), self.input_names, bundle.loss)))
        self.outputs = self._output_specs(y)
        if self.head == "raw":  # the dry run overruled the head: no token prompts, no generation
            self.can_generate = False
            self.inputs = tuple(self._spec(c, net) for c in bundle.schema.inputs)
        if self.head == "language_model":  # a token id beyond the vocabulary is a 400, not an IndexError
            self.inputs = tuple(replace(s, high=self.outputs[0].shape[0]) for s in self.inputs)
        self.labels = np.asarray(bundle.labels) if bundle.labels else None
        self.fn = make_form(self.form, net, self._first_row())

    # ------------------------------------------------------------------ what it takes and gives

    def _spec(self, c: Column, net: torch.nn.Module) -> TensorSpec:
        dtype = "float32" if c.dtype == "bfloat16" else c.dtype  # bf16 inputs travel as float32 (numpy has no bf16)
        features = c.columns if c.name == LEGACY_INPUT and len(c.shape) == 1 else ()
        max_len = 0
        if self.head == "language_model":  # the trained context, at most the model's block size
            block = _block_size(net)
            max_len = min(c.shape[0], block) if block else c.shape[0]
        return TensorSpec(c.name, dtype, c.shape, features=tuple(features), max_len=max_len)

    def _output_specs(self, y: torch.Tensor) -> tuple[OutputSpec, ...]:
        target = self.bundle.schema.target
        if self.head == "classifier" and y.dim() == 2:
            label = "bytes" if self.bundle.labels and isinstance(self.bundle.labels[0], str) else "int64"
            c = (y.shape[1],)
            return (OutputSpec("logits", "float32", c), OutputSpec("probabilities", "float32", c), OutputSpec("label", label, ()))
        if self.head == "language_model" and y.dim() == 3:
            v = (y.shape[2],)
            gen = (OutputSpec("continuation", "int64", (-1,), generated=True),) if self.can_generate else ()
            return (OutputSpec("logits", "float32", v), OutputSpec("probabilities", "float32", v), *gen)
        if self.head == "regression" and target is not None and y[0].numel() == math.prod(target.shape):
            return (OutputSpec("value", "float32", target.shape),)
        self.head = "raw"  # the output does not have the head's shape: served as it is
        return (OutputSpec("output", "float32", tuple(y.shape[1:])),)

    def example(self, rows: int) -> dict[str, np.ndarray]:
        """Zeros for every input, ``rows`` rows (warm-up and dry runs)."""
        return {s.name: np.zeros((rows, *((s.max_len,) if s.max_len else s.shape)), dtype=s.dtype) for s in self.inputs}

    def _first_row(self) -> Any:
        return model_inputs(self.tensors(self.example(1)), self.input_names, self.bundle.loss)

    # ------------------------------------------------------------------ running

    def tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Arrays (inputs, and targets for evaluation) as tensors of the schema's dtypes."""
        dtypes = {c.name: c.dtype for c in self.bundle.schema.columns}
        out = {}
        for name, a in arrays.items():
            t = torch.from_numpy(np.require(a, None, ["C", "W"]))
            out[name] = t.to(torch.bfloat16) if dtypes.get(name) == "bfloat16" else t
        return out

    @staticmethod
    def _float(y: Any) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the model returned {type(y).__name__}; serving needs one output tensor")
        return y.float()

    def call(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The form's raw output (float32) for a batch of input tensors."""
        return self._float(self.fn(model_inputs(tensors, self.input_names, self.bundle.loss)))

    def run(self, inputs: dict[str, np.ndarray], max_new_tokens: int = 0, scores: bool = True) -> dict[str, np.ndarray]:
        """Every output of the head for ``inputs`` (``[N, *shape]`` per input name).

        ``max_new_tokens`` > 0 (a language model): also the greedy ``continuation``; ``scores=False``
        then skips the next-token ``logits`` / ``probabilities``.
        """
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            t = self.tensors(inputs)
            if scores or not max_new_tokens:
                out.update(self._post(self.call(t)))
            if max_new_tokens:
                if not self.can_generate:
                    raise BundleError("this model has no generate(): it cannot continue a prompt")
                idx = t[self.input_names[0]]
                gen = self.fn.generate(idx, max_new_tokens, temperature=0.0)
                out["continuation"] = gen[:, -max_new_tokens:].to(torch.int64).numpy()
        return out

    def _post(self, y: torch.Tensor) -> dict[str, np.ndarray]:
        if self.head == "classifier":
            logits = y.numpy()
            idx = logits.argmax(axis=1)
            return {"logits": logits, "probabilities": _softmax(logits),
                    "label": self.labels[idx] if self.labels is not None else idx.astype(np.int64)}
        if self.head == "language_model":
            logits = y[:, -1, :].contiguous().numpy()
            return {"logits": logits, "probabilities": _softmax(logits)}
        if self.head == "regression":
            target = self.bundle.schema.target
            return {"value": y.reshape(len(y), *target.shape).numpy()}
        return {"output": y.numpy()}

    def predict(self, x: Union[np.ndarray, dict[str, np.ndarray]], max_new_tokens: int = 0) -> dict[str, np.ndarray]:
        """:meth:`run` for one input array (the only input) or a dict of them."""
        return self.run(x if isinstance(x, dict) else {self.input_names[0]: x}, max_new_tokens)

    def to_json(self, out: dict[str, np.ndarray], start: int = 0, stop: Optional[int] = None) -> list[Any]:
        """Rows ``start:stop`` of :meth:`run`'s output as ``/predict`` predictions.

        classifier: ``{"label", "probabilities"}``; language model: ``{"next_token", "probabilities"}``;
        regression: the value (a number, or nested lists); otherwise the output's nested lists.
        """
        if self.head == "classifier":
            labels = out["label"][start:stop].tolist()
            probs = out["probabilities"][start:stop].tolist()
            return [{"label": lab, "probabilities": pr} for lab, pr in zip(labels, probs)]
        if self.head == "language_model":
            probs = out["probabilities"][start:stop]
            return [{"next_token": t, "probabilities": pr} for t, pr in zip(probs.argmax(axis=1).tolist(), probs.tolist())]
        return out["value" if self.head == "regression" else "output"][start:stop].tolist()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
