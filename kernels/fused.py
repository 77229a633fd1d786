"""The fused image kernel: crop -> resample -> flip -> colour -> normalize -> dtype/layout.

The per-pixel math is written once, below, as plain Python functions inside the factories
``_build_lib`` (taps and weights: ``axis``, ``tap_weight``; 2-D ``sample``; ``luminance``; dtype
encoders) and ``_build_pixel`` (specialised per ``KernelSpec``: ``consts``, ``shade`` (colour),
``encode3``, ``grid_lum``/``image_mean`` (contrast pre-pass), ``pixel``). A factory takes a
decorator -- ``numba.njit`` for the CPU, ``numba.cuda.jit(device=True)`` for CUDA, the identity
for plain Python -- and returns the decorated functions. Absent ops are compile-time constants
(closure variables), so their code is removed.

Drivers (memory access only; all arithmetic comes from the functions above):
  CUDA  ``fused_main``: one thread per output pixel (grid x over columns, y over rows, z over the
        batch) running ``pixel`` (direct 2-D taps); ``fused_mean``: one block per image, one
        thread per contrast-grid cell, shared-memory reduction.
  CPU   ``fused_cpu``: prange over (image, block of rows) work items, separable evaluation of
        the same taps (see ``_make_cpu_kernel``), float16/bfloat16 rounded from the float bits
        by ``bits_f16``/``bits_bf16`` (integer twins of ``enc_f16``/``enc_bf16``, which need a
        frexp per element; both are tested bit-exact against numpy).
Compiled kernels are cached per (target, KernelSpec) in ``_KERNELS``. ``numba.cuda`` is
imported only when a CUDA kernel is requested.

Kernel ABI
----------
``src``      uint8[:]      B decoded images packed back to back, HWC, C in {1, 3, 4}, row-major
                           (C == 1 is replicated to RGB; C == 4 reads the first three channels).
``meta``     int64[B, 4]   (byte offset, H, W, C) per image.
``windows``  float32[B, 4] crop window (y0, x0, h, w) in that image's own pixel coordinates
                           (continuous coordinates: pixel k covers [k, k+1), its centre is k+0.5).
``params``   float32[B, P] per-sample parameters; the kernel reads the columns PARAM_FLIP,
                           PARAM_BRIGHTNESS, PARAM_CONTRAST, PARAM_SATURATION.
``mean``, ``inv_std``  float32[3] normalisation, applied to pixel/255.
``means``    float32[B]    scratch: per-image mean luminance (contrast pre-pass output).
``out``      (B,3,oh,ow) NCHW or (B,oh,ow,3) NHWC; float32, uint8, or uint16 holding float16 /
             bfloat16 bit patterns (round to nearest even; numba has no CPU float16).

Math, per output element (i, j) of image b (this is what tests/_reference_ops.py implements):

1. Resampling, separately per axis. With window start ``t0``, length ``L`` and ``n`` outputs:
   ``scale = L / n``; the output centre maps to ``c = t0 + (o + 0.5) * scale``; the filter is a
   triangle of support ``s = scale if scale > 2 else 1`` (plain bilinear unless shrinking by more
   than 2x, then PIL/torchvision ``antialias=True`` style); taps ``x`` run over
   ``floor(c - s + 0.5) <= x < floor(c + s + 0.5)`` with weight ``max(0, 1 - |x + 0.5 - c| / s)``,
   normalised to sum 1; tap indices are clamped to the image (edge replication). Taps outside the
   window but inside the image read the real neighbouring pixels.
2. Horizontal flip: output column j takes the sample of column ``ow - 1 - j``.
3. Colour, fixed order (torchvision permutes the order randomly; we do not), on v = pixel/255,
   clamped to [0, 1] after each step:
   brightness ``v *= fb``; contrast ``v = fc * v + (1 - fc) * m``; saturation
   ``v = fs * v + (1 - fs) * lum(v)`` with ``lum = 0.299 R + 0.587 G + 0.114 B`` of that pixel.
   ``m`` (contrast mean) is the mean luminance of the brightness-adjusted, clamped, *unflipped*
   resampled crop at a grid of ``gy x gx`` output positions, ``gy = min(16, oh)``,
   ``gx = min(16, ow)``, rows ``(2k + 1) * oh // (2 gy)``, columns ``(2k + 1) * ow // (2 gx)``.
4. Normalize ``(v - mean) * inv_std`` (mean 0, inv_std 1 when absent).
5. Output: float32 as is; float16 / bfloat16 rounded to nearest even; uint8
   ``floor(clamp(v, 0, 1) * 255 + 0.5)``.

Internally the kernel works on the 0..255 scale (same math, scaled) and in float32.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "KernelSpec",
    "NUM_PARAMS",
    "PARAM_Y0",
    "PARAM_X0",
    "PARAM_H",
    "PARAM_W",
    "PARAM_FLIP",
    "PARAM_BRIGHTNESS",
    "PARAM_CONTRAST",
    "PARAM_SATURATION",
    "CONTRAST_GRID",
    "get_cpu_kernel",
    "get_cuda_kernels",
    "launch_cuda",
    "check_inputs",
    "python_lib",
]

# Columns of the per-sample parameter matrix (float32, shape (B, NUM_PARAMS)).
PARAM_Y0 = 0  # crop window top, original-image pixel coordinates (float)
PARAM_X0 = 1  # crop window left
PARAM_H = 2  # crop window height
PARAM_W = 3  # crop window width
PARAM_FLIP = 4  # 1.0 = flip horizontally, 0.0 = not
PARAM_BRIGHTNESS = 5  # brightness factor (1.0 = unchanged)
PARAM_CONTRAST = 6  # contrast factor (1.0 = unchanged)
PARAM_SATURATION = 7  # saturation factor (1.0 = unchanged)
NUM_PARAMS = 8

CONTRAST_GRID = 16  # the contrast mean is taken over min(16, oh) x min(16, ow) output positions

OUT_KINDS = ("float32", "float16", "bfloat16", "uint8")
LAYOUTS = ("NCHW", "NHWC")
# numpy storage dtype the kernel writes, per output kind
STORAGE_DTYPE = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.uint16),
    "bfloat16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
}

# fastmath flags for the CPU build: no 'nnan'/'ninf' (the input check relies on NaN compares)
# and no 'reassoc' (keeps the float32 evaluation order close to the reference).
_CPU_FASTMATH = {"nsz", "arcp", "contract", "afn"}


@dataclass(frozen=True)
class KernelSpec:
    """What a compiled kernel is specialised on; absent ops cost nothing."""

    out_kind: str = "float32"  # one of OUT_KINDS
    layout: str = "NCHW"  # one of LAYOUTS
    brightness: bool = False
    contrast: bool = False
    saturation: bool = False
    flip: bool = False

    def __post_init__(self):
        if self.out_kind not in OUT_KINDS:
            raise ValueError(f"out_kind must be one of {OUT_KINDS}, got {self.out_kind!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


# --------------------------------------------------------------------------------------------
# The per-pixel math, written once.
# --------------------------------------------------------------------------------------------


def _build_lib(dev, dev_big):
    """Target-independent helpers, decorated with ``dev`` (small, always inlined on the CPU) or
    ``dev_big`` (larger, off the CPU hot path: not force-inlined, to keep compile times down)."""
    F = numba.float32

    @dev
    def clampi(v, lo, hi):
        if v < lo:
            return lo
        if v > hi:
            return hi
        return v

    @dev
    def clampf(v, lo, hi):
        if v < lo:
            return lo
        if v > hi:
            return hi
        return v

    @dev
    def ifloor(x):
        """floor() to int without a libm call (numba lowers math.floor to a floorf call)."""
        i = int(x)
        if F(i) > x:
            i -= 1
        return i

    @dev
    def axis(o, start, length, n_out):
        """Output index o -> (centre c, support s, first tap lo, tap count n) along one axis."""
        scale = length / F(n_out)
        c = start + (F(o) + F(0.5)) * scale
        if scale > F(2.0):
            s = scale
            lo = ifloor(c - s + F(0.5))
            n = ifloor(c + s + F(0.5)) - lo
        else:
            s = F(1.0)
            lo = ifloor(c - F(0.5))
            n = 2
        return c, s, lo, n

    @dev
    def tap_weight(x, c, inv_s):
        """Triangle-filter weight of source pixel x (centre x + 0.5) for output centre c."""
        w = F(1.0) - abs(F(x) + F(0.5) - c) * inv_s
        if w < F(0.0):
            return F(0.0)
        return w

    @dev
    def lerp2(a, b, c, d, fx, fy):
        t = F(a) + fx * (F(b) - F(a))
        u = F(c) + fx * (F(d) - F(c))
        return t + fy * (u - t)

    @dev_big
    def sample(src, off, H, W, C, cy, sy, ylo, ny, cx, sx, xlo, nx):
        """Resampled (r, g, b) on the 0..255 scale at output centre (cy, cx), direct 2-D form."""
        if sy == F(1.0) and sx == F(1.0):
            # bilinear: taps lo, lo+1 with weights 1-f, f
            fy = cy - F(0.5) - F(ylo)
            fx = cx - F(0.5) - F(xlo)
            ya = clampi(ylo, 0, H - 1)
            yb = clampi(ylo + 1, 0, H - 1)
            xa = clampi(xlo, 0, W - 1) * C
            xb = clampi(xlo + 1, 0, W - 1) * C
            ra = off + ya * W * C
            rb = off + yb * W * C
            if C == 1:
                v = lerp2(src[ra + xa], src[ra + xb], src[rb + xa], src[rb + xb], fx, fy)
                return v, v, v
            r = lerp2(src[ra + xa], src[ra + xb], src[rb + xa], src[rb + xb], fx, fy)
            g = lerp2(
                src[ra + xa + 1], src[ra + xb + 1], src[rb + xa + 1], src[rb + xb + 1], fx, fy
            )
            b = lerp2(
                src[ra + xa + 2], src[ra + xb + 2], src[rb + xa + 2], src[rb + xb + 2], fx, fy
            )
            return r, g, b
        # triangle filter of support (sy, sx), weights normalised per axis
        isy = F(1.0) / sy
        isx = F(1.0) / sx
        wsx = F(0.0)
        for x in range(xlo, xlo + nx):
            wsx += tap_weight(x, cx, isx)
        ar = F(0.0)
        ag = F(0.0)
        ab = F(0.0)
        wsy = F(0.0)
        for y in range(ylo, ylo + ny):
            wy = tap_weight(y, cy, isy)
            if wy <= F(0.0):
                continue
            wsy += wy
            row = off + clampi(y, 0, H - 1) * W * C
            tr = F(0.0)
            tg = F(0.0)
            tb = F(0.0)
            for x in range(xlo, xlo + nx):
                wx = tap_weight(x, cx, isx)
                if wx <= F(0.0):
                    continue
                p = row + clampi(x, 0, W - 1) * C
                if C == 1:
                    tr += wx * F(src[p])
                else:
                    tr += wx * F(src[p])
                    tg += wx * F(src[p + 1])
                    tb += wx * F(src[p + 2])
            ar += wy * tr
            ag += wy * tg
            ab += wy * tb
        norm = F(1.0) / (wsy * wsx)
        if C == 1:
            v = ar * norm
            return v, v, v
        return ar * norm, ag * norm, ab * norm

    @dev
    def luminance(r, g, b):
        return F(0.299) * r + F(0.587) * g + F(0.114) * b

    @dev
    def rint_even(q):
        """Round a non-negative float to the nearest integer, ties to even (exact for q < 2**23)."""
        fl = int(q)  # q >= 0: truncation is floor
        d = q - F(fl)
        if d > F(0.5) or (d == F(0.5) and (fl & 1) == 1):
            fl += 1
        return fl

    @dev
    def enc_f32(v):
        return v

    @dev
    def enc_f16(v):
        """float32 -> IEEE binary16 bit pattern, round to nearest even."""
        if v != v:
            return 0x7E00
        sign = 0
        if v < F(0.0) or (v == F(0.0) and math.copysign(F(1.0), v) < F(0.0)):
            sign = 0x8000
            v = -v
        if v >= F(65520.0):  # halfway between 65504 and 2**16 rounds (ties to even) to inf
            return sign | 0x7C00
        if v < F(2.0**-14):  # subnormal, units of 2**-24
            return sign | rint_even(v * F(16777216.0))
        m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= m < 1
        n = rint_even(m * F(2048.0))
        if n == 2048:
            n = 1024
            e += 1
        return sign | (((e + 14) << 10) + (n - 1024))

    @dev
    def enc_bf16(v):
        """float32 -> bfloat16 bit pattern, round to nearest even."""
        if v != v:
            return 0x7FC0
        sign = 0
        if v < F(0.0) or (v == F(0.0) and math.copysign(F(1.0), v) < F(0.0)):
            sign = 0x8000
            v = -v
        if v >= F((2.0 - 2.0**-8) * 2.0**127):  # halfway to 2**128: rounds (to even) to inf
            return sign | 0x7F80
        if v < F(2.0**-126):  # subnormal, units of 2**-133
            return sign | rint_even(v * F(2.0**66) * F(2.0**67))  # exact scalings by 2**133
        m, e = math.frexp(v)
        n = rint_even(m * F(256.0))
        if n == 256:
            n = 128
            e += 1
        return sign | (((e + 126) << 7) + (n - 128))

    @dev
    def enc_u8(v):
        """v on the 0..255 scale -> uint8 value floor(clamp(v) + 0.5)."""
        return int(clampf(v, F(0.0), F(255.0)) + F(0.5))  # >= 0.5: truncation is floor

    @dev
    def bits_bf16(u):
        """float32 bit pattern (0 <= u < 2**32) -> bfloat16 bit pattern, round to nearest even.
        Integer-only twin of ``enc_bf16`` for drivers that can see the float's bits."""
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return 0x7FC0
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF

    @dev
    def bits_f16(u):
        """float32 bit pattern -> IEEE binary16 bit pattern, round to nearest even.
        Integer-only twin of ``enc_f16``."""
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        if a >= 0x7F800000:  # inf / NaN
            if a > 0x7F800000:
                return 0x7E00
            return sign | 0x7C00
        if a >= 0x477FF000:  # >= 65520: rounds to inf
            return sign | 0x7C00
        if a < 0x38800000:  # < 2**-14: binary16 subnormal (units of 2**-24) or zero
            e = a >> 23
            if e < 102:  # < 2**-25
                return sign
            m = (a & 0x7FFFFF) | 0x800000
            shift = 126 - e
            q = m >> shift
            rem = m & ((1 << shift) - 1)
            half = 1 << (shift - 1)
            if rem > half or (rem == half and (q & 1) == 1):
                q += 1
            return sign | q
        h = (a - 0x38000000) >> 13  # rebias the exponent, keep 10 mantissa bits
        rem = a & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        return sign | h

    return dict(
        clampi=clampi,
        ifloor=ifloor,
        bits_bf16=bits_bf16,
        bits_f16=bits_f16,
        clampf=clampf,
        axis=axis,
        tap_weight=tap_weight,
        sample=sample,
        luminance=luminance,
        rint_even=rint_even,
        enc_f32=enc_f32,
        enc_f16=enc_f16,
        enc_bf16=enc_bf16,
        enc_u8=enc_u8,
    )


