"""What a loader is asked to do, validated once: ``LoaderSpec`` and its policy enums.

Every front door (``gpuload.pytorch``, ``gpuload.tensorflow``, ``Table.batches``, ``Table.pytorch``,
``Table.tensorflow``) takes the same keyword options with the same meaning; they become one
frozen ``LoaderSpec`` here and ``loader.make_loader`` builds from it. Policies are enums that still
accept the documented strings and booleans (``shuffle=True``, ``on_error="skip"``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from .decode.header import DEFAULT_MAX_PIXELS, validate_max_pixels
from .sampling import RowSelection, Shuffle, Tail, coerce_enum
from .windows import WindowSpec

__all__ = [
    "WINDOW_OPTIONS",
    "DecodeOptions",
    "LoaderSpec",
    "OnError",
    "RowSelection",
    "Shuffle",
    "Tail",
    "refuse_unused",
    "with_spec_options",
]


class OnError(Enum):
    """What a row that cannot be decoded or transformed does: stop the run, or be left out
    of its batch (counted in ``stats().skipped``)."""

    RAISE = "raise"
    SKIP = "skip"

    @classmethod
    def coerce(cls, value: Any) -> OnError:
        return coerce_enum(cls, value, "on_error")


@dataclass(frozen=True)
class DecodeOptions:
    """Decode choices: DCT-domain downscale when lossless for the output, ROI decode, fast IDCT.

    ``max_pixels``: most pixels (height x width) an image's header may claim, checked before
    any buffer is sized from it; a larger image is a DecodeError for its row (skipped by
    ``on_error="skip"``). Default 89,478,485 (Pillow's default ``MAX_IMAGE_PIXELS``, about
    256 MiB of RGB per image); None means no limit of gpuload's own (formats decoded through
    Pillow remain subject to Pillow's ``Image.MAX_IMAGE_PIXELS``).
    """

    dct: bool = True
    roi: bool | str = True  # True = the decoder's default ("rows" on the CPU), "region", False
    fast: bool = False
    threads: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_pixels", validate_max_pixels(self.max_pixels))
        if self.roi not in (True, False, "rows", "region"):
            raise ValueError(
                f"DecodeOptions.roi must be True, False, 'rows' or 'region', got {self.roi!r}"
            )
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ValueError(f"DecodeOptions.threads must be None or >= 1, got {self.threads!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """The options every front door shares (same names, same meaning everywhere).

    - ``batch_size``: rows per batch; None gives rows one at a time where a front door can
      (torch's map-style and iterable datasets, a tf.data dataset of rows).
    - ``shuffle``: False, True, "full" or "block"; ``seed`` makes it (and random image ops)
      reproduce; None draws a seed per loader, kept in ``state_dict()`` (0 when several
      ranks share the epoch: they must agree on one order).
    - ``epoch``: the epoch the first pass uses (default 0); each further pass is the next.
    - ``columns``: the columns to load (None: all of them).
    - ``indices``: a subset of rows (a slice, row positions or a boolean mask; ``t[a:b]`` and
      ``t.split()`` pass it for you): every epoch, shard and resume runs over these rows only.
    - ``image``: image ops (``gpuload.ops``) run as one fused kernel per batch on every loaded
      image column, or ``{column: [ops]}`` with each image column's own ops (and output shape);
      ``decoder``, ``decode_options`` and ``device`` say how and where.
    - ``episode``, ``window``, ``window_seconds``: samples are windows of rows inside an
      episode (``gpuload.windows``): ``window={"action": range(0, 50)}`` gathers the anchor row
      and the 49 after it, ``window_seconds={"state": [-0.02, 0]}`` the rows nearest those
      offsets of the ``timestamp`` column (within ``tolerance_s``); offsets outside the episode
      repeat its edge row and are flagged in ``<column>_is_pad``. ``drop_incomplete=True``
      keeps only anchors whose whole window lies inside their episode.
    - ``pad_ragged``: ragged columns (``"float32[*,14]"``) come as one (B, L, ...) array padded
      with zeros and ``<column>_length`` (B,): ``True`` pads to the batch's longest row, an
      integer to that fixed length (a longer row is an error; nothing is truncated); False
      (default) leaves them lists of arrays.
    - ``drop_last``: leave out a last batch smaller than ``batch_size``.
    - ``uneven``: "pad" or "drop", how ranks' shares are evened out.
    - ``on_error``: "raise" or "skip" a row that cannot be decoded or transformed.
    - ``prefetch``: batches prepared ahead of the consumer; ``num_threads``: batch assembly
      threads (default: one per core plus one with image ops, else one).
    - ``rank`` / ``world_size``: this process's share (default: torch.distributed or the
      RANK / WORLD_SIZE environment, else the whole table).
    """

    batch_size: int | None = None
    shuffle: Shuffle | bool | str = False
    seed: int | None = None
    epoch: int | None = None
    columns: tuple[str, ...] | None = None
    indices: RowSelection | slice | Sequence[int] | np.ndarray | None = None
    image: tuple[Any, ...] | Mapping[str, Any] | None = None
    decoder: str = "auto"
    decode_options: DecodeOptions | None = None
    device: Any = "auto"
    drop_last: bool = False
    uneven: Tail | str = "pad"
    on_error: OnError | str = "raise"
    prefetch: int = 2
    num_threads: int | None = None
    rank: int | None = None
    world_size: int | None = None
    episode: str | None = None
    window: Mapping[str, Sequence[int]] | None = None
    window_seconds: Mapping[str, Sequence[float]] | None = None
    timestamp: str = "timestamp"
    tolerance_s: float = 1e-4
    drop_incomplete: bool = False
    pad_ragged: bool | int = False
    windows: WindowSpec | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size <= 0):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        set_(self, "shuffle", Shuffle.coerce(self.shuffle))
        set_(self, "uneven", Tail.coerce(self.uneven))
        set_(self, "on_error", OnError.coerce(self.on_error))
        for name in ("seed", "epoch"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name} must be None or a non-negative integer, got {v!r}")
        set_(self, "columns", _columns(self.columns))
        if self.indices is not None:
            set_(self, "indices", RowSelection(self.indices))
        if self.image is not None:
            set_(self, "image", _image_ops(self.image))
        self._windows()
        if self.decode_options is None:
            set_(self, "decode_options", DecodeOptions())
        elif not isinstance(self.decode_options, DecodeOptions):
            raise TypeError(
                f"decode_options must be a gpuload.DecodeOptions, not {type(self.decode_options).__name__}"
            )
        if not isinstance(self.decoder, str):
            raise TypeError(f"decoder must be a decoder name, not {type(self.decoder).__name__}")
        if not _is_int(self.prefetch) or self.prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0, got {self.prefetch!r}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise ValueError(
                f"num_threads must be None or an integer >= 1, got {self.num_threads!r}"
            )
        if not isinstance(self.drop_last, (bool, np.bool_)):
            raise TypeError(f"drop_last must be True or False, got {self.drop_last!r}")
        _check_rank(self.rank, self.world_size)
        pr = self.pad_ragged
        if not isinstance(pr, (bool, np.bool_)) and (not _is_int(pr) or pr < 1):
            raise ValueError(
                f"pad_ragged must be True, False or a length >= 1 to pad every batch to, got {pr!r}"
            )

    def _windows(self) -> None:
        given = [n for n in WINDOW_OPTIONS if n in self.given()]
        if self.episode is None and given:
            raise ValueError(
                f"{', '.join(given)}: windows need episode= (the column naming each row's episode)"
            )
        if self.episode is None:
            return
        ws = WindowSpec.build(
            self.episode,
            self.window,
            self.window_seconds,
            self.timestamp,
            self.tolerance_s,
            self.drop_incomplete,
        )
        if self.window_seconds is None and ("timestamp" in given or "tolerance_s" in given):
            raise ValueError("timestamp= and tolerance_s= are for window_seconds=, not given")
        object.__setattr__(self, "windows", ws)
        for name in ("window", "window_seconds"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, dict(v))

    def image_ops(self, column: str) -> tuple[Any, ...] | None:
        """The image ops of ``column`` (None: the column is not transformed)."""
        if isinstance(self.image, Mapping):
            return self.image.get(column)
        return self.image

    def given(self) -> list[str]:
        """The options set to something other than their default."""
        return [f.name for f in _OPTIONS if not _is_default(self, f)]

    def replace(self, **changes: Any) -> LoaderSpec:
        """A copy with some options changed (validated again)."""
        kw = {f.name: getattr(self, f.name) for f in _OPTIONS}
        kw.update(changes)
        return LoaderSpec(**kw)


def _is_seq(v: Any) -> bool:
    return isinstance(v, Iterable) and not isinstance(v, (str, bytes))


def _image_ops(image: Any) -> tuple[Any, ...] | dict[str, tuple[Any, ...]]:
    """Ops for every image column (a tuple), or per column (``{column: ops}``)."""
    if isinstance(image, Mapping):
        if not image:
            raise ValueError("image={} names no column: pass None for no image ops")
        out = {}
        for col, ops in image.items():
            if not isinstance(col, str):
                raise TypeError(f"image= keys are image column names, got {col!r}")
            out[col] = tuple(ops) if _is_seq(ops) else (ops,)
        return out
    return tuple(image) if _is_seq(image) else (image,)


def _columns(columns: Any) -> tuple[str, ...] | None:
    if columns is None:
        return None
    cols = (columns,) if isinstance(columns, str) else tuple(columns)
    if not cols:
        raise ValueError("columns=[] selects no columns: pass None (the default) for all columns")
    for c in cols:
        if not isinstance(c, str):
            raise TypeError(f"columns must be column names, got {c!r}")
    return cols


def _check_rank(rank: Any, world: Any) -> None:
    for name, v in (("rank", rank), ("world_size", world)):
        if v is not None and not _is_int(v):
            raise TypeError(f"{name} must be None or an integer, got {v!r}")
    if world is not None and world < 1:
        raise ValueError(f"world_size must be >= 1, got {world}")
    if rank is not None and (rank < 0 or (world is not None and rank >= world)):
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world}")


_OPTIONS = tuple(f for f in dataclasses.fields(LoaderSpec) if f.init)
WINDOW_OPTIONS = ("window", "window_seconds", "timestamp", "tolerance_s", "drop_incomplete")
_DEFAULT_SPEC_VALUES = {
    "shuffle": Shuffle.NONE,
    "uneven": Tail.PAD,
    "on_error": OnError.RAISE,
    "decode_options": DecodeOptions(),
}


def _is_default(spec: LoaderSpec, f: dataclasses.Field) -> bool:
    default = _DEFAULT_SPEC_VALUES.get(f.name, f.default)
    return getattr(spec, f.name) == default


def refuse_unused(spec: LoaderSpec, mode: str, honoured: Iterable[str], hint: str) -> None:
    """Raise for any option this mode would ignore: an option that is accepted and does
    nothing is a defect. ``hint`` says which mode honours it."""
    unused = [n for n in spec.given() if n not in set(honoured)]
    if unused:
        shown = ", ".join(f"{n}={_shown(getattr(spec, n))}" for n in unused)
        raise ValueError(f"{shown}: not used by {mode}; {hint}")


def _shown(v: Any) -> str:
    return repr(v.value) if isinstance(v, Enum) else repr(v)


F = TypeVar("F", bound=Callable[..., Any])


def with_spec_options(*, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Give a front door (``def f(table, ..., **options)``) the real signature ``help()`` and
    IDEs show: its own parameters, then LoaderSpec's options as keyword-only parameters."""
    skip = set(exclude)

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=f.default,
                annotation=f.type,
            )
            for f in _OPTIONS
            if f.name not in names and f.name not in skip
        ]
        fn.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n" + _options_doc()
        return fn

    return deco


def _options_doc() -> str:
    doc = inspect.cleandoc(LoaderSpec.__doc__ or "")
    return "Options (gpuload.LoaderSpec):\n" + doc.split("\n", 2)[2]
