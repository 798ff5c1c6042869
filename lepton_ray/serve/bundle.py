"""Serving bundles: what a server needs to answer requests, in a safe format.

A bundle is a directory (local or any storage URI) holding

* ``model.safetensors`` — the fp32 weights (safetensors: tensors only, nothing is unpickled);
* ``bundle.json`` — the model config, the input schema (feature names, width, dtype),
  the label names, the task, the chosen form (``fp32 | bf16 | int8 | compile``) and the
  SHA-256 of the weights file;
* ``optimize_report.json`` — the optimizer's measurements (when written by :func:`optimize`).

The form is re-applied when the bundle is loaded (quantizing or compiling the fp32
weights is deterministic and fast), so the weights file is always plain fp32 tensors.

Writing is atomic: on a local disk the bundle is written to a hidden sibling directory
and renamed into place; on object storage ``bundle.json`` is written last, in one PUT,
and a bundle without it does not exist.

A checkpoint URI (``.../checkpoints/step_00000660``, or the checkpoint root for the
newest one) can be used wherever a bundle is expected: it loads as an fp32 bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lepton_ray.config import ModelConfig, load_config
from lepton_ray.storage import filesystem, is_local, join
from lepton_ray.train.checkpoint import MANIFEST, Checkpoint, CheckpointError, CheckpointStore

__all__ = ["Bundle", "BundleError", "load_bundle", "load_checkpoint", "write_bundle", "BUNDLE_FILE", "WEIGHTS_FILE"]

BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "optimize_report.json"
FORMAT = "lepton_ray.bundle/1"
_STEP = re.compile(r"^(.*)/step_(\d{8})/?$")


class BundleError(RuntimeError):
    """A bundle or checkpoint is missing, incomplete or does not match its metadata."""


@dataclass
class Bundle:
    """A model ready to serve: fp32 weights plus what is needed to rebuild and call it.

    >>> b = Bundle(model={"name": "mlp", "hidden": [4]}, input_dim=3, num_outputs=2,
    ...            features=["a", "b", "c"], state=None)
    >>> b.build_fp32()[0]
    Linear(in_features=3, out_features=4, bias=True)
    """

    model: dict[str, Any]
    """The ``model`` section of the training config."""
    input_dim: int
    num_outputs: int
    features: list[str]
    """Feature column names, in the order the model reads them."""
    state: Optional[dict[str, torch.Tensor]]
    """fp32 state dict (None = freshly initialised, for tests and examples)."""
    task: str = "classification"
    label: str = "label"
    labels: list[Any] = field(default_factory=list)
    """Class names by output index (default 0..num_outputs-1)."""
    form: str = "fp32"
    """The optimized form the server runs."""
    source: str = ""
    """Where the weights came from (a checkpoint URI)."""
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.labels and self.task == "classification":
            self.labels = list(range(self.num_outputs))

    def build_fp32(self) -> nn.Module:
        """The fp32 model with the bundle's weights, in eval mode."""
        from lepton_ray.models import build_model

        net = build_model(ModelConfig(**self.model), self.input_dim, self.num_outputs)
        if self.state is not None:
            net.load_state_dict(self.state)
        return net.eval()

    def metadata(self) -> dict[str, Any]:
        """The JSON-able description written as ``bundle.json`` (without the weights checksum)."""
        return {
            "format": FORMAT, "form": self.form, "task": self.task, "model": self.model,
            "input": {"features": self.features, "dim": self.input_dim, "dtype": "float32"},
            "num_outputs": self.num_outputs, "label": self.label, "labels": self.labels,
            "source": self.source, "metrics": self.metrics,
        }


def _split_checkpoint_uri(uri: str) -> tuple[str, Optional[int]]:
    m = _STEP.match(uri.rstrip("/"))
    return (m.group(1), int(m.group(2))) if m else (uri.rstrip("/"), None)


