"""Request validation for ``POST /predict``: body bytes -> typed input arrays, or a 400 that says why.

The contract is TF-Serving / KServe v1: ``{"instances": [...]}``, one instance per row.
An instance follows the model's input schema (:class:`TensorSpec`: name, dtype, per-row shape):

* one input: the value itself, nested lists of the input's shape (``[64]``: a list of 64 numbers;
  ``[1, 8, 8]``: ``[[[...8], ...8]]``; ``[]``: a bare number), or ``{"<input name>": value}``;
* several inputs: ``{"<input name>": value, ...}`` with every input;
* the flat input ``x`` (``data.features``) also takes ``{"<feature column>": number, ...}``;
* a variable-length token input (a language model's prompt): a list of at least one integer,
  any length; prompts longer than the model's context keep their last ``max_len`` tokens.

Values are checked against the dtype: numbers (not booleans) for float inputs, finite in the
dtype; integers (not ``2.0``) in the dtype's range for integer inputs (0..255 for uint8);
``true``/``false`` for bool inputs. Anything else is a :class:`BadRequest` whose message names
the instance (and value) index, the expected dtype and shape, and what came.

Flat float rows (``[[0.1, ...], ...]`` for a ``float32 [D]`` input) take a fast path:
one ``np.array`` call instead of a Python loop per value (``benchmarks/serve.py`` measures it).

>>> x = TensorSpec("x", "float32", (2,), features=("a", "b"))
>>> parse_instances(b'{"instances": [[1, 2], {"b": 4, "a": 3}]}', [x], max_instances=8).parts[0].inputs["x"].tolist()
[[1.0, 2.0], [3.0, 4.0]]
>>> parse_instances(b'{"instances": [[1]]}', [x], max_instances=8)
Traceback (most recent call last):
...
lepton_ray.serve.validate.BadRequest: instances[0]: expected float32 [2], got a list of shape [1]
"""

from __future__ import annotations

import functools
import json
import math
from itertools import chain
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["BadRequest", "OutputSpec", "Part", "Request", "TensorSpec", "loads", "parse_instances", "MAX_NEW_TOKENS", "int_range"]

MAX_NEW_TOKENS = 512
"""Most tokens one generation request may ask for (``max_new_tokens``)."""


class BadRequest(ValueError):
    """A client mistake: answered with ``status`` (400 unless said otherwise) and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One model input as the server accepts it: ``[N, *shape]`` of ``dtype`` (a numpy dtype name).

    ``features``: the flat input's feature columns (instances may be keyed by them).
    ``max_len`` > 0: a variable-length token sequence (``shape == (max_len,)``): any length >= 1,
    longer ones keep their last ``max_len`` values.
    ``high`` > 0: integer values must be below it (a token id below the vocabulary size); 0: the dtype's range.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] = ()
    max_len: int = 0
    high: int = 0

    def text(self, dtype: Optional[str] = None) -> str:
        """``float32 [64]``, ``int64 scalar``, ``uint8 [L]`` (a token prompt); ``dtype`` replaces the numpy spelling."""
        dt = dtype or self.dtype
        if self.max_len:
            return f"{dt} [L]"
        return f"{dt} [{', '.join(map(str, self.shape))}]" if self.shape else f"{dt} scalar"


@dataclass(frozen=True)
class OutputSpec:
    """One model output: ``[N, *shape]`` of ``dtype`` (-1 in ``shape``: known per request).

    ``generated``: produced by generation (needs ``max_new_tokens``), not by one forward pass.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    generated: bool = False


