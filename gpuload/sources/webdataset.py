"""WebDataset tar shards as a source, read with the standard library's ``tarfile`` over fsspec
(local paths or any fsspec URL; no ``webdataset`` package).

As WebDataset does, a sample is the run of consecutive members sharing a key: a member's key is
its path up to the first dot of its file name, the rest (lower-cased) its extension
(``dir/000017.seg.png`` is key ``dir/000017``, extension ``seg.png``). Each extension is a column:

- ``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``, ``gif``, ``tif``, ``tiff``: an image column;
- ``cls``, ``txt``, ``json``: a text column (UTF-8, never parsed or evaluated), or a number when
  ``columns=`` gives the column a numeric type (``{"cls": ("label", "int64")}``);
- ``npy``: an array column, read with ``np.load(allow_pickle=False)``;
- ``pyd``, ``pickle``, ``pkl``: refused (gpuload never unpickles anything);
- anything else: a bytes column.

``columns=`` maps extensions to column names (or ``(name, type)`` pairs); only those extensions
are read and other members are skipped unread. Without it every extension of the first sample is
a column named after it. A sample without a member for a column is a SchemaError naming the
shard, the key and the column.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SchemaError
from ..schema import Column, Schema, parse_type
from .base import RawBatch, Source

__all__ = ["WebDataset", "expand_braces", "looks_like_shards"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTS = ("cls", "txt", "json")
PICKLE_EXTS = ("pyd", "pickle", "pkl")
MAX_SHARDS = 1_000_000  # a brace pattern expanding to more is a mistake, not a dataset
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion as WebDataset URLs use it: ``shard-{000..009}.tar`` (numeric
    ranges, zero-padded to the width of their bounds, ascending or descending) and ``{a,b}``
    alternatives, several per pattern. A pattern without braces is itself."""
    m = _BRACE_RE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"unbalanced braces in shard pattern {pattern!r}")
        return [pattern]
    body = m.group(1)
    r = _RANGE_RE.match(body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        width = max(len(r.group(1)), len(r.group(2))) if r.group(1).startswith("0") else 0
        if abs(b - a) >= MAX_SHARDS:
            raise ValueError(f"shard pattern {pattern!r} expands to more than {MAX_SHARDS} names")
        step = 1 if b >= a else -1
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out: list[str] = []
    for opt in options:
        out += expand_braces(head + opt + tail)
        if len(out) > MAX_SHARDS:
            raise ValueError(f"shard pattern {pattern!r} expands to more than {MAX_SHARDS} names")
    return out


def looks_like_shards(data: Any) -> bool:
    """Whether ``data`` names tar shards: a path or URL ending in ``.tar`` (after brace
    expansion), or a non-empty list of them."""
    if isinstance(data, str):
        try:
            return expand_braces(data)[0].endswith(".tar")
        except ValueError:
            return False
    return (
        isinstance(data, (list, tuple))
        and bool(data)
        and all(isinstance(x, str) and x.endswith(".tar") for x in data)
    )


@dataclass(frozen=True)
class _Field:
    ext: str
    column: Column | None  # None: typed from its values (npy without a declared type)
    name: str


class WebDataset:
    """WebDataset tar shards to ingest: ``client.ingest("t", WebDataset("data/shard-{000..009}
    .tar", columns={"jpg": "image", "cls": ("label", "int64")}))``. ``shards`` is a path or
    fsspec URL (brace patterns expanded) or a list of them; ``storage_options`` go to fsspec.
    See the module docstring for how members become columns."""

    def __init__(
        self,
        shards: str | Sequence[str],
        columns: Mapping[str, str | tuple[str, str]] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        patterns = [shards] if isinstance(shards, str) else list(shards)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"shards must be a path/URL or a list of them, got {shards!r}")
        self.shards: tuple[str, ...] = tuple(u for p in patterns for u in expand_braces(p))
        self.storage_options = dict(storage_options or {})
        self.fields: tuple[_Field, ...] | None = (
            tuple(_field(str(e).lower().lstrip("."), v) for e, v in columns.items())
            if columns
            else None
        )

    def __repr__(self) -> str:
        return f"WebDataset({len(self.shards)} shards, first {self.shards[0]!r})"

    def source(self, batch_rows: int) -> Source:
        """The shards' samples as raw column batches, in shard and member order."""
        hint = None
        if self.fields is not None and all(f.column is not None for f in self.fields):
            hint = Schema(tuple(f.column for f in self.fields))  # type: ignore[misc]
        elif self.fields is not None:
            hint = _partial_hint(self.fields)
        return Source(self._batches(batch_rows), None, {"source": "webdataset"}, hint)

    def _batches(self, batch_rows: int) -> Iterator[tuple[RawBatch, int]]:
        fields = self.fields
        cols: dict[str, list] | None = None
        n = 0
        for shard in self.shards:
            for key, members in _samples(shard, self.storage_options, fields):
                if fields is None:
                    fields = tuple(_field(ext, ext) for ext in members)
                if cols is None:
                    cols = {f.name: [] for f in fields}
                for f in fields:
                    cols[f.name].append(_value(f, members, shard, key))
                extra = sorted(set(members) - {f.ext for f in fields})
                if extra and self.fields is None:
                    raise SchemaError(
                        f"shard {shard}, key {key!r}: member(s) with extension(s) {extra} that "
                        f"the first sample has not ({[f.ext for f in fields]}); pass columns= to "
                        "choose the extensions to read"
                    )
                n += 1
                if n == batch_rows:
                    yield cols, n
                    cols, n = {f.name: [] for f in fields}, 0
        if cols is not None and n:
            yield cols, n


def _field(ext: str, spec: str | tuple[str, str]) -> _Field:
    """An extension's column: ``spec`` is a column name or a (name, type string) pair."""
    if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
        raise SchemaError(
            f"WebDataset members with extension .{ext} are pickles; gpuload never unpickles "
            "anything: convert them (e.g. to .npy or .json) first"
        )
    name, type_ = (spec, None) if isinstance(spec, str) else tuple(spec)
    last = ext.rsplit(".", 1)[-1]
    if type_ is None:
        if last in IMAGE_EXTS:
            type_ = "image"
        elif last in TEXT_EXTS:
            type_ = "text"
        elif last != "npy":
            type_ = "bytes"
    col = parse_type(name, type_) if type_ is not None else None
    kinds = ("array", "ragged", "scalar") if last == "npy" else ("image", "bytes", "text", "scalar")
    if col is not None and col.kind not in kinds:
        raise SchemaError(
            f"WebDataset extension .{ext}: cannot read it as {col.type_string()} (.npy members "
            "are arrays; other members are images, bytes, text or numbers parsed from text)"
        )
    return _Field(ext, col, name)


def _partial_hint(fields: Sequence[_Field]) -> Schema | None:
    known = tuple(f.column for f in fields if f.column is not None)
    return Schema(known) if known else None  # type: ignore[arg-type]


def _samples(
    shard: str, storage_options: Mapping[str, Any], fields: Sequence[_Field] | None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: member bytes}) of each sample of one shard, in order. Members whose
    extension is not wanted are skipped unread."""
    import fsspec

    wanted = {f.ext for f in fields} if fields is not None else None
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with (
            fsspec.open(shard, "rb", **storage_options) as fh,
            tarfile.open(fileobj=fh, mode="r|*") as tar,
        ):
            for m in tar:
                if m.isdir():
                    continue
                parsed = _KEY_RE.match(m.name)
                if parsed is None:
                    continue  # no extension: not part of a sample (as in WebDataset)
                k, ext = parsed.group(1), parsed.group(2).lower()
                if k != key:
                    if key is not None:
                        yield key, members
                    if k in seen:
                        raise SchemaError(
                            f"shard {shard}: key {k!r} appears in two places; a sample's "
                            "members must be consecutive, as WebDataset writes them"
                        )
                    seen.add(k)
                    key, members = k, {}
                if wanted is not None and ext not in wanted:
                    continue
                _check_member(shard, k, ext, m, members)
                members[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    except FileNotFoundError:
        raise SchemaError(f"WebDataset shard {shard} does not exist") from None
    except tarfile.TarError as e:
        raise SchemaError(f"WebDataset shard {shard} is not a readable tar file ({e})") from None
    if key is not None:
        yield key, members


def _check_member(shard: str, key: str, ext: str, m: tarfile.TarInfo, members: dict) -> None:
    where = f"shard {shard}, key {key!r}, member {m.name!r}"
    if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
        raise SchemaError(
            f"{where}: a pickle; gpuload never unpickles anything: convert it (e.g. to .npy or "
            ".json) or pass columns= without this extension"
        )
    if not m.isfile():
        raise SchemaError(f"{where}: not a regular file (links and devices are not read)")
    if ext in members:
        raise SchemaError(f"{where}: the sample has two members with extension .{ext}")


def _value(f: _Field, members: Mapping[str, bytes], shard: str, key: str) -> Any:
    """The column value of one sample: bytes, text, a number or an array."""
    where = f"shard {shard}, key {key!r}, column {f.name!r}"
    if f.ext not in members:
        raise SchemaError(f"{where}: the sample has no member with extension .{f.ext}")
    raw = members[f.ext]
    kind = f.column.kind if f.column is not None else "array"
    if f.ext.rsplit(".", 1)[-1] == "npy":
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SchemaError(f"{where}: not a readable .npy array without pickle ({e})") from None
    if kind in ("image", "bytes"):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SchemaError(f"{where}: text is not UTF-8") from None
    if kind == "text":
        return text
    return _number(text, f.column, where)  # type: ignore[arg-type]


def _number(text: str, col: Column, where: str) -> Any:
    """A scalar column's value parsed from a member's text (``.cls`` holds ``"3\\n"``)."""
    s = text.strip()
    try:
        if col.np_dtype.kind in "iu":
            return int(s)
        if col.np_dtype.kind == "f":
            return float(s)
    except ValueError:
        raise SchemaError(f"{where}: {s[:40]!r} is not a {col.dtype}") from None
    raise SchemaError(f"{where}: cannot read text as {col.dtype}")
