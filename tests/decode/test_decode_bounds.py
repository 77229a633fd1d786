"""Allocation only after a plausibility check: an image header claiming huge (or zero)
dimensions is a DecodeError naming the image (index in the batch; table, row and column in the
loader) before any buffer is sized from it, ``on_error="skip"`` drops it, memory stays bounded,
and every decoder failure for one image (MemoryError, PIL's DecompressionBombError or its
warning turned into an error, a library's own exception) is a DecodeError naming that image."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

import gpuload
from gpuload import ops
from gpuload.decode import get_decoder, read_header, staging_nbytes
from gpuload.decode.header import DEFAULT_MAX_PIXELS
from gpuload.errors import DecodeError
from gpuload.testing.faults import hostile_image

from ..helpers import decoder_params as backend_param
from ..helpers import encode, textured_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUGE = 65535  # 65535 x 65535 x 3 bytes: a 12 GiB image, 15 GiB of staging with headroom
LIMIT_RE = r"too many pixels.*over the limit of 89478485 \(DecodeOptions.max_pixels\)"


# ---------------------------------------------------------------------------------------------
# hostile images: real small images whose headers are patched to claim other dimensions


def _real(fmt: str, h: int = 12, w: int = 16, seed: int = 0, **kw) -> bytes:
    return encode(textured_image(np.random.default_rng(seed), h, w), fmt, **kw)


def png_claiming(width: int, height: int) -> bytes:
    """A real PNG whose IHDR claims width x height, with a valid CRC (so libpng and PIL get
    past the chunk check)."""
    return hostile_image("png", width, height)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF segment claims width x height."""
    return hostile_image("jpeg", width, height)


def bmp_claiming(width: int, height: int) -> bytes:
    """A real BMP whose BITMAPINFOHEADER claims width x height (signed 32-bit fields)."""
    return hostile_image("bmp", width, height)


def gif_claiming(width: int, height: int) -> bytes:
    """A real GIF whose logical screen claims width x height."""
    return hostile_image("gif", width, height)


def webp_claiming(width: int, height: int) -> bytes:
    """A real lossless WebP whose VP8L header claims width x height (at most 16384 x 16384)."""
    return hostile_image("webp", width, height)


HOSTILE = {
    "png": lambda: png_claiming(HUGE, HUGE),
    "jpeg": lambda: jpeg_claiming(HUGE, HUGE),
    "bmp": lambda: bmp_claiming(HUGE, HUGE),
    "gif": lambda: gif_claiming(HUGE, HUGE),
    "webp": lambda: webp_claiming(16384, 16384),
}


