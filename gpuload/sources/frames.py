"""pandas DataFrames, column by column through Arrow where pandas has a notion of missing values.

A plain numpy column (int64, float32, bool, ...) is taken as its array: it cannot hold a null,
and a NaN in a float column is a value, stored as NaN. A nullable extension column (``Int64``,
``boolean``, ``string``, ``Float64``, Arrow-backed) and an object column go through
``pyarrow.array``, so ``pd.NA``/``None`` become nulls and reach the one clear "gpuload columns
have no nulls" error naming the column and the first null row, instead of turning into NaN.
Object columns Arrow cannot type (PIL images, 2-D arrays per row) stay Python objects, with
the same check for None/NaN cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SchemaError
from .arrow import arrow_array

__all__ = ["pandas_columns"]


def pandas_columns(df: Any, row0: int = 0) -> dict[str, Any]:
    """A DataFrame as {name: column values}, nulls refused (see the module docstring)."""
    return {str(c): pandas_column(df[c], str(c), row0) for c in df.columns}


def pandas_column(s: Any, name: str, row0: int = 0) -> Any:
    """One pandas Series as column values: a numpy array, a list, or Arrow-converted values."""
    import pyarrow as pa

    dtype = s.dtype
    if isinstance(dtype, np.dtype) and dtype.kind != "O":
        return s.to_numpy()
    try:
        arr = pa.array(s, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError):
        arr = None
    if arr is not None:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        return arrow_array(arr, name, row0)
    values = list(s.to_numpy(dtype=object))
    for j, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            raise SchemaError(
                f"row {row0 + j}, column {name!r}: null value (gpuload columns have no nulls)"
            )
    return values
