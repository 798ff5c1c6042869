"""Serving bundles: what a server needs to answer requests, in a safe format.

A bundle is a directory (local or any storage URI) holding

* ``model.safetensors`` — the fp32 weights (safetensors: tensors only, nothing is unpickled);
* ``bundle.json`` (format ``lepton_ray.bundle/2``) — the name, the model config, the
  ``model_io`` as in the checkpoint (the input and target schema: names, dtypes, per-row
  shapes; the loss, the metrics, the task), the class names, the chosen form
  (``fp32 | bf16 | int8 | compile``) and the SHA-256 of the weights file;
* ``optimize_report.json`` — the optimizer's measurements (when written by :func:`optimize`).

The form is re-applied when the bundle is loaded (quantizing or compiling the fp32
weights is deterministic and fast), so the weights file is always plain fp32 tensors.

Writing is atomic: ``bundle.json`` is written last, in one atomic write (a rename on a
local disk, one PUT on object storage, :func:`~lepton_ray.storage.atomic_write`), after
the old one is removed; a bundle without it does not exist, and it names the SHA-256 of
the weights it goes with.

A checkpoint URI (``.../checkpoints/step_00000660``, or the checkpoint root for the
newest one) can be used wherever a bundle is expected: it loads as an fp32 bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lepton_ray.config import ModelConfig, load_config
from lepton_ray.data.schema import LEGACY_INPUT, Column, Schema
from lepton_ray.storage import atomic_write, filesystem, join
from lepton_ray.train.checkpoint import MANIFEST, CheckpointError, model_state, open_checkpoint

__all__ = ["Bundle", "BundleError", "check_name", "load_bundle", "load_checkpoint", "write_bundle", "BUNDLE_FILE", "WEIGHTS_FILE"]

BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "optimize_report.json"
FORMAT = "lepton_ray.bundle/2"
_STEP = re.compile(r"^(.*)/step_(\d{8})/?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BundleError(RuntimeError):
    """A bundle or checkpoint is missing, incomplete or does not match its metadata."""


def check_name(name: str, option: str) -> str:
    """A model name is part of the v2 URLs (``/v2/models/<name>``): letters, digits, ``_ . -``.

    >>> check_name("digits-v2", "--name")
    'digits-v2'
    >>> check_name("a/b", "--name")
    Traceback (most recent call last):
    ...
    lepton_ray.serve.bundle.BundleError: --name: 'a/b' is not a model name: use letters, digits, '_', '.' and '-' (it is part of the URL /v2/models/<name>)
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise BundleError(f"{option}: {name!r} is not a model name: use letters, digits, '_', '.' and '-' "
                          f"(it is part of the URL /v2/models/<name>)")
    return name


