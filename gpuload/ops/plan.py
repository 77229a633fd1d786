"""Compile a list of declarative ops into an ``ImagePlan``: one crop window per sample in
source-image coordinates, one output size, per-sample flip and colour factors, normalisation,
output dtype and layout -- everything the single fused kernel needs.

Per-sample parameters (``ImagePlan.sample_params``) are a float32 matrix (B, NUM_PARAMS) whose
columns are named by the PARAM_* constants:

    PARAM_Y0, PARAM_X0, PARAM_H, PARAM_W   crop window (top, left, height, width), float, in
                                           ORIGINAL image pixel coordinates
    PARAM_FLIP                             1.0 = flip horizontally, 0.0 = not
    PARAM_BRIGHTNESS, PARAM_CONTRAST,      colour factors (1.0 = unchanged)
    PARAM_SATURATION

They are a pure function of (seed, epoch, row, source size): counter-based hashing
(``gpuload.ops.rng``), no global RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuload.errors import UnsupportedOpError
from gpuload.kernels.fused import (
    NUM_PARAMS,
    PARAM_BRIGHTNESS,
    PARAM_CONTRAST,
    PARAM_FLIP,
    PARAM_H,
    PARAM_SATURATION,
    PARAM_W,
    PARAM_X0,
    PARAM_Y0,
    STORAGE_DTYPE,
    KernelSpec,
)
from gpuload.ops import rng as _rng
from gpuload.ops.transforms import (
    SUPPORTED_OPS,
    CenterCrop,
    ColorJitter,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToDtype,
    ToLayout,
)

__all__ = ["ImagePlan", "compile_ops", "supported_op_names"]

_DRAWS_PER_OP = 64  # draw indices of op #k are k*64 .. k*64+63
_RRC_ATTEMPTS = 10
DCT_SCALES = (1, 2, 4, 8)


def supported_op_names() -> list[str]:
    return [op.__name__ for op in SUPPORTED_OPS]


def _op_name(op) -> str:
    t = type(op)
    name = getattr(op, "__qualname__", None) or getattr(op, "__name__", None)
    if (
        callable(op)
        and isinstance(name, str)
        and not isinstance(op, type)
        and t.__module__ == "builtins"
    ):
        return f"{name} ({t.__name__})"  # a function or lambda
    mod = t.__module__
    return t.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{t.__qualname__}"


@dataclass(frozen=True)
class ImagePlan:
    """The compiled form of an op list (see module docstring). Build with ``compile_ops``."""

    ops: tuple
    out_size: tuple[int, int]  # (oh, ow)
    geometry: tuple  # steps: ("rrc", (h, w), scale, ratio, draw0), ("resize_short", s),
    #                          ("resize", (h, w)), ("center_crop", (h, w)), ("flip", p, draw0)
    brightness: tuple[float, float] | None
    contrast: tuple[float, float] | None
    saturation: tuple[float, float] | None
    jitter_draw0: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalize: bool
    out_dtype: str  # "float32" | "float16" | "bfloat16" | "uint8"
    layout: str  # "NCHW" | "NHWC"
    channels: int = 3

    # ---- what the kernel needs ------------------------------------------------------------
    @property
    def needs_flip(self) -> bool:
        return any(s[0] == "flip" and s[1] > 0 for s in self.geometry)

    @property
    def needs_brightness(self) -> bool:
        return self.brightness is not None

    @property
    def needs_contrast(self) -> bool:
        return self.contrast is not None

    @property
    def needs_saturation(self) -> bool:
        return self.saturation is not None

    @property
    def needs_normalize(self) -> bool:
        return self.normalize

    @property
    def storage_dtype(self) -> np.dtype:
        """numpy dtype of the output buffer: float32, float16, uint8, or uint16 holding
        bfloat16 bits (view it as torch.bfloat16 / tf.bfloat16)."""
        return (
            np.dtype(np.float16) if self.out_dtype == "float16" else STORAGE_DTYPE[self.out_dtype]
        )

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(
            out_kind=self.out_dtype,
            layout=self.layout,
            brightness=self.needs_brightness,
            contrast=self.needs_contrast,
            saturation=self.needs_saturation,
            flip=self.needs_flip,
        )

    def out_shape(self, batch: int) -> tuple[int, int, int, int]:
        oh, ow = self.out_size
        return (batch, 3, oh, ow) if self.layout == "NCHW" else (batch, oh, ow, 3)

    def mean_array(self) -> np.ndarray:
        return np.asarray(self.mean if self.normalize else (0.0, 0.0, 0.0), dtype=np.float32)

    def inv_std_array(self) -> np.ndarray:
        std = np.asarray(self.std if self.normalize else (1.0, 1.0, 1.0), dtype=np.float64)
        return (1.0 / std).astype(np.float32)

    # ---- per-sample parameters -------------------------------------------------------------
    def _draw_indices(self) -> list[int]:
        idx: list[int] = []
        for step in self.geometry:
            if step[0] == "rrc":
                idx.extend(range(step[4], step[4] + 4 * _RRC_ATTEMPTS))
            elif step[0] == "flip":
                idx.append(step[2])
        if self.brightness is not None:
            idx.append(self.jitter_draw0)
        if self.contrast is not None:
            idx.append(self.jitter_draw0 + 1)
        if self.saturation is not None:
            idx.append(self.jitter_draw0 + 2)
        return idx

    def sample_params(self, heights, widths, rows, seed: int, epoch: int) -> np.ndarray:
        """float32 (B, NUM_PARAMS), a pure function of (seed, epoch, row) and the source size.

        ``heights``/``widths``: original image sizes (ints, arrays of B or scalars);
        ``rows``: global row ids (ints, B).
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"rows must be a 1-D array of integer row ids, got {rows!r}")
        B = rows.shape[0]
        src_h, src_w = _checked_sizes(heights, widths, B)
        out = np.zeros((B, NUM_PARAMS), dtype=np.float32)
        out[:, PARAM_BRIGHTNESS] = 1.0
        out[:, PARAM_CONTRAST] = 1.0
        out[:, PARAM_SATURATION] = 1.0
        if B == 0:
            return out
        draws = self._draw_indices()
        col = {d: k for k, d in enumerate(draws)}
        u = _rng.uniform(seed, epoch, rows, draws) if draws else np.zeros((B, 0))
        win = _Window(src_h, src_w)
        for step in self.geometry:
            win.apply(step, u, col)
        out[:, PARAM_Y0] = win.y0
        out[:, PARAM_X0] = win.x0
        out[:, PARAM_H] = win.h
        out[:, PARAM_W] = win.w
        out[:, PARAM_FLIP] = win.flip
        for rng_, c, d in (
            (self.brightness, PARAM_BRIGHTNESS, self.jitter_draw0),
            (self.contrast, PARAM_CONTRAST, self.jitter_draw0 + 1),
            (self.saturation, PARAM_SATURATION, self.jitter_draw0 + 2),
        ):
            if rng_ is not None:
                out[:, c] = rng_[0] + (rng_[1] - rng_[0]) * u[:, col[d]]
        return out

    # ---- helpers for the decode stage ------------------------------------------------------
    def max_dct_scale(self, params, src_h=None, src_w=None) -> np.ndarray:
        """Per sample, the largest s in {1, 2, 4, 8} such that the window divided by s is still
        at least the output size in both dimensions (so a 1/s DCT-domain downscale at decode
        time loses nothing the output can show). int32 (B,). ``src_h``/``src_w`` are accepted
        for symmetry with ``scale_window``; the window alone decides."""
        p = np.asarray(params)
        h = p[:, PARAM_H].astype(np.float64)
        w = p[:, PARAM_W].astype(np.float64)
        oh, ow = self.out_size
        s = np.ones(p.shape[0], dtype=np.int32)
        for cand in DCT_SCALES[1:]:
            ok = (h / cand >= oh) & (w / cand >= ow)
            s = np.where(ok, cand, s).astype(np.int32)
        return s

    @staticmethod
    def scale_window(
        params, src_h, src_w, dec_h=None, dec_w=None, roi_y0=0, roi_x0=0, dct_scale=None
    ) -> np.ndarray:
        """Map the windows of ``params`` (original-image coordinates) into the coordinates of
        the decoded buffer the kernel will read. float32 (B, 4) = (y0, x0, h, w).

        - ``dct_scale`` (int or array of B): the decoder downscaled by 1/s in the DCT domain
          (libjpeg/nvJPEG scaled decode; decoded size ceil(H/s) x ceil(W/s)); decoded pixel k
          covers source pixels [k*s, (k+1)*s), so coordinates divide by s exactly.
        - else ``dec_h``/``dec_w``: the decoded full-image size. When it equals ceil(H/s),
          ceil(W/s) for s in {1, 2, 4, 8} it is taken as a DCT downscale by s; otherwise as a
          plain resize (coordinates scale by dec/src).
        - ``roi_y0``/``roi_x0``: the decoded buffer holds only a region of interest starting
          at this pixel of the (downscaled) decoded image (see ``source_roi``).
        """
        p = np.asarray(params)
        B = p.shape[0]
        sh = np.broadcast_to(np.asarray(src_h, dtype=np.float64), (B,))
        sw = np.broadcast_to(np.asarray(src_w, dtype=np.float64), (B,))
        if dct_scale is not None:
            s = np.broadcast_to(np.asarray(dct_scale, dtype=np.float64), (B,))
            if np.any(s <= 0):
                raise ValueError(f"dct_scale must be > 0, got {dct_scale!r}")
            fy = fx = 1.0 / s
        elif dec_h is not None and dec_w is not None:
            dh = np.broadcast_to(np.asarray(dec_h, dtype=np.float64), (B,))
            dw = np.broadcast_to(np.asarray(dec_w, dtype=np.float64), (B,))
            if np.any(dh <= 0) or np.any(dw <= 0):
                raise ValueError("decoded sizes must be > 0")
            fy = dh / sh
            fx = dw / sw
            for cand in DCT_SCALES:
                is_dct = (np.ceil(sh / cand) == dh) & (np.ceil(sw / cand) == dw)
                fy = np.where(is_dct, 1.0 / cand, fy)
                fx = np.where(is_dct, 1.0 / cand, fx)
        elif dec_h is None and dec_w is None:
            fy = fx = np.ones(B)
        else:
            raise ValueError("give both dec_h and dec_w, or neither")
        out = np.empty((B, 4), dtype=np.float32)
        out[:, 0] = p[:, PARAM_Y0] * fy - np.asarray(roi_y0, dtype=np.float64)
        out[:, 1] = p[:, PARAM_X0] * fx - np.asarray(roi_x0, dtype=np.float64)
        out[:, 2] = p[:, PARAM_H] * fy
        out[:, 3] = p[:, PARAM_W] * fx
        return out

    def source_roi(self, windows, heights, widths, margin: int = 1) -> np.ndarray:
        """int64 (B, 4) = (y_lo, x_lo, y_hi, x_hi), half-open: the pixels the kernel reads for
        ``windows`` (in the same coordinates) in images of the given size, plus ``margin``
        pixels, clamped to the image. Decoding only this region and passing the windows shifted
        by (y_lo, x_lo) gives the same output as decoding the whole image."""
        win = np.asarray(windows, dtype=np.float64)
        B = win.shape[0]
        Hs = np.broadcast_to(np.asarray(heights, dtype=np.int64), (B,))
        Ws = np.broadcast_to(np.asarray(widths, dtype=np.int64), (B,))
        res = np.empty((B, 4), dtype=np.int64)
        for ax, (n, lim) in enumerate(((self.out_size[0], Hs), (self.out_size[1], Ws))):
            t0 = win[:, ax]
            length = win[:, 2 + ax]
            scale = length / n
            s = np.where(scale > 2.0, scale, 1.0)
            c_first = t0 + 0.5 * scale
            c_last = t0 + (n - 0.5) * scale
            lo = np.floor(c_first - s + 0.5).astype(np.int64) - margin
            hi = np.floor(c_last + s + 0.5).astype(np.int64) + margin
            lo = np.clip(lo, 0, lim - 1)
            hi = np.maximum(np.clip(hi, 0, lim), lo + 1)
            res[:, ax] = lo
            res[:, 2 + ax] = hi
        return res


