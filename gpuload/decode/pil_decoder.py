"""Plain PIL backend: the baseline the others are measured against.

JPEG DCT scaling goes through ``Image.draft`` (libjpeg scale 1/s, the same ``ceil(H/s)`` size);
regions are not decoded separately (the whole image is decoded, origin 0). Every image goes
through ``Image.open(...).load()`` and one copy into the staging buffer; the size ``Image.open``
reads is checked against the header and the pixel limit before ``load()``.
"""

from __future__ import annotations

import numpy as np

from gpuload.device import Device
from gpuload.errors import DecodeError

from ._host import open_pil, pil_to_array
from ._pool import WorkerPool, run_chunks
from .base import (
    DecodePlan,
    Decoder,
    DecodeRequest,
    batch_error,
    ceil_div,
    host_views,
    raise_first_error,
)
from .header import ImageHeader, output_channels

__all__ = ["PilDecoder"]


class PilDecoder(Decoder):
    """Decode with Pillow into a host staging buffer (``threads`` workers, default all cores)."""

    name = "pil"

    def __init__(self, device: Device | None = None, threads: int | None = None):
        super().__init__(Device("cpu"), threads)  # host memory, whatever the loader's device
        self._pool = WorkerPool(self.threads, "gpuload-pil")

    def _plan(self, i: int, h: ImageHeader, r: DecodeRequest) -> DecodePlan:
        c = output_channels(h)
        # PIL's draft picks the scale from floor divisions; it lands on exactly 1/s when the
        # image is at least 2s pixels on each side (smaller images decode at full size).
        if (
            h.codec == "jpeg"
            and h.channels in (1, 3)
            and r.scale > 1
            and min(h.height, h.width) >= 2 * r.scale
        ):
            s = r.scale
            return DecodePlan(ceil_div(h.height, s), ceil_div(h.width, s), c, 0, 0, s, "draft")
        return DecodePlan(h.height, h.width, c, method="full")

    def _decode(self, datas, headers, plans, offsets, staging, stream) -> None:
        views = host_views(staging, plans, offsets)
        limit = self.max_pixels

        def work(i: int) -> None:
            data, h, p, out = datas[i], headers[i], plans[i], views[i]
            try:
                with open_pil(data, h, limit) as im:
                    if p.method == "draft":
                        s = p.scale
                        im.draft("L" if p.channels == 1 else "RGB", (h.width // s, h.height // s))
                    im.load()
                    arr = pil_to_array(im, p.channels)
            except DecodeError as e:
                raise batch_error(i, str(e), e) from e
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise batch_error(i, f"corrupt {h.codec.upper()} data: {e}", e) from e
            except Exception as e:  # noqa: BLE001 - MemoryError, PIL bomb errors, PIL internals
                raise batch_error(i, f"{type(e).__name__}: {e}", e) from e
            if arr.shape != out.shape:
                raise batch_error(i, f"PIL decoded {arr.shape}, expected {out.shape}")
            np.copyto(out, arr)

        raise_first_error(run_chunks(self._pool, len(datas), work))

    def close(self) -> None:
        self._pool.close()