# ---------------------------------------------------------------------------------------------
# headers


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_header_over_limit_is_a_decode_error(kind):
    data = HOSTILE[kind]()
    with pytest.raises(DecodeError, match=LIMIT_RE):
        read_header(data)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_header_parser_allocates_nothing_sized_from_the_header(kind):
    """Without a limit the parser reports what the header claims, allocating only a few KiB."""
    data = HOSTILE[kind]()
    tracemalloc.start()
    try:
        h = read_header(data, max_pixels=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (h.height, h.width) == (HUGE, HUGE)
    assert peak < 64 << 10


@pytest.mark.parametrize("kind", ["bmp", "gif", "webp"])
def test_pillow_refusal_is_a_decode_error(kind):
    """Without gpuload's limit, Pillow's own (DecompressionBombError) still refuses these
    headers: a DecodeError, never PIL's exception."""
    with pytest.raises(DecodeError, match="Pillow refuses"):
        read_header(HOSTILE[kind](), max_pixels=None)


def test_pillow_bomb_warning_as_error_is_a_decode_error():
    """100 Mpx is over Pillow's warning threshold but under its error threshold: with the
    warning turned into an error (python -W error), read_header raises a DecodeError."""
    data = bmp_claiming(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DecodeError, match="Pillow refuses"):
            read_header(data, max_pixels=None)
        with pytest.raises(DecodeError, match=LIMIT_RE):  # gpuload's check comes first
            read_header(data)


@pytest.mark.parametrize(
    "data,what",
    [
        (png_claiming(0, 10), "PNG"),
        (png_claiming(10, 0), "PNG"),
        (png_claiming(1 << 31, 1), "PNG"),  # over the PNG maximum of 2**31 - 1
        (jpeg_claiming(0, 10), "JPEG"),
        (jpeg_claiming(10, 0), "JPEG"),
        (bmp_claiming(-5, 10), "BMP"),
        (bmp_claiming(0, 10), "BMP"),
        (bmp_claiming(10, 0), "BMP"),
    ],
)
def test_header_zero_or_negative_size_is_a_decode_error(data, what):
    with pytest.raises(DecodeError, match=f"(corrupt|unsupported) {what}.*image size"):
        read_header(data, max_pixels=None)


def test_header_custom_limit_both_ways():
    data = _real("PNG", 12, 16)  # 192 pixels
    assert read_header(data, max_pixels=192).width == 16  # the limit itself is allowed
    with pytest.raises(DecodeError, match="claims 12x16 = 192 pixels, over the limit of 191"):
        read_header(data, max_pixels=191)
    h = read_header(png_claiming(HUGE, HUGE), max_pixels=None)
    assert h.height * h.width > DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(
    "bad,err", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("9", TypeError)]
)
def test_max_pixels_is_validated(bad, err):
    with pytest.raises(err, match="max_pixels"):
        gpuload.DecodeOptions(max_pixels=bad)
    with pytest.raises(err, match="max_pixels"):
        get_decoder("cpu", "cpu", max_pixels=bad)
    with pytest.raises(TypeError, match="max_pixels"):
        gpuload.DecodeOptions(max_pixels=True)


def test_decode_options_default_and_none():
    assert gpuload.DecodeOptions().max_pixels == DEFAULT_MAX_PIXELS == 89_478_485
    assert gpuload.DecodeOptions(max_pixels=None).max_pixels is None
    opt = gpuload.DecodeOptions(max_pixels=np.int64(1000))
    assert opt.max_pixels == 1000 and type(opt.max_pixels) is int


# ---------------------------------------------------------------------------------------------
# decoders


def _staging(nbytes: int = 1 << 20) -> np.ndarray:
    return np.zeros(nbytes, np.uint8)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("name", backend_param())
def test_decoder_names_the_hostile_image(name, kind):
    dec = get_decoder(name, "cpu", threads=2)
    good = _real("JPEG", 20, 30)
    with pytest.raises(DecodeError, match=r"^image 1 of the batch: too many pixels") as ei:
        dec.decode_batch([good, HOSTILE[kind](), good], staging=_staging())
    assert ei.value.index == 1


@pytest.mark.parametrize("name", backend_param())
def test_decoder_checks_given_headers_before_sizing(name):
    """Headers parsed without a limit and handed to the decoder: planning, staging sizing and
    decode_batch refuse them (naming the index) before anything is allocated."""
    dec = get_decoder(name, "cpu", threads=2)
    datas = [_real("PNG"), _real("JPEG"), png_claiming(HUGE, HUGE), jpeg_claiming(HUGE, 3)]
    hdrs = [read_header(d, max_pixels=None) for d in datas]
    for call in (
        lambda: dec.staging_nbytes(hdrs),
        lambda: dec.output_shapes(hdrs),
        lambda: staging_nbytes(hdrs),
        lambda: dec.decode_batch(datas, staging=_staging(), headers=hdrs),
    ):
        with pytest.raises(DecodeError, match=r"^image 2 of the batch: too many pixels"):
            call()
    # the limit lifted: sizing reports what the headers claim (arithmetic, no allocation)
    free = get_decoder(name, "cpu", threads=2, max_pixels=None)
    assert free.staging_nbytes(hdrs[2:3]) >= HUGE * HUGE * 3
    assert staging_nbytes(hdrs, max_pixels=None) >= HUGE * HUGE * 3


