"""Decode stage: header parsing, a backend registry, and batch decode into a reused staging buffer.

Typical use by the loader::

    dec = get_decoder("auto", device)
    headers = [read_header(b) for b in encoded]
    staging = np.empty(staging_nbytes(headers, requests, dec), np.uint8)  # once, largest batch
    batch = dec.decode_batch(encoded, requests, staging)
    # batch.meta[i] = (offset, H, W, C); batch.origin[i], batch.scale[i] map crop windows.
"""

from .base import (
    STAGING_ALIGN,
    DecodedBatch,
    Decoder,
    DecodeRequest,
    StagingTooSmallError,
    staging_nbytes,
    staging_nbytes_for,
)
from .header import ImageHeader, output_channels, read_header
from .registry import available_decoders, get_decoder, known_decoders, register_decoder

__all__ = [
    "STAGING_ALIGN",
    "DecodeRequest",
    "DecodedBatch",
    "Decoder",
    "ImageHeader",
    "StagingTooSmallError",
    "available_decoders",
    "get_decoder",
    "known_decoders",
    "output_channels",
    "read_header",
    "register_decoder",
    "staging_nbytes",
    "staging_nbytes_for",
]
