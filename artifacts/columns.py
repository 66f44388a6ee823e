"""Arrow column types and conversions between Arrow columns and numpy / Python values.

Tensors are stored with Arrow's canonical ``fixed_shape_tensor`` extension type, so a
results file opens in pyarrow, pandas, polars or DuckDB without this project installed.
Tensors whose shape varies per row (decoded images) are a plain struct
``{shape: fixed_size_list<int32>[ndim], data: list<dtype>}`` (pyarrow has no canonical
variable-shape tensor type yet); stages that produce them are not cached by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import pyarrow as pa

Dim = Union[int, str, None]
"""A tensor dimension in a column spec: a size, a symbol bound at validation, or None (any)."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor column pattern: element type and shape with symbolic dimensions.

    ``TensorSpec("float32", ("g", "g"))`` accepts any square float32 tensor and binds ``g``;
    an output spec that names ``g`` gets the same size. ``shape=None`` means variable shape.
    """

    dtype: str
    shape: tuple[Dim, ...] | None
    ndim: int | None = None  # for variable-shape tensors

    def concrete(self, bindings: dict[str, int]) -> pa.DataType:
        if self.shape is None:
            return variable_tensor_type(self.dtype, self.ndim)
        dims = []
        for d in self.shape:
            if isinstance(d, str):
                if d not in bindings:
                    raise KeyError(d)
                d = bindings[d]
            if d is None:
                raise KeyError("None")
            dims.append(int(d))
        return tensor_type(self.dtype, dims)

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.dtype}[variable, {self.ndim} dims]"
        return f"{self.dtype}[{', '.join('*' if d is None else str(d) for d in self.shape)}]"


ColumnSpec = Union[pa.DataType, TensorSpec]


def tensor_type(dtype: str | np.dtype, shape: Sequence[int]) -> pa.DataType:
    """The canonical Arrow fixed-shape tensor type of ``shape`` (row-major)."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), [int(s) for s in shape])


def variable_tensor_type(dtype: str | np.dtype, ndim: int) -> pa.DataType:
    """A tensor whose shape varies per row (e.g. decoded images ``uint8[H, W, 3]``)."""
    return pa.struct([
        ("shape", pa.list_(pa.int32(), int(ndim))),
        ("data", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))),
    ])


def is_fixed_tensor(t: pa.DataType) -> bool:
    return isinstance(t, pa.FixedShapeTensorType)


def is_variable_tensor(t: pa.DataType) -> bool:
    return (
        pa.types.is_struct(t) and t.num_fields == 2
        and t.field(0).name == "shape" and pa.types.is_fixed_size_list(t.field(0).type)
        and t.field(1).name == "data" and pa.types.is_list(t.field(1).type)
    )


def _variable_parts(t: pa.DataType) -> tuple[pa.DataType, int]:
    return t.field(1).type.value_type, t.field(0).type.list_size


