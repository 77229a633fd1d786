"""Tests of the decode stage (gpuload.decode): headers, every backend's parity with PIL, DCT
scaling, regions, packing into a reused staging buffer, errors, fork safety, and GPU entry
points (marked gpu; reported NOT RUN without a GPU)."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from gpuload.decode import (
    STAGING_ALIGN,
    DecodeRequest,
    StagingTooSmallError,
    get_decoder,
    read_header,
    register_decoder,
    staging_nbytes,
    staging_nbytes_for,
)
from gpuload.decode._samples import encode_jpeg, encode_png, photo_jpegs, photo_rgb, smooth_texture
from gpuload.device import Device
from gpuload.errors import DecodeError, MissingDependencyError

from ..helpers import DECODERS as BACKENDS
from ..helpers import decoder_params as backend_param
from ..helpers import have_decoder as _have

pytest.importorskip("skimage")

# Mean absolute difference (0-255 scale) allowed against PIL's decode of the same JPEG. All four
# use libjpeg-turbo's accurate IDCT with fancy upsampling; measured differences are 0.0.
PARITY_MEAN_TOL = 0.5
# DCT-scaled decode against PIL's box-filter reduction of the full decode: different filters.
SCALE_MEAN_TOL = 6.0


_decoders: dict = {}


def dec_for(name: str, **kw):
    if name == "cpu-region":  # the cpu backend with nvImageCodec region decode for small windows
        name, kw = "cpu", {**kw, "roi": "region"}
    key = (name, tuple(sorted(kw.items())))
    if key not in _decoders:
        _decoders[key] = get_decoder(name, "cpu", threads=2, **kw)
    return _decoders[key]


def pil_rgb(data: bytes, mode: str = "RGB") -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert(mode))


def decode(dec, datas, requests=None, staging=None):
    if staging is None:
        hdrs = [read_header(d) for d in datas]
        staging = np.empty(staging_nbytes(hdrs, requests, dec), np.uint8)
    return dec.decode_batch(datas, requests, staging)


def mad(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def jpegs():
    return photo_jpegs(4, size=(240, 320), target_bytes=(6_000, 12_000), seed=3)


@pytest.fixture(scope="module")
def odd_jpeg():
    # Odd size: checks ceil(H/s) and MCU edges.
    return encode_jpeg(photo_rgb((237, 317), seed=7), quality=85)


# ---------------------------------------------------------------------------------------------
# headers


def test_header_jpeg_baseline_progressive_gray():
    rgb = photo_rgb((120, 160), seed=1)
    base = read_header(encode_jpeg(rgb, 80))
    assert (base.height, base.width, base.channels, base.codec) == (120, 160, 3, "jpeg")
    assert not base.progressive and base.huffman_sequential and base.mcu == (16, 16)
    prog = read_header(encode_jpeg(rgb, 80, progressive=True))
    assert (prog.height, prog.width, prog.channels) == (120, 160, 3) and prog.progressive
    gray = read_header(encode_jpeg(rgb[:, :, 1], 80))
    assert (gray.height, gray.width, gray.channels) == (120, 160, 1) and gray.mcu == (8, 8)
    s444 = read_header(encode_jpeg(rgb, 80, subsampling=0))
    assert s444.mcu == (8, 8)
    dri = read_header(encode_jpeg(rgb, 80, restart_marker_rows=1))
    assert dri.restart_interval > 0


def test_header_png_variants():
    tex = smooth_texture(33, 47, 4, seed=2)
    cases = {
        "RGB": (tex[:, :, :3], 3, 8),
        "L": (tex[:, :, 0], 1, 8),
        "RGBA": (tex, 4, 8),
        "LA": (tex[:, :, :2], 2, 8),
    }
    for mode, (arr, ch, depth) in cases.items():
        b = io.BytesIO()
        Image.fromarray(arr, mode).save(b, format="PNG")
        h = read_header(b.getvalue())
        assert (h.height, h.width, h.channels, h.codec, h.precision) == (
            33,
            47,
            ch,
            "png",
            depth,
        ), mode
    pal = io.BytesIO()
    Image.fromarray(tex[:, :, :3]).convert("P", palette=Image.ADAPTIVE).save(pal, format="PNG")
    assert read_header(pal.getvalue()).channels == 3
    g16 = io.BytesIO()
    Image.fromarray(tex[:, :, 0].astype(np.uint16) * 257).save(g16, format="PNG")
    h = read_header(g16.getvalue())
    assert (h.channels, h.precision) == (1, 16)


def test_header_other_formats_through_pil():
    tex = smooth_texture(21, 34, 3, seed=4)
    for fmt in ("BMP", "WEBP", "TIFF"):
        b = io.BytesIO()
        Image.fromarray(tex).save(b, format=fmt)
        h = read_header(b.getvalue())
        assert (h.height, h.width, h.channels, h.codec) == (21, 34, 3, fmt.lower())


def test_header_accepts_buffer_types():
    data = encode_jpeg(photo_rgb((64, 96), seed=5), 80)
    for buf in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        h = read_header(buf)
        assert (h.height, h.width) == (64, 96)


@pytest.mark.parametrize(
    "data, what",
    [
        (b"", "empty"),
        (b"this is not an image at all", "unknown"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated"),
        (b"\xff\xd8\x00\x00\x00", "corrupt"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\x00" * 17, "size"),
    ],
)
def test_header_garbage(data, what):
    with pytest.raises(DecodeError, match=what):
        read_header(data)


def test_header_truncated_before_sof():
    data = encode_jpeg(photo_rgb((64, 96), seed=6), 80)
    sof = read_header(data).sof_pos
    with pytest.raises(DecodeError, match="truncated JPEG header"):
        read_header(data[: sof - 10])


def test_header_is_fast():
    data = photo_jpegs(1, seed=1)[0]
    read_header(data)
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        read_header(data)
    per = (time.perf_counter() - t) / n
    # ~4 us measured on this machine; loose bound because the CPU is shared.
    assert per < 40e-6, f"read_header took {per * 1e6:.1f} us"


# ---------------------------------------------------------------------------------------------
# decode parity, scales, regions


@pytest.mark.parametrize("name", backend_param())
def test_full_decode_matches_pil(name, jpegs, odd_jpeg):
    datas = [*jpegs, odd_jpeg]
    batch = decode(dec_for(name), datas)
    assert batch.backend == name
    for i, d in enumerate(datas):
        ref = pil_rgb(d)
        img = batch.image(i)
        assert img.shape == ref.shape
        assert mad(img, ref) <= PARITY_MEAN_TOL, (name, i, mad(img, ref))
        assert tuple(batch.origin[i]) == (0, 0) and tuple(batch.scale[i]) == (1.0, 1.0)


def test_cpu_fast_mode_close(jpegs):
    batch = decode(dec_for("cpu", fast=True), jpegs)
    for i, d in enumerate(jpegs):
        assert mad(batch.image(i), pil_rgb(d)) < 3.0


@pytest.mark.parametrize("name", ["cpu", "pil"])
@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_dct_scale_matches_resized_pil(name, s, jpegs, odd_jpeg):
    datas = [jpegs[0], odd_jpeg]
    batch = decode(dec_for(name), datas, DecodeRequest(scale=s))
    for i, d in enumerate(datas):
        full = pil_rgb(d)
        H, W = full.shape[:2]
        img = batch.image(i)
        assert img.shape == (-(-H // s), -(-W // s), 3)
        assert tuple(batch.scale[i]) == (s, s)
        ref = np.asarray(Image.fromarray(full).reduce(s)) if s > 1 else full
        assert ref.shape == img.shape
        assert mad(img, ref) <= SCALE_MEAN_TOL, (s, mad(img, ref))


@pytest.mark.parametrize("name", ["nvimgcodec", "dali"])
def test_backends_without_dct_scaling_report_scale_one(name, jpegs):
    if not _have(name):
        pytest.skip(f"{name} not installed")
    batch = decode(dec_for(name), jpegs[:1], DecodeRequest(scale=4))
    assert batch.image(0).shape == (240, 320, 3)
    assert tuple(batch.scale[0]) == (1.0, 1.0)


ROIS = [(10, 20, 100, 200), (0, 0, 33, 317), (120, 100, 237, 317), (200, 0, 237, 50), (5, 7, 6, 8)]


@pytest.mark.parametrize(
    "name",
    [
        *backend_param(),
        pytest.param(
            "cpu-region",
            marks=pytest.mark.skipif(not _have("nvimgcodec"), reason="nvimgcodec not installed"),
        ),
    ],
)
@pytest.mark.parametrize("s", [1, 2])
def test_roi_covers_window_and_matches_full_decode(name, s, odd_jpeg):
    datas = [odd_jpeg] * len(ROIS)
    reqs = [DecodeRequest(scale=s, roi=r) for r in ROIS]
    batch = decode(dec_for(name), datas, reqs)
    full_batch = decode(dec_for(name), [odd_jpeg], DecodeRequest(scale=s))
    full = full_batch.image(0)
    fs = int(full_batch.scale[0, 0])
    for i, roi in enumerate(ROIS):
        img = batch.image(i)
        my0, mx0, my1, mx1 = batch.map_window(i, roi)
        # The decoded region covers the window...
        assert my0 >= 0 and mx0 >= 0 and my1 <= img.shape[0] and mx1 <= img.shape[1], (
            roi,
            img.shape,
        )
        # ...and its pixels are the full decode's (exactly: same library, same settings).
        oy, ox = batch.origin[i]
        sc = int(batch.scale[i, 0])
        assert sc == fs
        ref = full[oy // sc : oy // sc + img.shape[0], ox // sc : ox // sc + img.shape[1]]
        assert ref.shape == img.shape
        assert mad(img, ref) <= 0.01, (name, roi, mad(img, ref))


def test_cpu_roi_rows_decode_is_smaller_and_exact(jpegs):
    data = jpegs[1]
    h = read_header(data)
    req = DecodeRequest(scale=1, roi=(10, 30, 90, 200))
    dec = dec_for("cpu")
    shape = dec.output_shapes([h], [req])[0]
    assert shape[0] < h.height and shape[1] == h.width  # stops below the region, full width
    batch = decode(dec, [data], req)
    assert np.array_equal(batch.image(0), pil_rgb(data)[: shape[0]])
    off = decode(dec_for("cpu", roi="off"), [data], req)
    assert off.image(0).shape == (h.height, h.width, 3)


@pytest.mark.skipif(not _have("nvimgcodec"), reason="nvimgcodec not installed")
def test_cpu_roi_region_mode_small_windows_exact(jpegs):
    data = jpegs[2]
    h = read_header(data)
    dec = dec_for("cpu-region")
    small, big = DecodeRequest(roi=(50, 60, 150, 200)), DecodeRequest(roi=(0, 0, 200, 300))
    assert dec.output_shapes([h, h], [small, big]) == [(100, 140, 3), (209, 320, 3)]
    batch = decode(dec, [data, data], [small, big])
    full = pil_rgb(data)
    assert tuple(batch.origin[0]) == (50, 60) and tuple(batch.origin[1]) == (0, 0)
    assert np.array_equal(batch.image(0), full[50:150, 60:200])
    assert np.array_equal(batch.image(1), full[:209])
    # scale > 1 keeps the strict row path (nvImageCodec cannot DCT-scale)
    assert dec.output_shapes([h], [DecodeRequest(2, (50, 60, 150, 200))])[0][1] == 160
    with pytest.raises(DecodeError, match="image 1 of the batch: truncated"):
        decode(dec, [data, data[:-500]], [small, small])


@pytest.mark.parametrize("name", ["nvimgcodec", "dali"])
def test_exact_region_backends_honour_every_roi_mode(name, odd_jpeg):
    """The GPU decoders take ``roi`` as the cpu backend does (DecodeOptions.roi reaches them
    through the loader): "region" decodes each window exactly, "rows" the full-width rows down
    to its bottom, "off" the whole image; the pixels are the full decode's in every mode."""
    if not _have(name):
        pytest.skip(f"{name} not installed")
    h = read_header(odd_jpeg)
    reqs = [DecodeRequest(roi=r) for r in ROIS]
    full = decode(dec_for(name, roi="off"), [odd_jpeg]).image(0)
    want = {  # (origin y, origin x, height, width) of each decoded image
        "region": [(y0, x0, y1 - y0, x1 - x0) for y0, x0, y1, x1 in ROIS],
        "rows": [(0, 0, y1, h.width) for _, _, y1, _ in ROIS],
        "off": [(0, 0, h.height, h.width)] * len(ROIS),
    }
    for mode, shapes in want.items():
        dec = dec_for(name, roi=mode)
        assert dec.roi == mode
        batch = decode(dec, [odd_jpeg] * len(ROIS), reqs)
        for i, (oy, ox, hh, ww) in enumerate(shapes):
            assert tuple(batch.origin[i]) == (oy, ox), (mode, ROIS[i])
            img = batch.image(i)
            assert img.shape == (hh, ww, 3), (mode, ROIS[i])
            assert mad(img, full[oy : oy + hh, ox : ox + ww]) <= 0.01, (mode, ROIS[i])
    assert dec_for(name).roi == "region"  # the default, what DecodeOptions(roi=True) gives
    with pytest.raises(ValueError, match="roi must be 'region'.*got 'bogus'"):
        get_decoder(name, "cpu", roi="bogus")


