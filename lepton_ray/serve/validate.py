"""Request validation for ``POST /predict``: body bytes -> float32 rows, or a 400 that says why.

The contract is TF-Serving / KServe v1: ``{"instances": [[...], ...]}`` (one list of
``input_dim`` numbers per row) or ``{"instances": [{"px0": 0.1, ...}, ...]}`` (one
object per row keyed by feature name). Anything else is a :class:`BadRequest` whose
message names what was wrong and where.

>>> parse_instances(b'{"instances": [[1, 2]]}', features=["a", "b"], dim=2, max_instances=8).tolist()
[[1.0, 2.0]]
>>> parse_instances(b'{"instances": [[1]]}', features=["a", "b"], dim=2, max_instances=8)
Traceback (most recent call last):
...
lepton_ray.serve.validate.BadRequest: instances[0]: expected 2 feature values, got 1
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

__all__ = ["BadRequest", "parse_instances"]

_F32_MAX = float(np.finfo(np.float32).max)


class BadRequest(ValueError):
    """A client mistake: answered with ``status`` (400 unless said otherwise) and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _no_constants(name: str) -> Any:
    raise BadRequest(f"malformed JSON: {name} is not allowed; every feature value must be a finite number")


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{where}: expected a number, got {_show(v)}")
    if isinstance(v, int) and abs(v) > _F32_MAX:
        raise BadRequest(f"{where}: {_show(v)} is out of the float32 range")
    return float(v)


def _slow_rows(instances: list, features: Sequence[str], dim: int) -> np.ndarray:
    """Row-by-row conversion that names the first bad value (used when the fast path fails)."""
    by_name = len(features) == dim
    rows = np.empty((len(instances), dim), dtype=np.float32)
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(inst, list):
            if len(inst) != dim:
                raise BadRequest(f"{where}: expected {dim} feature values, got {len(inst)}")
            rows[i] = [_number(v, f"{where}[{j}]") for j, v in enumerate(inst)]
        elif isinstance(inst, dict):
            if not by_name:
                raise BadRequest(f"{where}: this model reads {dim} values from {len(features)} column(s); "
                                 f"send each instance as a list of {dim} numbers")
            unknown = [k for k in inst if k not in features]
            if unknown:
                shown = ", ".join(features[:8]) + (", ..." if len(features) > 8 else "")
                raise BadRequest(f"{where}: unknown feature {_show(unknown[0])} (features: {shown})")
            missing = [f for f in features if f not in inst]
            if missing:
                raise BadRequest(f"{where}: missing feature {_show(missing[0])}")
            rows[i] = [_number(inst[f], f"{where}.{f}") for f in features]
        else:
            raise BadRequest(f"{where}: expected a list of {dim} numbers or an object keyed by feature name, "
                             f"got {_show(inst)}")
    return rows


def parse_instances(body: bytes, *, features: Sequence[str], dim: int, max_instances: int) -> np.ndarray:
    """Validate a ``/predict`` body; return the rows as float32 ``[N, dim]`` or raise :class:`BadRequest`."""
    try:
        payload = json.loads(body, parse_constant=_no_constants)
    except BadRequest:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f'the body must be a JSON object like {{"instances": [[...], ...]}}, got {type(payload).__name__}'
                         .replace("NoneType", "null"))
    if "instances" not in payload:
        keys = ", ".join(map(_show, list(payload)[:5])) or "none"
        raise BadRequest(f'missing "instances": the body must be {{"instances": [[...], ...]}} (keys found: {keys})')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f'"instances" must be a list of rows, got {_show(instances)}')
    if not instances:
        raise BadRequest('"instances" is empty: send at least one row')
    if len(instances) > max_instances:
        raise BadRequest(f"too many instances: {len(instances)} > {max_instances} per request; split the request")
    x = None
    if b"true" not in body and b"false" not in body:  # fast path; booleans would pass np.array as 1/0
        try:
            arr = np.array(instances)
            if arr.ndim == 2 and arr.shape[1] == dim and arr.dtype.kind in "iuf":
                with np.errstate(over="ignore"):  # out-of-range values become inf, reported below
                    x = arr.astype(np.float32)
        except (ValueError, TypeError, OverflowError):
            x = None
    if x is None:
        x = _slow_rows(instances, features, dim)
    finite = np.isfinite(x)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise BadRequest(f"instances[{i}][{j}]: value is not finite in float32 (NaN, inf or beyond ±{_F32_MAX:.3g})")
    return x