@pytest.mark.parametrize("name", backend_param())
def test_decoder_custom_limit_both_ways(name):
    small, big = _real("JPEG", 12, 16), _real("PNG", 40, 50)
    strict = get_decoder(name, "cpu", threads=2, max_pixels=1000)
    with pytest.raises(DecodeError, match="image 1 of the batch: too many pixels.*limit of 1000"):
        strict.decode_batch([small, big], staging=_staging())
    free = get_decoder(name, "cpu", threads=2, max_pixels=None)
    out = free.decode_batch([small, big], staging=_staging())
    assert [tuple(m[1:3]) for m in out.meta] == [(12, 16), (40, 50)]


def test_no_limit_decodes_an_image_over_the_default_limit():
    """max_pixels=None really lifts the check: a real 9460 x 9460 grey PNG (89,491,600 pixels,
    just over the default) is refused by default and decodes without the limit."""
    a = np.zeros((9460, 9460), np.uint8)
    a[::97] = 200
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG", compress_level=1)
    data = b.getvalue()
    with pytest.raises(DecodeError, match=LIMIT_RE):
        get_decoder("cpu", "cpu", threads=1).decode_batch([data], staging=_staging())
    dec = get_decoder("cpu", "cpu", threads=1, max_pixels=None)
    h = read_header(data, max_pixels=None)
    staging = np.empty(dec.staging_nbytes([h]), np.uint8)
    with warnings.catch_warnings():  # Pillow warns about its own (lower) threshold
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        out = dec.decode_batch([data], staging=staging, headers=[h])
    img = out.image(0)
    assert img.shape == (9460, 9460, 1) and img[97, 5, 0] == 200 and img[98, 5, 0] == 0


def _patch_simplejpeg(monkeypatch, exc: BaseException) -> None:
    """Make libjpeg-turbo's decode (simplejpeg) raise ``exc`` for data holding b"MARK"."""
    import simplejpeg

    real = simplejpeg.decode_jpeg

    def fake(data, *args, **kwargs):
        if b"MARK" in bytes(data):
            raise exc
        return real(data, *args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", fake)


def _marked_jpeg() -> bytes:
    d = _real("JPEG", 20, 30, seed=1)
    return d[:-2] + b"MARK" + d[-2:]  # trailing bytes before EOI: the image still decodes


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        Image.DecompressionBombError("Image size exceeds limit"),
        RuntimeError("library failure"),
    ],
)
def test_any_exception_for_one_image_is_a_decode_error(monkeypatch, exc, threads):
    """cpu backend: whatever libjpeg-turbo (simplejpeg) raises for image 1 of the batch is a
    DecodeError naming image 1, with the original as its cause."""
    _patch_simplejpeg(monkeypatch, exc)
    dec = get_decoder("cpu", "cpu", threads=threads, roi="off")
    good = _real("JPEG", 20, 30)
    with pytest.raises(DecodeError, match=f"^image 1 of the batch: {type(exc).__name__}") as ei:
        dec.decode_batch([good, _marked_jpeg(), good], staging=_staging())
    assert ei.value.index == 1 and ei.value.__cause__ is exc


@pytest.mark.parametrize("threads", [1, 2])
def test_keyboard_interrupt_propagates(monkeypatch, threads):
    _patch_simplejpeg(monkeypatch, KeyboardInterrupt())
    dec = get_decoder("cpu", "cpu", threads=threads, roi="off")
    with pytest.raises(KeyboardInterrupt):
        dec.decode_batch([_real("JPEG"), _marked_jpeg()], staging=_staging())