_NUMPY_TYPES = {pa.bool_(): np.bool_, pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32,
                pa.int64(): np.int64, pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32,
                pa.uint64(): np.uint64, pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def numpy_dtype(t: pa.DataType) -> np.dtype:
    """The numpy dtype of a primitive Arrow value type (pyarrow's ``to_pandas_dtype`` would import
    pandas, 0.4 s of every command's start-up)."""
    try:
        return np.dtype(_NUMPY_TYPES[t])
    except KeyError:
        raise TypeError(f"no numpy dtype for Arrow type {t}") from None


def _dtype_name(t: pa.DataType) -> str:
    """numpy's name of an Arrow value type (Arrow says 'float' for float32)."""
    return numpy_dtype(t).name


def describe_type(t: ColumnSpec) -> str:
    """Human-readable type, e.g. ``float32[24, 24]`` or ``list<string>``."""
    if isinstance(t, TensorSpec):
        return t.describe()
    if is_fixed_tensor(t):
        return f"{_dtype_name(t.value_type)}[{', '.join(str(s) for s in t.shape)}]"
    if is_variable_tensor(t):
        vt, ndim = _variable_parts(t)
        return f"{_dtype_name(vt)}[variable, {ndim} dims]"
    if pa.types.is_list(t):
        return f"list<{describe_type(t.value_type)}>"
    return str(t)


def match_spec(spec: ColumnSpec, actual: pa.DataType, bindings: dict[str, int]) -> str | None:
    """Check a concrete producer type against a consumer spec, binding symbolic dims.

    Returns None when they match (``bindings`` updated), else a reason.
    """
    if isinstance(spec, pa.DataType):
        return None if spec.equals(actual) else f"expected {describe_type(spec)}"
    if spec.shape is None:
        ok = is_variable_tensor(actual) and _dtype_name(_variable_parts(actual)[0]) == np.dtype(spec.dtype).name
        ok = ok and (spec.ndim is None or _variable_parts(actual)[1] == spec.ndim)
        return None if ok else f"expected {spec.describe()}"
    if not is_fixed_tensor(actual) or _dtype_name(actual.value_type) != np.dtype(spec.dtype).name:
        return f"expected {spec.describe()}"
    if len(actual.shape) != len(spec.shape):
        return f"expected {len(spec.shape)} dimensions ({spec.describe()})"
    new = dict(bindings)
    for want, got in zip(spec.shape, actual.shape):
        if want is None:
            continue
        if isinstance(want, str):
            if want in new and new[want] != got:
                return f"expected {spec.describe()} with {want}={new[want]}, got {got}"
            new[want] = int(got)
        elif want != got:
            return f"expected {spec.describe()}"
    bindings.update(new)
    return None


# --- Arrow -> numpy / Python -------------------------------------------------------------

def column_to_python(col: pa.ChunkedArray | pa.Array) -> tuple[Any, np.ndarray]:
    """Convert one column for a stage's ``process``.

    Returns ``(values, valid)``: fixed-shape tensors become one ``np.ndarray [N, *shape]``
    (null rows zero-filled), variable-shape tensors a list of arrays (None for nulls),
    numeric scalars an ``np.ndarray`` (nulls zero), everything else a Python list.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    t = col.type
    if is_fixed_tensor(t):
        shape = tuple(t.shape)
        dtype = numpy_dtype(t.value_type)
        out = np.zeros((len(col), *shape), dtype=dtype)
        if valid.any():
            storage = col.storage
            flat = storage.flatten() if not storage.offset else storage.flatten()
            values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype)
            out[valid] = values.reshape(int(valid.sum()), *shape)
        return out, valid
    if is_variable_tensor(t):
        shapes = col.field("shape")
        data = col.field("data")
        rows = []
        for i in range(len(col)):
            if not valid[i]:
                rows.append(None)
                continue
            values = data[i].values.to_numpy(zero_copy_only=False)
            rows.append(values.reshape(shapes[i].as_py()))
        return rows, valid
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        arr = col.fill_null(False if pa.types.is_boolean(t) else 0)
        return np.asarray(arr.to_numpy(zero_copy_only=False)), valid
    return col.to_pylist(), valid


# --- numpy / Python -> Arrow -------------------------------------------------------------

def python_to_column(values: Any, t: pa.DataType, n: int) -> pa.Array:
    """Convert a stage's output for one column to an Arrow array of type ``t``.

    Tensors may be given as one array ``[N, *shape]`` or a list of arrays / None (null).
    Scalars may contain None (null); NaN floats stay NaN.
    """
    if is_fixed_tensor(t):
        return _fixed_tensor_array(values, t, n)
    if is_variable_tensor(t):
        return _variable_tensor_array(values, t, n)
    if isinstance(values, np.ndarray):
        if values.shape[0] != n:
            raise ValueError(f"expected {n} rows, got {values.shape[0]}")
        return pa.array(values, type=t, from_pandas=False)
    values = list(values)
    if len(values) != n:
        raise ValueError(f"expected {n} rows, got {len(values)}")
    if pa.types.is_floating(t) or pa.types.is_integer(t):
        values = [None if v is None else (v.item() if isinstance(v, np.generic) else v) for v in values]
    return pa.array(values, type=t)


def _fixed_tensor_array(values: Any, t: pa.FixedShapeTensorType, n: int) -> pa.Array:
    shape = tuple(t.shape)
    size = int(np.prod(shape)) if shape else 1
    dtype = numpy_dtype(t.value_type)
    if isinstance(values, np.ndarray):
        arr = np.ascontiguousarray(values, dtype=dtype)
        if arr.shape != (n, *shape):
            raise ValueError(f"expected shape {(n, *shape)}, got {arr.shape}")
        mask = None
    else:
        values = list(values)
        if len(values) != n:
            raise ValueError(f"expected {n} rows, got {len(values)}")
        arr = np.zeros((n, *shape), dtype=dtype)
        mask = np.zeros(n, dtype=bool)
        for i, v in enumerate(values):
            if v is None:
                mask[i] = True
                continue
            v = np.asarray(v, dtype=dtype)
            if v.shape != shape:
                raise ValueError(f"row {i}: expected shape {shape}, got {v.shape}")
            arr[i] = v
        if not mask.any():
            mask = None
    flat = pa.array(arr.reshape(-1), type=t.value_type)
    storage = pa.FixedSizeListArray.from_arrays(flat, size, mask=None if mask is None else pa.array(mask))
    return pa.ExtensionArray.from_storage(t, storage)


def _variable_tensor_array(values: Any, t: pa.DataType, n: int) -> pa.Array:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"expected {n} rows, got {len(values)}")
    value_type, ndim = _variable_parts(t)
    dtype = numpy_dtype(value_type)
    shapes, offsets, chunks = [], [0], []
    mask = np.zeros(n, dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            mask[i] = True
            shapes.append([0] * ndim)
            offsets.append(offsets[-1])
            continue
        v = np.ascontiguousarray(v, dtype=dtype)
        if v.ndim != ndim:
            raise ValueError(f"row {i}: expected {ndim} dimensions, got {v.ndim}")
        shapes.append(list(v.shape))
        chunks.append(v.reshape(-1))
        offsets.append(offsets[-1] + v.size)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    data = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, type=value_type))
    shape = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(shapes, np.int32).reshape(-1)), ndim)
    return pa.StructArray.from_arrays([shape, data], fields=list(t), mask=pa.array(mask))