def _build_pixel(dev, dev_big, lib, spec: KernelSpec):
    """The specialised per-pixel pipeline: colour (``shade``), encode + write (``store``), the
    per-sample constants, the contrast-grid luminance and one complete output pixel."""
    F = numba.float32
    axis = lib["axis"]
    sample = lib["sample"]
    clampf = lib["clampf"]
    luminance = lib["luminance"]
    HAS_B = spec.brightness
    HAS_C = spec.contrast
    HAS_S = spec.saturation
    HAS_FLIP = spec.flip
    NCHW = spec.layout == "NCHW"
    OUT_U8 = spec.out_kind == "uint8"
    enc = {
        "float32": lib["enc_f32"],
        "float16": lib["enc_f16"],
        "bfloat16": lib["enc_bf16"],
        "uint8": lib["enc_u8"],
    }[spec.out_kind]
    P_FLIP = PARAM_FLIP
    P_B = PARAM_BRIGHTNESS
    P_C = PARAM_CONTRAST
    P_S = PARAM_SATURATION
    G = CONTRAST_GRID

    @dev_big
    def grid_lum(b, gy, gx, OH, OW, src, meta, windows, params):
        """Luminance (0..255) of the brightness-adjusted pixel at contrast-grid cell (gy, gx)."""
        ngy = min(G, OH)
        ngx = min(G, OW)
        i = ((2 * gy + 1) * OH) // (2 * ngy)
        j = ((2 * gx + 1) * OW) // (2 * ngx)
        off = meta[b, 0]
        H = meta[b, 1]
        W = meta[b, 2]
        C = meta[b, 3]
        cy, sy, ylo, ny = axis(i, windows[b, 0], windows[b, 2], OH)
        cx, sx, xlo, nx = axis(j, windows[b, 1], windows[b, 3], OW)
        r, g, bb = sample(src, off, H, W, C, cy, sy, ylo, ny, cx, sx, xlo, nx)
        if HAS_B:
            fb = params[b, P_B]
            r = clampf(r * fb, F(0.0), F(255.0))
            g = clampf(g * fb, F(0.0), F(255.0))
            bb = clampf(bb * fb, F(0.0), F(255.0))
        return luminance(r, g, bb)

    @dev_big
    def image_mean(b, OH, OW, src, meta, windows, params):
        ngy = min(G, OH)
        ngx = min(G, OW)
        acc = F(0.0)
        for gy in range(ngy):
            for gx in range(ngx):
                acc += grid_lum(b, gy, gx, OH, OW, src, meta, windows, params)
        return acc / F(ngy * ngx)

    @dev
    def consts(b, params, means, mean, inv_std):
        """Per-sample constants: flip, colour factors, contrast mean, normalisation a*v + c."""
        flip = False
        if HAS_FLIP:
            flip = params[b, P_FLIP] > F(0.5)
        fb = F(1.0)
        fc = F(1.0)
        fs = F(1.0)
        ml = F(0.0)
        if HAS_B:
            fb = params[b, P_B]
        if HAS_C:
            fc = params[b, P_C]
            ml = means[b]
        if HAS_S:
            fs = params[b, P_S]
        s = F(1.0 / 255.0)
        na0 = inv_std[0] * s
        na1 = inv_std[1] * s
        na2 = inv_std[2] * s
        nb0 = -mean[0] * inv_std[0]
        nb1 = -mean[1] * inv_std[1]
        nb2 = -mean[2] * inv_std[2]
        return flip, fb, fc, fs, ml, na0, na1, na2, nb0, nb1, nb2

    @dev
    def shade(r, g, bb, fb, fc, fs, ml):
        """Brightness -> contrast -> saturation on the 0..255 scale, clamped after each."""
        if HAS_B:
            r = clampf(r * fb, F(0.0), F(255.0))
            g = clampf(g * fb, F(0.0), F(255.0))
            bb = clampf(bb * fb, F(0.0), F(255.0))
        if HAS_C:
            base = (F(1.0) - fc) * ml
            r = clampf(fc * r + base, F(0.0), F(255.0))
            g = clampf(fc * g + base, F(0.0), F(255.0))
            bb = clampf(fc * bb + base, F(0.0), F(255.0))
        if HAS_S:
            lum = (F(1.0) - fs) * luminance(r, g, bb)
            r = clampf(fs * r + lum, F(0.0), F(255.0))
            g = clampf(fs * g + lum, F(0.0), F(255.0))
            bb = clampf(fs * bb + lum, F(0.0), F(255.0))
        return r, g, bb

    @dev
    def encode3(r, g, bb, na0, na1, na2, nb0, nb1, nb2):
        """Normalize (a * v + c) and encode one pixel's three channels to the output dtype."""
        if OUT_U8:
            return enc(r), enc(g), enc(bb)
        return enc(r * na0 + nb0), enc(g * na1 + nb1), enc(bb * na2 + nb2)

    @dev
    def store(out, b, i, j, r, g, bb, na0, na1, na2, nb0, nb1, nb2):
        """encode3, then write the pixel in the output layout."""
        v0, v1, v2 = encode3(r, g, bb, na0, na1, na2, nb0, nb1, nb2)
        if NCHW:
            out[b, 0, i, j] = v0
            out[b, 1, i, j] = v1
            out[b, 2, i, j] = v2
        else:
            out[b, i, j, 0] = v0
            out[b, i, j, 1] = v1
            out[b, i, j, 2] = v2

    @dev_big
    def pixel(b, i, j, OH, OW, src, meta, windows, params, means, mean, inv_std, out):
        """One complete output pixel, direct 2-D form (the CUDA thread body)."""
        (flip, fb, fc, fs, ml, na0, na1, na2, nb0, nb1, nb2) = consts(
            b, params, means, mean, inv_std
        )
        jj = j
        if HAS_FLIP and flip:
            jj = OW - 1 - j
        cy, sy, ylo, ny = axis(i, windows[b, 0], windows[b, 2], OH)
        cx, sx, xlo, nx = axis(jj, windows[b, 1], windows[b, 3], OW)
        r, g, bb = sample(
            src, meta[b, 0], meta[b, 1], meta[b, 2], meta[b, 3], cy, sy, ylo, ny, cx, sx, xlo, nx
        )
        r, g, bb = shade(r, g, bb, fb, fc, fs, ml)
        store(out, b, i, j, r, g, bb, na0, na1, na2, nb0, nb1, nb2)

    return dict(
        grid_lum=grid_lum,
        image_mean=image_mean,
        consts=consts,
        shade=shade,
        encode3=encode3,
        store=store,
        pixel=pixel,
    )


