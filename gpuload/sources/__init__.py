"""Where ingest's data comes from: each kind of source as raw column batches (``Source``).

- ``arrow``: pyarrow Tables/RecordBatches and Parquet (lists, ragged lists, image structs);
- ``frames``: pandas DataFrames, through Arrow where pandas has missing values;
- ``batches``: iterables of column batches (dicts, RecordBatches, DataFrames), one commit;
- ``webdataset``: WebDataset tar shards over fsspec (``WebDataset``, ``expand_braces``);
- ``images``: image values (``{"bytes", "path"}`` dicts, PIL images, uint8 arrays) to bytes.

Nothing here writes: ``gpuload.ingest`` validates the batches and commits them.
"""

from __future__ import annotations

from .base import BATCH_ROWS, RawBatch, Source
from .images import IMAGE_FORMATS
from .webdataset import WebDataset, expand_braces

__all__ = ["BATCH_ROWS", "IMAGE_FORMATS", "RawBatch", "Source", "WebDataset", "expand_braces"]