def _rrc_windows(vh, vw, scale, ratio, u):
    """torchvision RandomResizedCrop.get_params, vectorised over B with 10 attempts.

    u: (B, 10, 4) uniforms -> (area fraction, log-ratio, top, left) per attempt.
    Returns integer-valued float arrays (top, left, h, w)."""
    area = (vh * vw)[:, None]
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ar = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.round(np.sqrt(target * ar))
    h = np.round(np.sqrt(target / ar))
    valid = (w > 0) & (w <= vw[:, None]) & (h > 0) & (h <= vh[:, None])
    top = np.floor(u[..., 2] * (vh[:, None] - h + 1))
    left = np.floor(u[..., 3] * (vw[:, None] - w + 1))
    first = np.argmax(valid, axis=1)
    ok = valid[np.arange(valid.shape[0]), first]
    pick = lambda a: a[np.arange(a.shape[0]), first]  # noqa: E731
    t, l_, hh, ww = pick(top), pick(left), pick(h), pick(w)
    # fallback: central crop at the nearest allowed aspect ratio
    in_ratio = vw / vh
    fw = np.where(
        in_ratio < ratio[0], vw, np.where(in_ratio > ratio[1], np.round(vh * ratio[1]), vw)
    )
    fh = np.where(in_ratio < ratio[0], np.round(vw / ratio[0]), vh)
    ft = np.floor((vh - fh) / 2.0)
    fl = np.floor((vw - fw) / 2.0)
    return (np.where(ok, t, ft), np.where(ok, l_, fl), np.where(ok, hh, fh), np.where(ok, ww, fw))