# --------------------------------------------------------------------------------------------
# Input validation (host side, plain njit; used by both targets)
# --------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def check_inputs(src_size, meta, windows, params, nparams):
    """Index of the first sample whose meta/window is unusable, or -1 when all are fine.

    Checks: offset >= 0, H, W > 0, C in {1, 3, 4}, the image lies inside ``src``; window finite
    with h, w > 0; params has at least ``nparams`` columns (else returns -2); shapes agree (-3).
    """
    B = meta.shape[0]
    if meta.shape[1] != 4 or windows.shape[0] != B or windows.shape[1] != 4 or params.shape[0] != B:
        return -3
    if params.shape[1] < nparams:
        return -2
    for b in range(B):
        off = meta[b, 0]
        H = meta[b, 1]
        W = meta[b, 2]
        C = meta[b, 3]
        if off < 0 or H <= 0 or W <= 0 or not (C == 1 or C == 3 or C == 4):
            return b
        if off + H * W * C > src_size:
            return b
        y0 = windows[b, 0]
        x0 = windows[b, 1]
        h = windows[b, 2]
        w = windows[b, 3]
        if not (h > 0 and w > 0 and h < 1e30 and w < 1e30):
            return b
        if not (abs(y0) < 1e30 and abs(x0) < 1e30):
            return b
    return -1


