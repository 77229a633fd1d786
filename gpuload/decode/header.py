"""Image header parsing without decoding.

JPEG and PNG headers are parsed in pure Python (a few microseconds): JPEG by walking the marker
segments up to the start of scan, PNG from the IHDR chunk. Any other format goes through PIL,
which only reads the header at ``Image.open``; GIF, BMP and WebP dimensions are read in pure
Python first, so that gpuload's pixel limit is checked before PIL sees the data.

Nothing here allocates memory sized from a header: the dimensions a header claims are checked
against a pixel limit (:data:`DEFAULT_MAX_PIXELS`, ``DecodeOptions.max_pixels``) before any
decoder or staging buffer is sized from them.
"""

from __future__ import annotations

import io
import numbers
from dataclasses import dataclass

from gpuload.errors import DecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageHeader",
    "read_header",
    "incomplete_reason",
    "output_channels",
    "check_size",
    "validate_max_pixels",
]

DEFAULT_MAX_PIXELS = 89_478_485
"""Default pixel limit per image: the value of Pillow's ``Image.MAX_IMAGE_PIXELS`` (a copy, so
that a change to Pillow's mutable global does not change gpuload's limit)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EOI = b"\xff\xd9"
_IEND = b"IEND"

# SOFn markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 = DHT, C8 = JPG extension, CC = DAC are not SOF).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_HUFFMAN_SEQUENTIAL_SOF = frozenset({0xC0, 0xC1})  # baseline and extended sequential, Huffman
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels (palette counted as RGB)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclass(slots=True)
class ImageHeader:
    """What an encoded image holds, read from its header without decoding.

    ``channels`` counts the colour channels stored in the file (JPEG: 1 grey, 3 YCbCr/RGB,
    4 CMYK/YCCK; PNG: 1 grey, 2 grey+alpha, 3 RGB or palette, 4 RGBA). Decoders output 1 channel
    for grey sources and 3 (RGB) for everything else, see :func:`output_channels`.

    The remaining fields are JPEG details the decoders use; they keep their defaults for other
    codecs: ``sof`` is the SOFn marker (0xC0 baseline, 0xC2 progressive, ...), ``mcu`` the MCU
    size in pixels (rows, columns), ``precision`` the bits per sample, ``restart_interval`` the
    DRI value (0 = none), ``sof_pos`` the byte offset of the SOF height field and ``sos_pos`` the
    byte offset of the first SOS marker.
    """

    height: int
    width: int
    channels: int
    codec: str
    sof: int = 0
    mcu: tuple[int, int] = (1, 1)
    precision: int = 8
    restart_interval: int = 0
    sof_pos: int = -1
    sos_pos: int = -1

    @property
    def progressive(self) -> bool:
        return self.sof in _PROGRESSIVE_SOF

    @property
    def huffman_sequential(self) -> bool:
        """Baseline or extended-sequential Huffman JPEG (one interleaved or per-component scan)."""
        return self.sof in _HUFFMAN_SEQUENTIAL_SOF


def output_channels(header: ImageHeader) -> int:
    """Channels a decoder writes for this image: 1 for grey (alpha dropped), else 3 (RGB)."""
    return 1 if header.channels <= 2 else 3


def validate_max_pixels(value) -> int | None:
    """``value`` as a pixel limit: a positive int, or None for no limit; else TypeError/ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"max_pixels must be a positive int or None (no limit), got {type(value).__name__}"
        )
    if value <= 0:
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {value}")
    return int(value)


def check_size(height: int, width: int, max_pixels: int | None, what: str = "image") -> None:
    """Raise DecodeError for dimensions a decoder must not allocate for: zero or negative, or
    more than ``max_pixels`` pixels (None: no limit)."""
    if height <= 0 or width <= 0:
        raise DecodeError(f"corrupt {what} header: image size {height}x{width}")
    if max_pixels is not None and height * width > max_pixels:
        raise DecodeError(
            f"too many pixels: the {what} header claims {height}x{width} = {height * width} "
            f"pixels, over the limit of {max_pixels} (DecodeOptions.max_pixels)"
        )


def _as_bytes_like(buf):
    """Return something indexable by int -> int and sliceable to bytes, without copying bytes."""
    if isinstance(buf, (bytes, bytearray)):
        return buf
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1 or not mv.c_contiguous:
        mv = mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())
    return mv


