"""The Open Inference Protocol (KServe v2) over REST: metadata, request parsing and response encoding.

Pure functions: the Serve app routes to them; tests call them without Ray. The endpoints:

* ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (:func:`server_metadata`);
* ``GET /v2/models/<name>`` (:func:`model_metadata`), ``GET /v2/models/<name>/ready``,
  ``POST /v2/models/<name>/infer`` (:func:`parse_infer` -> model -> :func:`encode_response`);
  ``/v2/models/<name>/versions/1/...`` is the same model (its one version).

An infer request is ``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data"}],
"outputs"?: [{"name", "parameters"?}]}``. Every model input must be sent once, with the model's
datatype (metadata spelling: ``FP32``, ``INT64``, ``UINT8``, ``BOOL``...; no implicit conversion,
as in Triton) and shape ``[N, *per-row shape]`` (N rows, 1 <= N <= ``max_instances``; a token input
takes ``[N, L]``, any L >= 1, left-cropped to the model's context). ``data`` is the tensor flat in
row-major order or nested to exactly ``shape``; the binary tensor data extension (the
``Inference-Header-Content-Length`` header and ``parameters.binary_data_size``, what Triton's client
sends by default) is read too. ``parameters.max_new_tokens`` asks a language model for its greedy
``continuation``. Without ``outputs`` every output is returned (with ``max_new_tokens``: the
generated ones); an output is sent as binary data when its ``parameters.binary_data`` (or the
request's ``parameters.binary_data_output``) is true.

The response is ``{"model_name", "model_version": "1", "id"? (echoed), "outputs": [{"name", "shape",
"datatype", "data" (flat, row-major)}]}``. Client mistakes raise
:class:`~lepton_ray.serve.validate.BadRequest` (the app answers 400 ``{"error": "..."}``).

>>> from lepton_ray.serve.validate import OutputSpec, TensorSpec
>>> x, y = TensorSpec("x", "float32", (2,)), OutputSpec("logits", "float32", (3,))
>>> req = parse_infer(b'{"id": "7", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}',
...                   [x], [y], max_instances=8)
>>> req.inputs["x"].tolist(), req.outputs
([[1.0, 2.0]], (('logits', False),))
>>> json.loads(encode_response("m", req, {"logits": np.zeros((1, 3), np.float32)})[0])
{'model_name': 'm', 'model_version': '1', 'id': '7', 'outputs': [{'name': 'logits', 'datatype': 'FP32', 'shape': [1, 3], 'data': [0.0, 0.0, 0.0]}]}
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from lepton_ray.serve.validate import (BadRequest, OutputSpec, TensorSpec, convert, flatten, index_path, int_range, loads,
                                       max_new_tokens_of, shape_of, show, too_deep, what)

__all__ = ["DATATYPES", "InferRequest", "datatype", "encode_response", "model_metadata", "parse_infer", "server_metadata",
           "VERSION"]

VERSION = "1"
"""The one version of the served model."""

DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "int8": "INT8",
             "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
             "bytes": "BYTES"}
"""numpy dtype name -> the protocol's datatype."""


def datatype(dtype: str) -> str:
    """The protocol's spelling of a numpy dtype name (strings are ``BYTES``).

    >>> datatype("float32"), datatype("uint8"), datatype("<U5")
    ('FP32', 'UINT8', 'BYTES')
    """
    kind = np.dtype(dtype).kind if dtype != "bytes" else "S"
    return "BYTES" if kind in "OUS" else DATATYPES[np.dtype(dtype).name]


def _shape(spec: TensorSpec) -> list[int]:
    return [-1, *([-1] if spec.max_len else spec.shape)]


def _text(spec: TensorSpec) -> str:
    return f"{spec.name}: {datatype(spec.dtype)} [{', '.join(map(str, _shape(spec)))}]"


def server_metadata() -> dict[str, Any]:
    """``GET /v2``."""
    from lepton_ray import __version__

    return {"name": "lepton_ray", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[OutputSpec]) -> dict[str, Any]:
    """``GET /v2/models/<name>``: inputs and outputs with datatype and shape (-1: the batch, or any length).

    >>> model_metadata("m", [TensorSpec("tokens", "uint8", (64,), max_len=64)], [OutputSpec("logits", "float32", (256,))])
    {'name': 'm', 'versions': ['1'], 'platform': 'pytorch', 'inputs': [{'name': 'tokens', 'datatype': 'UINT8', 'shape': [-1, -1]}], 'outputs': [{'name': 'logits', 'datatype': 'FP32', 'shape': [-1, 256]}]}
    """
    return {"name": name, "versions": [VERSION], "platform": "pytorch",
            "inputs": [{"name": s.name, "datatype": datatype(s.dtype), "shape": _shape(s)} for s in inputs],
            "outputs": [{"name": o.name, "datatype": datatype(o.dtype), "shape": [-1, *o.shape]} for o in outputs]}


