"""The CPU fused kernel (``fused_cpu`` in ``fused_source.py``) vectorised with NumPy, bit for bit.

Why: compiling the Numba kernel takes ~10 s in a process whose kernel cache is empty (a new
container, CI job or cluster node), and loading it from the cache ~1 s. This twin needs no
compilation, so a stage runs its first batches here while the compiled kernel is being built
on a background thread, then switches. Its outputs are the compiled kernel's, bit for bit
(tested on random sizes, windows and specs): the same float32 operations in the same order --
the vertical taps summed tap by tap per output row, the horizontal taps gathered from that
row, colour, normalisation and encoding per element, the contrast pre-pass from the direct 2-D
taps at the grid cells, summed cell by cell. That holds because the CPU kernel is compiled with
IEEE semantics (no fused multiply-add contraction, no reciprocal approximation; see
``fused._CPU_FASTMATH``); an elementwise loop that LLVM vectorises computes the same values.

It is slower than the compiled kernel (about 5-10x on one core) and meant only for a cold
start. Inputs must already be valid (``fused.check_inputs``), as for the compiled kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .fused import (
    CONTRAST_GRID,
    PARAM_BRIGHTNESS,
    PARAM_CONTRAST,
    PARAM_FLIP,
    PARAM_SATURATION,
)

F = np.float32
_HALF = F(0.5)
_ONE = F(1.0)
_ZERO = F(0.0)
_MAX8 = F(255.0)
_TWO = F(2.0)


def _ifloor(x: np.ndarray) -> np.ndarray:
    """floor() to int64 the way the kernel's ``ifloor`` computes it (truncate, then adjust)."""
    i = x.astype(np.int64)
    return i - (i.astype(F) > x)


def _axis(o: np.ndarray, start: F, length: F, n_out: int):
    """``axis`` for the output indices ``o`` (int64 array): centres, support, first taps, counts;
    the support and whether it antialiases are the same for every output of one axis."""
    scale = F(length / F(n_out))
    c = start + (o.astype(F) + _HALF) * scale
    if scale > _TWO:
        lo = _ifloor(c - scale + _HALF)
        return c, scale, lo, _ifloor(c + scale + _HALF) - lo
    return c, _ONE, _ifloor(c - _HALF), np.full(o.shape, 2, np.int64)


def _tap_weight(x: np.ndarray, c: np.ndarray, inv_s: F) -> np.ndarray:
    w = _ONE - np.abs(x.astype(F) + _HALF - c) * inv_s
    return np.where(w < _ZERO, _ZERO, w)


def _clamp(v: np.ndarray, lo, hi) -> np.ndarray:
    """``clampf``/``clampi``: NaN passes through, as in the kernel."""
    return np.where(v < lo, lo, np.where(v > hi, hi, v))


def _luminance(r, g, b):
    return F(0.299) * r + F(0.587) * g + F(0.114) * b


class _Consts:
    """``consts``: one sample's flip, colour factors, contrast mean and normalisation."""

    def __init__(self, spec, b: int, params, means, mean, inv_std) -> None:
        self.flip = bool(spec.flip and params[b, PARAM_FLIP] > _HALF)
        self.fb = F(params[b, PARAM_BRIGHTNESS]) if spec.brightness else _ONE
        self.fc = F(params[b, PARAM_CONTRAST]) if spec.contrast else _ONE
        self.ml = F(means[b]) if spec.contrast else _ZERO
        self.fs = F(params[b, PARAM_SATURATION]) if spec.saturation else _ONE
        s = F(1.0 / 255.0)
        self.na = [F(inv_std[k]) * s for k in range(3)]
        self.nb = [-F(mean[k]) * F(inv_std[k]) for k in range(3)]


