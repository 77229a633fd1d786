"""CPU backend: libjpeg-turbo through simplejpeg, in a persistent thread pool.

* JPEGs decode straight into views of the staging buffer (``buffer=``), strictly (libjpeg
  warnings such as corrupt or truncated data raise), with libjpeg-turbo DCT scaling for a
  request's scale 1/s (``ceil(H/s) x ceil(W/s)``) and optional fast IDCT / fast upsampling.
* Region requests use a *row-truncated* decode: libjpeg decodes a baseline JPEG top to bottom
  and cannot skip the entropy decoding of rows above a region, but it can stop below it. The
  SOF height of a private copy of the stream is lowered to just past the region's last MCU row
  (+1 row so that chroma upsampling of the last needed row sees its real neighbour), so rows
  below the region are neither entropy-decoded nor transformed. The decoded rows are
  bit-identical to a full decode. libjpeg then reports the unread scan data as "extraneous
  bytes before marker 0xd9" at the very end, after every row has been written; that one
  warning is accepted, any other warning still raises (a second, full strict decode confirms
  it). Not used for progressive JPEGs or JPEGs with restart markers. Measured on 640x480
  ~25 KB JPEGs with RandomResizedCrop windows (scale 0.08-1, one thread): 708 us/image vs 796
  for a full decode (-11%); 1420 vs 1282 images/s in the decode-backend benchmark (issue 4).
* ``roi="region"`` (opt-in, needs nvImageCodec) additionally sends windows covering less than
  half of the image to nvImageCodec's libjpeg-turbo region decoder (jpeg_crop_scanline +
  jpeg_skip_scanlines: rows above the window skip the IDCT, rows below are not read), exact
  crop, origin (y0, x0): 626 us/image on the same windows (-21%; 1504 images/s in the
  benchmark, where the per-batch overheads differ). Its trade-off: nvImageCodec
  does not surface libjpeg's corrupt-data warnings, so on that path only truncation (checked
  up front) and fatal errors are caught. Larger windows lose with it (its per-image overhead
  and a full-height, partial-width crop costs more than a full decode), so they stay on the
  row path. Used at scale 1 only (nvImageCodec has no DCT scaling).
* PNG goes through libpng (imagecodecs) when installed, other formats and CMYK JPEGs through
  PIL, per image, full size.
"""

from __future__ import annotations

import numpy as np

from gpuload.device import Device

from ._host import decode_other_into
from ._pool import ForkSafeLocal, WorkerPool, run_chunks
from .base import (
    DecodePlan,
    Decoder,
    DecodeRequest,
    as_batch_error,
    batch_error,
    ceil_div,
    host_views,
    raise_first_error,
)
from .header import ImageHeader, output_channels

__all__ = ["CpuDecoder"]

_EXTRANEOUS_AT_EOI = "extraneous bytes before marker 0xd9"
# roi="region": windows below this fraction of the image go to nvImageCodec's region decoder.
# Fitted on RandomResizedCrop windows over 640x480 JPEGs (`gpuload bench --suites codecs`): of the
# simple area thresholds 0.2-1.0, 0.5 was fastest (626 us/image vs 630 at 0.4, 643 at 0.7).
REGION_MAX_AREA = 0.5


def _simplejpeg():
    import simplejpeg  # core dependency; imported lazily to keep `import gpuload` light

    return simplejpeg


