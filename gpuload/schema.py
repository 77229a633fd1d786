"""Column types and table schemas: what a column holds and how it is laid out in a chunk.

Variable-length kinds (image, bytes, text, ragged) are stored as concatenated raw bytes plus an
int64 offsets index; fixed-shape kinds (scalar, array) as raw little-endian arrays. A ragged
column ("float32[*,14]") holds per row an array of shape (n_i, *inner) of one numeric dtype: its
row bytes are that array's little-endian values, so n_i is the row's byte length over the bytes
of one inner element (``Column.item_nbytes``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SchemaError

__all__ = ["Column", "Schema", "parse_type", "detect_codec", "NUMERIC_DTYPES"]

BYTES_KINDS = ("image", "bytes", "text")  # a row is an opaque byte string
VAR_KINDS = (*BYTES_KINDS, "ragged")  # stored as concatenated bytes + an offsets index
FIXED_KINDS = ("scalar", "array")
NUMERIC_KINDS = ("scalar", "array", "ragged")  # carry a numeric dtype
NUMERIC_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
MAX_DIM = 1 << 31  # one dimension of an array column
MAX_ROW_NBYTES = 1 << 40  # one row of a fixed-shape column
_TYPE_RE = re.compile(r"^\s*([a-z0-9]+)\s*(?:\[\s*([0-9*,\s]*)\s*\])?\s*$")
IMAGE_CODECS = ("jpeg", "png", "webp", "gif", "bmp", "tiff", "mixed")


def validate_name(name: str, what: str) -> str:
    """Check a table or column name: letters, digits, '_', '-', '.', no path separators or '..'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise SchemaError(
            f"invalid {what} name {name!r}: use 1-128 characters from [A-Za-z0-9_.-], "
            "starting with a letter, digit or '_', with no '..' or path separators"
        )
    return name