@dataclass
class Bundle:
    """A model ready to serve: fp32 weights plus what is needed to rebuild and call it.

    >>> from lepton_ray.data.schema import Column, Schema
    >>> s = Schema(inputs=(Column("x", ("a", "b", "c"), "float32", (3,)),), targets=(Column("y", ("y",), "int64", (), 2),))
    >>> b = Bundle(model={"name": "mlp", "hidden": [4]}, schema=s, state=None)
    >>> b.build_fp32()[0], b.num_outputs, b.labels, b.loss, b.metric_names
    (Linear(in_features=3, out_features=4, bias=True), 2, [0, 1], 'cross_entropy', ['accuracy', 'auc'])
    """

    model: dict[str, Any]
    """The ``model`` section of the training config."""
    schema: Schema
    """The model's inputs (names, dtypes, per-row shapes; the flat ``data.features`` form is the input ``x``)
    and targets, as in training."""
    state: Optional[dict[str, torch.Tensor]]
    """fp32 state dict (None = freshly initialised, for tests and examples)."""
    task: str = "classification"
    loss: str = ""
    """The training loss (``model_io.loss``); empty = by task (cross_entropy / mse)."""
    metric_names: Optional[list[str]] = None
    """The eval metrics (``model_io.metrics``); None = the defaults for the loss and target."""
    labels: list[Any] = field(default_factory=list)
    """Class names by output index, for a scalar classification target (default 0..num_outputs-1)."""
    name: str = "model"
    """The model's name (the run's name): ``/v2/models/<name>``."""
    form: str = "fp32"
    """The optimized form the server runs."""
    source: str = ""
    """Where the weights came from (a checkpoint URI)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Measured metrics (the checkpoint's, plus the optimizer's)."""

    def __post_init__(self) -> None:
        from types import SimpleNamespace

        from lepton_ray.train.losses import default_loss, default_metrics

        self.loss = self.loss or default_loss(self.task)
        if self.metric_names is None:
            self.metric_names = default_metrics(SimpleNamespace(metrics=None, loss=self.loss, task=self.task), self.schema)
        check_name(self.name, "name")
        target = self.schema.target
        classifier = self.task == "classification" and target is not None and target.shape == () and self.loss == "cross_entropy"
        if not classifier:
            self.labels = []
            return
        if not self.labels and target.num_classes:
            self.labels = list(range(target.num_classes))
        if self.labels and len(self.labels) != self.num_outputs:
            raise BundleError(f"labels: {len(self.labels)} class names for {self.num_outputs} classes")
        if not (all(isinstance(v, int) and not isinstance(v, bool) for v in self.labels)
                or all(isinstance(v, str) for v in self.labels)):
            raise BundleError(f"labels: class names must be all integers or all strings, got {self.labels[:5]}")

    @property
    def num_outputs(self) -> int:
        """Classes of a classification target, else values per row of the target (1 without one)."""
        from lepton_ray.models import flat_io

        return flat_io(self.schema)[1]

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(**self.model)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"the bundle's model section is not valid here: {exc}") from None

    def build_fp32(self) -> nn.Module:
        """The fp32 model with the bundle's weights, in eval mode."""
        from lepton_ray.models import build_model

        net = build_model(self.model_config(), self.schema)
        if self.state is not None:
            net.load_state_dict(self.state)
        return net.eval()

    def model_io(self) -> dict[str, Any]:
        """The checkpoint's ``model_io`` form: schema, loss, metrics, task."""
        return {"schema": self.schema.to_dict(), "loss": self.loss, "metrics": list(self.metric_names or []), "task": self.task}

    def metadata(self) -> dict[str, Any]:
        """The JSON-able description written as ``bundle.json`` (without the weights checksum)."""
        return {"format": FORMAT, "name": self.name, "form": self.form, "model": self.model, "model_io": self.model_io(),
                "labels": self.labels, "source": self.source, "metrics": self.metrics}


def _from_model_io(io: dict[str, Any], **kwargs: Any) -> Bundle:
    return Bundle(schema=Schema.from_dict(io["schema"]), task=io.get("task", "classification"), loss=io.get("loss") or "",
                  metric_names=io.get("metrics"), **kwargs)


def _legacy_model_io(io: dict[str, Any], task: str) -> dict[str, Any]:
    """The ``model_io`` of a checkpoint written before typed schemas (input_dim / num_outputs / features / label)
    as the flat schema it stood for: one float32 input ``x`` over the features, one scalar target."""
    n, label = int(io["num_outputs"]), io.get("label", "label")
    x = Column(LEGACY_INPUT, tuple(io["features"]), "float32", (int(io["input_dim"]),))
    if task == "classification":
        y = Column(label, (label,), "int64", (), n)
    else:
        y = Column(label, (label,), "float32", () if n == 1 else (n,))
    classify = task == "classification"
    return {"schema": Schema((x,), (y,)).to_dict(), "loss": "cross_entropy" if classify else "mse",
            "metrics": ["accuracy"] if classify else ["mse"], "task": task}


