"""One measurement, in a fresh process: ``python -m gpuload.bench.child TASK 'JSON ARGS'``.

Every task builds what it measures, runs a warm-up that is excluded, times the rest with a
:class:`~gpuload.bench.measure.Meter` and prints one record per phase (see ``emit``). Tasks
import only what they measure, so a peer's import cost and state never leak into another
measurement. The parent (the runner) resolves every argument: paths, URLs, batch sizes,
warm-up and timing windows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .measure import Meter, emit, process_tree, timed_once

TASKS: dict[str, Callable[[dict], dict]] = {}


def task(fn):
    TASKS[fn.__name__.removeprefix("t_")] = fn
    return fn


# -- helpers -----------------------------------------------------------------------------------
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


# -- ingest ------------------------------------------------------------------------------------
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


@task
def t_ingest(a: dict) -> dict:
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


def deeplake_schema(src, image_kind: str):
    import deeplake

    types = deeplake.types
    out = {}
    for c in src.schema:
        if c.kind == "image":
            out[c.name] = (
                types.Image(dtype="uint8", sample_compression="jpg")
                if image_kind == "jpg"
                else types.Bytes()
            )
        elif c.kind == "bytes":
            out[c.name] = types.Bytes()
        elif c.kind == "text":
            out[c.name] = types.Text()
        elif c.kind == "array":
            out[c.name] = types.Array(c.dtype, shape=list(c.shape))
        elif c.kind == "scalar":
            out[c.name] = c.dtype
    return out


def deeplake_write(dest: str, cols: dict, schema: dict, block: int = 1000) -> None:
    import deeplake
    import numpy as np

    ds = deeplake.create(dest)
    for name, typ in schema.items():
        ds.add_column(name, typ)
    n = len(next(iter(cols.values())))
    for lo in range(0, n, block):
        part = {}
        for name in schema:
            v = cols[name][lo : lo + block]
            part[name] = v if isinstance(v, list) else np.asarray(v)
        ds.append(part)
    ds.commit()


@task
def t_deeplake_ingest(a: dict) -> dict:
    """Deeplake 4: the same rows appended to a local dataset (1,000-row appends + commit).
    With ``keep`` the dataset stays (the runner's local Deeplake copies are made this way)."""
    import gpuload

    src = gpuload.open_table(a["source"])
    n = min(int(a["rows"]), len(src))
    cols = src[:n].to_dict()
    schema = deeplake_schema(src, a.get("image_kind", "bytes"))
    cols = {k: v for k, v in cols.items() if k in schema}
    nbytes = columns_nbytes(cols)
    dest = a["dest"]
    shutil.rmtree(dest, ignore_errors=True)
    _, rec = timed_once(deeplake_write, dest, cols, schema)
    if not a.get("keep"):
        shutil.rmtree(dest, ignore_errors=True)
    rec.update(rows=n, bytes=nbytes)
    return {"": rec}


# -- raw stream and loaders without decode ----------------------------------------------------
@task
def t_stream(a: dict) -> dict:
    """``table.batches(bs, shuffle=...)``: raw bytes + numeric arrays, no decode."""
    t = open_src(a)
    loader = t.batches(a["batch_size"], shuffle=a["shuffle"], seed=0, columns=a.get("columns"))

    def epoch(e):
        loader.set_epoch(e)
        return iter(loader)

    if a.get("epochs"):
        return run_epochs(a, epoch, stats=loader.stats)
    return run_timed(a, epoch, stats=loader.stats)


@task
def t_deeplake_stream(a: dict) -> dict:
    """Deeplake 4 ``ds.batches(bs)`` on the local copy (bytes column; no shuffle exists)."""
    import deeplake

    ds = deeplake.open_read_only(a["url"])
    bs = a["batch_size"]
    return run_timed(a, lambda e: ds.batches(bs))


@task
def t_fast(a: dict) -> dict:
    """gpuload's batched fast path, no image ops: (bytes, state, label) batches as tensors."""
    import gpuload

    t = open_src(a)
    loader = gpuload.pytorch(
        t,
        batch_size=a["batch_size"],
        shuffle=a.get("shuffle", True),
        seed=0,
        device=a.get("device", "cpu"),
        columns=a.get("columns"),
    )

    def epoch(e):
        loader.set_epoch(e)
        return iter(loader)

    if a.get("epochs"):
        return run_epochs(a, epoch, stats=loader.stats)
    return run_timed(a, epoch, stats=loader.stats)


@task
def t_dataloader(a: dict) -> dict:
    """``DataLoader(gpuload.pytorch(t), batch_size, shuffle=True, num_workers=w)``."""
    import torch
    from torch.utils.data import DataLoader

    import gpuload

    t = open_src(a)
    ds = gpuload.pytorch(t, columns=a.get("columns"))
    w = a["workers"]
    dl = DataLoader(
        ds,
        batch_size=a["batch_size"],
        shuffle=True,
        num_workers=w,
        persistent_workers=w > 0,
        multiprocessing_context="fork" if w else None,
        generator=torch.Generator().manual_seed(0),
    )
    if a.get("epochs"):
        return run_epochs(a, lambda e: iter(dl))
    return run_timed(a, lambda e: iter(dl))


@task
def t_deeplake_dataloader(a: dict) -> dict:
    """Deeplake 4 ``DataLoader(ds.pytorch(), batch_size, shuffle=True, num_workers=w)``."""
    import deeplake
    import torch
    from torch.utils.data import DataLoader

    ds = deeplake.open_read_only(a["url"])
    w = a.get("workers", 0)
    dl = DataLoader(
        ds.pytorch(),
        batch_size=a["batch_size"],
        shuffle=True,
        num_workers=w,
        persistent_workers=w > 0,
        generator=torch.Generator().manual_seed(0),
    )
    return run_timed(a, lambda e: iter(dl))


# -- decode ------------------------------------------------------------------------------------
def _pil_decode(b: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(b)).convert("RGB")


@task
def t_decode(a: dict) -> dict:
    """Decode the table's first images in batches, over and over, full size unless stated."""
    import numpy as np

    import gpuload

    t = gpuload.open_table(a["url"])
    n = min(int(a.get("images", 256)), len(t))
    images = list(t[:n][a["image"]])
    bs = min(int(a.get("batch_size", 128)), n)
    batches = [images[i : i + bs] for i in range(0, n - bs + 1, bs)] or [images]
    method = a["method"]
    threads = int(a.get("threads") or cores())
    sync = None

    if method == "raw_libjpeg":
        # the limit: libjpeg-turbo into one reused buffer per thread, nothing else; images handed
        # out in small chunks (as gpuload's decoder does), so one slowed core does not stall a
        # batch the way a fixed split would
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import simplejpeg

        dims = [simplejpeg.decode_jpeg_header(x)[:2] for x in images]
        size_of = {id(x): hh * ww * 3 for x, (hh, ww) in zip(images, dims)}
        biggest = max(size_of.values())
        local = threading.local()
        pool = ThreadPoolExecutor(threads)

        def chunk(batch, lo):
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.empty(biggest, np.uint8)
                buf.fill(0)  # fault the pages in (the warm-up batches do this, untimed)
            for x in batch[lo : lo + 4]:
                simplejpeg.decode_jpeg(x, buffer=buf[: size_of[id(x)]])

        def step(batch):
            if threads == 1:
                for lo in range(0, len(batch), 4):
                    chunk(batch, lo)
            else:
                list(pool.map(lambda lo: chunk(batch, lo), range(0, len(batch), 4)))

    elif method == "pil":
        # the reference's "PIL single-thread": Image.open(BytesIO(b)).convert("RGB")
        def step(batch):
            for b in batch:
                _pil_decode(b)

    elif method == "pil_pool":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(threads)

        def step(batch):
            list(pool.map(_pil_decode, batch))

    elif method == "gpuload":
        from gpuload.decode import DecodeRequest, get_decoder, read_header

        device = a.get("device", "cpu")
        dec = get_decoder(a.get("decoder", "cpu"), device, threads=threads)
        req = DecodeRequest(int(a.get("scale", 1)))
        heads = [[read_header(x) for x in b] for b in batches]
        need = max(dec.staging_nbytes(h, [req] * len(h)) for h in heads)
        if dec.device.is_cuda:
            from numba import cuda

            staging = cuda.device_array(need, dtype=np.uint8)
            sync = cuda.synchronize
        else:
            staging = np.empty(need, np.uint8)
            staging.fill(0)
        head_of = {id(b): h for b, h in zip(batches, heads)}

        def step(batch):
            dec.decode_batch(batch, req, staging, headers=head_of[id(batch)])

    else:
        raise ValueError(f"unknown decode method {method!r}")

    nbytes = {id(b): sum(len(x) for x in b) for b in batches}

    def epoch(e):
        for b in batches:
            step(b)
            if sync is not None:
                sync()
            yield b

    return run_timed(a, lambda e: epoch(e), rows=len, nbytes=lambda b: nbytes[id(b)])


# -- end to end: decode + RandomResizedCrop + flip + normalize, batch 128 ---------------------
def _decode_options(name: str):
    import gpuload

    return {
        "off": gpuload.DecodeOptions(dct=False, roi=False),
        "on": gpuload.DecodeOptions(),
        "fast": gpuload.DecodeOptions(roi="region", fast=True),
    }[name]


def _to_device(batch, device: str):
    if not str(device).startswith("cuda"):
        return batch
    if isinstance(batch, dict):
        return {
            k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()
        }
    return [v.to(device, non_blocking=True) if hasattr(v, "to") else v for v in batch]


def _image_of(b):
    return b["image"] if isinstance(b, dict) else b[0]


def e2e_loader(a: dict):
    """(make_epoch, sync) for the end-to-end variant ``a["kind"]``; batches hold tensors."""
    import numpy as np

    from .workloads import (
        DeeplakeRowTransform,
        GpuloadRowTransform,
        JpegFolder,
        ops_list,
    )

    kind = a["kind"]
    bs = a["batch_size"]
    device = a.get("device", "cpu")
    image, label = a.get("image", "image"), a.get("label")
    cols = [image] + ([label] if label else [])
    workers = int(a.get("workers") or cores())

    if kind in ("gpuload", "gpuload_tf"):
        import gpuload

        # the same loader arguments through either front door
        kw = dict(
            batch_size=bs,
            shuffle=True,
            seed=0,
            device=device,
            columns=cols,
            image=ops_list(),
            decode_options=_decode_options(a.get("options", "on")),
        )
    if kind == "gpuload":
        loader = gpuload.pytorch(open_src(a), **kw)

        def epoch(e):
            loader.set_epoch(e)
            return iter(loader)

        return epoch, torch_sync(device), loader

    if kind == "gpuload_tf":
        ds = gpuload.tensorflow(a["url"], **kw)
        return (lambda e: iter(ds)), None, ds  # the dataset carries its loader's stats()

    import torch
    from torch.utils.data import DataLoader

    pin = str(device).startswith("cuda")
    if kind in ("torch_pil", "gpuload_dataloader", "deeplake"):
        if kind == "torch_pil":
            ds = JpegFolder(a["files"])
        elif kind == "gpuload_dataloader":
            import gpuload

            ds = gpuload.pytorch(
                a["url"], transform=GpuloadRowTransform(image, label), columns=cols
            )
        else:
            import deeplake

            dl_ds = deeplake.open_read_only(a["deeplake_url"])
            ds = dl_ds.pytorch(transform=DeeplakeRowTransform(image, label))
        dl = DataLoader(
            ds,
            batch_size=bs,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(0),
        )

        def epoch(e):
            for b in dl:
                yield _to_device(b, device)

        return epoch, torch_sync(device), None

    if kind == "dali":
        from nvidia.dali import fn, pipeline_def, types

        import gpuload

        t = gpuload.open_table(a["url"])
        dali_cuda = str(device).startswith("cuda")

        def source():
            e = 0
            while True:
                for b in t.batches(bs, shuffle=True, seed=0, epoch=e, columns=cols, drop_last=True):
                    jpegs = [np.frombuffer(x, np.uint8) for x in b[image]]
                    labels = (
                        [np.asarray(v, np.int64) for v in b[label]]
                        if label
                        else [np.zeros((), np.int64)] * len(jpegs)
                    )
                    yield jpegs, labels
                e += 1

        src = source()

        @pipeline_def(
            batch_size=bs,
            num_threads=workers,
            device_id=0 if dali_cuda else None,
            seed=0,
            prefetch_queue_depth=2,
        )
        def pipe():
            jpegs, labels = fn.external_source(
                source=src, num_outputs=2, dtype=[types.UINT8, types.INT64]
            )
            img = fn.decoders.image(
                jpegs, device="mixed" if dali_cuda else "cpu", output_type=types.RGB
            )
            img = fn.random_resized_crop(
                img, size=(224, 224), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
            )
            img = fn.crop_mirror_normalize(
                img,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[m * 255 for m in (0.485, 0.456, 0.406)],
                std=[s * 255 for s in (0.229, 0.224, 0.225)],
                mirror=fn.random.coin_flip(probability=0.5),
            )
            return img, labels

        p = pipe()
        p.build()

        def epoch(e):
            for _ in range(max(1, len(t) // bs)):
                imgs, labels = p.run()
                x = imgs.as_tensor()
                yield {
                    "image": torch.from_dlpack(x),
                    "label": torch.from_dlpack(labels.as_tensor()),
                }

        return epoch, torch_sync(device), None

    raise ValueError(f"unknown end-to-end kind {kind!r}")


@task
def t_e2e(a: dict) -> dict:
    """Images/s of augmented float32 NCHW batches (batch 128) delivered as tensors."""
    epoch, sync, loader = e2e_loader(a)
    return run_timed(
        a,
        epoch,
        rows=lambda b: batch_rows(_image_of(b)),
        nbytes=lambda b: value_nbytes(_image_of(b)),
        sync=sync,
        stats=loader.stats if loader is not None else None,
    )


# -- a short training run -----------------------------------------------------------------------
@task
def t_train(a: dict) -> dict:
    """A small CNN trained for ``steps`` steps (after ``warmup`` excluded steps) on batches from
    ``loader``: "gpuload" (fast path, image ops), "synthetic" (one batch held in memory: the
    compute-bound ceiling) or "torch_pil" (DataLoader + PIL). Reports steps/s, images/s and the
    fraction of the loop's time spent waiting for the next batch."""
    import torch

    from .workloads import small_cnn

    torch.manual_seed(0)
    device = a.get("device", "cpu")
    dev = torch.device(device if str(device).startswith("cuda") else "cpu")
    kind = a["loader"]
    bs = a["batch_size"]
    loader_obj = before = None
    if kind == "synthetic":
        x = torch.randn(bs, 3, 224, 224, device=dev)
        y = torch.randint(0, 10, (bs,), device=dev)

        def epoch(e):
            while True:
                yield {"image": x, "label": y}

        sync = torch_sync(device)
    else:
        b = dict(a, kind=kind, batch_size=bs)
        epoch, sync, loader_obj = e2e_loader(b)
    model = small_cnn(10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lossf = torch.nn.CrossEntropyLoss()
    warm, steps = int(a.get("warmup", 3)), int(a["steps"])
    tree = process_tree()

    gen = forever(epoch)
    waited = 0.0
    n_img = 0
    step = 0
    t0 = c0 = w0 = None
    gpu_wait0 = 0.0
    losses = []
    try:
        while step < warm + steps:
            if step == warm:
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                w0 = time.time()
                c0 = tree.cpu_times()
                waited, n_img = 0.0, 0
                before = loader_obj.stats() if loader_obj is not None else None
                gpu_wait0 = before.wait_s if before is not None else 0.0
            tw = time.perf_counter()
            batch = next(gen)
            waited += time.perf_counter() - tw
            img = _image_of(batch)
            if isinstance(batch, dict):
                lab = batch.get("label")
            else:
                lab = batch[1] if len(batch) > 1 else None
            if lab is None:
                lab = torch.zeros(len(img), dtype=torch.int64)
            img = img.to(dev, non_blocking=True)
            lab = lab.to(dev, non_blocking=True).long() % 10
            opt.zero_grad(set_to_none=True)
            loss = lossf(model(img), lab)
            loss.backward()
            opt.step()
            n_img += len(img)
            step += 1
            if step > warm and (step - warm) % max(1, steps // 10) == 0:
                losses.append(float(loss.detach()))
    finally:
        gen.close()
    if sync is not None:
        sync()
    wall = max(time.perf_counter() - t0, 1e-9)
    cpu = type(tree).cpu_delta(c0, tree.cpu_times())
    rec = {
        "rows": n_img,
        "bytes": n_img * 3 * 224 * 224 * 4,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss": tree.peak_rss(),
        "window": [w0, time.time()],
        "steps": steps,
        "steps_s": steps / wall,
        # time the loop spent waiting for batches: gpuload's own counter where it has one
        "wait_fraction": (
            (loader_obj.stats().wait_s - gpu_wait0) / wall
            if loader_obj is not None
            else waited / wall
        ),
        "loss_first": losses[0] if losses else float(loss.detach()),
        "loss_last": float(loss.detach()),
    }
    if str(device).startswith("cuda"):
        rec["gpu_mem_peak"] = int(torch.cuda.max_memory_allocated())
    if loader_obj is not None:
        rec.update(stage_record(loader_obj.stats, before))
    return {"": rec}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in TASKS:
        print(
            f"usage: python -m gpuload.bench.child TASK JSON; tasks: {sorted(TASKS)}",
            file=sys.stderr,
        )
        return 2
    process_tree()  # start sampling memory now
    args = json.loads(argv[1])
    out = TASKS[argv[0]](args)
    emit(out)
    # The task's loaders are garbage now: collecting them shuts DataLoader workers down (they
    # would otherwise linger until their watchdog notices). Then skip interpreter teardown,
    # which worker pools and library threads of some peers can hang; a timer makes sure.
    import gc
    import threading

    threading.Timer(30.0, os._exit, args=(0,)).start()
    del out
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