@pytest.mark.parametrize("name", ["cpu", "pil"])
@pytest.mark.parametrize("as_error", [False, True])
def test_pillow_bomb_check_during_decode_is_a_decode_error(monkeypatch, name, as_error):
    """A PNG within gpuload's limit that Pillow refuses while decoding (its global lowered:
    DecompressionBombError, or its warning turned into an error) is a DecodeError naming it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150 if as_error else 50)
    dec = get_decoder(name, "cpu", threads=2)
    datas = [_real("JPEG", 6, 6), _real("PNG", 12, 16)]  # 36 and 192 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DecodeError, match="^image 1 of the batch: .*(Pillow|exceeds limit)"):
            dec.decode_batch(datas, staging=_staging())


# ---------------------------------------------------------------------------------------------
# the loader: table, row and column; on_error="skip"; bounded memory

RESIZE = [ops.Resize((8, 8))]
HOSTILE_ROWS = {2: "png", 5: "jpeg", 7: "bmp", 9: "gif", 10: "webp"}


def _good_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        fmt = "PNG" if i % 3 == 1 else "JPEG"
        out.append(encode(textured_image(rng, 24 + i, 32), fmt))
    return out


def _hostile_table(tmp_path, rows=HOSTILE_ROWS, n: int = 14, name: str = "hostile"):
    imgs = _good_images(n)
    for r, kind in rows.items():
        imgs[r] = HOSTILE[kind]()
    t = gpuload.Client(tmp_path).ingest(name, {"image": imgs, "label": np.arange(n)})
    return t, imgs


def _by_label(batches) -> dict[int, np.ndarray]:
    out = {}
    for b in batches:
        for lab, img in zip(b["label"].tolist(), np.asarray(b["image"]), strict=True):
            out[lab] = img.copy()
    return out


@pytest.mark.parametrize("row,kind", sorted(HOSTILE_ROWS.items()))
def test_loader_names_table_row_column(tmp_path, row, kind):
    t, _ = _hostile_table(tmp_path, rows={row: kind})
    with pytest.raises(DecodeError) as ei:
        for _ in t.batches(4, image=RESIZE):
            pass
    msg = str(ei.value)
    assert f"table 'hostile', row {row}, column 'image'" in msg
    assert "too many pixels" in msg and "DecodeOptions.max_pixels" in msg


@pytest.mark.parametrize("decoder", backend_param())
def test_loader_skip_delivers_the_other_rows_intact(tmp_path, decoder):
    t, imgs = _hostile_table(tmp_path)
    good_rows = [r for r in range(len(imgs)) if r not in HOSTILE_ROWS]
    clean = gpuload.Client(tmp_path).ingest(
        "clean", {"image": [imgs[r] for r in good_rows], "label": np.array(good_rows)}
    )
    loader = t.batches(4, image=RESIZE, decoder=decoder, on_error="skip")
    got = _by_label(loader)
    want = _by_label(clean.batches(4, image=RESIZE, decoder=decoder))
    assert sorted(got) == good_rows
    assert loader.stats().skipped == len(HOSTILE_ROWS)
    for r in good_rows:
        np.testing.assert_array_equal(got[r], want[r])


def test_loader_maps_a_decoder_index_to_the_row(tmp_path, monkeypatch):
    """The decoder's own check (second line of defence, batch_error indexes) reaches the user
    as table/row/column too, and skip drops exactly those rows: the stage's header check is
    bypassed here so that the decoder sees the hostile headers."""
    from gpuload.image_stage import ImageStage

    monkeypatch.setattr(ImageStage, "_header", lambda self, data: read_header(data, None))
    t, _ = _hostile_table(tmp_path, rows={1: "png", 2: "jpeg", 6: "png"})
    with pytest.raises(DecodeError, match=r"table 'hostile', row 1, column 'image'.*too many"):
        for _ in t.batches(4, image=RESIZE):
            pass
    loader = t.batches(4, image=RESIZE, on_error="skip")
    got = _by_label(loader)
    assert sorted(got) == [0, 3, 4, 5, *range(7, 14)] and loader.stats().skipped == 3


def test_loader_custom_limit_both_ways(tmp_path):
    rng = np.random.default_rng(3)
    sizes = [(12, 16), (48, 64), (12, 16), (40, 40)]  # 192, 3072, 192, 1600 pixels
    imgs = [encode(textured_image(rng, h, w), "JPEG") for h, w in sizes]
    t = gpuload.Client(tmp_path).ingest("sizes", {"image": imgs, "label": np.arange(4)})
    strict = gpuload.DecodeOptions(max_pixels=1000)
    with pytest.raises(DecodeError, match=r"row 1, column 'image'.*limit of 1000"):
        for _ in t.batches(4, image=RESIZE, decode_options=strict):
            pass
    loader = t.batches(4, image=RESIZE, decode_options=strict, on_error="skip")
    assert sorted(_by_label(loader)) == [0, 2] and loader.stats().skipped == 2
    free = t.batches(4, image=RESIZE, decode_options=gpuload.DecodeOptions(max_pixels=None))
    default = t.batches(4, image=RESIZE)
    a, b = _by_label(free), _by_label(default)
    assert sorted(a) == [0, 1, 2, 3]
    for r in a:
        np.testing.assert_array_equal(a[r], b[r])


_MEMORY_CHILD = """
import resource, sys
limit = {limit}
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
if hard != resource.RLIM_INFINITY:
    limit = min(limit, hard)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # before numpy, numba, gpuload