def load_checkpoint(uri: str, storage_options: Optional[dict] = None) -> Bundle:
    """Load a committed lepton_ray checkpoint (verified against its manifest) as an fp32 :class:`Bundle`.

    ``uri`` is one checkpoint (``.../step_00000660``) or a checkpoint root (its newest one).

    >>> load_checkpoint("/nonexistent/step_00000001")
    Traceback (most recent call last):
    ...
    lepton_ray.serve.bundle.BundleError: no committed checkpoint at '/nonexistent/step_00000001' (MANIFEST.json is missing)
    """
    try:
        reader = open_checkpoint(uri, storage_options)
        state = model_state(reader)  # whole, or consolidated here from every rank's shards
    except CheckpointError as exc:
        raise BundleError(str(exc)) from None
    ckpt = reader.checkpoint
    meta = ckpt.meta
    io = meta.get("model_io")
    if not io or "config" not in meta:
        raise BundleError(f"checkpoint '{ckpt.uri}' has no model_io/config metadata; it was not written by lepton_ray train")
    cfg = load_config(meta["config"])
    if "schema" not in io:
        if "input_dim" not in io:
            raise BundleError(f"checkpoint '{ckpt.uri}': model_io has no schema (keys: {', '.join(io)})")
        io = _legacy_model_io(io, io.get("task", cfg.model.task))
    return _from_model_io(io, model=_asdict(cfg.model), state={k: v.float().contiguous() for k, v in state.items()},
                          name=cfg.run.name, source=ckpt.uri, metrics=dict(meta.get("metrics") or {}))


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
    fs.makedirs(path, exist_ok=True)
    if fs.exists(f"{path}/{BUNDLE_FILE}"):
        if not overwrite:
            raise BundleError(f"'{uri}' already exists")
        fs.rm_file(f"{path}/{BUNDLE_FILE}")  # un-commit the old bundle before touching its files
    for fname, data in files.items():  # bundle.json last: its one atomic write commits the bundle
        atomic_write(fs, f"{path}/{fname}", data)
    return uri


def load_bundle(uri: str, storage_options: Optional[dict] = None) -> Bundle:
    """Load a bundle written by :func:`write_bundle`, or a checkpoint (as an fp32 bundle).

    The weights are checked against the SHA-256 in ``bundle.json`` and read with safetensors.
    """
    fs, path = filesystem(uri, storage_options)
    try:
        meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/{BUNDLE_FILE}"))
    except FileNotFoundError:
        if fs.exists(f"{path.rstrip('/')}/{MANIFEST}") or _STEP.match(uri.rstrip("/")) is not None or fs.isdir(path):
            return load_checkpoint(uri, storage_options)
        raise BundleError(f"'{uri}' is neither a serving bundle ({BUNDLE_FILE}) nor a lepton_ray checkpoint ({MANIFEST})") from None
    fmt = meta.get("format")
    if fmt == "lepton_ray.bundle/1":
        src = meta.get("source") or "<its checkpoint>"
        raise BundleError(f"'{join(uri, BUNDLE_FILE)}' is a {fmt} bundle (flat features, from before typed input schemas); "
                          f"this lepton_ray reads {FORMAT}: re-export it with 'lepton-ray optimize {src} --eval <held-out data> "
                          f"-o {uri}'")
    if fmt != FORMAT:
        raise BundleError(f"'{join(uri, BUNDLE_FILE)}' has format {fmt!r}, expected {FORMAT!r}")
    data = fs.cat_file(f"{path.rstrip('/')}/{meta['weights']['file']}")
    if hashlib.sha256(data).hexdigest() != meta["weights"]["sha256"]:
        raise BundleError(f"'{join(uri, meta['weights']['file'])}' does not match the SHA-256 in {BUNDLE_FILE}")
    return _from_model_io(meta["model_io"], model=meta["model"], state=st_load(data), labels=list(meta.get("labels") or []),
                          name=meta.get("name") or "model", form=meta["form"], source=meta.get("source", ""),
                          metrics=meta.get("metrics", {}))
