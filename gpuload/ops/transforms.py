"""Declarative image ops. Each is a frozen dataclass validated on construction; ``compile_ops``
turns a list of them into one fused kernel launch (see ``gpuload.ops.plan``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

__all__ = [
    "RandomResizedCrop",
    "Resize",
    "CenterCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "Normalize",
    "ToDtype",
    "ToLayout",
    "SUPPORTED_OPS",
    "parse_ops",
    "OUT_DTYPES",
    "LAYOUTS",
]

OUT_DTYPES = ("float32", "float16", "bfloat16", "uint8")
LAYOUTS = ("NCHW", "NHWC")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _size_hw(op: str, size) -> tuple[int, int]:
    """int -> (s, s); (h, w) -> (h, w); both positive ints."""
    if _is_int(size):
        h = w = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) for v in size):
        h, w = int(size[0]), int(size[1])
    elif isinstance(size, (tuple, list)) and len(size) == 1 and _is_int(size[0]):
        h = w = int(size[0])
    else:
        raise ValueError(
            f"{op}: size must be an int or a (height, width) pair of ints, got {size!r}"
        )
    if h <= 0 or w <= 0:
        raise ValueError(f"{op}: size must be positive, got {size!r}")
    return h, w


def _range_pair(op: str, name: str, v, positive: bool) -> tuple[float, float]:
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_real(x) for x in v)):
        raise ValueError(f"{op}: {name} must be a (min, max) pair of finite numbers, got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if lo > hi:
        raise ValueError(f"{op}: {name} must have min <= max, got {v!r}")
    if positive and lo <= 0:
        raise ValueError(f"{op}: {name} values must be > 0, got {v!r}")
    return lo, hi


@dataclass(frozen=True)
class RandomResizedCrop:
    """Random window (area fraction in ``scale``, aspect w/h log-uniform in ``ratio``; 10
    attempts, then the torchvision centre-crop fallback), resized to ``size``."""

    size: int | tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        object.__setattr__(self, "size", _size_hw("RandomResizedCrop", self.size))
        object.__setattr__(
            self, "scale", _range_pair("RandomResizedCrop", "scale", self.scale, True)
        )
        object.__setattr__(
            self, "ratio", _range_pair("RandomResizedCrop", "ratio", self.ratio, True)
        )


@dataclass(frozen=True)
class Resize:
    """int: shorter side to ``size`` keeping the aspect (long side = int(size * long / short),
    as torchvision); (h, w): exactly that size."""

    size: int | tuple[int, int]

    def __post_init__(self):
        if _is_int(self.size):
            if self.size <= 0:
                raise ValueError(f"Resize: size must be positive, got {self.size!r}")
            object.__setattr__(self, "size", int(self.size))
        else:
            object.__setattr__(self, "size", _size_hw("Resize", self.size))


@dataclass(frozen=True)
class CenterCrop:
    """Centre crop to ``size`` (top = round((H - h) / 2), as torchvision). A crop larger than
    the image reads edge-replicated pixels (torchvision pads with zeros)."""

    size: int | tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "size", _size_hw("CenterCrop", self.size))


@dataclass(frozen=True)
class RandomHorizontalFlip:
    p: float = 0.5

    def __post_init__(self):
        if not _is_real(self.p) or not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be a number in [0, 1], got {self.p!r}")
        object.__setattr__(self, "p", float(self.p))


def _jitter_range(name: str, v) -> tuple[float, float]:
    if _is_real(v):
        f = float(v)
        if f < 0:
            raise ValueError(f"ColorJitter: {name} must be >= 0, got {v!r}")
        return max(0.0, 1.0 - f), 1.0 + f
    lo, hi = _range_pair("ColorJitter", name, v, False)
    if lo < 0:
        raise ValueError(f"ColorJitter: {name} range must be >= 0, got {v!r}")
    return lo, hi


@dataclass(frozen=True)
class ColorJitter:
    """Brightness, contrast, saturation factors as torchvision: a float f means a factor drawn
    uniformly from [max(0, 1 - f), 1 + f]; a (min, max) pair is used as is; 0 means off.

    Applied in the FIXED order brightness -> contrast -> saturation (torchvision permutes the
    order at random), each clamped to [0, 1]. The contrast mean is the mean luminance of the
    brightness-adjusted crop over a 16x16 grid of output positions (see gpuload.kernels.fused).
    Hue is not supported.
    """

    brightness: float | tuple[float, float] = 0
    contrast: float | tuple[float, float] = 0
    saturation: float | tuple[float, float] = 0
    # normalised (min, max) factor ranges, filled in by __post_init__
    brightness_range: tuple[float, float] = field(init=False, repr=False, compare=False)
    contrast_range: tuple[float, float] = field(init=False, repr=False, compare=False)
    saturation_range: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            object.__setattr__(self, name + "_range", _jitter_range(name, getattr(self, name)))


def _three(op: str, name: str, v) -> tuple[float, float, float]:
    if _is_real(v):
        return (float(v),) * 3
    try:
        vals = [float(x) for x in v]
    except TypeError:
        vals = None
    if vals is None or len(vals) not in (1, 3) or not all(math.isfinite(x) for x in vals):
        raise ValueError(f"{op}: {name} must be a number or 3 numbers (one per channel), got {v!r}")
    if len(vals) == 1:
        vals = vals * 3
    return tuple(vals)  # type: ignore[return-value]


@dataclass(frozen=True)
class Normalize:
    """(pixel/255 - mean) / std per channel (torchvision ToTensor + Normalize)."""

    mean: float | tuple[float, float, float]
    std: float | tuple[float, float, float]

    def __post_init__(self):
        object.__setattr__(self, "mean", _three("Normalize", "mean", self.mean))
        std = _three("Normalize", "std", self.std)
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be > 0, got {self.std!r}")
        object.__setattr__(self, "std", std)


def _dtype_name(v) -> str | None:
    if isinstance(v, str):
        name = v.lower()
    else:
        name = getattr(v, "name", None) or getattr(v, "__name__", None) or str(v)
        name = str(name).lower()
    name = name.replace("torch.", "").replace("numpy.", "").replace("np.", "")
    aliases = {
        "float": "float32",
        "half": "float16",
        "f4": "float32",
        "f2": "float16",
        "u1": "uint8",
    }
    name = aliases.get(name, name)
    return name if name in OUT_DTYPES else None


@dataclass(frozen=True)
class ToDtype:
    """Output dtype: "float32" (default), "float16", "bfloat16" (stored as uint16 bits on the
    CPU) or "uint8" (round(clamp(v, 0, 1) * 255); cannot be combined with Normalize)."""

    dtype: str = "float32"

    def __post_init__(self):
        name = _dtype_name(self.dtype)
        if name is None:
            raise ValueError(f"ToDtype: dtype must be one of {OUT_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", name)


@dataclass(frozen=True)
class ToLayout:
    """Output layout: "NCHW" (default) or "NHWC"."""

    layout: str = "NCHW"

    def __post_init__(self):
        if not isinstance(self.layout, str) or self.layout.upper() not in LAYOUTS:
            raise ValueError(f"ToLayout: layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "layout", self.layout.upper())


SUPPORTED_OPS = (
    RandomResizedCrop,
    Resize,
    CenterCrop,
    RandomHorizontalFlip,
    ColorJitter,
    Normalize,
    ToDtype,
    ToLayout,
)


def parse_ops(text: str) -> list:
    """Ops written as Python calls, e.g. ``"RandomResizedCrop(224), RandomHorizontalFlip()"``,
    with or without the ``ops.`` prefix, for command lines and config files.
    Only calls of the supported ops with literal arguments are accepted: nothing is evaluated
    (``ast.literal_eval`` on each argument), so a string from a config is never executed."""
    import ast

    known = {op.__name__: op for op in SUPPORTED_OPS}
    try:
        tree = ast.parse(f"[{text}]", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse image ops {text!r}: {e.msg}") from None
    out = []
    for node in tree.elts:
        func = node.func if isinstance(node, ast.Call) else None
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name not in known:
            raise ValueError(
                f"image ops must be calls of {sorted(known)}, got {ast.unparse(node)!r}"
            )
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(
                f"the arguments of {ast.unparse(node)!r} must be literals (numbers, strings, "
                "tuples)"
            ) from None
        out.append(known[name](*args, **kwargs))
    return out
