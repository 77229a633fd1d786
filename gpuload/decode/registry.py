"""String-keyed decoder registry with lazy imports (in the manner of fsspec's registry).

Backends are named by ``"module:Class"`` paths and imported only when asked for, so importing
gpuload never imports DALI, nvImageCodec or numba.cuda. A missing optional dependency raises
:class:`~gpuload.errors.MissingDependencyError` carrying an install hint.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

from gpuload.device import Device, resolve_device
from gpuload.errors import MissingDependencyError

from .base import Decoder
from .header import DEFAULT_MAX_PIXELS, validate_max_pixels

__all__ = ["get_decoder", "register_decoder", "known_decoders", "available_decoders"]

_REGISTRY: dict[str, tuple[str, str]] = {
    "cpu": ("gpuload.decode.cpu:CpuDecoder", "pip install simplejpeg"),
    "pil": ("gpuload.decode.pil_decoder:PilDecoder", "pip install pillow"),
    "nvimgcodec": (
        "gpuload.decode.nvimgcodec_decoder:NvImgCodecDecoder",
        "pip install nvidia-nvimgcodec-cu12 (or: pip install 'gpuload[cuda]')",
    ),
    "dali": (
        "gpuload.decode.dali_decoder:DaliDecoder",
        "pip install nvidia-dali-cuda120 (or: pip install 'gpuload[cuda]')",
    ),
}

_AUTO_GPU = ("nvimgcodec", "dali", "cpu")
_LIBRARIES = {
    "nvimgcodec": "nvidia.nvimgcodec",
    "dali": "nvidia.dali",
    "cpu": "simplejpeg",
    "pil": "PIL",
}


def register_decoder(
    name: str, target: str | type, install_hint: str = "", clobber: bool = False
) -> None:
    """Register a decoder class (or a lazy ``"module:Class"`` path) under ``name``."""
    if name == "auto":
        raise ValueError("'auto' is reserved")
    if name in _REGISTRY and not clobber:
        raise ValueError(
            f"decoder {name!r} is already registered (pass clobber=True to replace it)"
        )
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    _REGISTRY[name] = (target, install_hint)


def known_decoders() -> list[str]:
    """Every registered name (installed or not), plus "auto"."""
    return ["auto", *_REGISTRY]


def _load(name: str) -> type[Decoder]:
    try:
        target, hint = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown decoder {name!r}; known: {', '.join(known_decoders())}"
        ) from None
    mod_name, _, cls_name = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise MissingDependencyError(f"decoder {name!r} is not available ({e}); {hint}") from e
    return getattr(mod, cls_name)


def available_decoders() -> list[str]:
    """Registered decoders whose backend module and library are installed (checked without
    importing the libraries)."""
    out = []
    for name in _REGISTRY:
        try:
            _load(name)
            lib = _LIBRARIES.get(name)
            if lib is not None and importlib.util.find_spec(lib) is None:
                continue
        except (ImportError, ValueError, MissingDependencyError):
            continue
        out.append(name)
    return out


def get_decoder(
    name: str = "auto",
    device: Device | str | None = "auto",
    threads: int | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    **options,
) -> Decoder:
    """A decoder by name: "cpu", "pil", "nvimgcodec", "dali" or "auto".

    "auto" on a CUDA device picks nvimgcodec, else dali, else cpu (which stages in host memory:
    check ``decoder.device``); on the CPU it picks "cpu". ``options`` go to the backend
    (e.g. ``fast=True``; ``roi``: cpu "rows"/"region"/"off", nvimgcodec/dali "region"/"rows"/
    "off"; nvimgcodec/dali: ``hw_load=0.9``); an option the backend does not take is a
    ValueError naming the ones it does (the cpu fallback of "auto" takes only ``fast``,
    ``roi`` and ``strict``: ``hw_load`` is for the GPU decoders). ``max_pixels`` bounds each
    image's header dimensions (None: no limit), see ``Decoder.max_pixels``.
    Creating a decoder neither touches CUDA nor starts threads; that happens at the first batch.
    """
    limit = validate_max_pixels(max_pixels)
    dec = _construct(name, resolve_device(device), threads, options)
    dec.max_pixels = limit
    return dec


def _options_of(cls: type) -> list[str] | None:
    """The keyword options ``cls(device, threads, ...)`` takes (None: any, it has ``**kw``)."""
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[3:]
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _make(name: str, cls: type, dev: Device, threads: int | None, options: dict) -> Decoder:
    """``cls(dev, threads, **options)``, an option it does not take being a ValueError."""
    known = _options_of(cls)
    unknown = [k for k in options if known is not None and k not in known]
    if unknown:
        raise ValueError(
            f"the {name!r} decoder takes no option {', '.join(map(repr, unknown))}; its options "
            f"are {', '.join(known) or 'none'}"
        )
    return cls(dev, threads, **options)


_CPU_FALLBACK_OPTIONS = ("fast", "roi", "strict")


def _construct(name: str, dev: Device, threads: int | None, options: dict) -> Decoder:
    """The backend instance for ``name`` ("auto" resolved for ``dev``)."""
    if name == "auto":
        if not dev.is_cuda:
            return _make("cpu", _load("cpu"), dev, threads, options)
        errors = []
        for cand in _AUTO_GPU:
            try:
                cls = _load(cand)
                if cand == "cpu":  # host fallback: the options it understands (not hw_load)
                    kw = {k: v for k, v in options.items() if k in _CPU_FALLBACK_OPTIONS}
                    return _make(cand, cls, dev, threads, kw)
                return _make(cand, cls, dev, threads, options)
            except MissingDependencyError as e:
                errors.append(str(e))
        raise MissingDependencyError("no decoder available: " + "; ".join(errors))
    return _make(name, _load(name), dev, threads, options)