def test_cpu_roi_rows_not_used_for_progressive_or_restart_markers():
    rgb = photo_rgb((160, 200), seed=8)
    req = DecodeRequest(roi=(0, 0, 40, 40))
    dec = dec_for("cpu")
    for data in (
        encode_jpeg(rgb, 80, progressive=True),
        encode_jpeg(rgb, 80, restart_marker_rows=1),
    ):
        h = read_header(data)
        assert dec.output_shapes([h], [req])[0] == (160, 200, 3)
        assert mad(decode(dec, [data], req).image(0), pil_rgb(data)) <= PARITY_MEAN_TOL


# ---------------------------------------------------------------------------------------------
# packing and staging reuse


def _check_packing(batch, staging_nbytes_total):
    meta = batch.meta
    assert meta.dtype == np.int64 and meta.shape == (len(batch), 4)
    end = 0
    for off, h, w, c in meta:
        assert off % STAGING_ALIGN == 0
        assert off >= end  # no overlap, in order
        end = off + h * w * c
    assert end == batch.nbytes <= staging_nbytes_total


@pytest.mark.parametrize("name", backend_param())
def test_packing_and_staging_reuse(name, jpegs, odd_jpeg):
    dec = dec_for(name)
    batches = [
        ([*jpegs], [DecodeRequest(1), DecodeRequest(2), DecodeRequest(1, (0, 0, 50, 60)), None]),
        ([odd_jpeg, jpegs[2]], None),
        ([jpegs[3], odd_jpeg, jpegs[0]], DecodeRequest(4)),
    ]
    need = max(staging_nbytes([read_header(d) for d in ds], rq, dec) for ds, rq in batches)
    staging = np.full(need + 256, 0xAB, np.uint8)
    ptr = staging.ctypes.data
    for datas, reqs in batches:
        staging[:] = 0xAB
        batch = dec.decode_batch(datas, reqs, staging)
        assert batch.staging is staging and staging.ctypes.data == ptr
        _check_packing(batch, staging.nbytes)
        # bytes outside the images (alignment gaps, tail) are untouched
        mask = np.ones(staging.nbytes, bool)
        for off, h, w, c in batch.meta:
            mask[off : off + h * w * c] = False
        assert (staging[mask] == 0xAB).all()
        for i, d in enumerate(datas):
            img = batch.image(i)
            oy, ox = batch.origin[i]
            s = int(batch.scale[i, 0])
            ref = pil_rgb(d)
            if s > 1:
                ref = np.asarray(Image.fromarray(ref).reduce(s))
            ref = ref[oy // s : oy // s + img.shape[0], ox // s : ox // s + img.shape[1]]
            assert mad(img, ref) <= (PARITY_MEAN_TOL if s == 1 else SCALE_MEAN_TOL)


@pytest.mark.parametrize("name", backend_param())
def test_staging_too_small_is_an_error_not_a_reallocation(name, jpegs):
    dec = dec_for(name)
    hdrs = [read_header(d) for d in jpegs]
    need = staging_nbytes(hdrs, None, dec)
    staging = np.zeros(need - 1, np.uint8)
    with pytest.raises(StagingTooSmallError, match="too small"):
        dec.decode_batch(jpegs, None, staging)
    assert not staging.any()
    assert staging_nbytes(hdrs) >= need  # the decoder-free bound is an upper bound
    assert staging_nbytes_for(len(hdrs), 240, 320) >= need


def test_staging_must_be_host_uint8(jpegs):
    with pytest.raises(TypeError):
        dec_for("cpu").decode_batch(jpegs[:1], None, np.zeros(10**6, np.float32))


# ---------------------------------------------------------------------------------------------
# mixed formats


def _mixed_batch():
    tex = smooth_texture(48, 64, 4, seed=9)
    gray_png = encode_png(tex[:, :, 0])
    rgba_png = encode_png(tex)
    rgb_png = encode_png(tex[:, :, :3])
    la = io.BytesIO()
    Image.fromarray(tex[:, :, :2], "LA").save(la, format="PNG")
    g16 = io.BytesIO()
    Image.fromarray(tex[:, :, 0].astype(np.uint16) * 257).save(g16, format="PNG")
    pal = io.BytesIO()
    Image.fromarray(tex[:, :, :3]).convert("P", palette=Image.ADAPTIVE).save(pal, format="PNG")
    bmp = io.BytesIO()
    Image.fromarray(tex[:, :, :3]).save(bmp, format="BMP")
    jpg = encode_jpeg(photo_rgb((48, 64), seed=10), 85)
    gray_jpg = encode_jpeg(photo_rgb((48, 64), seed=11)[:, :, 1], 85)
    cmyk = io.BytesIO()  # CMYK JPEG: converted to RGB (host fallback on the cpu backend)
    Image.fromarray(photo_rgb((48, 64), seed=12)).convert("CMYK").save(
        cmyk, format="JPEG", quality=90
    )
    datas = [
        jpg,
        rgb_png,
        gray_png,
        rgba_png,
        gray_jpg,
        la.getvalue(),
        g16.getvalue(),
        pal.getvalue(),
        bmp.getvalue(),
        jpg,
        cmyk.getvalue(),
    ]
    # reference pixels, and whether the source is grey
    refs = [
        pil_rgb(jpg),
        tex[:, :, :3],
        tex[:, :, :1],
        tex[:, :, :3],
        pil_rgb(gray_jpg, "L")[:, :, None],
        tex[:, :, :1],
        tex[:, :, :1],
        pil_rgb(pal.getvalue()),
        tex[:, :, :3],
        pil_rgb(jpg),
        pil_rgb(cmyk.getvalue()),
    ]
    return datas, refs


@pytest.mark.parametrize("name", backend_param())
def test_mixed_jpeg_png_batch(name):
    datas, refs = _mixed_batch()
    batch = decode(dec_for(name), datas, DecodeRequest(scale=2))
    for i, ref in enumerate(refs):
        img = batch.image(i)
        if img.shape[2] == 3 and ref.shape[2] == 1:
            ref = np.repeat(ref, 3, axis=2)  # nvimgcodec/dali output RGB for grey sources
        s = int(batch.scale[i, 0])
        if s > 1:
            ref = np.asarray(
                Image.fromarray(ref.squeeze(2) if ref.shape[2] == 1 else ref).reduce(s)
            )
            ref = ref.reshape(img.shape)
        assert img.shape == ref.shape, (i, img.shape, ref.shape)
        assert mad(img, ref) <= (1.0 if s == 1 else SCALE_MEAN_TOL), (name, i, mad(img, ref))
    if name in ("cpu", "pil"):
        assert [int(c) for c in batch.meta[:, 3]] == [3, 3, 1, 3, 1, 1, 1, 3, 3, 3, 3]
        assert [int(s) for s in batch.scale[:, 0]] == [2, 1, 1, 1, 2, 1, 1, 1, 1, 2, 1]


# ---------------------------------------------------------------------------------------------
# corrupt and truncated data


def _corrupt_scan(data: bytes) -> bytes:
    """Overwrite part of the entropy-coded data with bytes libjpeg cannot parse."""
    sos = read_header(data).sos_pos
    mid = sos + (len(data) - sos) // 3
    junk = bytes([0xFF, 0x37] * 64)
    return data[:mid] + junk + data[mid + len(junk) :]


@pytest.mark.parametrize("name", backend_param())
def test_truncated_raises_with_index(name, jpegs):
    bad = jpegs[2][: len(jpegs[2]) * 2 // 3]
    datas = [jpegs[0], jpegs[1], bad, jpegs[3]]
    for reqs in (None, [None, None, DecodeRequest(roi=(0, 0, 20, 20)), None]):
        with pytest.raises(DecodeError, match=r"image 2 of the batch: .*truncated") as ei:
            decode(dec_for(name), datas, reqs)
        assert ei.value.index == 2


@pytest.mark.parametrize("name", backend_param())
def test_truncated_png_and_garbage_raise_with_index(name, jpegs):
    png = encode_png(smooth_texture(40, 50, 3, seed=12))
    for bad, pat in ((png[: len(png) // 2], "truncated PNG"), (b"garbage" * 10, "unknown")):
        with pytest.raises(DecodeError, match=rf"image 1 of the batch: .*{pat}"):
            decode(dec_for(name), [jpegs[0], bad], None, staging=np.empty(10**6, np.uint8))


@pytest.mark.parametrize("name", ["cpu", "pil"])
def test_corrupt_scan_raises_with_index(name, jpegs):
    """Damage inside the entropy-coded data (the stream still ends with EOI). The cpu backend
    (libjpeg warnings are errors) and PIL raise. nvImageCodec's CPU path and DALI's CPU decoder
    decode this very stream without complaint (libjpeg's warnings are not surfaced), which is
    why they are not listed: on those backends only truncation and fatal errors are caught."""
    bad = _corrupt_scan(jpegs[1])
    with pytest.raises(DecodeError, match=r"image 1 of the batch") as ei:
        decode(dec_for(name), [jpegs[0], bad, jpegs[2]])
    assert ei.value.index == 1


def test_cpu_corrupt_scan_above_region_raises(jpegs):
    bad = _corrupt_scan(jpegs[1])
    with pytest.raises(DecodeError, match="image 0 of the batch: corrupt JPEG"):
        decode(dec_for("cpu"), [bad], DecodeRequest(roi=(200, 0, 239, 320)))


def test_decoder_usable_after_error(jpegs):
    for name in [b for b in BACKENDS if _have(b)]:
        dec = dec_for(name)
        with pytest.raises(DecodeError):
            decode(dec, [jpegs[0][:-2000]])
        ok = decode(dec, [jpegs[0]])
        assert mad(ok.image(0), pil_rgb(jpegs[0])) <= PARITY_MEAN_TOL


# ---------------------------------------------------------------------------------------------
# threads, fork, import side effects


def test_concurrent_batches_on_one_decoder(jpegs):
    for name in [b for b in BACKENDS if _have(b)]:
        dec = dec_for(name)
        results = {}

        def run(k, dec=dec, results=results):
            datas = [jpegs[k % 4], jpegs[(k + 1) % 4]]
            b = decode(dec, datas)
            results[k] = all(
                mad(b.image(i), pil_rgb(d)) <= PARITY_MEAN_TOL for i, d in enumerate(datas)
            )

        ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert results == {0: True, 1: True, 2: True, 3: True}, name


def _make(name):
    if name == "cpu-region":
        return get_decoder("cpu", "cpu", threads=2, roi="region")
    return get_decoder(name, "cpu", threads=2)


def _child_decode(name, datas, q):
    try:
        dec = _decoders_in_parent[name]  # inherited through fork, used after fork
        b = decode(dec, datas, _FORK_REQS)
        q.put([int(b.image(i).astype(np.int64).sum()) for i in range(len(datas))])
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put(repr(e))


_decoders_in_parent: dict = {}
_FORK_REQS = [
    None,
    DecodeRequest(2),
    DecodeRequest(1, (10, 10, 60, 90)),
    DecodeRequest(1, (0, 0, 200, 300)),
]


@pytest.mark.parametrize("name", ["cpu", "cpu-region", "pil", "nvimgcodec", "dali"])
def test_decode_in_forked_child_after_parent_decoded(name, jpegs):
    if not _have("nvimgcodec" if name == "cpu-region" else name):
        pytest.skip(f"{name} not installed")
    dec = _make(name)
    _decoders_in_parent[name] = dec
    parent = decode(dec, jpegs, _FORK_REQS)  # starts the parent's pool / library handles
    want = [int(parent.image(i).astype(np.int64).sum()) for i in range(len(jpegs))]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_decode, args=(name, jpegs, q))
    p.start()
    try:
        got = q.get(timeout=120)
    finally:
        p.join(30)
        if p.is_alive():  # pragma: no cover
            p.kill()
    assert got == want
    # the parent still works afterwards
    again = decode(dec, jpegs, _FORK_REQS)
    assert [int(again.image(i).astype(np.int64).sum()) for i in range(len(jpegs))] == want


def test_import_and_construction_start_no_threads_and_touch_no_cuda():
    code = textwrap.dedent(
        """
        import sys, threading
        import gpuload.decode as D
        names = ["cpu", "pil"] + [n for n in ("nvimgcodec", "dali") if n in D.available_decoders()]
        decs = [D.get_decoder(n, "cpu") for n in names]
        assert threading.active_count() == 1, threading.enumerate()
        assert not any(m == "numba.cuda" or m.startswith("cupy") for m in sys.modules), "cuda imported"
        assert "nvidia.dali" not in sys.modules and "nvidia.nvimgcodec" not in sys.modules
        print("ok", len(decs))
        """
    )
    env = dict(os.environ, GPULOAD_FORCE_CPU="1")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_errors():
    assert isinstance(get_decoder("auto", "cpu"), type(get_decoder("cpu", "cpu")))
    with pytest.raises(ValueError, match="unknown decoder"):
        get_decoder("nope", "cpu")
    register_decoder(
        "test-missing", "gpuload_no_such_module_xyz:Thing", "pip install thing", clobber=True
    )
    with pytest.raises(MissingDependencyError, match="pip install thing"):
        get_decoder("test-missing", "cpu")
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("cpu", "x:y")
    # host decoders stage in host memory whatever the loader's device
    assert get_decoder("cpu", Device("cuda", 0)).device == Device("cpu")
    # an option the backend does not take is a ValueError naming the ones it does
    no_hw_load = "'cpu' decoder takes no option 'hw_load'; its options are fast, roi, strict"
    with pytest.raises(ValueError, match=no_hw_load):
        get_decoder("cpu", "cpu", hw_load=0.5)
    with pytest.raises(ValueError, match="'pil' decoder takes no option 'fast'"):
        get_decoder("pil", "cpu", fast=True)
    with pytest.raises(ValueError, match="roi must be 'rows', 'region' or 'off'"):
        get_decoder("auto", "cpu", roi="exact")


@pytest.mark.cudasim
def test_device_packing_under_cuda_simulator():
    """The GPU backends' D2D/H2D copies into a device staging buffer, run on Numba's CUDA
    simulator (strided source, as a pitched decoder output would be)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from numba import cuda
        from gpuload.decode._cuda import (copy_device_to_device, copy_host_to_device,
                                          device_capacity, device_views, stream_handle)
        from gpuload.decode.base import DecodePlan
        staging = cuda.device_array(4096, np.uint8)
        assert device_capacity(staging) == 4096
        plans = [DecodePlan(6, 5, 3), DecodePlan(4, 3, 1)]
        views = device_views(staging, plans, [0, 128])
        host = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
        src = cuda.to_device(host)[:, 1:6, :]  # not contiguous
        s = cuda.stream()
        copy_device_to_device(src, views[0], s)
        copy_host_to_device(np.full((4, 3, 1), 9, np.uint8), views[1], s)
        s.synchronize()
        out = staging.copy_to_host()
        assert np.array_equal(out[:90].reshape(6, 5, 3), host[:, 1:6])
        assert (out[128:140] == 9).all()
        assert stream_handle(None) == 0
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


_ROI_SIM = """
import json, logging, sys
import numpy as np
from numba import cuda
from gpuload.decode import DecodeRequest, get_decoder, read_header
from gpuload.decode._samples import photo_jpegs
from gpuload.decode.nvimgcodec_decoder import NvImgCodecDecoder

logging.basicConfig(stream=sys.stderr, level=logging.DEBUG)
datas = photo_jpegs(3, size=(120, 160), target_bytes=(3_000, 6_000), seed=5)
rois = [(10, 20, 60, 100), (0, 0, 120, 160), (70, 30, 119, 150)]
reqs = [DecodeRequest(roi=r) for r in rois]
hdrs = [read_header(d) for d in datas]
ref = get_decoder("cpu", "cpu", threads=1, roi="off")  # whole images, for the windows' pixels
full = ref.decode_batch(datas, None, np.empty(3 * 120 * 160 * 3 + 256, np.uint8))


def cpu_backend(self):  # no GPU here: nvImageCodec's CPU backend stands in for its GPU ones
    nv = self._nv
    return nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                      backends=[nv.Backend(nv.BackendKind.CPU_ONLY)],
                      options=":fancy_upsampling=0 :fast_idct=1")


res = {}
for backend in ("fallback", "nvimgcodec-cpu"):
    if backend == "nvimgcodec-cpu":
        NvImgCodecDecoder._make_decoder = cpu_backend
    for mode in ("region", "rows"):
        dec = get_decoder("auto", "cuda", roi=mode, fast=True)  # as DecodeOptions(roi=mode)
        assert (dec.name, str(dec.device), dec.roi, dec.fast) == ("nvimgcodec", "cuda:0", mode, True)
        staging = cuda.device_array(dec.staging_nbytes(hdrs, reqs), np.uint8)
        stream = cuda.stream()
        batch = dec.decode_batch(datas, reqs, staging, stream=stream)
        stream.synchronize()
        host = staging.copy_to_host()
        for i in range(3):
            off, h, w, c = (int(v) for v in batch.meta[i])
            oy, ox = (int(v) for v in batch.origin[i])
            want = full.image(i)[oy : oy + h, ox : ox + w].astype(int)
            got = host[off : off + h * w * c].reshape(h, w, c).astype(int)
            res[f"{backend} {mode} {i}"] = [oy, ox, h, w, float(np.abs(got - want).mean())]
        res[f"{backend} {mode} host_decoded"] = dec.host_decoded
print(json.dumps(res))
"""


@pytest.mark.cudasim
def test_gpu_decoders_take_the_roi_option_under_cuda_simulator():
    """DecodeOptions.roi with the GPU decoder ("auto" on CUDA: nvImageCodec) is honoured, not
    a TypeError (issue 13): the decoder's CUDA branch under Numba's CUDA simulator, real JPEGs
    into a device staging buffer, each mode's region and pixels checked against a full CPU
    decode ("region": the window; "rows": full-width rows down to its bottom). Twice: as it
    runs here (nvImageCodec cannot make a CUDA decoder without a GPU: a logged warning, every
    image decoded on the host and counted), and with nvImageCodec's CPU backend standing in
    for the GPU ones (its region decode, host images copied to the device)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run(
        [sys.executable, "-c", _ROI_SIM], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rois = [(10, 20, 60, 100), (0, 0, 120, 160), (70, 30, 119, 150)]
    for backend, fallbacks in (("fallback", 3), ("nvimgcodec-cpu", 0)):
        for mode in ("region", "rows"):
            assert res[f"{backend} {mode} host_decoded"] == fallbacks
            for i, (y0, x0, y1, x1) in enumerate(rois):
                want = [y0, x0, y1 - y0, x1 - x0] if mode == "region" else [0, 0, y1, 160]
                assert res[f"{backend} {mode} {i}"][:4] == want, (backend, mode, i)
                # fast IDCT against the accurate reference: a few levels at most
                assert res[f"{backend} {mode} {i}"][4] < 3.0, (backend, mode, i, res)
    assert "decoding on the host" in r.stderr  # the fallback is logged, never silent


# ---------------------------------------------------------------------------------------------
# GPU entry points (reported NOT RUN without a CUDA GPU)


_LIBRARY = {"nvimgcodec": "nvidia.nvimgcodec", "dali": "nvidia.dali"}


def _device_staging(nbytes):
    from numba import cuda

    return cuda.device_array(nbytes, np.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nvimgcodec", "dali"])
def test_gpu_decode_into_device_staging(name, jpegs, odd_jpeg):
    from numba import cuda

    pytest.importorskip(_LIBRARY[name])
    dec = get_decoder(name, "cuda")
    datas = [*jpegs, odd_jpeg]
    reqs = [
        None,
        DecodeRequest(roi=(10, 20, 100, 200)),
        None,
        DecodeRequest(roi=(0, 0, 240, 160)),
        None,
    ]
    hdrs = [read_header(d) for d in datas]
    staging = _device_staging(staging_nbytes(hdrs, reqs, dec))
    ptr = staging.__cuda_array_interface__["data"][0]
    stream = cuda.stream()
    for _ in range(2):  # reuse across batches
        batch = dec.decode_batch(datas, reqs, staging, stream=stream)
        stream.synchronize()
        assert staging.__cuda_array_interface__["data"][0] == ptr
        host = staging.copy_to_host()
        _check_packing(batch, staging.size)
        for i, d in enumerate(datas):
            off, h, w, c = (int(v) for v in batch.meta[i])
            img = host[off : off + h * w * c].reshape(h, w, c)
            oy, ox = batch.origin[i]
            ref = pil_rgb(d)[oy : oy + h, ox : ox + w]
            assert mad(img, ref) <= 2.0  # nvJPEG's IDCT differs slightly from libjpeg's


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nvimgcodec", "dali"])
def test_gpu_mixed_formats_and_errors(name, jpegs):
    pytest.importorskip(_LIBRARY[name])
    dec = get_decoder(name, "cuda")
    datas, refs = _mixed_batch()
    hdrs = [read_header(d) for d in datas]
    staging = _device_staging(staging_nbytes(hdrs, None, dec))
    batch = dec.decode_batch(datas, None, staging)
    host = staging.copy_to_host()
    for i, ref in enumerate(refs):
        off, h, w, c = (int(v) for v in batch.meta[i])
        img = host[off : off + h * w * c].reshape(h, w, c)
        ref = np.repeat(ref, 3, axis=2) if ref.shape[2] == 1 else ref
        assert mad(img, ref) <= 2.0
    with pytest.raises(DecodeError, match="image 1 of the batch"):
        dec.decode_batch([jpegs[0], jpegs[1][:-3000]], None, staging)


@pytest.mark.gpu
def test_gpu_auto_picks_nvimgcodec():
    assert get_decoder("auto", "cuda").name in ("nvimgcodec", "dali")