def load_checkpoint(uri: str, storage_options: Optional[dict] = None) -> Bundle:
    """Load a committed lepton_ray checkpoint (verified against its manifest) as an fp32 :class:`Bundle`.

    ``uri`` is one checkpoint (``.../step_00000660``) or a checkpoint root (its newest one).

    >>> load_checkpoint("/nonexistent/step_00000001")
    Traceback (most recent call last):
    ...
    lepton_ray.serve.bundle.BundleError: no committed checkpoint at '/nonexistent/step_00000001' (MANIFEST.json is missing)
    """
    root, step = _split_checkpoint_uri(uri)
    store = CheckpointStore(root, storage_options)
    try:
        if step is None:
            ckpt: Optional[Checkpoint] = store.latest()
            if ckpt is None:
                raise BundleError(f"no committed checkpoint at '{uri}' (no {MANIFEST}, no step_* checkpoint under it)")
        else:
            ckpt = store.get(step)
        state = store.load(ckpt, ["model"])["model"]
    except CheckpointError as exc:
        raise BundleError(str(exc)) from None
    meta = ckpt.meta
    io = meta.get("model_io")
    if not io or "config" not in meta:
        raise BundleError(f"checkpoint '{ckpt.uri}' has no model_io/config metadata; it was not written by lepton_ray train")
    cfg = load_config(meta["config"])
    return Bundle(
        model=_asdict(cfg.model),
        input_dim=int(io["input_dim"]), num_outputs=int(io["num_outputs"]), features=list(io["features"]),
        state={k: v.float().contiguous() for k, v in state.items()}, task=io.get("task", cfg.model.task),
        label=io.get("label", "label"), source=ckpt.uri, metrics=dict(meta.get("metrics") or {}),
    )


def _asdict(section: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(section)


def write_bundle(bundle: Bundle, uri: str, *, report: Optional[dict[str, Any]] = None,
                 storage_options: Optional[dict] = None, overwrite: bool = True) -> str:
    """Write ``bundle`` (and the optimizer ``report``) to ``uri`` atomically; returns ``uri``."""
    net = bundle.build_fp32()
    weights = st_save({k: v.detach().float().contiguous() for k, v in net.state_dict().items()})
    meta = {**bundle.metadata(), "weights": {"file": WEIGHTS_FILE, "bytes": len(weights),
                                             "sha256": hashlib.sha256(weights).hexdigest()}}
    files = {WEIGHTS_FILE: weights}
    if report is not None:
        files[REPORT_FILE] = json.dumps(report, indent=1).encode()
    files[BUNDLE_FILE] = json.dumps(meta, indent=1).encode()  # last: it commits the bundle
    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        parent, name = os.path.split(path.rstrip("/"))
        os.makedirs(parent or ".", exist_ok=True)
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        try:
            for fname, data in files.items():
                with open(os.path.join(tmp, fname), "wb") as fh:
                    fh.write(data)
            if os.path.exists(path):
                if not overwrite:
                    raise BundleError(f"'{uri}' already exists")
                old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        if fs.exists(f"{path}/{BUNDLE_FILE}"):
            if not overwrite:
                raise BundleError(f"'{uri}' already exists")
            fs.rm_file(f"{path}/{BUNDLE_FILE}")  # un-commit the old bundle first
        for fname, data in files.items():
            fs.pipe_file(f"{path}/{fname}", data)
    return uri


def load_bundle(uri: str, storage_options: Optional[dict] = None) -> Bundle:
    """Load a bundle written by :func:`write_bundle`, or a checkpoint (as an fp32 bundle).

    The weights are checked against the SHA-256 in ``bundle.json`` and read with safetensors.
    """
    fs, path = filesystem(uri, storage_options)
    try:
        meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/{BUNDLE_FILE}"))
    except FileNotFoundError:
        if fs.exists(f"{path.rstrip('/')}/{MANIFEST}") or _split_checkpoint_uri(uri)[1] is not None or fs.isdir(path):
            return load_checkpoint(uri, storage_options)
        raise BundleError(f"'{uri}' is neither a serving bundle ({BUNDLE_FILE}) nor a lepton_ray checkpoint ({MANIFEST})") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"'{join(uri, BUNDLE_FILE)}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    data = fs.cat_file(f"{path.rstrip('/')}/{meta['weights']['file']}")
    if hashlib.sha256(data).hexdigest() != meta["weights"]["sha256"]:
        raise BundleError(f"'{join(uri, meta['weights']['file'])}' does not match the SHA-256 in {BUNDLE_FILE}")
    inp = meta["input"]
    return Bundle(model=meta["model"], input_dim=int(inp["dim"]), num_outputs=int(meta["num_outputs"]),
                  features=list(inp["features"]), state=st_load(data), task=meta["task"], label=meta["label"],
                  labels=list(meta["labels"]), form=meta["form"], source=meta.get("source", ""),
                  metrics=meta.get("metrics", {}))