def _shade(spec, r, g, bb, c: _Consts):
    """Brightness -> contrast -> saturation on the 0..255 scale, clamped after each."""
    if spec.brightness:
        r, g, bb = (_clamp(v * c.fb, _ZERO, _MAX8) for v in (r, g, bb))
    if spec.contrast:
        base = (_ONE - c.fc) * c.ml
        r, g, bb = (_clamp(c.fc * v + base, _ZERO, _MAX8) for v in (r, g, bb))
    if spec.saturation:
        lum = (_ONE - c.fs) * _luminance(r, g, bb)
        r, g, bb = (_clamp(c.fs * v + lum, _ZERO, _MAX8) for v in (r, g, bb))
    return r, g, bb


def bf16_bits(v: np.ndarray) -> np.ndarray:
    """``bits_bf16``: float32 -> bfloat16 bit patterns, round to nearest even (NaN: 0x7FC0)."""
    u = v.view(np.uint32)
    h = (u >> 16) & 1
    h += u
    h += 0x7FFF  # wraps only for negative NaNs, which the last line replaces
    h >>= 16
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, np.uint32(0x7FC0), h)


def f16_bits(v: np.ndarray) -> np.ndarray:
    """``bits_f16``: float32 -> IEEE binary16 bit patterns. NumPy's conversion rounds to nearest
    even, subnormals and overflow included, as ``bits_f16`` does (both tested against each
    other); only NaN differs: the kernel writes 0x7E00 for every NaN."""
    with np.errstate(over="ignore"):  # overflow to inf is the rounding asked for
        h = v.astype(np.float16).view(np.uint16)
    return np.where(v != v, np.uint16(0x7E00), h)


def _encode(spec, planes, c: _Consts) -> list[np.ndarray]:
    """``encode3`` (or the bit-pattern rounding of the separable driver) of three planes."""
    kind = spec.out_kind
    if kind == "uint8":
        return [(_clamp(v, _ZERO, _MAX8) + _HALF).astype(np.int64) for v in planes]
    normed = [v * c.na[k] + c.nb[k] for k, v in enumerate(planes)]
    if kind == "float32":
        return normed
    bits = f16_bits if kind == "float16" else bf16_bits
    return [bits(np.ascontiguousarray(v, F)) for v in normed]


def _htaps(spec, W: int, x0: F, ww: F, OW: int, flip: bool):
    """The horizontal tap table (already flipped): source columns (K, OW) and weights."""
    j = np.arange(OW, dtype=np.int64)
    jj = OW - 1 - j if (spec.flip and flip) else j
    cx, sx, xlo, nx = _axis(jj, x0, ww, OW)
    if ww / F(OW) <= _TWO:  # bilinear: taps lo, lo + 1 with weights 1 - f, f
        fx = cx - _HALF - xlo.astype(F)
        xoff = np.stack([np.clip(xlo, 0, W - 1), np.clip(xlo + 1, 0, W - 1)])
        return xoff, np.stack([_ONE - fx, fx]), False
    K = max(1, int(nx.max()))
    isx = _ONE / sx
    k = np.arange(K, dtype=np.int64)[:, None]
    w = np.where(k < nx, _tap_weight(xlo + k, cx, isx), _ZERO)
    ws = np.zeros(OW, F)
    for t in range(K):  # in tap order, as the kernel sums them
        ws = ws + w[t]
    inv = _ONE / ws
    return np.clip(xlo + k, 0, W - 1), w * inv, True


