"""Typed columns: what a batch holds (names, dtypes, per-row shapes), decided once from the Parquet schema.

A batch is a ``dict`` of tensors, one per input and per target, each ``[B, *shape]`` of the column's own
dtype: int64 ids stay int64 (exact up to 2**63), uint8 pixels stay uint8 until the model converts them,
a fixed-size list of ``n`` values is ``[B, n]`` (or ``[B, *shape]`` with a ``shape`` in the config), and
Arrow's fixed-shape tensor type keeps its shape. The legacy ``data.features`` form (numeric scalar and
fixed-size list columns concatenated into one float32 vector) is one input named ``x``.

>>> import pyarrow as pa
>>> t = pa.table({"ids": pa.array([[1, 2**40]], pa.list_(pa.int64(), 2)), "y": pa.array([1], pa.int64())})
>>> s = Schema.from_arrow(t.schema, inputs={"ids": "ids"}, targets={"y": "y"}, key="data.train", uri="t")
>>> s.inputs[0]
Column(name='ids', columns=('ids',), dtype='int64', shape=(2,), num_classes=None)
>>> decode(s, t)["ids"].tolist()
[[1, 1099511627776]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from lepton_ray.config import ConfigError

__all__ = ["CAST_DTYPES", "Column", "Schema", "check_config", "column_text", "decode", "field_info", "resolve_columns", "LEGACY_INPUT"]

LEGACY_INPUT = "x"
"""The name of the one input built from ``data.features`` (the columns concatenated as float32)."""

_DTYPES = {  # Arrow scalar type -> the numpy/torch dtype a batch holds
    pa.bool_(): "bool", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.uint8(): "uint8", pa.uint16(): "int32", pa.uint32(): "int64", pa.uint64(): "int64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
}
CAST_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool")
"""What ``dtype`` in a column spec may convert to (on the worker, after reading)."""


@dataclass(frozen=True)
class Column:
    """One tensor of a batch: ``[B, *shape]`` of ``dtype``, read from Parquet column(s) ``columns``.

    ``columns`` has one name, or several for the legacy ``data.features`` form (concatenated, float32).
    ``num_classes``: for a classification target, the number of classes (``max + 1`` over both splits).
    """

    name: str
    columns: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]
    num_classes: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "columns": list(self.columns), "dtype": self.dtype, "shape": list(self.shape)}
        if self.num_classes is not None:
            d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Column":
        return cls(name=d["name"], columns=tuple(d["columns"]), dtype=d["dtype"], shape=tuple(d["shape"]),
                   num_classes=d.get("num_classes"))


def check_config(cfg: Any) -> None:
    """Every ``dtype`` in ``data.inputs`` / ``data.targets`` is one a column converts to (:data:`CAST_DTYPES`)."""
    for section in ("inputs", "targets"):
        for name, spec in (getattr(cfg.data, section) or {}).items():
            if isinstance(spec, dict) and spec.get("dtype") is not None and spec["dtype"] not in CAST_DTYPES:
                raise ConfigError(f"data.{section}.{name}.dtype: {spec['dtype']!r} is not one of {', '.join(CAST_DTYPES)}")


def column_text(c: Column) -> str:
    """``int64 [128]`` (scalar: ``int64 []``)."""
    return f"{c.dtype} [{', '.join(map(str, c.shape))}]"


@dataclass(frozen=True)
class Schema:
    """The inputs and targets of every batch (plain data: it travels to the workers and into bundles)."""

    inputs: tuple[Column, ...]
    targets: tuple[Column, ...]

    @property
    def columns(self) -> tuple[Column, ...]:
        return self.inputs + self.targets

    @property
    def target(self) -> Optional[Column]:
        """The only target (``None`` without targets; the first of several)."""
        return self.targets[0] if self.targets else None

    def parquet_columns(self) -> list[str]:
        return list(dict.fromkeys(n for c in self.columns for n in c.columns))

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [c.to_dict() for c in self.inputs], "targets": [c.to_dict() for c in self.targets]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schema":
        return cls(inputs=tuple(Column.from_dict(c) for c in d["inputs"]), targets=tuple(Column.from_dict(c) for c in d["targets"]))

    def with_classes(self, num_classes: dict[str, int]) -> "Schema":
        return replace(self, targets=tuple(replace(c, num_classes=num_classes.get(c.name, c.num_classes)) for c in self.targets))

    # ------------------------------------------------------------------ from the Parquet schema

    @classmethod
    def from_arrow(cls, schema: pa.Schema, *, inputs: Optional[dict[str, Any]] = None, targets: Optional[dict[str, Any]] = None,
                   features: Optional[list[str]] = None, label: Optional[str] = "label", key: str = "data.train",
                   uri: str = "") -> "Schema":
        """Resolve the configured columns against ``schema``; ``ConfigError`` names the column, what it is and what is valid.

        ``inputs`` / ``targets``: ``{name: column}`` or ``{name: {column, shape, dtype}}``; without ``inputs``
        the legacy ``features`` (default: every column but the targets') become the float32 input ``x``;
        without ``targets`` the ``label`` column is the one target (``label: None``: no target).
        """
        names = schema.names
        legacy_label = targets is None
        if targets is None:
            targets = {label: label} if label else {}
        target_cols = [_spec(n, s)[0] for n, s in targets.items()]
        out_targets = tuple(_typed(name, spec, schema, "data.label" if legacy_label else "data.targets", key, uri)
                            for name, spec in targets.items())
        if inputs is not None:
            out_inputs = tuple(_typed(name, spec, schema, "data.inputs", key, uri) for name, spec in inputs.items())
        else:
            cols = tuple(features) if features is not None else tuple(n for n in names if n not in target_cols)
            for c in cols:
                if c not in names:
                    raise ConfigError(f"data.features: column '{c}' is not in {key} '{uri}' (columns: {', '.join(names)})")
            if not cols:
                besides = f"the label '{label}'" if legacy_label else f"the targets ({', '.join(target_cols)})"
                raise ConfigError(f"data.features: {key} '{uri}' has no column besides {besides}")
            width = sum(_legacy_width(schema.field(c), key, uri) for c in cols)
            out_inputs = (Column(LEGACY_INPUT, cols, "float32", (width,)),)
        return cls(inputs=out_inputs, targets=out_targets)


def _spec(name: str, spec: Any) -> tuple[str, Optional[tuple[int, ...]], Optional[str]]:
    """``(column, shape, dtype)`` of a column spec (validated by the config already)."""
    if spec is None:
        return name, None, None
    if isinstance(spec, str):
        return spec, None, None
    shape = spec.get("shape")
    return spec.get("column", name), (tuple(shape) if shape is not None else None), spec.get("dtype")


def _arrow_shape(t: pa.DataType) -> tuple[tuple[int, ...], pa.DataType]:
    """Per-row shape and scalar type of a numeric scalar, (nested) fixed-size list or fixed-shape tensor type."""
    if isinstance(t, pa.FixedShapeTensorType):
        return tuple(t.shape), t.value_type
    shape: list[int] = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape), t


def field_info(f: pa.Field) -> dict[str, Any]:
    """A Parquet column as a manifest records it: Arrow type, and the tensor it reads as (``dtype`` and
    per-row ``shape``; ``dtype`` None for a column no batch can hold, e.g. strings).

    >>> field_info(pa.field("tokens", pa.list_(pa.uint8(), 128)))
    {'name': 'tokens', 'type': 'fixed_size_list<item: uint8>[128]', 'dtype': 'uint8', 'shape': [128]}
    """
    shape, scalar = _arrow_shape(f.type)
    return {"name": f.name, "type": str(f.type), "dtype": _DTYPES.get(scalar), "shape": list(shape)}


def _typed(name: str, spec: Any, schema: pa.Schema, option: str, key: str, uri: str) -> Column:
    column, want_shape, cast = _spec(name, spec)
    where = option if option == "data.label" else f"{option}.{name}"
    if column not in schema.names:
        raise ConfigError(f"{where}: column '{column}' is not in {key} '{uri}' (columns: {', '.join(schema.names)})")
    t = schema.field(column).type
    shape, scalar = _arrow_shape(t)
    if scalar not in _DTYPES:
        hint = " (a variable-length list: write it as a fixed-size list, pa.list_(type, n))" if pa.types.is_list(scalar) or pa.types.is_large_list(scalar) else ""
        raise ConfigError(f"{where}: column '{column}' in {key} '{uri}' has type {t}{hint}; valid: numeric or bool scalars, "
                          f"fixed-size lists of them, or Arrow fixed-shape tensors")
    if want_shape is not None:
        if math.prod(want_shape) != math.prod(shape):
            raise ConfigError(f"{option}.{name}.shape: {list(want_shape)} holds {math.prod(want_shape)} values per row, but column "
                              f"'{column}' in {key} '{uri}' has {math.prod(shape)} ({t})")
        shape = want_shape
    return Column(name, (column,), cast or _DTYPES[scalar], shape)


def _legacy_width(f: pa.Field, key: str, uri: str) -> int:
    shape, scalar = _arrow_shape(f.type)
    if scalar in _DTYPES and len(shape) <= 1:
        return shape[0] if shape else 1
    raise ConfigError(f"{key}: feature column '{f.name}' in '{uri}' has type {f.type}; features must be numeric scalars or "
                      f"fixed-size numeric lists (for tensors, name the column in data.inputs instead)")


def resolve_columns(train: Schema, other: Schema, key: str, uri: str) -> None:
    """``other`` (e.g. the eval split) must hold the same tensors as ``train``; name the column, both dtypes and shapes."""
    for a, b in zip(train.columns, other.columns):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            raise ConfigError(f"{key}: column '{b.columns[0]}' ({b.name}) in '{uri}' is {column_text(b)} per row; "
                              f"data.train has {column_text(a)}")


# --------------------------------------------------------------------------- decoding (worker side)


def _values(col: pa.ChunkedArray) -> np.ndarray:
    """Every scalar of ``col``, flattened, as numpy."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    while pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def decode(schema: Schema, table: pa.Table, *, key: str = "", uri: str = "") -> dict[str, np.ndarray]:
    """``table``'s rows as one writable numpy array per input and target: ``[rows, *shape]`` of its dtype."""
    out: dict[str, np.ndarray] = {}
    for c in schema.columns:
        for name in c.columns:
            nulls = table.column(name).null_count
            if nulls:  # a null list row would vanish in flatten() and shift every later row against the others
                raise ConfigError(f"{key}: column '{name}' ({c.name}) in '{uri}' has {nulls} null value(s); fill or drop them first")
        if len(c.columns) > 1:  # the legacy data.features form: columns concatenated, float32
            parts = [_values(table.column(n)).astype(np.float32, copy=False).reshape(table.num_rows, -1) for n in c.columns]
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        else:
            dtype = "float32" if c.dtype == "bfloat16" else c.dtype  # numpy has no bfloat16: the tensor is cast on the worker
            arr = _values(table.column(c.columns[0])).astype(dtype, copy=False).reshape(table.num_rows, *c.shape)
        out[c.name] = np.require(arr, None, ["C", "W"])  # torch.from_numpy needs writable memory: copies only when needed
    return out

