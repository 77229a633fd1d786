"""Error types. Every error names what is wrong and where (table, row, column, byte range)."""

from __future__ import annotations


class GpuloadError(Exception):
    """Base class of every error gpuload raises on purpose."""


class TableNotFoundError(GpuloadError, FileNotFoundError):
    """The named table (or its manifest) does not exist."""


class TableExistsError(GpuloadError, FileExistsError):
    """ingest(mode="create") on a table that already exists."""


class SchemaError(GpuloadError, ValueError):
    """Data does not match the table's schema (unknown column, wrong type or shape, ragged rows)."""


class FormatError(GpuloadError, ValueError):
    """A manifest or chunk is malformed, of an unknown version, or points outside the table."""


class CommitConflictError(GpuloadError):
    """Another writer committed a new version while this one was writing."""


class FetchError(GpuloadError, OSError):
    """A read failed after retries; names the table, chunk and byte range."""


class DecodeError(GpuloadError, ValueError):
    """An image could not be decoded; names the table, row and column where known."""


class UnsupportedOpError(GpuloadError, ValueError):
    """An image op that gpuload cannot fuse; the message lists the supported ops."""


class MissingDependencyError(GpuloadError, ImportError):
    """An optional backend is not installed; the message says what to install."""


class TransformError(GpuloadError):
    """A user transform raised; names the table and row. The original error is the __cause__."""


class IntegrityError(GpuloadError, OSError):
    """Bytes read from a table do not match their checksum, even after a second fetch; names the
    table, chunk and byte range."""
