"""``data.transform``: the user's function over each batch of rows read, before the stream cuts training batches.

A transform maps a dict of numpy arrays (the inputs and targets, ``[n, *shape]``) to the same keys, one row out
per row in (what exactly-once resume needs: the cursor counts rows), and may change dtypes and shapes. It must
treat rows independently: the rows it is given together depend on the engine and on resizes. A random one takes a
``seeds`` parameter and draws each row's randomness from its seed, a pure function of (train.seed, epoch, row id),
so a resumed or re-dealt epoch sees the same augmented rows. Both engines call it through :class:`Transform`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np

from lepton_ray.config import ConfigError
from lepton_ray.data.schema import Column, Schema

__all__ = ["Transform", "TransformError", "row_seeds"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_seeds(seed: int, epoch: int, row_ids: np.ndarray) -> np.ndarray:
    """One uint64 per row, a pure function of ``(seed, epoch, row id)``: ``np.random.default_rng(s)`` per row.

    >>> a = row_seeds(0, 1, np.arange(3)); b = row_seeds(0, 1, np.array([2, 0]))
    >>> bool(a[2] == b[0] and a[0] == b[1]), bool(a[0] != row_seeds(0, 2, np.arange(1))[0])
    (True, True)
    """
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & (2**64 - 1)) + _GOLDEN * np.uint64(epoch + 1))
        return _mix(key ^ (np.asarray(row_ids, dtype=np.uint64) * _GOLDEN + _GOLDEN))


class TransformError(RuntimeError):
    """A transform raised, or broke its contract (another row count, missing keys)."""


class Transform:
    """``fn`` (named ``name`` in errors) applied to a batch of rows with their ids, checked against its contract."""

    def __init__(self, fn: Callable[..., Any], name: str, seed: int):
        self.fn, self.name, self.seed = fn, name, seed
        try:
            self.takes_seeds = "seeds" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self.takes_seeds = False

    def __call__(self, batch: dict[str, np.ndarray], row_ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        n = len(row_ids)
        first = int(row_ids[0]) if n else None
        try:
            out = self.fn(batch, seeds=row_seeds(self.seed, epoch, row_ids)) if self.takes_seeds else self.fn(batch)
        except Exception as exc:
            raise TransformError(f"data.transform '{self.name}' raised on the batch of {n} rows starting at row id {first}"
                                 f" (epoch {epoch}): {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, dict):
            raise TransformError(f"data.transform '{self.name}' returned {type(out).__name__}; it must return a dict of arrays"
                                 f" with the keys it was given ({', '.join(batch)})")
        missing = [k for k in batch if k not in out]
        if missing:
            raise TransformError(f"data.transform '{self.name}' dropped {', '.join(missing)}; it must return every key it was given"
                                 f" ({', '.join(batch)})")
        result = {}
        for k in batch:
            v = np.asarray(out[k])
            if v.ndim == 0 or len(v) != n:
                raise TransformError(
                    f"data.transform '{self.name}' returned {len(v) if v.ndim else 'a scalar'} rows of '{k}' for {n} rows in (batch"
                    f" starting at row id {first}): a transform must map each row to one row (exactly-once resume counts rows);"
                    " filter or expand rows when preparing the data instead")
            result[k] = np.require(v, None, ["C", "W"])
        return result

    def on_sample(self, schema: Schema, sample: dict[str, np.ndarray]) -> tuple[Schema, dict[str, np.ndarray]]:
        """``sample`` (a few decoded rows of ``schema``) transformed, and ``schema`` as the model then sees it: each
        column's dtype and per-row shape after the transform. Run on the driver, so a broken transform fails before
        any worker starts."""
        try:
            out = self(sample, np.arange(len(next(iter(sample.values())))), epoch=0)
        except TransformError as exc:
            raise ConfigError(str(exc)) from None

        def after(c: Column) -> Column:
            v = out[c.name]
            dtype = str(v.dtype)
            if dtype not in ("float32", "float64", "float16", "int64", "int32", "uint8", "bool"):
                raise ConfigError(f"data.transform '{self.name}' made '{c.name}' {dtype}; use one of float32, float64, float16,"
                                  " int64, int32, uint8, bool")
            return replace(c, dtype=dtype, shape=tuple(int(d) for d in v.shape[1:]))

        return Schema(inputs=tuple(after(c) for c in schema.inputs), targets=tuple(after(c) for c in schema.targets)), out


def load_transform(cfg: Any, seed: int) -> Optional[Transform]:
    """The transform ``cfg`` (a :class:`~lepton_ray.config.DataConfig`) names, with its kwargs (None: none)."""
    if cfg.transform is None:
        return None
    from lepton_ray.imports import import_object

    fn = import_object(cfg.transform, "data.transform")
    if not callable(fn):
        raise ConfigError(f"data.transform: '{cfg.transform}' is {type(fn).__name__}, not a function")
    return Transform(functools.partial(fn, **cfg.transform_kwargs) if cfg.transform_kwargs else fn, cfg.transform, seed)