def detect_codec(data: bytes | memoryview) -> str | None:
    """Image codec from magic bytes, or None when the bytes are not a known image format."""
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A positive integer shape whose rows (or inner elements, for ragged columns) stay below
    MAX_ROW_NBYTES (a manifest may lie)."""
    if not isinstance(shape, (tuple, list)):
        raise SchemaError(f"column {name!r}: shape must be a list of integers, got {shape!r}")
    out = []
    for s in shape:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise SchemaError(f"column {name!r}: shape {shape!r} must hold integers")
        if not 0 < int(s) < MAX_DIM:
            raise SchemaError(f"column {name!r}: shape {tuple(shape)} must be positive and < 2^31")
        out.append(int(s))
    if len(out) > 32 or int(np.prod(out, dtype=object)) * 8 > MAX_ROW_NBYTES:
        raise SchemaError(f"column {name!r}: shape {tuple(out)} is too large for one row")
    return tuple(out)


@dataclass(frozen=True)
class Column:
    """One column: ``kind`` is image/bytes/text/scalar/array/ragged; numeric kinds carry a dtype
    and a shape (for ragged columns the inner shape of one element, () for "int32[*]")."""

    name: str
    kind: str
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    codec: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        validate_name(self.name, "column")
        if self.kind not in VAR_KINDS + FIXED_KINDS:
            raise SchemaError(
                f"column {self.name!r}: unknown kind {self.kind!r}; "
                f"expected one of {', '.join(VAR_KINDS + FIXED_KINDS)}"
            )
        if self.kind in NUMERIC_KINDS:
            if self.dtype not in NUMERIC_DTYPES:
                raise SchemaError(
                    f"column {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(NUMERIC_DTYPES)}"
                )
            shape = _check_shape(self.name, self.shape)
            if self.kind == "scalar" and shape:
                raise SchemaError(f"column {self.name!r}: a scalar has shape ()")
            if self.kind == "array" and not shape:
                raise SchemaError(f"column {self.name!r}: an array column needs a shape")
            object.__setattr__(self, "shape", shape)
        else:
            if self.dtype is not None or self.shape:
                raise SchemaError(f"column {self.name!r}: kind {self.kind!r} has no dtype or shape")
        if not isinstance(self.metadata, Mapping):
            raise SchemaError(f"column {self.name!r}: metadata must be a mapping")
        if self.kind == "image" and self.codec is not None and self.codec not in IMAGE_CODECS:
            raise SchemaError(
                f"column {self.name!r}: unknown image codec {self.codec!r}; expected one of {IMAGE_CODECS}"
            )
        if self.kind != "image" and self.codec is not None:
            raise SchemaError(f"column {self.name!r}: only image columns have a codec")
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def is_var(self) -> bool:
        """True for variable-length kinds (stored as bytes + offsets)."""
        return self.kind in VAR_KINDS

    @property
    def is_ragged(self) -> bool:
        """True for ragged columns: per row an array of shape (n_i, *shape)."""
        return self.kind == "ragged"

    @property
    def np_dtype(self) -> np.dtype:
        """Little-endian numpy dtype of a numeric (fixed-shape or ragged) column."""
        if self.kind not in NUMERIC_KINDS:
            raise SchemaError(f"column {self.name!r} ({self.kind}) has no numpy dtype")
        return np.dtype(self.dtype).newbyteorder("<")

    @property
    def row_nbytes(self) -> int:
        """Bytes per row of a fixed-shape column."""
        if self.is_var:
            raise SchemaError(f"column {self.name!r} ({self.kind}) has rows of varying size")
        return self.item_nbytes

    @functools.cached_property
    def item_nbytes(self) -> int:
        """Bytes of one element of ``shape``: a row of a fixed-shape column, one inner element
        (one step of the first dimension) of a ragged one. Cached: a manifest's checks ask
        for it once per chunk and column."""
        return self.np_dtype.itemsize * math.prod(self.shape)

    def type_string(self) -> str:
        """Compact type, e.g. "image/jpeg", "text", "int64", "float32[14]"."""
        if self.kind == "image":
            return f"image/{self.codec}" if self.codec else "image"
        if self.kind in ("bytes", "text"):
            return self.kind
        if self.kind == "scalar":
            return str(self.dtype)
        dims = [str(s) for s in self.shape]
        if self.kind == "ragged":
            dims.insert(0, "*")
        return f"{self.dtype}[{','.join(dims)}]"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.dtype is not None:
            d["dtype"] = self.dtype
        if self.kind in ("array", "ragged"):
            d["shape"] = list(self.shape)
        if self.codec is not None:
            d["codec"] = self.codec
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Column:
        if not isinstance(d, Mapping) or "name" not in d or "kind" not in d:
            raise SchemaError(f"malformed column entry {d!r}: needs 'name' and 'kind'")
        for key in ("name", "kind", "dtype", "codec"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise SchemaError(f"column entry field {key!r} must be a string, got {d[key]!r}")
        shape = d.get("shape", ())
        if not isinstance(shape, (list, tuple)):
            raise SchemaError(f"column {d['name']!r}: shape must be a list, got {shape!r}")
        return cls(
            name=d["name"],
            kind=d["kind"],
            dtype=d.get("dtype"),
            shape=tuple(shape),
            codec=d.get("codec"),
            metadata=d.get("metadata") or {},
        )


def parse_type(name: str, spec: str | Column | Mapping[str, Any]) -> Column:
    """A Column from a compact type string ("image", "image/png", "bytes", "text", "int64",
    "float32[14]", "uint8[2,3]", ragged "int32[*]" and "float32[*,14]") or a Column/JSON
    mapping."""
    if isinstance(spec, Column):
        if spec.name != name:
            return Column(name, spec.kind, spec.dtype, spec.shape, spec.codec, spec.metadata)
        return spec
    if isinstance(spec, Mapping):
        return Column.from_json({"name": name, **spec})
    if isinstance(spec, np.dtype) or (isinstance(spec, type) and issubclass(spec, np.generic)):
        return Column(name, "scalar", np.dtype(spec).name)
    if not isinstance(spec, str):
        raise SchemaError(
            f"column {name!r}: cannot read type {spec!r}; use e.g. 'image', 'int64', 'float32[14]'"
        )
    s = spec.strip().lower()
    if s.startswith("image"):
        codec = s.split("/", 1)[1] if "/" in s else None
        return Column(name, "image", codec=codec)
    if s in ("bytes", "binary"):
        return Column(name, "bytes")
    if s in ("text", "str", "string"):
        return Column(name, "text")
    m = _TYPE_RE.match(s)
    if not m:
        raise SchemaError(f"column {name!r}: cannot parse type {spec!r}")
    dtype, dims = m.group(1), m.group(2)
    aliases = {"int": "int64", "float": "float64", "double": "float64", "half": "float16"}
    dtype = aliases.get(dtype, dtype)
    if dims is None:
        return Column(name, "scalar", dtype)
    parts = [x.strip() for x in dims.split(",")]
    kind = "array"
    if parts and parts[0] == "*":
        kind, parts = "ragged", parts[1:]
    try:
        shape = tuple(int(x) for x in parts if x)
    except ValueError:
        raise SchemaError(
            f"column {name!r}: cannot parse shape in {spec!r} (only the first dimension may "
            "be '*', as in 'float32[*,14]')"
        ) from None
    return Column(name, kind, dtype, shape)


@dataclass(frozen=True)
class Schema:
    """Ordered columns of a table plus free-form table metadata (JSON-serialisable)."""

    columns: tuple[Column, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        cols = tuple(self.columns)
        if not cols:
            raise SchemaError("a schema needs at least one column")
        names = [c.name for c in cols]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SchemaError(f"duplicate column names: {sorted(dup)}")
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def __getitem__(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.columns)

    def __iter__(self):
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    def column(self, name: str, table: str | None = None) -> Column:
        """The named column, or a SchemaError listing the columns that exist."""
        for c in self.columns:
            if c.name == name:
                return c
        where = f" in table {table!r}" if table else ""
        raise SchemaError(f"unknown column {name!r}{where}; columns are {self.names}")

    def select(
        self, names: list[str] | tuple[str, ...] | None, table: str | None = None
    ) -> list[Column]:
        """Columns by name (all when None), raising SchemaError for an unknown name."""
        if names is None:
            return list(self.columns)
        if isinstance(names, str):
            names = [names]
        return [self.column(n, table) for n in names]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"columns": [c.to_json() for c in self.columns]}
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Schema:
        if not isinstance(d, Mapping) or not isinstance(d.get("columns"), list):
            raise SchemaError("malformed schema: expected {'columns': [...]}")
        if not isinstance(d.get("metadata") or {}, Mapping):
            raise SchemaError("malformed schema: 'metadata' must be an object")
        return cls(tuple(Column.from_json(c) for c in d["columns"]), d.get("metadata") or {})

    @classmethod
    def from_spec(cls, spec: Schema | Mapping[str, Any]) -> Schema:
        """A Schema from a Schema or a mapping of column name -> type (string, Column or JSON)."""
        if isinstance(spec, Schema):
            return spec
        if not isinstance(spec, Mapping):
            raise SchemaError(
                f"schema must be a mapping of column name to type, not {type(spec).__name__}"
            )
        return cls(tuple(parse_type(n, t) for n, t in spec.items()))

    def describe(self) -> str:
        return ", ".join(f"{c.name}: {c.type_string()}" for c in self.columns)