def _checked_sizes(heights, widths, B: int) -> tuple[np.ndarray, np.ndarray]:
    """Source heights and widths as float64 arrays of B, each an integer >= 1."""
    src_h = np.broadcast_to(np.asarray(heights, dtype=np.float64), (B,)).copy()
    src_w = np.broadcast_to(np.asarray(widths, dtype=np.float64), (B,)).copy()
    if B and (
        np.any(src_h < 1) or np.any(src_w < 1) or np.any(np.isnan(src_h)) or np.any(np.isnan(src_w))
    ):
        raise ValueError("image heights and widths must be >= 1")
    if B and (np.any(src_h != np.floor(src_h)) or np.any(src_w != np.floor(src_w))):
        raise ValueError("image heights and widths must be integers")
    return src_h, src_w


class _Window:
    """The geometric state while the steps compose: the current virtual image (vh x vw) maps
    linearly onto the source window (y0, x0, h, w), mirrored in x where ``flip``."""

    def __init__(self, src_h: np.ndarray, src_w: np.ndarray) -> None:
        self.B = len(src_h)
        self.vh, self.vw = src_h.copy(), src_w.copy()
        self.y0 = np.zeros(self.B)
        self.x0 = np.zeros(self.B)
        self.h, self.w = src_h.copy(), src_w.copy()
        self.flip = np.zeros(self.B, dtype=bool)

    def crop(self, top, left, ch, cw) -> None:
        sy = self.h / self.vh
        sx = self.w / self.vw
        left_eff = np.where(self.flip, self.vw - left - cw, left)
        self.y0 = self.y0 + top * sy
        self.x0 = self.x0 + left_eff * sx
        self.h = ch * sy
        self.w = cw * sx
        self.vh = np.broadcast_to(np.asarray(ch, dtype=np.float64), (self.B,)).copy()
        self.vw = np.broadcast_to(np.asarray(cw, dtype=np.float64), (self.B,)).copy()

    def apply(self, step: tuple, u: np.ndarray, col: dict[int, int]) -> None:
        """One geometric step from ``compile_ops``; ``u`` are the rows' uniforms, ``col`` maps
        a draw index to its column in ``u``."""
        kind, B = step[0], self.B
        if kind == "rrc":
            (oh, ow), scale, ratio, d0 = step[1], step[2], step[3], step[4]
            uu = u[:, [col[d] for d in range(d0, d0 + 4 * _RRC_ATTEMPTS)]].reshape(
                B, _RRC_ATTEMPTS, 4
            )
            self.crop(*_rrc_windows(self.vh, self.vw, scale, ratio, uu))
            self.vh = np.full(B, float(oh))
            self.vw = np.full(B, float(ow))
        elif kind == "resize_short":
            s = float(step[1])
            short = np.minimum(self.vh, self.vw)
            new_long = np.floor(s * np.maximum(self.vh, self.vw) / short)
            wide = self.vw >= self.vh  # h <= w: height is the short side
            self.vh, self.vw = np.where(wide, s, new_long), np.where(wide, new_long, s)
        elif kind == "resize":
            self.vh = np.full(B, float(step[1][0]))
            self.vw = np.full(B, float(step[1][1]))
        elif kind == "center_crop":
            th, tw = step[1]
            vh, vw = self.vh, self.vw
            top = np.where(vh >= th, np.round((vh - th) / 2.0), -np.floor((th - vh) / 2.0))
            left = np.where(vw >= tw, np.round((vw - tw) / 2.0), -np.floor((tw - vw) / 2.0))
            self.crop(top, left, float(th), float(tw))
        elif kind == "flip":
            p, d = step[1], step[2]
            self.flip = self.flip ^ (u[:, col[d]] < p)
        else:  # pragma: no cover - compile_ops only emits the kinds above
            raise AssertionError(kind)


