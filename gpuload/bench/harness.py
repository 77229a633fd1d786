"""What every benchmark child shares: counting a batch's rows and bytes, opening the source
table, timing epochs with a :class:`~gpuload.bench.measure.Meter` (warm-up excluded), stage
times from gpuload's own loader stats, and the torch plumbing the end-to-end loaders use."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from .measure import Meter

__all__ = [
    "batch_nbytes",
    "batch_rows",
    "columns_nbytes",
    "cores",
    "decode_options",
    "forever",
    "image_of",
    "open_src",
    "run_epochs",
    "run_timed",
    "ServerProbe",
    "stage_record",
    "to_device",
    "device_epochs",
    "run_loader",
    "torch_dataloader",
    "torch_sync",
    "value_nbytes",
]


def cores() -> int:
    return os.cpu_count() or 1


def value_nbytes(v: Any) -> int:
    """Bytes carried by one column of a batch (encoded bytes, text, arrays, tensors)."""
    if isinstance(v, (list, tuple)):
        if not v:
            return 0
        if isinstance(v[0], (bytes, bytearray, memoryview)):
            return sum(map(len, v))
        return sum(value_nbytes(x) for x in v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return len(v)
    if isinstance(v, str):
        return len(v.encode())
    nb = getattr(v, "nbytes", None)
    if isinstance(nb, int):
        return nb
    if hasattr(v, "element_size") and hasattr(v, "numel"):  # torch
        return int(v.element_size() * v.numel())
    size = getattr(getattr(v, "dtype", None), "size", None)  # tensorflow
    if isinstance(size, int) and hasattr(v, "shape"):
        n = 1
        for d in v.shape:
            n *= int(d)
        return n * size
    return 0


def batch_nbytes(b: Any) -> int:
    if isinstance(b, dict):
        return sum(value_nbytes(v) for v in b.values())
    if isinstance(b, (list, tuple)):
        return sum(value_nbytes(v) for v in b)
    return value_nbytes(b)


def batch_rows(b: Any) -> int:
    if isinstance(b, dict):
        v = next(iter(b.values()))
    elif isinstance(b, (list, tuple)):
        v = b[0]
    else:
        v = b
    shape = getattr(v, "shape", None)
    if shape is not None:
        return int(shape[0])
    return len(v)


def open_src(a: dict):
    import gpuload

    kw = {}
    if a.get("storage_options"):
        kw["storage_options"] = a["storage_options"]
    if "cache" in a:
        kw["cache"] = a["cache"]
    fetch = {}
    if a.get("verify") is False:  # the cost of checksums: the same read without them
        fetch["verify_local"] = False
    if a.get("max_in_flight"):  # a pinned in-flight limit (the default is adaptive)
        fetch["max_in_flight"] = int(a["max_in_flight"])
    if fetch:
        kw["fetch"] = gpuload.FetchOptions(**fetch)
    return gpuload.open_table(a["url"], **kw)


def forever(make_epoch: Callable[[int], Iterator]) -> Iterator:
    """Batches of epoch 0, 1, 2, ... without end (the meter decides when to stop)."""
    e = 0
    while True:
        yielded = False
        for b in make_epoch(e):
            yielded = True
            yield b
        if not yielded:
            return
        e += 1


def meter_for(a: dict, sync=None) -> Meter:
    return Meter(
        warmup=a.get("warmup", 2),
        min_time=a.get("min_time", 1.0),
        min_batches=a.get("min_batches", 5),
        max_time=a.get("max_time"),
        sync=sync,
    )


def stage_record(stats, before=None) -> dict:
    """Time to first batch and seconds per stage since ``before`` (a snapshot), read from a
    gpuload loader's own ``stats()`` rather than measured again here."""
    if stats is None:
        return {}
    s = stats()
    base = before.stages if before is not None else {}
    stages = {k: max(0.0, v - base.get(k, 0.0)) for k, v in s.stages.items()}
    return {"first_batch_s": s.time_to_first_batch_s, "stages": stages}


def run_timed(
    a: dict, make_epoch, rows=batch_rows, nbytes=batch_nbytes, sync=None, stats=None
) -> dict:
    """Warm-up excluded, then at least min_time seconds of batches over as many epochs as it
    takes. One phase, named "". ``stats``: a gpuload loader's ``stats`` (stage times)."""
    m = meter_for(a, sync)
    gen = forever(make_epoch)
    before = None
    try:
        for b in gen:
            if not m.tick(rows(b), nbytes(b)):
                break
            if before is None and stats is not None and m.timing:
                before = stats()
    finally:
        gen.close()
    if m.rows == 0:
        raise RuntimeError("no batch was timed: the table is smaller than the warm-up")
    return {"": m.result(**stage_record(stats, before))}