class CpuDecoder(Decoder):
    """libjpeg-turbo (simplejpeg) decode into a host staging buffer.

    ``threads``: decode threads (default: all cores); 1 decodes in the calling thread.
    ``fast``: libjpeg-turbo's fast integer IDCT and fast (non-fancy) chroma upsampling,
    ~20% faster on 640x480 JPEGs (measured), slightly lower quality (mean abs diff < 3).
    ``roi``: "rows" (default) stops decoding below a request's region; "region" also decodes
    small windows exactly with nvImageCodec (faster, less strict; see module docstring);
    "off" always decodes whole images.
    ``strict``: raise on libjpeg warnings (corrupt/truncated data). Leave it on.
    """

    name = "cpu"

    def __init__(
        self,
        device: Device | None = None,
        threads: int | None = None,
        *,
        fast: bool = False,
        roi: str = "rows",
        strict: bool = True,
    ):
        # A host decoder always stages in host memory, whatever device the loader targets.
        super().__init__(Device("cpu"), threads)
        if roi not in ("rows", "region", "off"):
            raise ValueError(f"roi must be 'rows', 'region' or 'off', got {roi!r}")
        if roi == "region":
            from .nvimgcodec_decoder import require_nv

            require_nv()  # MissingDependencyError with the install hint; imported on first use
            self._local = ForkSafeLocal()
        self.fast = bool(fast)
        self.roi = roi
        self.strict = bool(strict)
        self._pool = WorkerPool(self.threads, "gpuload-decode")

    # ----- planning -------------------------------------------------------------------------
    def _plan(self, i: int, h: ImageHeader, r: DecodeRequest) -> DecodePlan:
        if h.codec != "jpeg" or h.channels == 4 or h.precision != 8:
            return DecodePlan(h.height, h.width, output_channels(h), method="other")
        s = r.scale
        c = 1 if h.channels == 1 else 3
        w = ceil_div(h.width, s)
        if (
            r.roi is not None
            and self.roi == "region"
            and s == 1
            and c == 3
            and h.huffman_sequential
        ):
            y0, x0, y1, x1 = r.roi
            if (y1 - y0) * (x1 - x0) < REGION_MAX_AREA * h.height * h.width:
                return DecodePlan(y1 - y0, x1 - x0, 3, y0, x0, 1, "region", r.roi)
        # Restart markers are excluded: with DRI, libjpeg's "extraneous bytes" warning can also
        # come from a damaged restart interval mid-image, so it would no longer prove completion.
        if (
            r.roi is not None
            and self.roi != "off"
            and h.huffman_sequential
            and not h.restart_interval
        ):
            mcu_h = h.mcu[0]
            rows = ceil_div(r.roi[2], mcu_h) * mcu_h + 1
            if rows <= h.height - mcu_h:  # saves at least one MCU row
                return DecodePlan(ceil_div(rows, s), w, c, 0, 0, s, "rows", rows)
        return DecodePlan(ceil_div(h.height, s), w, c, 0, 0, s, "jpeg")

    # ----- decoding -------------------------------------------------------------------------
    def _decode(self, datas, headers, plans, offsets, staging, stream) -> None:
        sj = _simplejpeg()
        views = host_views(staging, plans, offsets)
        fast = self.fast
        strict = self.strict
        limit = self.max_pixels

        def jpeg(data, h: ImageHeader, p: DecodePlan, out, height: int):
            cs = "GRAY" if p.channels == 1 else "RGB"
            if p.scale == 1:
                mh = mw = 0
            else:
                mh, mw = ceil_div(height, p.scale), ceil_div(h.width, p.scale)
            return sj.decode_jpeg(
                data,
                colorspace=cs,
                fastdct=fast,
                fastupsample=fast,
                min_height=mh,
                min_width=mw,
                buffer=out,
                strict=strict,
            )

        def work(i: int) -> None:
            data, h, p, out = datas[i], headers[i], plans[i], views[i]
            if p.method == "jpeg":
                try:
                    res = jpeg(data, h, p, out, h.height)
                except ValueError as e:
                    raise batch_error(i, f"corrupt JPEG data: {e}", e) from e
                if res.shape != out.shape:
                    raise batch_error(i, f"libjpeg decoded {res.shape}, expected {out.shape}")
            elif p.method == "rows":
                patched = bytearray(data)
                pos = h.sof_pos
                patched[pos] = p.arg >> 8
                patched[pos + 1] = p.arg & 0xFF
                try:
                    jpeg(patched, h, p, out, p.arg)
                except ValueError as e:
                    if _EXTRANEOUS_AT_EOI not in str(e):
                        self._full_then_copy(i, data, h, p, out, jpeg)
            elif p.method == "region":
                self._region(i, data, h, p, out, jpeg)
            else:
                try:
                    decode_other_into(data, h, out, limit)
                except Exception as e:  # noqa: BLE001 - any failure is this image's DecodeError
                    raise as_batch_error(i, e)  # noqa: B904 - cause set

        raise_first_error(run_chunks(self._pool, len(datas), work))

    def _full_then_copy(self, i, data, h, p, out, jpeg) -> None:
        """A partial decode failed or hit an unexpected warning: decide with a full strict
        decode (raises DecodeError when the image is corrupt) and copy the planned part."""
        full = np.empty(
            (ceil_div(h.height, p.scale), ceil_div(h.width, p.scale), p.channels), np.uint8
        )
        try:
            jpeg(data, h, p, full, h.height)
        except ValueError as e:
            raise batch_error(i, f"corrupt JPEG data: {e}", e) from e
        y0, x0 = p.origin_y // p.scale, p.origin_x // p.scale
        out[...] = full[y0 : y0 + out.shape[0], x0 : x0 + out.shape[1]]

    def _region(self, i, data, h, p, out, jpeg) -> None:
        nv, dec, params = self._local.get("nv", self._make_nv)
        y0, x0, y1, x1 = p.arg
        cs = nv.CodeStream(data if isinstance(data, bytes) else np.frombuffer(data, np.uint8))
        cs = cs.get_sub_code_stream(region=nv.Region(y0, x0, y1, x1))
        try:
            res = dec.decode(cs, image=nv.as_image(out), params=params)
        except Exception:  # noqa: BLE001 - decided by the strict decode below
            res = None
        if res is None:
            self._full_then_copy(i, data, h, p, out, jpeg)

    def _make_nv(self):
        """(module, decoder, params) for this thread: one nvImageCodec decoder per thread."""
        from .nvimgcodec_decoder import _nv

        nv = _nv()
        opts = ":fancy_upsampling=0 :fast_idct=1" if self.fast else ":fancy_upsampling=1"
        dec = nv.Decoder(
            device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
            max_num_cpu_threads=1,
            backends=[nv.Backend(nv.BackendKind.CPU_ONLY)],
            options=opts,
        )
        params = nv.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nv.ColorSpec.SRGB,
            allow_any_depth=False,
            sample_format=nv.SampleFormat.I_RGB,
        )
        return nv, dec, params

    def close(self) -> None:
        self._pool.close()