import numpy as np
import gpuload
from gpuload import ops
t = gpuload.open_table({url!r})
opts = gpuload.DecodeOptions(threads=1)
loader = t.batches(8, image=[ops.Resize((8, 8))], decode_options=opts, num_threads=2,
                   on_error="skip")
labels = [int(x) for b in loader for x in b["label"]]
print("labels", labels, "skipped", loader.stats().skipped)
# this process's own peak resident memory (ru_maxrss would carry the parent's over exec)
with open("/proc/self/status") as f:
    print("hwm_kib", next(line.split()[1] for line in f if line.startswith("VmHWM:")))
"""


def _run_bounded(url: str, limit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_NUM_THREADS="2", MALLOC_ARENA_MAX="2", GPULOAD_FORCE_CPU="1")
    code = textwrap.dedent(_MEMORY_CHILD.format(limit=limit, url=url))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
    )


def test_loader_memory_stays_bounded(tmp_path):
    """In a child process whose address space is capped at 4 GiB (a normal run needs well under
    1 GiB; threads are capped so the bound does not depend on the core count), a table with
    65535 x 65535 PNG and JPEG headers (15 GiB of staging each if believed: a MemoryError
    without the check) loads with on_error="skip": the hostile rows are skipped, the rest
    delivered, and the peak resident memory stays small."""
    rows = {2: "png", 5: "jpeg", 12: "png"}
    t, imgs = _hostile_table(tmp_path, rows=rows, n=16)
    p = _run_bounded(t.url, 4 << 30)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    good = [r for r in range(16) if r not in rows]
    assert lines["labels"] == f"{good} skipped {len(rows)}"
    assert int(lines["hwm_kib"]) < 1 << 20  # under 1 GiB resident


# ---------------------------------------------------------------------------------------------
# GPU (reported NOT RUN without a CUDA GPU)


@pytest.mark.gpu
def test_gpu_loader_skips_hostile_headers(tmp_path):
    """On a GPU (device staging, nvImageCodec): hostile headers are skipped before any device
    buffer is sized from them; the other rows come through."""
    pytest.importorskip("torch")
    t, imgs = _hostile_table(tmp_path)
    loader = gpuload.pytorch(
        t, batch_size=4, image=RESIZE, device="cuda", decoder="auto", on_error="skip"
    )
    labels = sorted(int(x) for b in loader for x in b["label"])
    assert labels == [r for r in range(len(imgs)) if r not in HOSTILE_ROWS]
    assert loader.stats().skipped == len(HOSTILE_ROWS)
    with pytest.raises(DecodeError, match=r"table 'hostile', row 2, column 'image'"):
        for _ in gpuload.pytorch(t, batch_size=4, image=RESIZE, device="cuda"):
            pass