# --------------------------------------------------------------------------------------------
# Compilation and cache
# --------------------------------------------------------------------------------------------

_KERNELS: dict = {}
_LIBS: dict = {}
_LOCK = threading.RLock()

# numba.cuda, bound on first use by _import_cuda(). A module global (not a local) because the
# CUDA simulator swaps module globals that refer to numba.cuda for its fake module.
cuda = None


def _import_cuda():
    global cuda
    if cuda is None:
        from numba import cuda as _cuda  # lazily: never at import time of gpuload

        cuda = _cuda
    return cuda


def _identity(f):
    return f


def _lib(target: str):
    with _LOCK:
        lib = _LIBS.get(target)
        if lib is None:
            lib = _build_lib(_device_decorator(target), _device_decorator(target, inline=False))
            _LIBS[target] = lib
        return lib


def _device_decorator(target: str, inline: bool = True):
    if target == "cpu":
        if inline:
            return numba.njit(nogil=True, fastmath=_CPU_FASTMATH, inline="always")
        return numba.njit(nogil=True, fastmath=_CPU_FASTMATH)
    if target == "cuda":
        return _import_cuda().jit(device=True)
    if target == "python":
        return _identity
    raise ValueError(f"unknown kernel target {target!r}; expected 'cpu', 'cuda' or 'python'")


