"""The fused image kernel's source, written once: the per-pixel math for every target, and the
CPU drivers, as plain module-level Python functions.

This file is the template that ``gpuload.kernels.fused`` compiles (it is not imported by the
loader): per target and ``KernelSpec`` it generates a module made of this text with the block
between the ``# <specialisation>`` and ``# </specialisation>`` lines replaced by

* the target's decorators -- ``dev`` (small helpers; always inlined on the CPU) and ``dev_big``
  (larger, off the CPU hot path: not force-inlined, to keep compile times down) are
  ``numba.njit(...)`` for the CPU, ``numba.cuda.jit(device=True)`` for CUDA and the identity for
  plain Python; ``cpu_jit(**options)`` compiles the CPU drivers (``numba.njit(cache=True, ...)``
  when the module is written to the kernel cache directory, so Numba's on-disk cache works: every
  function is module-level, and everything it depends on is a module global of a file whose
  name is a hash of its text); ``num_threads()`` is the thread count the CPU driver splits its
  work for (1 in the serial build);
* the specialisation constants: the output kind and layout, which colour ops and flip are
  present (an absent op is a compile-time ``False``: its code is removed), ``PARALLEL``, and the
  parameter columns ``P_*`` / contrast grid ``G`` of the kernel ABI.

The defaults below (plain Python, ``KernelSpec()``) only keep this file valid on its own. Names
of other functions (``axis``, ``sample``, ...) resolve in the generated module, where they are the
same target's compiled functions. The math and the kernel ABI are documented in ``fused.py``.
"""

import math

import numba
import numpy as np

F = numba.float32

# <specialisation>
PARALLEL = True
OUT_KIND = "float32"
NCHW = True
HAS_B = False
HAS_C = False
HAS_S = False
HAS_FLIP = False
P_FLIP = 4
P_B = 5
P_C = 6
P_S = 7
G = 16


def dev(f):
    return f


dev_big = dev


def cpu_jit(**options):
    return dev


def num_threads():
    return 1


# </specialisation>

# --------------------------------------------------------------------------------------------
# Target-independent helpers: taps and weights, 2-D sample, luminance, dtype encoders.
# --------------------------------------------------------------------------------------------


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
        g = lerp2(src[ra + xa + 1], src[ra + xb + 1], src[rb + xa + 1], src[rb + xb + 1], fx, fy)
        b = lerp2(src[ra + xa + 2], src[ra + xb + 2], src[rb + xa + 2], src[rb + xb + 2], fx, fy)
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


# Derived specialisation constants: the output encoder (``enc``, per element: normalised value
# -> stored value) and, for float16/bfloat16, its integer twin on the float's bits (``benc``).
OUT_U8 = OUT_KIND == "uint8"
BITS_OUT = OUT_KIND in ("float16", "bfloat16")
enc = {"float32": enc_f32, "float16": enc_f16, "bfloat16": enc_bf16, "uint8": enc_u8}[OUT_KIND]
benc = bits_f16 if OUT_KIND == "float16" else bits_bf16

# --------------------------------------------------------------------------------------------
# The specialised per-pixel pipeline: colour (``shade``), encode + write (``store``), the
# per-sample constants, the contrast-grid luminance and one complete output pixel (``pixel``:
# the CUDA thread body).
# --------------------------------------------------------------------------------------------


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
    (flip, fb, fc, fs, ml, na0, na1, na2, nb0, nb1, nb2) = consts(b, params, means, mean, inv_std)
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


# --------------------------------------------------------------------------------------------
# CPU drivers (memory access only; all arithmetic comes from the functions above).
#
# ``fused_cpu`` (the fast one, separable): a ``prange`` over work items (image, block of output
# rows); per item ``rows_block`` builds the horizontal tap table once (``axis`` + ``tap_weight``,
# already flipped), then per output row runs the vertical taps over the needed source span into
# a one-row float32 buffer (contiguous, SIMD-vectorised), the horizontal taps from it into three
# row planes, and ``shade`` + ``encode3`` per pixel, writing each output element once. Same taps
# and weights as the direct 2-D form, summed in a different order (differences are float32
# rounding). The per-item scratch (tap table, one source row, three output-row planes) is
# allocated per work item, never a full-size intermediate. float16/bfloat16 are rounded from
# the float bits by ``bits_f16``/``bits_bf16`` (integer twins of ``enc_f16``/``enc_bf16``).
#
# ``rows_block`` is a plain (non-parallel) njit function called from the prange loop: that
# halves compile time versus inlining everything into the parfor. Its hot loops call no helper
# that takes an array argument (numba would incref/decref each array per call).
#
# ``fused_cpu_direct``: the CUDA thread body (``pixel``) in a prange loop; slow, for tests.
# --------------------------------------------------------------------------------------------


@cpu_jit(parallel=PARALLEL)
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


@cpu_jit(error_model="numpy")
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
    (flip, fb, fc, fs, ml, na0, na1, na2, nb0, nb1, nb2) = consts(b, params, means, mean, inv_std)
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


@cpu_jit(parallel=PARALLEL)
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
    nth = num_threads()
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
