"""What every source hands to ingest: raw column batches and what is known up front."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..schema import Schema

__all__ = ["BATCH_ROWS", "RawBatch", "Source"]

BATCH_ROWS = 1024
RawBatch = dict[str, Any]


@dataclass
class Source:
    """Raw column batches plus what we know up front (row count, table metadata, schema hints).
    ``schema_hint`` may name only some columns: the others are inferred from the first batch."""

    batches: Iterator[tuple[RawBatch, int]]
    total: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_hint: Schema | None = None