def python_lib(spec: KernelSpec | None = None) -> dict:
    """The same per-pixel functions as plain Python (for tests and debugging)."""
    lib = dict(_lib("python"))
    if spec is not None:
        lib.update(_build_pixel(_identity, _identity, lib, spec))
    return lib


def _make_cpu_kernel(spec: KernelSpec, mode: str = "separable", parallel: bool = True):
    """CPU driver.

    ``mode="separable"`` (the fast one): a ``prange`` over work items (image, block of output
    rows); per item ``rows_block`` builds the horizontal tap table once (``axis`` +
    ``tap_weight``, already flipped), then per output row runs the vertical taps over the needed
    source span into a one-row float32 buffer (contiguous, SIMD-vectorised), the horizontal taps
    from it into three row planes, and ``shade`` + ``encode3`` per pixel, writing each output
    element once. Same taps and weights as the direct 2-D form, summed in a different order
    (differences are float32 rounding). The per-item scratch (tap table, one source row, three
    output-row planes) is allocated per work item, never a full-size intermediate.

    ``rows_block`` is a plain (non-parallel) njit function called from the prange loop: that
    halves compile time versus inlining everything into the parfor. Its hot loops call no
    helper that takes an array argument (numba would incref/decref each array per call).

    ``mode="direct"``: the CUDA thread body (``pixel``) in a prange loop; slow, for tests.
    """
    dev = _device_decorator("cpu")
    lib = _lib("cpu")
    px = _build_pixel(dev, _device_decorator("cpu", inline=False), lib, spec)
    image_mean = px["image_mean"]
    pixel = px["pixel"]
    consts = px["consts"]
    shade = px["shade"]
    encode3 = px["encode3"]
    axis = lib["axis"]
    tap_weight = lib["tap_weight"]
    clampi = lib["clampi"]
    HAS_C = spec.contrast
    HAS_FLIP = spec.flip
    NCHW = spec.layout == "NCHW"
    BITS_OUT = spec.out_kind in ("float16", "bfloat16")
    benc = lib["bits_f16"] if spec.out_kind == "float16" else lib["bits_bf16"]
    F = numba.float32

    if mode == "direct":

        @numba.njit(parallel=True, nogil=True, fastmath=_CPU_FASTMATH)
        def fused_cpu_direct(src, meta, windows, params, mean, inv_std, means, out):
            B = meta.shape[0]
            if NCHW:
                OH = out.shape[2]
                OW = out.shape[3]
            else:
                OH = out.shape[1]
                OW = out.shape[2]
            if HAS_C:
                for b in numba.prange(B):
                    means[b] = image_mean(b, OH, OW, src, meta, windows, params)
            for t in numba.prange(B * OH):
                b = t // OH
                i = t - b * OH
                for j in range(OW):
                    pixel(b, i, j, OH, OW, src, meta, windows, params, means, mean, inv_std, out)
            return 0

        return fused_cpu_direct
    if mode != "separable":
        raise ValueError(f"unknown CPU kernel mode {mode!r}")

    @numba.njit(nogil=True, fastmath=_CPU_FASTMATH, error_model="numpy")
    def rows_block(b, i0, i1, OH, OW, src, meta, windows, params, mean, inv_std, means, out):
        """Output rows [i0, i1) of image b (one parallel work item; its scratch is allocated here)."""
        off = meta[b, 0]
        H = meta[b, 1]
        W = meta[b, 2]
        C = meta[b, 3]
        y0 = windows[b, 0]
        x0 = windows[b, 1]
        wh = windows[b, 2]
        ww = windows[b, 3]
        (flip, fb, fc, fs, ml, na0, na1, na2, nb0, nb1, nb2) = consts(
            b, params, means, mean, inv_std
        )
        # horizontal tap table (already flipped), tap-major: entry k * OW + j is tap k of
        # output column j (source column, weight); K >= the most taps any column has
        aax = ww / F(OW) > F(2.0)  # antialiased in x (same test as in ``axis``)
        K = 2
        if aax:
            K = 1
            for j in range(OW):
                nx = axis(j, x0, ww, OW)[3]
                if nx > K:
                    K = nx
        xoff = np.empty(OW * K, np.uint32)
        xw = np.empty(OW * K, np.float32)
        xmin = W - 1
        xmax = 0
        for j in range(OW):
            jj = j
            if HAS_FLIP and flip:
                jj = OW - 1 - j
            cx, sx, xlo, nx = axis(jj, x0, ww, OW)
            if not aax:
                fx = cx - F(0.5) - F(xlo)
                xoff[j] = clampi(xlo, 0, W - 1)
                xoff[OW + j] = clampi(xlo + 1, 0, W - 1)
                xw[j] = F(1.0) - fx
                xw[OW + j] = fx
            else:
                isx = F(1.0) / sx
                ws = F(0.0)
                for k in range(K):
                    w = F(0.0)
                    if k < nx:
                        w = tap_weight(xlo + k, cx, isx)
                    xoff[k * OW + j] = clampi(xlo + k, 0, W - 1)
                    xw[k * OW + j] = w
                    ws += w
                inv = F(1.0) / ws
                for k in range(K):
                    xw[k * OW + j] *= inv
            for k in range(K):
                x = np.int64(xoff[k * OW + j])
                if x < xmin:
                    xmin = x
                if x > xmax:
                    xmax = x
        for k in range(OW * K):
            xoff[k] = (np.int64(xoff[k]) - xmin) * C
        n = (xmax - xmin + 1) * C
        tmp = np.empty(n + 2, np.float32)
        t1 = tmp[1:]
        t2 = tmp[2:]
        rowbuf = np.empty(3 * OW, np.float32)
        rr = rowbuf[:OW]
        rg = rowbuf[OW : 2 * OW]
        rb = rowbuf[2 * OW :]
        rowbits = rowbuf.view(np.uint32)
        ru = rowbits[:OW]
        gu = rowbits[OW : 2 * OW]
        bu = rowbits[2 * OW :]
        rowlen = W * C
        for i in range(i0, i1):
            # vertical taps over the needed source span -> tmp
            cy, sy, ylo, ny = axis(i, y0, wh, OH)
            if sy == F(1.0):
                fy = cy - F(0.5) - F(ylo)
                pa = off + clampi(ylo, 0, H - 1) * rowlen + xmin * C
                pb = off + clampi(ylo + 1, 0, H - 1) * rowlen + xmin * C
                sa = src[pa : pa + n]
                sb = src[pb : pb + n]
                wa = F(1.0) - fy
                for q in range(n):
                    tmp[q] = wa * F(sa[q]) + fy * F(sb[q])
            else:
                isy = F(1.0) / sy
                ws = F(0.0)
                for y in range(ylo, ylo + ny):
                    ws += tap_weight(y, cy, isy)
                inv = F(1.0) / ws
                first = True
                for y in range(ylo, ylo + ny):
                    w = tap_weight(y, cy, isy)
                    if w <= F(0.0):
                        continue
                    w *= inv
                    p = off + clampi(y, 0, H - 1) * rowlen + xmin * C
                    sp = src[p : p + n]
                    if first:
                        for q in range(n):
                            tmp[q] = w * F(sp[q])
                        first = False
                    else:
                        for q in range(n):
                            tmp[q] += w * F(sp[q])
            # horizontal taps (gathers) into three row planes. Written out here rather than
            # calling a helper with array arguments: numba increfs/decrefs every array passed to
            # an inlined function, per call, which costs more than the math in this loop.
            if not aax and C != 1:
                for j in range(OW):
                    a = xoff[j]
                    c = xoff[OW + j]
                    wa = xw[j]
                    wc = xw[OW + j]
                    rr[j] = wa * tmp[a] + wc * tmp[c]
                    rg[j] = wa * t1[a] + wc * t1[c]
                    rb[j] = wa * t2[a] + wc * t2[c]
            elif not aax:
                for j in range(OW):
                    v = xw[j] * tmp[xoff[j]] + xw[OW + j] * tmp[xoff[OW + j]]
                    rr[j] = v
                    rg[j] = v
                    rb[j] = v
            else:
                # antialiased: accumulate tap by tap (inner loops contiguous over j)
                for j in range(OW):
                    rr[j] = F(0.0)
                    rg[j] = F(0.0)
                    rb[j] = F(0.0)
                for k in range(K):
                    wk = xw[k * OW : (k + 1) * OW]
                    ok = xoff[k * OW : (k + 1) * OW]
                    if C != 1:
                        for j in range(OW):
                            w = wk[j]
                            a = ok[j]
                            rr[j] += w * tmp[a]
                            rg[j] += w * t1[a]
                            rb[j] += w * t2[a]
                    else:
                        for j in range(OW):
                            rr[j] += wk[j] * tmp[ok[j]]
                if C == 1:
                    for j in range(OW):
                        rg[j] = rr[j]
                        rb[j] = rr[j]
            # ... then colour, normalise, encode, write (contiguous: vectorisable)
            if BITS_OUT:
                # float16 / bfloat16: normalised float32 values into the planes, then round
                # them from their bit patterns (integer ops; no frexp per element)
                for j in range(OW):
                    r, g, bb = shade(rr[j], rg[j], rb[j], fb, fc, fs, ml)
                    rr[j] = r * na0 + nb0
                    rg[j] = g * na1 + nb1
                    rb[j] = bb * na2 + nb2
                if NCHW:
                    o0 = out[b, 0, i]
                    o1 = out[b, 1, i]
                    o2 = out[b, 2, i]
                    for j in range(OW):
                        o0[j] = benc(np.int64(ru[j]))
                        o1[j] = benc(np.int64(gu[j]))
                        o2[j] = benc(np.int64(bu[j]))
                else:
                    orow = out[b, i]
                    for j in range(OW):
                        orow[j, 0] = benc(np.int64(ru[j]))
                        orow[j, 1] = benc(np.int64(gu[j]))
                        orow[j, 2] = benc(np.int64(bu[j]))
            elif NCHW:
                o0 = out[b, 0, i]
                o1 = out[b, 1, i]
                o2 = out[b, 2, i]
                for j in range(OW):
                    r, g, bb = shade(rr[j], rg[j], rb[j], fb, fc, fs, ml)
                    v0, v1, v2 = encode3(r, g, bb, na0, na1, na2, nb0, nb1, nb2)
                    o0[j] = v0
                    o1[j] = v1
                    o2[j] = v2
            else:
                orow = out[b, i]
                for j in range(OW):
                    r, g, bb = shade(rr[j], rg[j], rb[j], fb, fc, fs, ml)
                    v0, v1, v2 = encode3(r, g, bb, na0, na1, na2, nb0, nb1, nb2)
                    orow[j, 0] = v0
                    orow[j, 1] = v1
                    orow[j, 2] = v2

    @numba.njit(parallel=parallel, nogil=True, fastmath=_CPU_FASTMATH)
    def fused_cpu(src, meta, windows, params, mean, inv_std, means, out):
        B = meta.shape[0]
        if NCHW:
            OH = out.shape[2]
            OW = out.shape[3]
        else:
            OH = out.shape[1]
            OW = out.shape[2]
        if B == 0:
            return 0
        if HAS_C:
            for b in numba.prange(B):
                means[b] = image_mean(b, OH, OW, src, meta, windows, params)
        # work items: (image, block of rows), >= 4 per thread
        nth = numba.get_num_threads()
        nblk = min(OH, max(1, (4 * nth + B - 1) // B))
        rpb = (OH + nblk - 1) // nblk
        nblk = (OH + rpb - 1) // rpb
        for t in numba.prange(B * nblk):
            b = t // nblk
            i0 = (t - b * nblk) * rpb
            rows_block(
                b,
                i0,
                min(OH, i0 + rpb),
                OH,
                OW,
                src,
                meta,
                windows,
                params,
                mean,
                inv_std,
                means,
                out,
            )
        return 0

    return fused_cpu


def get_cpu_kernel(spec: KernelSpec, mode: str = "separable", parallel: bool = True):
    """The compiled CPU kernel ``f(src, meta, windows, params, mean, inv_std, means, out)``.

    Inputs must already be valid (see ``check_inputs``); compiled lazily on the first call.
    ``parallel=False`` compiles the same source without Numba's threading layer (prange runs as
    a plain loop): what a forked child uses when its parent already started OpenMP.
    """
    key = ("cpu", spec, mode, parallel)
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            k = _make_cpu_kernel(spec, mode, parallel)
            _KERNELS[key] = k
        return k


# The process that started Numba's threading layer (set when a parallel CPU kernel first runs).
_PARALLEL_PID: int | None = None


def note_parallel_use() -> None:
    """Record that this process ran a parallel CPU kernel (its threading layer is live)."""
    global _PARALLEL_PID
    if _PARALLEL_PID is None:
        _PARALLEL_PID = os.getpid()


def cpu_parallel_safe() -> bool:
    """False in a forked child whose parent already ran Numba's OpenMP layer: GNU OpenMP is not
    fork-safe and would abort the child ("fork() called from a process already using GNU
    OpenMP"); such a child uses the serial build of the kernel instead. TBB and workqueue
    layers are fork-safe."""
    if _PARALLEL_PID is None or os.getpid() == _PARALLEL_PID:
        return True
    try:
        layer = numba.threading_layer()
    except ValueError:  # no layer started (cannot happen if the parent ran one): be safe
        return True
    return layer != "omp"


class CudaKernels:
    """The two CUDA kernels of a spec: ``mean_kernel`` (contrast pre-pass) and ``main``."""

    MEAN_THREADS = CONTRAST_GRID * CONTRAST_GRID

    def __init__(self, spec: KernelSpec, mean_kernel, main_kernel):
        self.spec = spec
        self.mean_kernel = mean_kernel
        self.main = main_kernel


def _make_cuda_kernels(spec: KernelSpec) -> CudaKernels:
    _import_cuda()
    dev = _device_decorator("cuda")
    lib = _lib("cuda")
    px = _build_pixel(dev, _device_decorator("cuda"), lib, spec)
    grid_lum = px["grid_lum"]
    pixel = px["pixel"]
    NCHW = spec.layout == "NCHW"
    G = CONTRAST_GRID
    NT = CudaKernels.MEAN_THREADS
    F = numba.float32

    @cuda.jit
    def fused_mean(src, meta, windows, params, means, OH, OW):
        # one block per image, one thread per grid cell, tree reduction in shared memory
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        acc = cuda.shared.array(NT, numba.float32)
        ngy = min(G, OH)
        ngx = min(G, OW)
        v = F(0.0)
        if t < ngy * ngx:
            v = grid_lum(b, t // ngx, t % ngx, OH, OW, src, meta, windows, params)
        acc[t] = v
        cuda.syncthreads()
        step = NT // 2
        while step > 0:
            if t < step:
                acc[t] += acc[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            means[b] = acc[0] / F(ngy * ngx)

    @cuda.jit
    def fused_main(src, meta, windows, params, mean, inv_std, means, out):
        # one thread per output pixel; grid x over columns, y over rows, z over the batch
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        i = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        b = cuda.blockIdx.z
        if NCHW:
            OH = out.shape[2]
            OW = out.shape[3]
        else:
            OH = out.shape[1]
            OW = out.shape[2]
        if i >= OH or j >= OW or b >= meta.shape[0]:
            return
        pixel(b, i, j, OH, OW, src, meta, windows, params, means, mean, inv_std, out)

    return CudaKernels(spec, fused_mean, fused_main)


def get_cuda_kernels(spec: KernelSpec) -> CudaKernels:
    key = ("cuda", spec)
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            k = _make_cuda_kernels(spec)
            _KERNELS[key] = k
        return k


def launch_cuda(
    kernels: CudaKernels,
    stream,
    B,
    OH,
    OW,
    src,
    meta,
    windows,
    params,
    mean,
    inv_std,
    means,
    out,
    block=(32, 8),
):
    """Enqueue the contrast pre-pass (when needed) and the main kernel for B images on ``stream``."""
    if B <= 0:
        return
    if kernels.spec.contrast:
        kernels.mean_kernel[B, CudaKernels.MEAN_THREADS, stream](
            src, meta, windows, params, means, OH, OW
        )
    bx = min(block[0], OW)
    by = min(block[1], OH)
    grid = ((OW + bx - 1) // bx, (OH + by - 1) // by, B)
    kernels.main[grid, (bx, by, 1), stream](src, meta, windows, params, mean, inv_std, means, out)
