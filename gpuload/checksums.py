"""Page checksums of chunk files: what lets every read verify the bytes it delivers.

A chunk file is cut into fixed-size pages (16 KiB by default) and each page's xxh3-64 hash is
stored in a hash table at the end of the file; the manifest holds the table's own hash. A reader
verifies exactly the pages its byte ranges touch, so a shuffled single-row read and a sequential
stream both verify what they read while reading at most one page more on either side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from .errors import FormatError

__all__ = [
    "ALGO",
    "DEFAULT_PAGE_BYTES",
    "PageChecksums",
    "hash_bytes",
    "page_hashes",
    "bad_pages",
]

ALGO = "xxh3_64"
DEFAULT_PAGE_BYTES = 16 << 10
MIN_PAGE_BYTES = 4 << 10
MAX_PAGE_BYTES = 16 << 20
hash_bytes = xxhash.xxh3_64_intdigest  # the xxh3-64 hash of a buffer, as an unsigned int


def check_page_bytes(page: int) -> int:
    """A page size must be a power of two between 4 KiB and 16 MiB."""
    if (
        not isinstance(page, int)
        or isinstance(page, bool)
        or not MIN_PAGE_BYTES <= page <= MAX_PAGE_BYTES
        or page & (page - 1)
    ):
        raise ValueError(
            f"checksum page size must be a power of two in [{MIN_PAGE_BYTES}, {MAX_PAGE_BYTES}], "
            f"got {page!r}"
        )
    return page


@dataclass(frozen=True)
class PageChecksums:
    """Where a chunk's page hashes live: pages of ``page`` bytes cover bytes [0, ``covers``) of
    the file; their little-endian uint64 hashes are the bytes [covers, covers + 8 * pages), whose
    own hash is ``digest``."""

    page: int
    covers: int
    digest: int

    @property
    def pages(self) -> int:
        return -(-self.covers // self.page)

    @property
    def table_offset(self) -> int:
        return self.covers

    @property
    def table_length(self) -> int:
        return 8 * self.pages

    @property
    def end(self) -> int:
        return self.covers + self.table_length

    def to_json(self) -> dict[str, Any]:
        return {
            "algo": ALGO,
            "page": self.page,
            "covers": self.covers,
            "digest": f"{self.digest:016x}",
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> PageChecksums:
        if not isinstance(d, Mapping):
            raise FormatError(f"{where}: field 'checksums' must be an object")
        if d.get("algo") != ALGO:
            raise FormatError(
                f"{where}: field 'checksums.algo' is {d.get('algo')!r}; this gpuload knows {ALGO!r}"
            )
        try:
            page = check_page_bytes(d.get("page"))
        except ValueError as e:
            raise FormatError(f"{where}: field 'checksums.page': {e}") from None
        covers = d.get("covers")
        if not isinstance(covers, int) or isinstance(covers, bool) or not 0 <= covers < 1 << 50:
            raise FormatError(f"{where}: field 'checksums.covers' must be an int in [0, 2^50)")
        digest = d.get("digest")
        if not isinstance(digest, str) or len(digest) != 16:
            raise FormatError(f"{where}: field 'checksums.digest' must be 16 hex digits")
        try:
            value = int(digest, 16)
        except ValueError:
            raise FormatError(f"{where}: field 'checksums.digest' must be 16 hex digits") from None
        return cls(page, covers, value)


def page_hashes(parts: Iterable[Any], page: int) -> np.ndarray:
    """Hashes of the consecutive ``page``-byte pages of the concatenation of ``parts`` (the last
    page may be short), computed without joining the parts."""
    out: list[int] = []
    h = xxhash.xxh3_64()
    fill = 0
    for part in parts:
        mv = memoryview(part).cast("B")
        pos, n = 0, len(mv)
        while pos < n:
            if fill == 0 and n - pos >= page:  # a whole page inside this part: one call
                out.append(hash_bytes(mv[pos : pos + page]))
                pos += page
                continue
            take = min(page - fill, n - pos)
            h.update(mv[pos : pos + take])
            fill += take
            pos += take
            if fill == page:
                out.append(h.intdigest())
                h.reset()
                fill = 0
    if fill:
        out.append(h.intdigest())
    return np.array(out, dtype="<u8")


def bad_pages(buf: Any, start: int, sums: PageChecksums, hashes: np.ndarray) -> list[int]:
    """Indexes of the pages in ``buf`` (bytes [start, start + len(buf)) of the file, page-aligned
    at ``start``, ending on a page boundary or at ``covers``) whose hash does not match."""
    mv = memoryview(buf).cast("B")
    page = sums.page
    p0 = start // page
    n = len(mv)
    expected = hashes[p0 : p0 + -(-n // page)].tolist()
    bad = []
    for k, want in enumerate(expected):
        if hash_bytes(mv[k * page : (k + 1) * page]) != want:
            bad.append(p0 + k)
    if len(expected) * page < n:  # more bytes than pages: they cannot be verified
        bad.append(p0 + len(expected))
    return bad