def _checked_ops(ops: Sequence) -> tuple:
    """The op list as a tuple, every op one the fused kernel supports."""
    if isinstance(ops, SUPPORTED_OPS):
        ops = [ops]
    if isinstance(ops, (str, bytes)) or not isinstance(ops, Sequence):
        raise TypeError(f"compile_ops expects a list of ops, got {type(ops).__name__}")
    ops = tuple(ops)
    supported = ", ".join(supported_op_names())
    for k, op in enumerate(ops):
        if not isinstance(op, SUPPORTED_OPS):
            raise UnsupportedOpError(
                f"op #{k} ({_op_name(op)}) is not supported by gpuload's fused image kernel; "
                f"supported ops (from gpuload.ops): {supported}"
            )
    return ops


def _geometry(ops: tuple) -> tuple[tuple, tuple[int, int] | None]:
    """The geometric steps in list order, and the output size they fix (None if they do not):
    a resize of the short side keeps the aspect ratio of a size known so far."""
    geometry: list = []
    size: tuple[int, int] | None = None  # statically known current size, None = per-sample
    for k, op in enumerate(ops):
        d0 = k * _DRAWS_PER_OP
        if isinstance(op, RandomResizedCrop):
            geometry.append(("rrc", op.size, op.scale, op.ratio, d0))
            size = op.size
        elif isinstance(op, Resize) and isinstance(op.size, int):
            geometry.append(("resize_short", op.size))
            if size is not None:
                h, w, s = size[0], size[1], op.size
                size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        elif isinstance(op, Resize):
            geometry.append(("resize", op.size))
            size = op.size
        elif isinstance(op, CenterCrop):
            geometry.append(("center_crop", op.size))
            size = op.size
        elif isinstance(op, RandomHorizontalFlip):
            geometry.append(("flip", op.p, d0))
    return tuple(geometry), size