@dataclass(frozen=True)
class InferRequest:
    """A validated infer request: ``n`` rows of every input, the outputs to send (name, as binary?)."""

    id: Optional[str]
    inputs: dict[str, np.ndarray]
    n: int
    outputs: tuple[tuple[str, bool], ...]
    max_new_tokens: int = 0


def _object(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise BadRequest(f"{where} must be an object, got {show(v)}")
    return v


def _binary(t: dict, spec: TensorSpec, shape: list[int], size: Any, blob: memoryview, where: str) -> np.ndarray:
    if "data" in t:
        raise BadRequest(f'{where}: has both "data" and parameters.binary_data_size; send one')
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(f"{where}: parameters.binary_data_size must be a byte count, got {show(size)}")
    dtype = np.dtype(spec.dtype)
    want = math.prod(shape) * dtype.itemsize
    if size != want:
        raise BadRequest(f"{where}: binary_data_size {size} does not fit shape {shape} of {datatype(spec.dtype)} "
                         f"({want} bytes)")
    if len(blob) < size:
        raise BadRequest(f"{where}: binary_data_size {size}, but only {len(blob)} bytes of binary data are left")
    arr = np.frombuffer(blob[:size], dtype=dtype.newbyteorder("<")).astype(dtype)  # a copy: writable, native order
    if dtype.kind == "b" and np.frombuffer(blob[:size], dtype=np.uint8).max(initial=0) > 1:
        raise BadRequest(f"{where}: BOOL binary data must be bytes 0 or 1")
    if dtype.kind in "iu" and arr.size:
        lo, hi = int_range(spec.dtype, spec.high)
        bad = (arr < lo) | (arr > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise BadRequest(f"{where}: data{index_path(i, tuple(shape))}: expected an integer in {lo}..{hi} "
                             f"({datatype(spec.dtype)}), got {arr[i]}")
    if dtype.kind == "f" and not np.isfinite(arr).all():
        i = int(np.argmin(np.isfinite(arr)))
        raise BadRequest(f"{where}: data{index_path(i, tuple(shape))}: value is not finite ({datatype(spec.dtype)})")
    return arr


def _data(t: dict, spec: TensorSpec, shape: list[int], where: str, may_have_bools: bool) -> np.ndarray:
    data = t.get("data")
    if data is None:
        raise BadRequest(f'{where}: missing "data" (or binary data announced by parameters.binary_data_size)')
    if not isinstance(data, list):
        raise BadRequest(f'{where}: "data" must be a list (flat, row-major, or nested as "shape"), got {show(data)}')
    count = math.prod(shape)
    nested = bool(data) and isinstance(data[0], list)
    if nested:
        got = shape_of(data)
        if got != tuple(shape):
            raise BadRequest(f'{where}: "data" is {what(data, got)}, "shape" says {shape}')
        flat = flatten(data, len(shape))
    else:
        flat = data
        if len(flat) != count:
            raise BadRequest(f'{where}: shape {shape} holds {count} values, "data" has {len(flat)}')
    dt = datatype(spec.dtype)
    return convert(flat, spec.dtype, lambda i: f"{where}: data{index_path(i, tuple(shape)) if nested else f'[{i}]'}", dt,
                   high=spec.high, may_have_bools=may_have_bools)


@too_deep
def parse_infer(body: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[OutputSpec], *, max_instances: int,
                generates: bool = False, header_length: Optional[str] = None) -> InferRequest:
    """Validate a ``POST /v2/models/<name>/infer`` body against the model's ``inputs`` and ``outputs``.

    ``header_length``: the ``Inference-Header-Content-Length`` header (binary tensor data follows the JSON).
    ``generates``: the model can continue a prompt (``parameters.max_new_tokens``).
    """
    blob = memoryview(b"")
    if header_length is not None:
        try:
            h = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length: expected a byte count, got {show(header_length)}") from None
        if not 0 < h <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length: {h} is not within the body's {len(body)} bytes")
        blob = memoryview(body)[h:]
        body = body[:h]
    payload = loads(body)
    if not isinstance(payload, dict):
        raise BadRequest('the body must be a JSON object like {"inputs": [{"name", "shape", "datatype", "data"}]}, '
                         f"got {type(payload).__name__}".replace("NoneType", "null"))
    rid = payload.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f'"id" must be a string, got {show(rid)}')
    params = _object(payload.get("parameters"), '"parameters"')
    new_tokens = max_new_tokens_of(params.get("max_new_tokens"), '"parameters.max_new_tokens"', generates)
    raw = payload.get("inputs")
    if raw is None:
        keys = ", ".join(map(show, list(payload)[:5])) or "none"
        raise BadRequest(f'missing "inputs": the body must be {{"inputs": [{{"name", "shape", "datatype", "data"}}]}} '
                         f"(keys found: {keys})")
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f'"inputs" must be a non-empty list of tensors, got {show(raw)}')
    specs = {s.name: s for s in inputs}
    model_inputs = ", ".join(_text(s) for s in inputs)
    may_have_bools = b"true" in body or b"false" in body
    arrays: dict[str, np.ndarray] = {}
    first: Optional[tuple[str, int]] = None
    offset = 0
    for i, t in enumerate(raw):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise BadRequest(f'{where}: expected a tensor {{"name", "shape", "datatype", "data"}}, got {show(t)}')
        name = t.get("name")
        if name not in specs:
            got = f"unknown input {show(name)}" if isinstance(name, str) else f'"name" must be a string, got {show(name)}'
            raise BadRequest(f"{where}: {got} (the model's inputs: {model_inputs})")
        if name in arrays:
            raise BadRequest(f'{where}: input "{name}" appears twice')
        spec = specs[name]
        where = f'{where} "{name}"'
        dt = t.get("datatype")
        if dt != datatype(spec.dtype):
            raise BadRequest(f"{where}: datatype {show(dt)} does not match the model's input {_text(spec)}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            raise BadRequest(f'{where}: "shape" must be a list of non-negative integers, got {show(shape)}')
        fits = (len(shape) == 2 and shape[1] >= 1) if spec.max_len else shape[1:] == list(spec.shape)
        if not shape or not fits:
            raise BadRequest(f"{where}: shape {shape} does not match the model's input {_text(spec)}")
        rows = shape[0]
        if rows == 0:
            raise BadRequest(f"{where}: shape {shape} has no rows; send at least one")
        if rows > max_instances:
            raise BadRequest(f"too many instances: {rows} > {max_instances} per request; split the request")
        if first is not None and rows != first[1]:
            raise BadRequest(f'{where}: shape {shape} has {rows} rows, input "{first[0]}" has {first[1]}')
        tparams = _object(t.get("parameters"), f"{where}: parameters")
        size = tparams.get("binary_data_size")
        if size is not None:
            arr = _binary(t, spec, shape, size, blob[offset:], where)
            offset += size
        else:
            arr = _data(t, spec, shape, where, may_have_bools)
        arr = arr.reshape(shape)
        arrays[name] = arr[:, -spec.max_len:] if spec.max_len else arr
        first = first or (name, rows)
    missing = [s for s in inputs if s.name not in arrays]
    if missing:
        raise BadRequest(f'missing input "{missing[0].name}" (the model\'s inputs: {model_inputs})')
    if offset != len(blob):
        raise BadRequest(f"{len(blob) - offset} bytes of binary data after the last input's binary_data_size")
    assert first is not None
    return InferRequest(rid, arrays, first[1], _outputs(payload.get("outputs"), outputs, params, new_tokens), new_tokens)


def _outputs(raw: Any, outputs: Sequence[OutputSpec], params: dict, new_tokens: int) -> tuple[tuple[str, bool], ...]:
    default_binary = params.get("binary_data_output", False) is True
    if raw is None or raw == []:
        return tuple((o.name, default_binary) for o in outputs if o.generated == bool(new_tokens))
    if not isinstance(raw, list):
        raise BadRequest(f'"outputs" must be a list of {{"name"}} objects, got {show(raw)}')
    specs = {o.name: o for o in outputs}
    names = ", ".join(specs)
    chosen: dict[str, bool] = {}
    for j, o in enumerate(raw):
        where = f"outputs[{j}]"
        name = o.get("name") if isinstance(o, dict) else None
        if name not in specs:
            got = f"unknown output {show(name)}" if isinstance(name, str) else f'expected {{"name": ...}}, got {show(o)}'
            raise BadRequest(f"{where}: {got} (the model's outputs: {names})")
        if name in chosen:
            raise BadRequest(f'{where}: output "{name}" appears twice')
        if specs[name].generated and not new_tokens:
            raise BadRequest(f'{where}: "{name}" is generated: send "parameters": {{"max_new_tokens": n}} with the request')
        oparams = _object(o.get("parameters"), f"{where}: parameters")
        if oparams.get("class_count"):
            raise BadRequest(f'{where}: the classification extension (class_count) is not supported; '
                             f'ask for "probabilities" and take the top classes')
        binary = oparams.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise BadRequest(f"{where}: parameters.binary_data must be true or false, got {show(binary)}")
        chosen[name] = binary
    return tuple(chosen.items())


def _raw_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype.kind in "OUS":  # BYTES: each element as a 4-byte little-endian length, then its bytes
        parts = []
        for v in arr.ravel().tolist():
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def encode_response(model_name: str, request: InferRequest, values: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON then binary tensors when any output is binary."""
    outs, blobs = [], []
    for name, binary in request.outputs:
        arr = values[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype(arr.dtype.str), "shape": list(arr.shape)}
        if binary:
            raw = _raw_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            flat = arr.ravel().tolist()
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in flat] if arr.dtype.kind in "OS" else flat
        outs.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": VERSION}
    if request.id is not None:
        body["id"] = request.id
    body["outputs"] = outs
    text = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream", "inference-header-content-length": str(len(text))}