@dataclass(frozen=True)
class Part:
    """Rows of a request that go through the model together (same per-row shapes).

    ``rows``: their positions in the request (``None``: every row, in order).
    """

    rows: Optional[np.ndarray]
    inputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class Request:
    """A validated request: ``n`` rows in one or more :class:`Part` (one per prompt length), plus options."""

    n: int
    parts: tuple[Part, ...]
    max_new_tokens: int = 0

    def merge(self, results: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The parts' outputs (``results[i]`` for ``parts[i]``) put back in request order.

        >>> r = Request(3, (Part(np.array([0, 2]), {}), Part(np.array([1]), {})))
        >>> r.merge([{"y": np.array([10, 12])}, {"y": np.array([11])}])["y"].tolist()
        [10, 11, 12]
        """
        if len(self.parts) == 1 and self.parts[0].rows is None:
            return dict(results[0])
        out: dict[str, np.ndarray] = {}
        for name, first in results[0].items():
            arr = np.empty((self.n, *first.shape[1:]), dtype=first.dtype)
            for part, res in zip(self.parts, results):
                arr[part.rows] = res[name]
            out[name] = arr
        return out


# --------------------------------------------------------------------------- shared pieces (also used by v2)


def _no_constants(name: str) -> Any:
    raise BadRequest(f"malformed JSON: {name} is not allowed; every value must be a finite number")


def loads(body: bytes) -> Any:
    """``json.loads`` whose failures are :class:`BadRequest` (NaN / Infinity included)."""
    try:
        return json.loads(body, parse_constant=_no_constants)
    except BadRequest:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"malformed JSON: {exc}") from None


def show(v: Any) -> str:
    """A JSON value as the client wrote it, cut to 40 characters."""
    text = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def shape_of(v: Any) -> Optional[tuple[int, ...]]:
    """The shape of nested lists (``()`` for a non-list; ``None`` when ragged).

    >>> shape_of([[1, 2], [3, 4]]), shape_of(3), shape_of([[1], 2])
    ((2, 2), (), None)
    """
    if not isinstance(v, list):
        return ()
    if not v:
        return (0,)
    first = shape_of(v[0])
    if first is None:
        return None
    for e in v[1:]:
        if shape_of(e) != first:
            return None
    return (len(v), *first)


def what(v: Any, shape: Optional[tuple[int, ...]] = None) -> str:
    """What came, for a message: ``a list of shape [8, 8]``, ``a ragged nested list``, ``"x"``."""
    shape = shape_of(v) if shape is None and isinstance(v, list) else shape
    if not isinstance(v, list):
        return show(v)
    if shape is None:
        return "a ragged nested list (rows of different lengths)"
    if shape == (0,):
        return "an empty list"
    if len(shape) > 8:
        return f"a list nested {len(shape)} deep"
    return f"a list of shape [{', '.join(map(str, shape))}]"


def int_range(dtype: str, high: int = 0) -> tuple[int, int]:
    """The smallest and largest value an integer input takes."""
    info = np.iinfo(dtype)
    return int(info.min), int(min(info.max, high - 1) if high > 0 else info.max)


def _expected(dtype: str, dt: str, high: int) -> str:
    kind = np.dtype(dtype).kind
    if kind == "b":
        return f"true or false ({dt})"
    if kind in "iu":
        lo, hi = int_range(dtype, high)
        return f"an integer in {lo}..{hi} ({dt})"
    return f"a number ({dt})"


def _leaf_ok(v: Any, kind: str, bounds: tuple[int, int]) -> bool:
    if kind == "b":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    if kind in "iu":
        return isinstance(v, int) and bounds[0] <= v <= bounds[1]
    return isinstance(v, (int, float))


def _float(v: Any) -> float:
    try:
        return float(v)
    except OverflowError:  # an integer beyond any float: reported as not finite
        return math.inf


def convert(values: Any, dtype: str, where: Callable[[int], str], dt: str, *, high: int = 0, context: str = "",
            may_have_bools: bool = True) -> np.ndarray:
    """A flat list of JSON leaves as a 1-D array of ``dtype``, checked value by value.

    ``where(i)`` names value ``i`` in a message; ``dt`` is the dtype as the protocol spells it
    (``context``, when given, replaces it in the parenthesis of a wrong value's message);
    ``high`` bounds integers (see :class:`TensorSpec`). ``may_have_bools=False`` (the body has no
    ``true``/``false``) lets numbers skip the per-value check.
    """
    kind = np.dtype(dtype).kind
    bounds = int_range(dtype, high) if kind in "iu" else (0, 0)
    arr: Optional[np.ndarray] = None
    try:
        a = np.asarray(values)
        if a.ndim == 1 and (kind == "b" and a.dtype.kind == "b"
                            or kind in "iu" and a.dtype.kind in "iu" and not may_have_bools
                            or kind in "fc" and a.dtype.kind in "iuf" and not may_have_bools):
            if kind in "iu" and a.size and not (bounds[0] <= a.min() and a.max() <= bounds[1]):
                raise OverflowError
            arr = a
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is None:  # the slow path names the first bad value
        for i, v in enumerate(values):
            if not _leaf_ok(v, kind, bounds):
                raise BadRequest(f"{where(i)}: expected {_expected(dtype, context or dt, high)}, got {show(v)}")
        if kind in "fc":
            arr = np.array([_float(v) for v in values], dtype=np.float64)
        else:
            arr = np.asarray(values, dtype=object if kind in "iu" else None)
    if kind == "f":
        with np.errstate(over="ignore"):  # out-of-range values become inf, reported below
            out = arr.astype(dtype)
        finite = np.isfinite(out)
        if not finite.all():
            i = int(np.argmin(finite))
            raise BadRequest(f"{where(i)}: value is not finite in {dt} (NaN, inf or beyond ±{float(np.finfo(dtype).max):.3g})")
        return out
    return arr.astype(dtype)


def flatten(v: list, depth: int) -> list:
    """Nested lists ``depth`` deep (checked regular) as one flat list, row-major."""
    for _ in range(depth - 1):
        v = list(chain.from_iterable(v))
    return v


def index_path(flat: int, shape: tuple[int, ...]) -> str:
    """``[i][j]`` of element ``flat`` of a row-major array of ``shape``."""
    return "".join(f"[{i}]" for i in np.unravel_index(flat, shape)) if shape else ""


# --------------------------------------------------------------------------- /predict


def _context(spec: TensorSpec) -> str:
    return f"input {spec.name}: {spec.text()}"


def _value(v: Any, spec: TensorSpec, where: str, may_have_bools: bool) -> np.ndarray:
    """One input of one instance as an array of ``spec.shape`` (or ``[L]`` for a token input)."""
    if spec.max_len:
        if not isinstance(v, list) or not v or shape_of(v) != (len(v),):
            raise BadRequest(f"{where}: expected {spec.text()} token ids (L >= 1), got {what(v)}")
        return convert(v, spec.dtype, lambda i: f"{where}[{i}]", spec.dtype, high=spec.high, context=_context(spec),
                       may_have_bools=may_have_bools)[-spec.max_len:]
    got = shape_of(v)
    if got != spec.shape:
        raise BadRequest(f"{where}: expected {spec.text()}, got {what(v, got)}")
    flat = flatten(v, len(spec.shape)) if spec.shape else [v]
    arr = convert(flat, spec.dtype, lambda i: f"{where}{index_path(i, spec.shape)}", spec.dtype, high=spec.high,
                  context=_context(spec), may_have_bools=may_have_bools)
    return arr.reshape(spec.shape)


def _by_feature(inst: dict, spec: TensorSpec, where: str) -> np.ndarray:
    features = spec.features
    if len(features) != math.prod(spec.shape):
        raise BadRequest(f"{where}: this model reads {math.prod(spec.shape)} values from {len(features)} column(s); "
                         f"send each instance as {spec.text()} (a list of {math.prod(spec.shape)} numbers)")
    known = set(features)
    unknown = [k for k in inst if k not in known]
    if unknown:
        shown = ", ".join(features[:8]) + (", ..." if len(features) > 8 else "")
        raise BadRequest(f"{where}: unknown feature {show(unknown[0])} (features: {shown})")
    missing = [f for f in features if f not in inst]
    if missing:
        raise BadRequest(f"{where}: missing feature {show(missing[0])}")
    values = [inst[f] for f in features]
    return convert(values, spec.dtype, lambda i: f"{where}.{features[i]}", spec.dtype, context=_context(spec))


def _inputs_text(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f'"{s.name}" ({s.text()})' for s in specs)


def _instance(inst: Any, specs: Sequence[TensorSpec], where: str, may_have_bools: bool) -> list[np.ndarray]:
    """One instance as one array per input (slow path: checks everything, names the first problem)."""
    if len(specs) == 1:
        spec = specs[0]
        if isinstance(inst, dict):
            if spec.features and not (list(inst) == [spec.name] and spec.name not in spec.features):
                return [_by_feature(inst, spec, where).reshape(spec.shape)]
            if list(inst) != [spec.name]:
                extra = [k for k in inst if k != spec.name]
                if extra:
                    raise BadRequest(f"{where}: unknown input {show(extra[0])} (the model's input: {_inputs_text(specs)})")
                raise BadRequest(f"{where}: missing input {show(spec.name)} ({spec.text()})")
            return [_value(inst[spec.name], spec, f"{where}.{spec.name}", may_have_bools)]
        return [_value(inst, spec, where, may_have_bools)]
    if not isinstance(inst, dict):
        raise BadRequest(f"{where}: expected an object with the inputs {_inputs_text(specs)}, got {what(inst)}")
    names = {s.name for s in specs}
    unknown = [k for k in inst if k not in names]
    if unknown:
        raise BadRequest(f"{where}: unknown input {show(unknown[0])} (the model's inputs: {_inputs_text(specs)})")
    for s in specs:
        if s.name not in inst:
            raise BadRequest(f"{where}: missing input {show(s.name)} ({s.text()})")
    return [_value(inst[s.name], s, f"{where}.{s.name}", may_have_bools) for s in specs]


def _fast(instances: list, spec: TensorSpec, may_have_bools: bool) -> Optional[np.ndarray]:
    """All instances as one array ``[N, *shape]`` when they are plain nested lists of valid values, else None."""
    try:
        arr = np.array(instances)
    except (ValueError, TypeError, OverflowError):
        return None
    shape_ok = (arr.ndim == 2 and arr.shape[1] >= 1) if spec.max_len else arr.shape[1:] == spec.shape
    if not shape_ok or arr.ndim == 0:
        return None
    kind = np.dtype(spec.dtype).kind
    if kind == "b":
        return arr if arr.dtype.kind == "b" else None
    if may_have_bools or arr.dtype.kind not in ("iu" if kind in "iu" else "iuf"):
        return None
    if kind in "iu":
        lo, hi = int_range(spec.dtype, spec.high)
        if arr.size and not (lo <= arr.min() and arr.max() <= hi):
            return None
        out = arr.astype(spec.dtype)
    else:
        with np.errstate(over="ignore"):
            out = arr.astype(spec.dtype)
        if not np.isfinite(out).all():
            return None  # the slow path names the value
    return out[:, -spec.max_len:] if spec.max_len else out


def _parts(n: int, specs: Sequence[TensorSpec], columns: list[list[np.ndarray]]) -> tuple[Part, ...]:
    """Stack per-row arrays into parts: one part, or one per token-prompt length."""
    var = [i for i, s in enumerate(specs) if s.max_len]
    if not var:
        return (Part(None, {s.name: np.stack(col) for s, col in zip(specs, columns)}),)
    lengths = np.array([tuple(len(columns[i][r]) for i in var) for r in range(n)]).reshape(n, -1)
    keys, inverse = np.unique(lengths, axis=0, return_inverse=True)
    if len(keys) == 1:
        return (Part(None, {s.name: np.stack(col) for s, col in zip(specs, columns)}),)
    parts = []
    for k in range(len(keys)):
        rows = np.flatnonzero(inverse.reshape(-1) == k)
        parts.append(Part(rows, {s.name: np.stack([col[r] for r in rows]) for s, col in zip(specs, columns)}))
    return tuple(parts)


def max_new_tokens_of(value: Any, where: str, generates: bool) -> int:
    """A request's ``max_new_tokens`` (0 when absent), checked."""
    if value is None:
        return 0
    if not generates:
        raise BadRequest(f"{where}: this model does not generate tokens (only a language model does)")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise BadRequest(f"{where}: expected an integer in 1..{MAX_NEW_TOKENS}, got {show(value)}")
    return value


def too_deep(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Nesting deep enough to exhaust the stack while checking it is a client mistake too (a 400)."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RecursionError:
            raise BadRequest("the body's lists are nested too deep") from None

    return checked


@too_deep
def parse_instances(body: bytes, inputs: Sequence[TensorSpec], *, max_instances: int, generates: bool = False) -> Request:
    """Validate a ``/predict`` body against the model's ``inputs``; raise :class:`BadRequest` when it is wrong.

    ``generates``: the model can continue a prompt (the body may carry ``"max_new_tokens": n``).
    """
    payload = loads(body)
    if not isinstance(payload, dict):
        raise BadRequest(f'the body must be a JSON object like {{"instances": [[...], ...]}}, got {type(payload).__name__}'
                         .replace("NoneType", "null"))
    if "instances" not in payload:
        keys = ", ".join(map(show, list(payload)[:5])) or "none"
        raise BadRequest(f'missing "instances": the body must be {{"instances": [[...], ...]}} (keys found: {keys})')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f'"instances" must be a list of rows, got {show(instances)}')
    if not instances:
        raise BadRequest('"instances" is empty: send at least one row')
    if len(instances) > max_instances:
        raise BadRequest(f"too many instances: {len(instances)} > {max_instances} per request; split the request")
    new_tokens = max_new_tokens_of(payload.get("max_new_tokens"), '"max_new_tokens"', generates)
    n = len(instances)
    may_have_bools = b"true" in body or b"false" in body  # np.array would read booleans as 1/0
    if len(inputs) == 1 and not isinstance(instances[0], dict):
        arr = _fast(instances, inputs[0], may_have_bools)
        if arr is not None:
            return Request(n, (Part(None, {inputs[0].name: arr}),), new_tokens)
    columns: list[list[np.ndarray]] = [[] for _ in inputs]
    for i, inst in enumerate(instances):
        for col, arr in zip(columns, _instance(inst, inputs, f"instances[{i}]", may_have_bools)):
            col.append(arr)
    return Request(n, _parts(n, inputs, columns), new_tokens)
