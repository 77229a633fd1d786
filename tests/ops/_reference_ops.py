"""Straightforward NumPy float64 implementation of the fused kernel's documented math
(gpuload/kernels/fused.py module docstring). Clarity over speed; used by the parity tests.

Works on the 0..1 scale exactly as documented (the kernel works on 0..255 internally).
"""

from __future__ import annotations

import math

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])
GRID = 16


def axis_matrix(start: float, length: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) resampling matrix along one axis: triangle filter of support
    s = scale if scale > 2 else 1 centred at start + (o + 0.5) * scale, taps
    floor(c - s + 0.5) <= x < floor(c + s + 0.5), weights max(0, 1 - |x + 0.5 - c| / s)
    normalised to sum 1, tap indices clamped to [0, n_in - 1]."""
    start = float(start)
    length = float(length)
    scale = length / n_out
    s = scale if scale > 2.0 else 1.0
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        c = start + (o + 0.5) * scale
        lo = math.floor(c - s + 0.5)
        hi = math.floor(c + s + 0.5)
        xs = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs(xs + 0.5 - c) / s)
        w = w / w.sum()
        np.add.at(m[o], np.clip(xs, 0, n_in - 1), w)
    return m


def to_rgb(img: np.ndarray) -> np.ndarray:
    """HWC uint8 with C in {1, 3, 4} -> (H, W, 3) float64 on 0..1."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[:, :, :3].astype(np.float64) / 255.0


def resample(img: np.ndarray, window, oh: int, ow: int) -> np.ndarray:
    """Crop window (y0, x0, h, w) of img resampled to (oh, ow, 3), 0..1, float64."""
    rgb = to_rgb(img)
    y0, x0, h, w = (float(v) for v in window)
    my = axis_matrix(y0, h, oh, rgb.shape[0])
    mx = axis_matrix(x0, w, ow, rgb.shape[1])
    return np.einsum("iy,yxc,jx->ijc", my, rgb, mx)


def grid_positions(n: int) -> np.ndarray:
    g = min(GRID, n)
    return np.array([((2 * k + 1) * n) // (2 * g) for k in range(g)])


def contrast_mean(unflipped: np.ndarray, fb: float) -> float:
    """Mean luminance of the brightness-adjusted, clamped, unflipped resampled crop at the
    min(16, oh) x min(16, ow) grid of output positions."""
    gi = grid_positions(unflipped.shape[0])
    gj = grid_positions(unflipped.shape[1])
    sub = np.clip(unflipped[np.ix_(gi, gj)] * fb, 0.0, 1.0)
    return float((sub @ LUMA).mean())


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern, round to nearest even (NaN -> 0x7FC0)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def bf16_bits_to_float(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint32) << 16).view(np.float32)


def reference_image(img, window, prm, plan) -> np.ndarray:
    """One image -> (oh, ow, 3) float64 values before the dtype conversion (normalised when
    the plan normalises; 0..1 otherwise). ``prm``: the sample's parameter row."""
    from gpuload.ops import PARAM_BRIGHTNESS, PARAM_CONTRAST, PARAM_FLIP, PARAM_SATURATION

    oh, ow = plan.out_size
    v = resample(img, window, oh, ow)
    unflipped = v
    if plan.needs_flip and prm[PARAM_FLIP] > 0.5:
        v = v[:, ::-1]
    fb = float(prm[PARAM_BRIGHTNESS]) if plan.needs_brightness else 1.0
    if plan.needs_brightness:
        v = np.clip(v * fb, 0.0, 1.0)
    if plan.needs_contrast:
        fc = float(prm[PARAM_CONTRAST])
        m = contrast_mean(unflipped, fb)
        v = np.clip(fc * v + (1.0 - fc) * m, 0.0, 1.0)
    if plan.needs_saturation:
        fs = float(prm[PARAM_SATURATION])
        lum = (v @ LUMA)[:, :, None]
        v = np.clip(fs * v + (1.0 - fs) * lum, 0.0, 1.0)
    if plan.needs_normalize:
        v = (v - np.asarray(plan.mean)) / np.asarray(plan.std)
    return v


def reference_batch(src, meta, windows, params, plan) -> np.ndarray:
    """float64 values (before dtype conversion) in the plan's layout, (B, 3, oh, ow) or
    (B, oh, ow, 3)."""
    outs = []
    for b in range(meta.shape[0]):
        off, H, W, C = (int(x) for x in meta[b])
        img = src[off : off + H * W * C].reshape(H, W, C)
        outs.append(reference_image(img, windows[b], params[b], plan))
    out = np.stack(outs)
    if plan.layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return out


def encode(values: np.ndarray, out_dtype: str) -> np.ndarray:
    """Reference dtype conversion of float64 values -> what the kernel stores."""
    if out_dtype == "float32":
        return values.astype(np.float32)
    if out_dtype == "float16":
        return values.astype(np.float32).astype(np.float16)
    if out_dtype == "bfloat16":
        return float_to_bf16_bits(values.astype(np.float32))
    if out_dtype == "uint8":
        return np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(out_dtype)


def decoded_values(out: np.ndarray, out_dtype: str) -> np.ndarray:
    """Kernel output (storage dtype) -> float64 values comparable with reference_batch."""
    out = np.asarray(out)
    if out_dtype == "bfloat16":
        return bf16_bits_to_float(out).astype(np.float64)
    if out_dtype == "float16":
        return (
            out.view(np.float16).astype(np.float64)
            if out.dtype == np.uint16
            else out.astype(np.float64)
        )
    return out.astype(np.float64)


def pack_images(images) -> tuple[np.ndarray, np.ndarray]:
    """List of HWC uint8 images -> (src uint8 1-D, meta int64 (B, 4))."""
    metas = []
    off = 0
    for im in images:
        H, W, C = im.shape
        metas.append((off, H, W, C))
        off += im.size
    src = np.empty(off, dtype=np.uint8)
    for im, m in zip(images, metas):
        src[m[0] : m[0] + im.size] = im.reshape(-1)
    return src, np.array(metas, dtype=np.int64).reshape(-1, 4)


def random_image(rng: np.random.Generator, H: int, W: int, C: int) -> np.ndarray:
    """Random, non-constant test image: smooth gradients plus noise, full 0..255 range."""
    yy, xx = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
    chans = []
    for c in range(C):
        a, b, ph = rng.uniform(0.5, 3.0, size=3)
        base = 0.5 + 0.35 * np.sin(2 * np.pi * (a * yy + b * xx) + ph * c)
        chans.append(base + rng.normal(0, 0.15, size=(H, W)))
    img = np.clip(np.stack(chans, axis=-1) * 255.0, 0, 255).astype(np.uint8)
    img.reshape(-1)[rng.integers(0, img.size, size=max(1, img.size // 50))] = rng.integers(0, 256)
    return img
