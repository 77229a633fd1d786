"""DALI backend: a small pipeline ``fn.external_source`` -> ``fn.decoders.image`` (or
``fn.decoders.image_slice`` when the batch has regions), on the CPU (``device_id=None``,
``device="cpu"``) or with the GPU's mixed decoder (``device="mixed"``, ``hw_decoder_load``).

* Pipelines are built once per (process, region or not) and reused; a larger batch than the
  pipeline's ``max_batch_size`` rebuilds it at the new size, smaller batches reuse it.
* Regions are exact (origin = (y0, x0)); no DCT scaling (scale 1); output always RGB.
  ``roi`` chooses the region of a request's window as in the nvimgcodec backend
  (``decode_region``): "region" (default) the window, "rows" full-width rows from the top to
  the window's bottom, "off" the whole image.
* Only JPEG and PNG go through DALI; other formats decode on the host per image.
* GPU: each output is copied device-to-device into the staging buffer on the caller's stream,
  which is then synchronised once per batch (DALI reuses its output buffers on the next run).
* DALI fails a whole batch on a bad image: the batch is then re-checked image by image with
  the strict host decoder to name the failing index, and the pipeline is rebuilt next time.
  Any exception for one image (host decode included) is a DecodeError naming its index.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading

import numpy as np

from gpuload.device import Device
from gpuload.errors import DecodeError, MissingDependencyError

from ._pool import orphan
from .base import DecodePlan, Decoder, DecodeRequest, as_batch_error, batch_error, host_views
from .header import ImageHeader
from .nvimgcodec_decoder import check_roi_mode, decode_region, host_decode_rgb

__all__ = ["DaliDecoder"]

INSTALL_HINT = "pip install nvidia-dali-cuda120 (or: pip install 'gpuload[cuda]')"
_DALI_CODECS = ("jpeg", "png")


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as e:
        raise MissingDependencyError(f"the 'dali' decoder needs NVIDIA DALI: {INSTALL_HINT}") from e
    return dali, fn, types


class DaliDecoder(Decoder):
    """Decode with a DALI pipeline into a staging buffer (device memory on CUDA, else host).

    ``threads``: DALI CPU threads (default all cores). ``fast``: fast IDCT, non-fancy chroma
    upsampling. ``hw_load``: share of each batch for the hardware JPEG decoder (mixed mode).
    ``roi``: what a request's window decodes as: "region" (default) exactly the window,
    "rows" full-width rows from the top to the window's bottom, "off" the whole image.
    """

    name = "dali"

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
        # Fail early with the install hint, without importing DALI (left to the first batch).
        try:
            found = importlib.util.find_spec("nvidia.dali") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingDependencyError(f"the 'dali' decoder needs NVIDIA DALI: {INSTALL_HINT}")
        self.fast = bool(fast)
        self.hw_load = float(hw_load)
        self._pipes: dict = {}
        self._pid = None
        self._lock = threading.Lock()

    # ----- pipelines --------------------------------------------------------------------------
    def _pipeline(self, n: int, roi: bool):
        import os

        pid = os.getpid()
        if self._pid != pid:  # pipelines (and their threads) do not survive fork
            for p in self._pipes.values():
                orphan(p)
            self._pipes = {}
            self._pid = pid
        pipe = self._pipes.get(roi)
        if pipe is not None and pipe.max_batch_size >= n:
            return pipe
        if pipe is not None:
            del self._pipes[roi]
        pipe = self._build(max(n, pipe.max_batch_size * 2 if pipe is not None else n), roi)
        self._pipes[roi] = pipe
        return pipe

    def _build(self, batch_size: int, roi: bool):
        dali, fn, types = _dali()
        cuda = self.device.is_cuda
        pipe = dali.Pipeline(
            batch_size=batch_size,
            num_threads=self.threads,
            device_id=self.device.index if cuda else None,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        kw = dict(
            device="mixed" if cuda else "cpu",
            output_type=types.RGB,
            use_fast_idct=self.fast,
            jpeg_fancy_upsampling=not self.fast,
        )
        if cuda:
            kw["hw_decoder_load"] = self.hw_load
        with pipe:
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            if roi:
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
                img = fn.decoders.image_slice(
                    enc,
                    anchor,
                    shape,
                    axis_names="WH",
                    normalized_anchor=False,
                    normalized_shape=False,
                    **kw,
                )
            else:
                img = fn.decoders.image(enc, **kw)
            pipe.set_outputs(img)
        pipe.build()
        return pipe

    # ----- planning / staging -----------------------------------------------------------------
    def _plan(self, i: int, h: ImageHeader, r: DecodeRequest) -> DecodePlan:
        method = "dali" if h.codec in _DALI_CODECS else "host"
        region = decode_region(h, r, self.roi) if method == "dali" else None
        if region is not None:
            y0, x0, y1, x1 = region
            return DecodePlan(y1 - y0, x1 - x0, 3, y0, x0, 1, method, region)
        return DecodePlan(h.height, h.width, 3, 0, 0, 1, method)

    def _staging_capacity(self, staging) -> int:
        if not self.device.is_cuda:
            return super()._staging_capacity(staging)
        from ._cuda import device_capacity

        return device_capacity(staging)

    # ----- decoding -------------------------------------------------------------------------
    def _decode(self, datas, headers, plans, offsets, staging, stream) -> None:
        cuda = self.device.is_cuda
        if cuda:
            from ._cuda import copy_host_to_device, device_views, stream_handle

            views = device_views(staging, plans, offsets)
            handle = stream_handle(stream)
        else:
            views = host_views(staging, plans, offsets)
        idx = [i for i, p in enumerate(plans) if p.method == "dali"]
        for i, p in enumerate(plans):
            if p.method == "host":
                try:
                    arr = host_decode_rgb(datas[i], headers[i], p, self.max_pixels)
                except Exception as e:  # noqa: BLE001 - any failure is this image's DecodeError
                    raise as_batch_error(i, e)  # noqa: B904 - cause set
                if cuda:
                    copy_host_to_device(arr, views[i], stream)
                else:
                    np.copyto(views[i], arr)
        if not idx:
            return
        roi = any(plans[i].method == "dali" and plans[i].arg is not None for i in idx)
        enc = [np.frombuffer(datas[i], dtype=np.uint8) for i in idx]
        with self._lock:
            pipe = self._pipeline(len(idx), roi)
            try:
                pipe.feed_input("enc", enc)
                if roi:
                    anchors, shapes = [], []
                    for i in idx:
                        p, h = plans[i], headers[i]
                        y0, x0, y1, x1 = p.arg if p.arg is not None else (0, 0, h.height, h.width)
                        anchors.append(np.array([x0, y0], np.float32))
                        shapes.append(np.array([x1 - x0, y1 - y0], np.float32))
                    pipe.feed_input("anchor", anchors)
                    pipe.feed_input("shape", shapes)
                (out,) = pipe.run()
            except Exception as e:
                self._pipes.pop(roi, None)  # a failed DALI pipeline is not reusable
                self._blame(datas, headers, plans, idx, e)
                raise  # _blame always raises
            for k, i in enumerate(idx):
                t = out[k]
                if tuple(t.shape()) != (plans[i].height, plans[i].width, 3):
                    raise batch_error(
                        i,
                        f"DALI decoded {tuple(t.shape())}, expected "
                        f"{(plans[i].height, plans[i].width, 3)}",
                    )
                if cuda:  # device-to-device into the staging view, on the caller's stream
                    ptr = views[i].__cuda_array_interface__["data"][0]
                    t.copy_to_external(
                        ctypes.c_void_p(ptr), cuda_stream=ctypes.c_void_p(handle), non_blocking=True
                    )
                else:
                    np.copyto(views[i], np.asarray(t))
            if cuda:
                # DALI reuses its output buffers at the next run without waiting for our
                # stream, so the copies must be complete before the pipeline runs again.
                from ._cuda import numba_stream

                numba_stream(stream).synchronize()

    def _blame(self, datas, headers, plans, idx, err: Exception):
        for i in idx:
            try:
                host_decode_rgb(datas[i], headers[i], plans[i], self.max_pixels)
            except Exception as e:  # noqa: BLE001 - the first image the host cannot decode
                raise batch_error(
                    i, f"{e} (DALI: {str(err).splitlines()[0] if str(err) else err})", err
                ) from err
        raise DecodeError(
            f"DALI failed on a batch of {len(idx)} images, each of which decodes on the host: {err}"
        ) from err