def read_header(buf, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Parse an encoded image's header: JPEG and PNG in pure Python, anything else with PIL.

    ``buf`` is any bytes-like object (bytes, bytearray, memoryview, 1-D uint8 numpy array).
    Raises :class:`~gpuload.errors.DecodeError` naming what is wrong for empty, truncated,
    corrupt or unrecognised data, for zero or negative dimensions, and for an image of more
    than ``max_pixels`` pixels (None: no limit of gpuload's own; formats read through Pillow
    are still subject to Pillow's ``Image.MAX_IMAGE_PIXELS``, whose refusal is a DecodeError).
    """
    data = _as_bytes_like(buf)
    n = len(data)
    if n == 0:
        raise DecodeError("empty image buffer (0 bytes)")
    if n >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF:
        h = _read_jpeg(data, n)
    elif n >= 8 and bytes(data[:8]) == _PNG_SIGNATURE:
        h = _read_png(data, n)
    elif n >= 2 and data[0] == 0xFF and data[1] == 0xD8:
        raise DecodeError(f"corrupt JPEG header: SOI marker not followed by a marker ({n} bytes)")
    else:
        peek = _peek_size(data, n)
        if peek is not None:
            check_size(peek[0], peek[1], max_pixels, peek[2])
        h = _read_with_pil(data, n)
    check_size(h.height, h.width, max_pixels, h.codec.upper())
    return h


def _read_jpeg(data, n: int) -> ImageHeader:
    i = 2
    sof = None
    restart = 0
    sof_markers = _SOF_MARKERS
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise DecodeError(
                f"corrupt JPEG header: expected a marker at byte {i}, found 0x{data[i]:02x}"
            )
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= m <= 0xD7 or m == 0x01:  # standalone markers have no length
            i += 2
            continue
        seg_len = (data[i + 2] << 8) | data[i + 3]
        if m == 0xDA:  # SOS
            if sof is None:
                raise DecodeError("corrupt JPEG header: start of scan before any SOF marker")
            return _jpeg_header(sof, restart, i)
        if seg_len < 2 or m == 0xD8 or m == 0xD9:
            raise DecodeError(
                f"corrupt JPEG header: marker 0x{m:02x} (length {seg_len}) at byte {i}"
            )
        if m in sof_markers:
            if i + 2 + seg_len > n or seg_len < 8:
                raise DecodeError(f"truncated JPEG header: SOF segment at byte {i} is cut short")
            if sof is not None:
                raise DecodeError(f"corrupt JPEG header: second SOF marker at byte {i}")
            sof = _parse_sof(data, i, m, seg_len)
        elif m == 0xDD and i + 6 <= n:  # DRI
            restart = (data[i + 4] << 8) | data[i + 5]
        i += 2 + seg_len
    what = "start of scan" if sof is not None else "SOF marker"
    raise DecodeError(f"truncated JPEG header: data ends at byte {n} before the {what}")


def _parse_sof(data, i: int, m: int, seg_len: int):
    p = data[i + 4]
    height = (data[i + 5] << 8) | data[i + 6]
    width = (data[i + 7] << 8) | data[i + 8]
    nf = data[i + 9]
    if seg_len != 8 + 3 * nf:
        raise DecodeError(
            f"corrupt JPEG header: SOF length {seg_len} does not match {nf} components"
        )
    if width == 0 or height == 0:
        raise DecodeError(
            f"unsupported JPEG: image size {height}x{width} (height defined by DNL or zero)"
        )
    if nf not in (1, 3, 4):
        raise DecodeError(f"unsupported JPEG: {nf} colour components")
    hmax = vmax = 1
    for k in range(nf):
        hv = data[i + 11 + 3 * k]
        h, v = hv >> 4, hv & 15
        if not (1 <= h <= 4 and 1 <= v <= 4):
            raise DecodeError(f"corrupt JPEG header: sampling factors {h}x{v} in component {k}")
        if h > hmax:
            hmax = h
        if v > vmax:
            vmax = v
    mcu = (8, 8) if nf == 1 else (8 * vmax, 8 * hmax)
    return (m, height, width, nf, p, mcu, i + 5)


def _jpeg_header(sof, restart: int, sos_pos: int) -> ImageHeader:
    m, height, width, nf, p, mcu, sof_pos = sof
    return ImageHeader(
        height=height,
        width=width,
        channels=nf,
        codec="jpeg",
        sof=m,
        mcu=mcu,
        precision=p,
        restart_interval=restart,
        sof_pos=sof_pos,
        sos_pos=sos_pos,
    )


def _read_png(data, n: int) -> ImageHeader:
    if n < 33:
        raise DecodeError(f"truncated PNG: {n} bytes, the IHDR chunk needs 33")
    if bytes(data[12:16]) != b"IHDR" or bytes(data[8:12]) != b"\x00\x00\x00\x0d":
        raise DecodeError("corrupt PNG: the first chunk is not a 13-byte IHDR")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    depth, ctype = data[24], data[25]
    if not (0 < width < 1 << 31 and 0 < height < 1 << 31):  # PNG: 1 .. 2**31 - 1
        raise DecodeError(f"corrupt PNG: image size {height}x{width}")
    if ctype not in _PNG_CHANNELS:
        raise DecodeError(f"corrupt PNG: unknown colour type {ctype}")
    if depth not in _PNG_DEPTHS[ctype]:
        raise DecodeError(f"corrupt PNG: bit depth {depth} is invalid for colour type {ctype}")
    return ImageHeader(
        height=height, width=width, channels=_PNG_CHANNELS[ctype], codec="png", precision=depth
    )


_PIL_BANDS = {
    "P": 3,
    "PA": 4,
    "1": 1,
    "L": 1,
    "LA": 2,
    "La": 2,
    "I": 1,
    "F": 1,
    "I;16": 1,
    "I;16B": 1,
    "I;16L": 1,
    "I;16N": 1,
}


def _peek_size(data, n: int) -> tuple[int, int, str] | None:
    """(height, width, codec) from a GIF, BMP or WebP header, read without PIL (so the pixel
    limit is checked before PIL parses anything), or None for other or too short data."""
    head = bytes(data[:30])
    if n >= 10 and head[:6] in (b"GIF87a", b"GIF89a"):  # logical screen size, uint16 LE
        h, w = _le(head, 8, 2), _le(head, 6, 2)
        return (h, w, "GIF") if h and w else None  # 0: PIL takes the first frame's size
    if n >= 26 and head[:2] == b"BM":
        if _le(head, 14, 4) == 12:  # OS/2 BITMAPCOREHEADER: uint16 sizes
            return _le(head, 20, 2), _le(head, 18, 2), "BMP"
        w = int.from_bytes(head[18:22], "little", signed=True)
        h = int.from_bytes(head[22:26], "little", signed=True)
        return abs(h), w, "BMP"  # a negative height means rows stored top-down
    if n >= 30 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        chunk = head[12:16]
        if chunk == b"VP8X":  # canvas size - 1, 24-bit LE
            return _le(head, 27, 3) + 1, _le(head, 24, 3) + 1, "WEBP"
        if chunk == b"VP8L" and head[20] == 0x2F:  # 14-bit (size - 1) fields
            bits = _le(head, 21, 4)
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1, "WEBP"
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # 14-bit sizes after start code
            return _le(head, 28, 2) & 0x3FFF, _le(head, 26, 2) & 0x3FFF, "WEBP"
    return None


def _le(b: bytes, at: int, size: int) -> int:
    return int.from_bytes(b[at : at + size], "little")


def _read_with_pil(data, n: int) -> ImageHeader:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - pillow is a core dependency
        raise DecodeError("unknown image format and Pillow is not installed to identify it") from e
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            width, height = im.size
            mode = im.mode
            fmt = (im.format or "unknown").lower()
    except UnidentifiedImageError as e:
        head = bytes(data[:8]).hex(" ")
        raise DecodeError(f"unknown or corrupt image data ({n} bytes, starts with {head})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own limit (its mutable global), or its warning turned into an error
        raise DecodeError(f"too many pixels: Pillow refuses the image header: {e}") from e
    except Exception as e:  # noqa: BLE001 - any failure of a PIL header parser is corrupt data
        raise DecodeError(f"corrupt image header: {type(e).__name__}: {e}") from e
    channels = _PIL_BANDS.get(mode, len(mode) if mode.isalpha() else 3)
    if mode in ("RGB", "YCbCr", "LAB", "HSV"):
        channels = 3
    elif mode in ("RGBA", "RGBX", "RGBa", "CMYK"):
        channels = 4
    return ImageHeader(height=height, width=width, channels=channels, codec=fmt)


def incomplete_reason(buf, header: ImageHeader) -> str | None:
    """Why the encoded stream looks truncated, or None when it looks complete.

    Decoders based on libjpeg pad a truncated JPEG with grey rows instead of failing, so a JPEG
    must contain an EOI marker after its first start of scan (trailing bytes after the EOI are
    tolerated, as libjpeg stops at it). A PNG must end with its IEND chunk (trailing bytes
    tolerated). Costs a reverse byte search (tens of nanoseconds to a few microseconds).
    """
    if header.codec == "jpeg":
        if not isinstance(buf, (bytes, bytearray)):
            buf = _as_bytes_like(buf)
        n = len(buf)
        if n >= 2 and buf[n - 2] == 0xFF and buf[n - 1] == 0xD9:
            return None
        data = buf if isinstance(buf, (bytes, bytearray)) else bytes(buf)
        if data.rfind(_EOI, max(header.sos_pos, 0)) >= 0:
            return None
        return f"truncated JPEG: no EOI marker after the start of scan ({n} bytes)"
    if header.codec == "png":
        data = buf if isinstance(buf, (bytes, bytearray)) else bytes(_as_bytes_like(buf))
        if data.rfind(_IEND, 33) >= 0:
            return None
        return f"truncated PNG: no IEND chunk ({len(data)} bytes)"
    return None