def _vertical(rows: np.ndarray, i: np.ndarray, y0: F, wh: F, OH: int) -> np.ndarray:
    """Vertical taps of output rows ``i`` over the needed source span ``rows`` (H, n) uint8:
    per row, the taps' weighted source rows summed in tap order (uint8 -> float32 is exact)."""
    H = rows.shape[0]
    cy, sy, ylo, ny = _axis(i, y0, wh, OH)
    if sy == _ONE:
        fy = (cy - _HALF - ylo.astype(F))[:, None]
        out = np.multiply(rows[np.clip(ylo, 0, H - 1)], _ONE - fy, dtype=F)
        out += np.multiply(rows[np.clip(ylo + 1, 0, H - 1)], fy, dtype=F)
        return out
    isy = _ONE / sy
    w = [np.where(t < ny, _tap_weight(ylo + t, cy, isy), _ZERO) for t in range(int(ny.max()))]
    ws = np.zeros(len(i), F)
    for wt in w:
        ws = ws + wt
    inv = _ONE / ws
    acc = np.multiply(rows[np.clip(ylo, 0, H - 1)], (w[0] * inv)[:, None], dtype=F)
    for t in range(1, len(w)):  # a zero weight adds +0.0 where the kernel skips the tap: same sum
        acc += np.multiply(rows[np.clip(ylo + t, 0, H - 1)], (w[t] * inv)[:, None], dtype=F)
    return acc


def _horizontal(tmp: np.ndarray, C: int, xoff, xw, aa: bool):
    """Horizontal taps from the vertical pass's rows into three (rows, OW) planes."""
    nch = 1 if C == 1 else 3
    if not aa:
        planes = [xw[0] * tmp[:, xoff[0] + ch] + xw[1] * tmp[:, xoff[1] + ch] for ch in range(nch)]
    else:
        planes = []
        for ch in range(nch):
            acc = np.zeros((tmp.shape[0], xoff.shape[1]), F)
            for t in range(xoff.shape[0]):
                acc += xw[t] * tmp[:, xoff[t] + ch]
            planes.append(acc)
    return planes * 3 if nch == 1 else planes


def _sample_grid(src, off, H, W, C, yax, xax):
    """``sample`` (the direct 2-D form) at every (row centre, column centre) pair: three
    (ny, nx) planes on the 0..255 scale."""
    img = src[off : off + H * W * C].reshape(H, W, C)
    cy, sy, ylo, ny = yax
    cx, sx, xlo, nx = xax
    chans = [0] if C == 1 else [0, 1, 2]
    if sy == _ONE and sx == _ONE:  # bilinear: lerp2
        fy = (cy - _HALF - ylo.astype(F))[:, None]
        fx = (cx - _HALF - xlo.astype(F))[None, :]
        ya, yb = np.clip(ylo, 0, H - 1)[:, None], np.clip(ylo + 1, 0, H - 1)[:, None]
        xa, xb = np.clip(xlo, 0, W - 1)[None, :], np.clip(xlo + 1, 0, W - 1)[None, :]
        out = []
        for ch in chans:
            a, b = img[ya, xa, ch].astype(F), img[ya, xb, ch].astype(F)
            c, d = img[yb, xa, ch].astype(F), img[yb, xb, ch].astype(F)
            t = a + fx * (b - a)
            u = c + fx * (d - c)
            out.append(t + fy * (u - t))
        return out * 3 if C == 1 else out
    isy, isx = _ONE / sy, _ONE / sx
    Ky, Kx = int(ny.max()), int(nx.max())
    wx = [np.where(t < nx, _tap_weight(xlo + t, cx, isx), _ZERO) for t in range(Kx)]
    wsx = np.zeros(len(cx), F)
    for t in range(Kx):
        wsx = wsx + wx[t]
    wsy = np.zeros(len(cy), F)
    acc = [np.zeros((len(cy), len(cx)), F) for _ in chans]
    for ty in range(Ky):
        wy = np.where(ty < ny, _tap_weight(ylo + ty, cy, isy), _ZERO)
        wsy = wsy + wy
        yi = np.clip(ylo + ty, 0, H - 1)[:, None]
        for a, ch in zip(acc, chans):
            tr = np.zeros((len(cy), len(cx)), F)
            for tx in range(Kx):
                tr += wx[tx][None, :] * img[yi, np.clip(xlo + tx, 0, W - 1)[None, :], ch]
            a += wy[:, None] * tr
    norm = _ONE / (wsy[:, None] * wsx[None, :])
    out = [a * norm for a in acc]
    return out * 3 if C == 1 else out


