"""gpuload itself: ingest, raw streams, the torch fast path and DataLoader front door, decode
only, and the end-to-end loaders (fast path, tf.data, DataLoader with a per-row transform)."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from ..harness import (
    columns_nbytes,
    decode_options,
    device_epochs,
    open_src,
    run_epochs,
    run_loader,
    run_timed,
    torch_dataloader,
    torch_sync,
)
from ..measure import timed_once


def disk_write_mb_s(path: str, nbytes: int, passes: int = 3) -> float:
    """The disk's sequential write rate for the same bytes: 8 MiB writes + fsync, the best of
    ``passes`` (a first write to fresh blocks is often several times slower on virtual disks,
    so the best pass is the rate the disk can sustain, and the fraction stays conservative)."""
    blk = os.urandom(8 << 20)
    best = 0.0
    for _ in range(passes):
        t = time.perf_counter()
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                left -= f.write(blk[: min(left, len(blk))])
            f.flush()
            os.fsync(f.fileno())
        best = max(best, nbytes / (time.perf_counter() - t) / 1e6)
        os.unlink(path)
    return best


def ingest(a: dict) -> dict:
    """``gpuload.ingest`` of already-encoded rows held in memory (reading them is untimed),
    then the disk's sequential write rate for the same bytes."""
    import gpuload

    src = gpuload.open_table(a["source"])
    n = min(int(a["rows"]), len(src))
    cols = src[:n].to_dict()
    schema = {c.name: c.type_string() for c in src.schema}
    nbytes = columns_nbytes(cols)
    dest = a["dest"]
    shutil.rmtree(dest, ignore_errors=True)
    _, rec = timed_once(gpuload.ingest, dest, cols, schema=schema, progress=False)
    disk = disk_write_mb_s(dest + ".seqwrite", nbytes)
    shutil.rmtree(dest, ignore_errors=True)
    rec.update(
        rows=n, bytes=nbytes, disk_mb_s=disk, fraction_of_disk=nbytes / rec["wall_s"] / 1e6 / disk
    )
    return {"": rec}


def stream(a: dict) -> dict:
    """``table.batches(bs, shuffle=...)``: raw bytes + numeric arrays, no decode."""
    t = open_src(a)
    loader = t.batches(a["batch_size"], shuffle=a["shuffle"], seed=0, columns=a.get("columns"))

    return run_loader(a, loader, stats=loader.stats)


def _plain(a: dict):
    """``gpuload.pytorch(t, batch_size, shuffle=True)`` without image ops, over ``a["columns"]``."""
    import gpuload

    return gpuload.pytorch(
        open_src(a),
        batch_size=a["batch_size"],
        shuffle=a.get("shuffle", True),
        seed=0,
        device=a.get("device", "cpu"),
        columns=a.get("columns"),
    )


def fast(a: dict) -> dict:
    """gpuload's batched fast path, no image ops: (bytes, state, label) batches as tensors."""
    loader = _plain(a)
    return run_loader(a, loader, stats=loader.stats)


def dataloader(a: dict) -> dict:
    """``DataLoader(gpuload.pytorch(t), batch_size, shuffle=True, num_workers=w)``."""
    import gpuload

    ds = gpuload.pytorch(open_src(a), columns=a.get("columns"))
    w = a["workers"]
    dl = torch_dataloader(ds, a["batch_size"], w, multiprocessing_context="fork" if w else None)
    if a.get("epochs"):
        return run_epochs(a, lambda e: iter(dl))
    return run_timed(a, lambda e: iter(dl))


def _requests(heads, a: dict, opts):
    """The DecodeRequests of one batch: full size at ``a["scale"]``, or (``a["rrc"]``) what
    the loader asks for the end-to-end suite's RandomResizedCrop windows under ``opts``."""
    from gpuload.decode import DecodeRequest
    from gpuload.image_stage import decode_requests
    from gpuload.ops import compile_ops

    from ..workloads import ops_list

    if not a.get("rrc"):
        return [DecodeRequest(int(a.get("scale", 1)))] * len(heads)
    plan = compile_ops(ops_list())
    H = np.array([h.height for h in heads], np.int64)
    W = np.array([h.width for h in heads], np.int64)
    rows = np.arange(len(heads), dtype=np.int64) + int(a.get("first_row", 0))
    params = plan.sample_params(H, W, rows, 0, 0)
    return decode_requests(plan, params, H, W, opts)[1]


