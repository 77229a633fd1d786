"""nvImageCodec backend: batched decode on the GPU (nvJPEG hardware / hybrid / CUDA), or on the
CPU (its libjpeg-turbo / libpng extensions) with ``NVIMGCODEC_DEVICE_CPU_ONLY``.

* One ``nvimgcodec.Decoder`` per calling thread and process (they are not thread-safe), created
  at the first batch, never at import or construction, so nothing touches CUDA before fork.
* Regions use nvImageCodec's region API (``CodeStream.get_sub_code_stream(region=Region(...))``)
  and come back exact: origin = (y0, x0). There is no DCT scaling: ``scale`` is always 1.
  ``roi`` (``DecodeOptions.roi`` through the loader) says which region a request's window is
  decoded as, on the GPU and on the CPU alike (:func:`decode_region`): "region" (default) the
  window exactly, "rows" every full-width row from the top down to the window's bottom edge
  (the rows the cpu backend's row-truncated decode covers; origin (0, 0)), "off" the whole
  image.
* CPU: images decode straight into views of the host staging buffer (``images=`` wrapping
  them with ``as_image``), one single-threaded nvImageCodec decoder per worker thread.
  GPU: one batched decode on the caller's stream; the decoded device images are copied
  device-to-device into the device staging buffer on that stream (asynchronous); an image
  one of its CPU backends left in host memory is copied host-to-device instead.
* Output is always RGB (3 channels), grey JPEGs included (one decode parameter set per batch).
* An image nvImageCodec cannot decode (it returns None) is decoded on the host instead (strict
  libjpeg-turbo for JPEG, libpng/PIL otherwise), which either succeeds or raises a DecodeError
  naming the index; so is every image of a batch whose decode call raises. Any exception for
  one image becomes a DecodeError naming it. nvImageCodec's libjpeg-turbo path does not report
  libjpeg's corrupt-data warnings; truncated streams are rejected before decoding (EOI check).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading

import numpy as np

from gpuload.device import Device
from gpuload.errors import DecodeError, MissingDependencyError

from ._host import decode_other
from ._pool import ForkSafeLocal, WorkerPool
from .base import DecodePlan, Decoder, DecodeRequest, as_batch_error, host_views
from .header import DEFAULT_MAX_PIXELS, ImageHeader, check_size

__all__ = ["NvImgCodecDecoder"]

log = logging.getLogger("gpuload.decode")

INSTALL_HINT = "pip install nvidia-nvimgcodec-cu12 (or: pip install 'gpuload[cuda]')"

ROI_MODES = ("region", "rows", "off")
"""What the exact-region backends (nvimgcodec, dali) decode for a request's window."""


def check_roi_mode(roi, backend: str) -> str:
    """``roi`` if it names a mode of :data:`ROI_MODES`, else a ValueError naming them."""
    if not isinstance(roi, str) or roi not in ROI_MODES:
        raise ValueError(
            f"the {backend!r} decoder's roi must be 'region' (the window exactly), 'rows' "
            f"(full-width rows down to the window's bottom) or 'off' (whole images), got {roi!r}"
        )
    return roi


def decode_region(h: ImageHeader, r: DecodeRequest, roi: str) -> tuple[int, int, int, int] | None:
    """The region ``(y0, x0, y1, x1)`` an exact-region backend decodes for request ``r`` in
    ``roi`` mode, or None for the whole image: "region" the request's window, "rows" rows
    ``[0, y1)`` at full width, "off" (or no window) the whole image."""
    if r.roi is None or roi == "off":
        return None
    y0, x0, y1, x1 = r.roi
    if roi == "rows":
        y0, x0, x1 = 0, 0, h.width
    if (y0, x0, y1, x1) == (0, 0, h.height, h.width):
        return None
    return (y0, x0, y1, x1)


def require_nv() -> None:
    """MissingDependencyError (with the install hint) unless nvImageCodec is installed; does
    not import it (importing is left to the first batch, after any fork)."""
    try:
        found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError(f"the 'nvimgcodec' decoder needs nvImageCodec: {INSTALL_HINT}")


def _nv():
    try:
        from nvidia import nvimgcodec
    except ImportError as e:
        raise MissingDependencyError(
            f"the 'nvimgcodec' decoder needs nvImageCodec: {INSTALL_HINT}"
        ) from e
    return nvimgcodec


def _on_host(image) -> bool:
    """Whether nvImageCodec left a decoded image in host memory (STRIDED_HOST), as a CPU
    backend of a CUDA decoder may."""
    return "HOST" in str(getattr(image, "buffer_kind", ""))