_SINGLE_OPS = (ColorJitter, Normalize, ToDtype, ToLayout)


def _single_ops(ops: tuple) -> dict[type, tuple[Any, int]]:
    """The ops allowed once per list, by type, with their positions; ColorJitter only before
    Normalize."""
    found: dict[type, tuple[Any, int]] = {}
    for k, op in enumerate(ops):
        kind = next((t for t in _SINGLE_OPS if isinstance(op, t)), None)
        if kind is None:
            continue
        if kind in found:
            raise ValueError(f"only one {kind.__name__} is supported per op list")
        if kind is ColorJitter and Normalize in found:
            raise ValueError("ColorJitter must come before Normalize")
        found[kind] = (op, k)
    return found


def compile_ops(ops: Sequence) -> ImagePlan:
    """Validate an op list and compile it into an ImagePlan (one fused kernel).

    Geometric ops (RandomResizedCrop, Resize, CenterCrop, RandomHorizontalFlip) compose, in list
    order, into one window in source coordinates, a flip flag and one output size; the list must
    fix the output size. ColorJitter must come before Normalize; at most one each of ColorJitter,
    Normalize, ToDtype, ToLayout.
    """
    ops = _checked_ops(ops)
    geometry, size = _geometry(ops)
    if size is None:
        raise ValueError(
            "the op list does not fix the output size, but a batch needs one output size: add "
            "RandomResizedCrop(size), Resize((h, w)), or Resize(int) followed by CenterCrop(size)"
        )
    single = _single_ops(ops)
    jitter, jitter_k = single.get(ColorJitter, (None, 0))
    normalize = single.get(Normalize, (None, 0))[0]
    dtype = single.get(ToDtype, (None, 0))[0]
    layout = single.get(ToLayout, (None, 0))[0]
    out_dtype = dtype.dtype if dtype is not None else "float32"
    if out_dtype == "uint8" and normalize is not None:
        raise ValueError(
            "ToDtype('uint8') cannot be combined with Normalize (normalised values are not 0..1)"
        )

    def rng_or_none(r):
        return None if r == (1.0, 1.0) else r

    return ImagePlan(
        ops=ops,
        out_size=(int(size[0]), int(size[1])),
        geometry=tuple(geometry),
        brightness=rng_or_none(jitter.brightness_range) if jitter else None,
        contrast=rng_or_none(jitter.contrast_range) if jitter else None,
        saturation=rng_or_none(jitter.saturation_range) if jitter else None,
        jitter_draw0=jitter_k * _DRAWS_PER_OP,
        mean=tuple(normalize.mean) if normalize else (0.0, 0.0, 0.0),
        std=tuple(normalize.std) if normalize else (1.0, 1.0, 1.0),
        normalize=normalize is not None,
        out_dtype=out_dtype,
        layout=layout.layout if layout is not None else "NCHW",
    )