def decode_step(batches: list[list[bytes]], threads: int, a: dict):
    """gpuload's decoder alone (CPU or GPU), configured by ``a["decode"]`` (DecodeOptions
    fields): headers read, requests made and one staging buffer sized for the largest batch
    before anything is timed."""
    from gpuload import DecodeOptions
    from gpuload.decode import read_header
    from gpuload.image_stage import decoder_for

    opts = DecodeOptions(**a.get("decode", {"dct": False, "roi": False}))
    dec = decoder_for(a.get("decoder", "cpu"), a.get("device", "cpu"), threads, opts)
    plans = {}
    for k, b in enumerate(batches):
        heads = [read_header(x) for x in b]
        plans[id(b)] = (heads, _requests(heads, {**a, "first_row": k * len(b)}, opts))
    need = max(dec.staging_nbytes(h, r) for h, r in plans.values())
    sync = None
    if dec.device.is_cuda:
        from numba import cuda

        staging = cuda.device_array(need, dtype=np.uint8)
        sync = cuda.synchronize
    else:
        staging = np.empty(need, np.uint8)
        staging.fill(0)

    def step(batch):
        heads, reqs = plans[id(batch)]
        dec.decode_batch(batch, reqs, staging, headers=heads)

    return step, sync


def kernel(a: dict) -> dict:
    """The fused CPU kernel alone on decoded 480x640 images (``workloads.kernel_sources``):
    ``a["preset"]``'s ops, per-sample parameters cycling through 4 epochs' windows, outputs
    reused; the first call (compilation) is timed apart as ``compile_s``."""
    from gpuload import ops

    from ..workloads import kernel_ops, kernel_sources

    bs = int(a["batch_size"])
    src, meta = kernel_sources(bs)
    plan = ops.compile_ops(kernel_ops(a["preset"]))
    H, W = meta[:, 1], meta[:, 2]
    sets = []
    for epoch in range(4):
        p = plan.sample_params(H, W, np.arange(bs), seed=1, epoch=epoch)
        sets.append((plan.scale_window(p, H, W), p))
    stage = ops.FusedImageStage(plan, batch_size=bs, device="cpu", depth=2)
    t = time.perf_counter()
    stage.run(src, meta, *sets[0])
    compile_s = time.perf_counter() - t

    def epoch(e):
        for k in range(4):
            stage.run(src, meta, *sets[(e + k) % 4])
            yield bs

    rec = run_timed(a, epoch, rows=lambda b: b, nbytes=lambda b: b * int(meta[0, 1:].prod()))
    rec[""]["compile_s"] = compile_s
    return rec


def _loader_kw(a: dict) -> dict:
    """The same loader arguments through either front door."""
    from ..workloads import ops_list

    image, label = a.get("image", "image"), a.get("label")
    return dict(
        batch_size=a["batch_size"],
        shuffle=True,
        seed=0,
        device=a.get("device", "cpu"),
        columns=[image] + ([label] if label else []),
        image=ops_list(),
        decode_options=decode_options(a.get("options", "on")),
    )


def _epochs(loader, a: dict):
    """(make_epoch, sync, loader) for a gpuload torch loader: ``set_epoch`` + ``iter``."""

    def epoch(e):
        loader.set_epoch(e)
        return iter(loader)

    return epoch, torch_sync(a.get("device", "cpu")), loader


def fast_path_loader(a: dict, workers: int):
    """``gpuload.pytorch(t, batch_size=..., image=[...])``: the fused fast path."""
    import gpuload

    return _epochs(gpuload.pytorch(open_src(a), **_loader_kw(a)), a)


def plain_loader(a: dict, workers: int):
    """The fast path without image ops (numeric and label columns, ``a["columns"]``)."""
    return _epochs(_plain(a), a)


def jax_loader(a: dict, workers: int):
    """``gpuload.jax(t, batch_size=..., image=[...])``: the fast path into ``jax.Array``;
    synced with ``jax.block_until_ready`` (a no-op for the CPU's zero-copy arrays)."""
    import jax

    import gpuload

    loader = gpuload.jax(open_src(a), **_loader_kw(a))

    def epoch(e):
        loader.set_epoch(e)
        for b in loader:
            yield jax.block_until_ready(b)

    return epoch, None, loader


def tensorflow_loader(a: dict, workers: int):
    """``gpuload.tensorflow(t, batch_size=..., image=[...])`` (tf.data)."""
    import gpuload

    ds = gpuload.tensorflow(a["url"], **_loader_kw(a))
    return (lambda e: iter(ds)), None, ds  # the dataset carries its loader's stats()


def dataloader_loader(a: dict, workers: int):
    """torch's DataLoader over ``gpuload.pytorch(t, transform=PIL)``, ``workers`` processes."""
    import gpuload

    from ..workloads import GpuloadRowTransform

    image, label = a.get("image", "image"), a.get("label")
    ds = gpuload.pytorch(
        a["url"],
        transform=GpuloadRowTransform(image, label),
        columns=[image] + ([label] if label else []),
    )
    return device_epochs(ds, a, workers)
