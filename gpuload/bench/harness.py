"""What every benchmark child shares: counting a batch's rows and bytes, opening the source
table, timing epochs with a :class:`~gpuload.bench.measure.Meter` (warm-up excluded), stage
times from gpuload's own loader stats, and the torch plumbing the end-to-end loaders use."""

from __future__ import annotations

import os
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
    if a.get("verify") is False:  # the cost of checksums: the same read without them
        kw["fetch"] = gpuload.FetchOptions(verify_local=False)
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


def run_epochs(a: dict, make_epoch, rows=batch_rows, nbytes=batch_nbytes, stats=None) -> dict:
    """Whole epochs, each its own phase ("epoch1", "epoch2", ...), nothing excluded (for cold
    versus cached reads of a remote table)."""
    out = {}
    for e in range(a["epochs"]):
        before = stats() if stats is not None else None
        m = Meter(warmup=0, min_time=None)
        for b in make_epoch(e):
            m.tick(rows(b), nbytes(b))
        out[f"epoch{e + 1}"] = m.result(**stage_record(stats, before))
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