def _as_u8(data):
    if isinstance(data, bytes):
        return data
    return np.frombuffer(data, dtype=np.uint8)


def host_decode_rgb(
    data, header: ImageHeader, plan: DecodePlan, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Strict host decode of one image to the plan's (region of the) RGB output."""
    import simplejpeg

    check_size(header.height, header.width, max_pixels, header.codec.upper())
    if header.codec == "jpeg" and header.channels in (1, 3) and header.precision == 8:
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as e:
            raise DecodeError(f"corrupt JPEG data: {e}") from e
    else:
        arr = decode_other(data, header, max_pixels)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    y0, x0 = plan.origin_y, plan.origin_x
    return arr[y0 : y0 + plan.height, x0 : x0 + plan.width]


class NvImgCodecDecoder(Decoder):
    """Batched nvImageCodec decode into a staging buffer (device memory on CUDA, else host).

    ``threads``: nvImageCodec's CPU worker threads (default all cores).
    ``fast``: fast IDCT and non-fancy chroma upsampling in the libjpeg-turbo path.
    ``hw_load``: share of a batch given to the hardware JPEG decoder (A100/H100) on CUDA.
    ``roi``: what a request's window decodes as: "region" (default) exactly the window,
    "rows" full-width rows from the top to the window's bottom, "off" the whole image.
    ``host_decoded``: images of this decoder's batches that nvImageCodec did not decode and
    the host did instead (0 when nvImageCodec decoded everything).
    """

    name = "nvimgcodec"

    def __init__(
        self,
        device: Device | None = None,
        threads: int | None = None,
        *,
        fast: bool = False,
        hw_load: float = 0.75,
        roi: str = "region",
    ):
        super().__init__(device or Device("cpu"), threads)
        self.roi = check_roi_mode(roi, self.name)
        require_nv()  # fail early with the install hint; imported at the first batch
        self.fast = bool(fast)
        self.hw_load = float(hw_load)
        self.host_decoded = 0
        self._count_lock = threading.Lock()
        self._local = ForkSafeLocal()
        self._pool = WorkerPool(self.threads, "gpuload-nvimgcodec")

    @property
    def _nv(self):
        return _nv()

    # ----- library handles (per thread, per process) ------------------------------------------
    def _make_decoder(self):
        nv = self._nv
        opts = ":fancy_upsampling=0 :fast_idct=1" if self.fast else ":fancy_upsampling=1"
        if self.device.is_cuda:
            backends = [
                nv.Backend(nv.BackendKind.HW_GPU_ONLY, load_hint=self.hw_load),
                nv.Backend(nv.BackendKind.HYBRID_CPU_GPU),
                nv.Backend(nv.BackendKind.GPU_ONLY),
                nv.Backend(nv.BackendKind.CPU_ONLY),
            ]
            return nv.Decoder(
                device_id=self.device.index,
                max_num_cpu_threads=self.threads,
                backends=backends,
                options=opts,
            )
        # CPU: one single-threaded decoder per worker thread of our pool (nvImageCodec caps its
        # own pool at cores - 1 workers, which leaves a core idle on small machines).
        return nv.Decoder(
            device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
            max_num_cpu_threads=1,
            backends=[nv.Backend(nv.BackendKind.CPU_ONLY)],
            options=opts,
        )

    def _decoder(self):
        return self._local.get("decoder", self._make_decoder)

    def _params(self):
        nv = self._nv
        return nv.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nv.ColorSpec.SRGB,
            allow_any_depth=False,
            sample_format=nv.SampleFormat.I_RGB,
        )

    # ----- planning / staging -----------------------------------------------------------------
    def _plan(self, i: int, h: ImageHeader, r: DecodeRequest) -> DecodePlan:
        region = decode_region(h, r, self.roi)
        if region is not None:
            y0, x0, y1, x1 = region
            return DecodePlan(y1 - y0, x1 - x0, 3, y0, x0, 1, "roi", region)
        return DecodePlan(h.height, h.width, 3, 0, 0, 1, "full")

    def _staging_capacity(self, staging) -> int:
        if not self.device.is_cuda:
            return super()._staging_capacity(staging)
        from ._cuda import device_capacity

        return device_capacity(staging)

    def _code_streams(self, datas, plans):
        nv = self._nv
        out = []
        for d, p in zip(datas, plans, strict=True):
            cs = nv.CodeStream(_as_u8(d))
            if p.method == "roi":
                y0, x0, y1, x1 = p.arg
                cs = cs.get_sub_code_stream(region=nv.Region(y0, x0, y1, x1))
            out.append(cs)
        return out

    # ----- decoding -------------------------------------------------------------------------
    def _decode(self, datas, headers, plans, offsets, staging, stream) -> None:
        if self.device.is_cuda:
            self._decode_cuda(datas, headers, plans, offsets, staging, stream)
        else:
            self._decode_host(datas, headers, plans, offsets, staging)

    def _decode_host(self, datas, headers, plans, offsets, staging) -> None:
        nv = self._nv
        views = host_views(staging, plans, offsets)
        n = len(datas)
        outs: list = [None] * n
        params = self._params()

        def sub_batch(lo: int, hi: int) -> None:
            # Each worker decodes a contiguous slice with its own decoder, straight into staging.
            srcs = self._code_streams(datas[lo:hi], plans[lo:hi])
            images = [nv.as_image(v) for v in views[lo:hi]]
            # A malformed batch raises: its images are then decided one by one below.
            with contextlib.suppress(Exception):
                outs[lo:hi] = self._decoder().decode(srcs, images=images, params=params)

        k = min(self.threads, n)
        bounds = [(n * j // k, n * (j + 1) // k) for j in range(k)]
        if k <= 1:
            sub_batch(0, n)
        else:
            pool = self._pool.get()
            for f in [pool.submit(sub_batch, lo, hi) for lo, hi in bounds]:
                f.result()
        self._note_host_decoded(sum(o is None for o in outs), n)
        for i, o in enumerate(outs):
            if o is None:
                try:
                    np.copyto(
                        views[i], host_decode_rgb(datas[i], headers[i], plans[i], self.max_pixels)
                    )
                except Exception as e:  # noqa: BLE001 - any failure is this image's DecodeError
                    raise as_batch_error(i, e)  # noqa: B904 - cause set

    def _decode_cuda(self, datas, headers, plans, offsets, staging, stream) -> None:
        from ._cuda import copy_device_to_device, copy_host_to_device, device_views, stream_handle

        handle = stream_handle(stream)
        views = device_views(staging, plans, offsets)
        outs = self._decode_device(datas, plans, handle)
        self._note_host_decoded(sum(o is None for o in outs), len(outs))
        for i, o in enumerate(outs):
            if o is None:
                try:
                    arr = host_decode_rgb(datas[i], headers[i], plans[i], self.max_pixels)
                except Exception as e:  # noqa: BLE001 - any failure is this image's DecodeError
                    raise as_batch_error(i, e)  # noqa: B904 - cause set
                copy_host_to_device(arr, views[i], stream)
                continue
            if _on_host(o):  # a CPU backend's output: it has no CUDA array interface
                try:
                    copy_host_to_device(np.asarray(o), views[i], stream)
                except ValueError as e:  # decoded to another shape than its header says
                    raise as_batch_error(i, e)  # noqa: B904 - cause set
                continue
            # nvImageCodec orders its output on the stream it was given; wait only if the
            # image reports another one.
            other = getattr(o, "cuda_stream", handle) not in (handle, None)
            try:
                copy_device_to_device(o, views[i], stream, sync_src=other)
            except ValueError as e:  # decoded to another shape than its header says
                raise as_batch_error(i, e)  # noqa: B904 - cause set

    def _note_host_decoded(self, k: int, n: int) -> None:
        """Count (and log at debug level) the ``k`` of ``n`` images decoded on the host."""
        if not k:
            return
        with self._count_lock:
            self.host_decoded += k
        log.debug("nvImageCodec left %d of %d images to the host decoder", k, n)

    def _decode_device(self, datas, plans, handle: int) -> list:
        """nvImageCodec's batched decode on the stream: one output per image, None for an image
        it cannot read (decided on the host by the caller), all None if the batch call raises.

        nvImageCodec allocates the output images (stream-ordered on ``handle``); they are freed
        when the list goes away, which the CUDA allocator orders after the caller's copies.
        (Reusing them across batches via images= would save the allocations, but only if the
        next decode is ordered after these copies; left for a GPU measurement.)"""
        outs: list = [None] * len(datas)
        srcs, where = [], []
        for i, (d, p) in enumerate(zip(datas, plans, strict=True)):
            try:
                srcs.append(self._code_streams([d], [p])[0])
                where.append(i)
            except Exception:  # noqa: BLE001 - an unreadable stream is decided on the host
                continue
        if not srcs:
            return outs
        try:
            got = self._decoder().decode(srcs, params=self._params(), cuda_stream=handle)
        except Exception as e:  # noqa: BLE001 - a failed batch call: images decided on the host
            log.warning("nvImageCodec batch decode failed (%r); decoding on the host", e)
            return outs
        for i, o in zip(where, got, strict=True):
            outs[i] = o
        return outs

    def close(self) -> None:
        self._pool.close()