class ServerProbe:
    """The HTTP object server's counters between :meth:`start` and :meth:`stop`, from its
    stats page (``gpuload.testing.shaped.STATS_PATH``): requests answered, bytes served, the
    seconds in between and the most requests in flight at once (``start`` restarts the server's
    peak, so it is exact for the stretch as long as only this client reads the server)."""

    def __init__(self, server_url: str) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(server_url)
        self.host, self.port = u.hostname, u.port
        self._before: dict | None = None
        self._t0 = 0.0

    def _read(self, reset: bool = False) -> dict:
        import http.client
        import json

        from gpuload.testing.shaped import STATS_PATH

        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", STATS_PATH + ("?reset_peak=1" if reset else ""))
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def start(self) -> None:
        """Read the counters now and restart the server's peak."""
        self._before, self._t0 = self._read(reset=True), time.perf_counter()

    def stop(self) -> dict:
        """The stretch's counters (empty when it was not started)."""
        if self._before is None:
            return {}
        wall = time.perf_counter() - self._t0
        after, b, self._before = self._read(), self._before, None
        return {
            "server_requests": after["requests"] - b["requests"],
            "server_bytes": after["bytes_served"] - b["bytes_served"],
            "server_wall_s": wall,
            "peak_in_flight": after["peak_in_flight"],
        }


def run_epochs(
    a: dict, make_epoch, rows=batch_rows, nbytes=batch_nbytes, stats=None, sync=None
) -> dict:
    """Whole epochs, each its own phase ("epoch1", "epoch2", ...), for cold versus cached reads
    of a remote table; nothing excluded but ``a["warmup"]`` batches of the first epoch (0 by
    default). ``a["server"]``: the URL of the HTTP object server read from, whose counters over
    each epoch go into its record (:class:`ServerProbe`)."""
    out = {}
    probe = ServerProbe(a["server"]) if a.get("server") else None
    for e in range(a["epochs"]):
        if probe is not None:  # the server's counters cover the whole epoch, warm-up included
            probe.start()
        m = Meter(warmup=int(a.get("warmup") or 0) if e == 0 else 0, min_time=None, sync=sync)
        before = stats() if stats is not None and m.timing else None
        for b in make_epoch(e):
            m.tick(rows(b), nbytes(b))
            if before is None and stats is not None and m.timing:  # stage times: timed part
                before = stats()
        m.finish()
        if m.rows == 0:
            raise RuntimeError(
                f"epoch {e + 1} timed no batch: the table is smaller than the warm-up"
            )
        server = probe.stop() if probe is not None else {}
        rec = m.result(**stage_record(stats, before), **server)
        if e:  # the loader's time to first batch is its first epoch's
            rec.pop("first_batch_s", None)
        out[f"epoch{e + 1}"] = rec
    return out


def torch_sync(device: str):
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


def columns_nbytes(cols: dict) -> int:
    return sum(value_nbytes(v) for v in cols.values())


def decode_options(name: str):
    """The decode options a benchmark row names: "off", "on" (the default) or "fast"."""
    import gpuload

    return {
        "off": gpuload.DecodeOptions(dct=False, roi=False),
        "on": gpuload.DecodeOptions(),
        "fast": gpuload.DecodeOptions(roi="region", fast=True),
    }[name]


def to_device(batch, device: str):
    if not str(device).startswith("cuda"):
        return batch
    if isinstance(batch, dict):
        return {
            k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()
        }
    return [v.to(device, non_blocking=True) if hasattr(v, "to") else v for v in batch]


def image_of(b):
    return b["image"] if isinstance(b, dict) else b[0]


def torch_dataloader(ds, batch_size: int, workers: int, **kw):
    """torch's DataLoader as every peer row uses it: shuffled with a seeded generator, workers
    persistent across epochs."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )


def run_loader(a: dict, loader, stats=None) -> dict:
    """Time a gpuload loader (``set_epoch`` + iteration): whole epochs when ``a["epochs"]``,
    else the usual warm-up and window."""

    def epoch(e):
        loader.set_epoch(e)
        return iter(loader)

    if a.get("epochs"):
        return run_epochs(a, epoch, stats=stats)
    return run_timed(a, epoch, stats=stats)


def device_epochs(ds, a: dict, workers: int):
    """(make_epoch, sync, None) for torch's DataLoader over ``ds``, batches moved to
    ``a["device"]`` (pinned host memory when that is a GPU)."""
    device = a.get("device", "cpu")
    dl = torch_dataloader(ds, a["batch_size"], workers, pin_memory=str(device).startswith("cuda"))

    def epoch(e):
        for b in dl:
            yield to_device(b, device)

    return epoch, torch_sync(device), None