def _image_mean(spec, b, OH, OW, src, meta, windows, params) -> F:
    """``image_mean``: mean luminance of the brightness-adjusted grid cells, summed in order."""
    ngy, ngx = min(CONTRAST_GRID, OH), min(CONTRAST_GRID, OW)
    gi = ((2 * np.arange(ngy, dtype=np.int64) + 1) * OH) // (2 * ngy)
    gj = ((2 * np.arange(ngx, dtype=np.int64) + 1) * OW) // (2 * ngx)
    off, H, W, C = (int(v) for v in meta[b])
    yax = _axis(gi, F(windows[b, 0]), F(windows[b, 2]), OH)
    xax = _axis(gj, F(windows[b, 1]), F(windows[b, 3]), OW)
    r, g, bb = _sample_grid(src, off, H, W, C, yax, xax)
    if spec.brightness:
        fb = F(params[b, PARAM_BRIGHTNESS])
        r, g, bb = (_clamp(v * fb, _ZERO, _MAX8) for v in (r, g, bb))
    lum = _luminance(r, g, bb).ravel()
    return F(np.add.accumulate(lum, dtype=F)[-1] / F(ngy * ngx))  # sequential, as the kernel


def _one_image(spec, b, OH, OW, src, meta, windows, params, mean, inv_std, means, out) -> None:
    """``rows_block`` over all rows of image ``b``."""
    off, H, W, C = (int(v) for v in meta[b])
    y0, x0, wh, ww = (F(v) for v in windows[b])
    c = _Consts(spec, b, params, means, mean, inv_std)
    xoff, xw, aa = _htaps(spec, W, x0, ww, OW, c.flip)
    xmin, xmax = int(xoff.min()), int(xoff.max())
    rows = src[off : off + H * W * C].reshape(H, W * C)[:, xmin * C : (xmax + 1) * C]
    tmp = _vertical(rows, np.arange(OH, dtype=np.int64), y0, wh, OH)
    planes = _horizontal(tmp, C, (xoff - xmin) * C, xw, aa)
    planes = _shade(spec, *planes, c)
    enc = _encode(spec, planes, c)
    for ch in range(3):
        if spec.layout == "NCHW":
            out[b, ch] = enc[ch]
        else:
            out[b, :, :, ch] = enc[ch]


def _images(spec, bs: range, args) -> None:
    """The contrast means, then the outputs, of images ``bs``."""
    src, meta, windows, params, mean, inv_std, means, out = args
    OH, OW = (out.shape[2], out.shape[3]) if spec.layout == "NCHW" else out.shape[1:3]
    if spec.contrast:
        for b in bs:
            means[b] = _image_mean(spec, b, OH, OW, src, meta, windows, params)
    for b in bs:
        _one_image(spec, b, OH, OW, src, meta, windows, params, mean, inv_std, means, out)


def get_numpy_kernel(spec, threads: int = 1) -> Callable:
    """``f(src, meta, windows, params, mean, inv_std, means, out)``: the compiled CPU kernel's
    ABI and results (see ``fused.py``), evaluated with NumPy on up to ``threads`` threads
    (NumPy releases the GIL in its loops; each thread takes a contiguous share of images)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    def fused_numpy(src, meta, windows, params, mean, inv_std, means, out) -> int:
        args = (src, meta, windows, params, mean, inv_std, means, out)
        B = meta.shape[0]
        n = max(1, min(threads, B))
        shares = [range(B * k // n, B * (k + 1) // n) for k in range(n)]
        if n == 1:
            _images(spec, shares[0], args)
            return 0
        with ThreadPoolExecutor(n, thread_name_prefix="gpuload-fused-numpy") as pool:
            for f in [pool.submit(_images, spec, bs, args) for bs in shares]:
                f.result()
        return 0

    return fused_numpy
