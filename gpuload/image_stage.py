"""The image stage of a batch: fetched bytes -> headers -> per-sample op parameters ->
decode (DCT-scaled, row-ROI) into a reused staging buffer -> one fused kernel -> output batch.

Built once per loader: decoder, staging buffers, raw-byte buffers and kernel output rings are
allocated when the stage is built (staging grows only if a batch needs more than any before it,
counted in ``stats["staging_grows"]``), so the hot loop allocates nothing for pixels.

Every image's header is checked against ``DecodeOptions.max_pixels`` as soon as it is read,
before the staging buffer is sized from it: an implausible header (a few bytes claiming
65535x65535 pixels) is a DecodeError for its row, which ``on_error="skip"`` drops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .collate import BFloat16Bits, aligned_empty
from .decode.header import ImageHeader, read_header
from .device import Device
from .errors import DecodeError, SchemaError
from .reader import TableReader
from .schema import Column
from .spec import DecodeOptions, OnError
from .stats import StageClock
from .windows import BatchWindows

if TYPE_CHECKING:
    from .ops import ImagePlan

__all__ = [
    "ImageStage",
    "ImageStageFactory",
    "image_stage_factory",
    "decoder_for",
    "decode_requests",
]

log = logging.getLogger("gpuload.image_stage")


class ImageStageFactory:
    """Builds the ImageStage of a loader (in the loader's process, on first use)."""

    def __init__(
        self, plans: Mapping[str, ImagePlan], decoder: str, device: Device, options: DecodeOptions
    ) -> None:
        self.plans = dict(plans)  # image column -> its compiled ops
        self.decoder = decoder
        self.device = device
        self.options = options

    @property
    def plan(self) -> ImagePlan | None:
        """The plan every image column shares, or None when columns have ops of their own."""
        distinct = {id(p): p for p in self.plans.values()}
        return next(iter(distinct.values())) if len(distinct) == 1 else None

    def warm_up(self) -> None:
        """Start compiling the stage's kernels in the background (``ops.warm_up``)."""
        from .ops import warm_up

        for p in {id(p): p for p in self.plans.values()}.values():
            warm_up(p, self.device)

    def __call__(
        self,
        table: TableReader,
        columns: Sequence[Column],
        batch_size: int,
        ring_size: int,
        loader_threads: int = 1,
        frames: Mapping[str, int] | None = None,
    ) -> ImageStage:
        return ImageStage(
            table,
            columns,
            self.plans,
            self.decoder,
            self.device,
            batch_size,
            ring_size,
            self.options,
            loader_threads,
            frames=frames,
        )


def image_stage_factory(
    table: TableReader,
    image_ops: Sequence[Any] | Mapping[str, Sequence[Any]],
    decoder: str,
    device: Device,
    columns: Sequence[str] | None,
    options: DecodeOptions | None = None,
) -> tuple[list[str], ImageStageFactory]:
    """(image columns, factory) for ``image=`` ops on a table: a list of ops applies to every
    image column among the loaded columns; ``{column: ops}`` gives each named column its own
    (other image columns then stay encoded bytes)."""
    from .ops import compile_ops

    names = list(columns) if columns is not None else table.columns
    cols = [table.schema.column(n, table.name) for n in names]
    if isinstance(image_ops, Mapping):
        for name in image_ops:
            col = table.schema.column(name, table.name)
            if name not in names:
                raise ValueError(
                    f"image={{{name!r}: ...}}: column {name!r} is not among the loaded columns "
                    f"{names}; add it to columns="
                )
            if col.kind != "image":
                raise SchemaError(
                    f"image={{{name!r}: ...}}: column {name!r} of table {table.name!r} is "
                    f"{col.type_string()}, not an image column"
                )
        per_column = {c.name: tuple(image_ops[c.name]) for c in cols if c.name in image_ops}
    else:
        per_column = {c.name: tuple(image_ops) for c in cols if c.kind == "image"}
        if not per_column:
            raise SchemaError(
                f"image= ops need an image column; the loaded columns of table {table.name!r} "
                f"are {[f'{c.name}: {c.type_string()}' for c in cols]}"
            )
    compiled: dict[tuple, ImagePlan] = {}
    plans = {}
    for name, ops in per_column.items():
        key = tuple(map(repr, ops))  # equal ops share one plan (and one compiled kernel)
        if key not in compiled:
            compiled[key] = compile_ops(list(ops))
        plans[name] = compiled[key]
    factory = ImageStageFactory(plans, decoder, device, options or DecodeOptions())
    return list(plans), factory


def decoder_for(name: str, device: Device | str, threads: int, options: DecodeOptions):
    """The decoder ``name`` on ``device`` as ``options`` configure it (fast IDCT, ROI mode,
    header pixel limit): the one place a loader's decoder is made, shared by the benchmark.

    A string ``options.roi`` is the decoder's ROI mode ("auto" on a GPU included): on the cpu
    backend "rows" is its row-truncated decode and "region" adds nvImageCodec's exact region
    decode for small windows; nvimgcodec and dali (the GPU decoders) decode "region" as the
    window exactly (their default, also what ``roi=True`` gives) and "rows" as the full-width
    rows from the top down to the window's bottom. ``roi=False`` asks for whole images."""
    from .decode import get_decoder

    kw: dict = {"fast": True} if options.fast else {}
    if isinstance(options.roi, str):
        kw["roi"] = options.roi
    return get_decoder(name, device, threads=threads, max_pixels=options.max_pixels, **kw)


def decode_requests(plan: ImagePlan, params: np.ndarray, H: np.ndarray, W: np.ndarray, options):
    """(DCT scales, DecodeRequests) for images of heights ``H`` and widths ``W`` whose op
    parameters are ``params``: the largest lossless DCT downscale (``options.dct``) and the
    source region the ops read, widened by a pixel and to whole scaled pixels (``options.roi``)."""
    from .decode import DecodeRequest

    n = len(H)
    scales = plan.max_dct_scale(params) if options.dct else np.ones(n, np.int32)
    if not (options.roi and n):
        return scales, [DecodeRequest(int(s)) for s in scales.tolist()]
    dec_win = plan.scale_window(params, H, W, dct_scale=scales)
    sc = scales.astype(np.int64)
    roi_dec = plan.source_roi(dec_win, -(-H // sc), -(-W // sc), margin=1)
    roi = np.stack(
        [
            roi_dec[:, 0] * sc,
            roi_dec[:, 1] * sc,
            np.minimum(H, roi_dec[:, 2] * sc),
            np.minimum(W, roi_dec[:, 3] * sc),
        ],
        1,
    )
    requests = [
        DecodeRequest(int(s), tuple(int(v) for v in r)) for s, r in zip(scales.tolist(), roi)
    ]
    return scales, requests


@dataclass(frozen=True)
class _Batch:
    """The batch an image stage is working on (what every column of it shares)."""

    table: TableReader
    rows: np.ndarray
    slot: int
    seed: int
    epoch: int
    skip: bool
    clock: StageClock
    threads: int  # decoder and kernel threads this batch may use


class ImageStage:
    """Decode + fused ops for the image columns of one loader's batches. A windowed column
    (``frames[column] = K``) makes K images per sample: each distinct frame of a batch is
    decoded once, and every (sample, offset) runs through the kernel with its sample's ops."""

    def __init__(
        self,
        table: TableReader,
        columns: Sequence[Column],
        plans: Mapping[str, ImagePlan],
        decoder: str,
        device: Device,
        batch_size: int,
        ring_size: int,
        options: DecodeOptions,
        loader_threads: int = 1,
        frames: Mapping[str, int] | None = None,
    ) -> None:
        from .ops import FusedImageStage

        self.table = table
        self.columns = list(columns)
        self.plans = {c.name: plans[c.name] for c in self.columns}
        self.frames = dict(frames or {})
        self.device = device
        self.options = options
        # Parallelism lives at the batch level (the loader's threads): each batch decodes and
        # runs its kernel on the thread that assembles it, so decoder and kernel get
        # cores // loader_threads threads each instead of oversubscribing the cores.
        cores = os.cpu_count() or 1
        self.inner_threads = options.threads or max(1, cores // max(1, loader_threads))
        # a batch assembled alone (a loader's first) has every core to itself
        self.solo_threads = options.threads or cores
        self.decoder = decoder_for(decoder, device, self.inner_threads, options)
        self.kernels = {
            c.name: FusedImageStage(
                self.plans[c.name],
                batch_size * self.frames.get(c.name, 1),
                device,
                depth=ring_size,
            )
            for c in self.columns
        }
        self.ring_size = ring_size
        # Raw bytes and decoded staging are only needed while a batch is assembled: one set per
        # assembling thread (thread-local), not one per output slot.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._solo = None  # the decoder of a batch alone (see _decoder_for)
        self.stats = {"staging_grows": 0, "raw_grows": 0, "decoded": 0, "dct_scaled": 0}

    def counters(self) -> dict[str, int]:
        """Images decoded and DCT-scaled, buffer growths, output slots given a fresh buffer
        because the batch that used them was still held (``held_replaced``), and batches the
        kernel's NumPy twin ran while the kernel compiled (``twin_batches``)."""
        held = sum(k.held_replaced for k in self.kernels.values())
        twin = sum(k.twin_batches for k in self.kernels.values())
        return {**self.stats, "held_replaced": held, "twin_batches": twin}

    # -- buffers (per assembling thread) ---------------------------------------------------
    def _alloc(self, nbytes: int, where: str):
        if where == "device":
            from numba import cuda

            return cuda.device_array(nbytes, dtype=np.uint8)
        if where == "pinned":
            from numba import cuda

            return cuda.pinned_array(nbytes, dtype=np.uint8)  # page-locked: fast async H2D
        # Not filled: the decoder's writes fault the pages in (without the GIL, on the pages a
        # batch uses, not the headroom). Filling here cost a first batch ~0.4 s per thread.
        return aligned_empty(nbytes, np.uint8)

    def _staging_for(self, nbytes: int):
        buf = getattr(self._local, "staging", None)
        if buf is not None and buf.size >= nbytes:
            return buf
        if buf is not None:
            with self._lock:
                self.stats["staging_grows"] += 1
            log.debug("staging grows to %d bytes", nbytes)
        where = (
            "device"
            if self.decoder.device.is_cuda
            else ("pinned" if self.device.is_cuda else "host")
        )
        buf = self._alloc(int(nbytes * 1.25) + (1 << 16), where)  # headroom: sizes vary by batch
        self._local.staging = buf
        return buf

    def _raw_for(self, nbytes: int):
        buf = getattr(self._local, "raw", None)
        if buf is not None and buf.size >= nbytes:
            return buf
        if buf is not None:
            with self._lock:
                self.stats["raw_grows"] += 1
        buf = self._alloc(
            int(nbytes * 1.5) + (1 << 16), "pinned" if self.device.is_cuda else "host"
        )
        self._local.raw = buf
        return buf

    # -- one batch -------------------------------------------------------------------------
    def run(
        self,
        table: TableReader,
        rows: np.ndarray,
        *,
        slot: int,
        seed: int,
        epoch: int,
        on_error: OnError,
        clock: StageClock,
        windows: Mapping[str, BatchWindows] | None = None,
        alone: bool = False,
    ) -> tuple[dict, np.ndarray | None]:
        """Images of the batch's rows for each image column, and a keep-mask when rows were
        dropped (on_error="skip"), else None. Random ops draw from (seed, epoch, row): with
        ``windows``, every frame of a sample draws from its anchor row (one crop per sample).
        ``alone``: no other batch is being assembled (a loader's first), so the decoder and the
        kernel use every core (``solo_threads``) instead of this thread's share."""
        keep = np.ones(len(rows), dtype=bool)
        outs: dict[str, Any] = {}
        produced: dict[str, np.ndarray] = {}
        threads = self.solo_threads if alone else self.inner_threads
        batch = _Batch(table, rows, slot, seed, epoch, on_error is OnError.SKIP, clock, threads)
        for col in self.columns:
            win = windows.get(col.name) if windows else None
            out, bad = self._column(batch, col, keep, win)
            outs[col.name], produced[col.name] = out, ~bad
            keep &= ~bad
        if keep.all():
            return outs, None
        # a row dropped in one image column goes from every column of the batch
        for name, out in outs.items():
            sel = keep[produced[name]]
            if not sel.all():
                outs[name] = out[sel]
        return outs, keep

    def _column(self, batch: _Batch, col: Column, keep: np.ndarray, win: BatchWindows | None):
        """One column's images for the batch's live rows, and the mask of rows it dropped."""
        if win is None:
            frames, index = batch.rows, np.arange(len(batch.rows))[:, None]
        else:
            frames, index = win.unique()
        with batch.clock.time("read"):
            plan, dest = batch.table.read_plan(frames, col)
            total = int(dest[-1])
            buf = self._raw_for(total)[:total]
            batch.table.fetch_rows(frames, plan, dest, col, buf)
        mv = memoryview(buf)
        o = dest.tolist()
        live = keep.copy()
        heads: dict[int, ImageHeader] = {}
        while True:
            need = np.unique(index[live]) if win is not None else np.flatnonzero(live)
            failed = None
            for f in need.tolist():
                if f not in heads:
                    try:
                        heads[f] = self._header(mv[o[f] : o[f + 1]])
                    except DecodeError as e:
                        failed = (f, e)
                        break
            if failed is None:
                try:
                    out = self._decode_and_run(batch, col, mv, o, heads, need, index[live], live)
                    return out, ~live
                except DecodeError as e:
                    j = getattr(e, "index", None)
                    if j is None or not 0 <= j < len(need):
                        raise
                    failed = (int(need[j]), e)
            f, e = failed
            if not batch.skip:
                raise self._where(e, frames[f], col, o[f], o[f + 1]) from e
            live &= ~(index == f).any(axis=1)  # every sample that needs the frame goes

    def _decoder_for(self, threads: int):
        """The decoder for a batch that may use ``threads`` threads: the stage's own, or for a
        batch alone on a host decoder with a pool of its own (libjpeg-turbo, PIL), the same
        backend with ``threads`` (made on first use: a loader's first batch; outputs do not
        depend on the thread count, each image is decoded on one thread)."""
        dec = self.decoder
        if threads <= dec.threads or dec.device.is_cuda or dec.name not in ("cpu", "pil"):
            return dec
        with self._lock:
            if self._solo is None:
                self._solo = decoder_for(dec.name, dec.device, threads, self.options)
            return self._solo

    def release_solo(self) -> None:
        """Close the decoder made for a batch alone (its threads are not needed again)."""
        with self._lock:
            solo, self._solo = self._solo, None
        if solo is not None:
            solo.close()

    def _header(self, data: memoryview) -> ImageHeader:
        """The image's header, checked against ``max_pixels`` before anything is sized from it;
        any failure is a DecodeError."""
        try:
            return read_header(data, self.options.max_pixels)
        except DecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable header is this row's DecodeError
            raise DecodeError(f"{type(e).__name__}: {e}") from e

    def _where(self, e: DecodeError, row, col: Column, a: int, b: int) -> DecodeError:
        msg = str(e)
        if msg.startswith("image ") and ": " in msg:
            msg = msg.split(": ", 1)[1]
        return DecodeError(
            f"table {self.table.name!r}, row {int(row)}, column {col.name!r} ({b - a} bytes): cannot decode: {msg}"
        )

    def _decode_and_run(self, batch: _Batch, col: Column, mv, o, heads, need, index, live):
        """Decode frames ``need`` (positions in the batch's frames) once each, then run the
        kernel for every live sample x offset (``index``: (samples, K) frame positions)."""
        plan = self.plans[col.name]
        n = len(need)
        t0 = time.perf_counter()
        datas = [mv[o[f] : o[f + 1]] for f in need.tolist()]
        hs = [heads[f] for f in need.tolist()]
        item = np.searchsorted(need, index.ravel())  # each item's position among the frames
        anchors = np.repeat(batch.rows[live], index.shape[1])
        H = np.fromiter((h.height for h in hs), np.int64, n)[item]
        W = np.fromiter((h.width for h in hs), np.int64, n)[item]
        params = plan.sample_params(H, W, anchors, batch.seed, batch.epoch)
        _, requests = decode_requests(plan, params, H, W, self.options)
        if len(item) != n or not np.array_equal(item, np.arange(n)):
            requests = merge_requests(requests, item, n)
        need_bytes = self.decoder.staging_nbytes(hs, requests)
        staging = self._staging_for(need_bytes)
        kernel = self.kernels[col.name]
        # GPU decoders copy into the staging buffer on the kernel's stream, so decode and kernel
        # are ordered without a device-wide sync.
        stream = kernel.stream if self.device.is_cuda else None
        decoder = self._decoder_for(batch.threads)
        dec = decoder.decode_batch(datas, requests, staging, headers=hs, stream=stream)
        t1 = time.perf_counter()
        batch.clock.add("decode", t1 - t0)
        origin, scale = dec.origin[item], dec.scale[item]
        windows = np.empty((len(item), 4), np.float32)
        windows[:, 0] = (params[:, 0] - origin[:, 0]) / scale[:, 0]
        windows[:, 1] = (params[:, 1] - origin[:, 1]) / scale[:, 1]
        windows[:, 2] = params[:, 2] / scale[:, 0]
        windows[:, 3] = params[:, 3] / scale[:, 1]
        with self._lock:
            self.stats["decoded"] += n
            self.stats["dct_scaled"] += int((dec.scale[:, 0] > 1).sum())
        flat = staging.reshape(-1) if hasattr(staging, "reshape") else staging
        if not self.device.is_cuda:
            import numba

            # thread-local: this batch's kernel gets its share of the cores (all when alone)
            numba.set_num_threads(min(batch.threads, numba.config.NUMBA_NUM_THREADS))
        slot = batch.slot
        meta = np.ascontiguousarray(dec.meta[item])
        k = index.shape[1] if col.name in self.frames else 1
        out = kernel.run(
            flat[: max(1, dec.nbytes)], meta, windows, params, out_index=slot, frames=k
        )
        if self.device.is_cuda:
            # Wait (on this assembling thread) for the batch's own event, not for the device:
            # the consumer then reads a finished batch on whatever stream it uses.
            kernel.events[slot].synchronize()
        batch.clock.add("kernel", time.perf_counter() - t1)
        return BFloat16Bits(out) if plan.out_dtype == "bfloat16" else out


def merge_requests(requests: Sequence[Any], item: np.ndarray, n: int) -> list[Any]:
    """One decode request per frame from the requests of the items that read it: the finest
    DCT scale any of them allows and the union of their regions (scales are powers of two,
    so a region aligned to a coarser scale is aligned to the finer one too)."""
    from .decode import DecodeRequest

    scale = [0] * n
    roi: list[Any] = [False] * n  # False: no item yet; None: the whole image
    for r, f in zip(requests, item.tolist()):
        scale[f] = r.scale if scale[f] == 0 else min(scale[f], r.scale)
        if roi[f] is False or r.roi is None or roi[f] is None:
            roi[f] = r.roi if roi[f] is False else None
        else:
            a, b = roi[f], r.roi
            roi[f] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
    return [DecodeRequest(int(s), r if r is not False else None) for s, r in zip(scale, roi)]
