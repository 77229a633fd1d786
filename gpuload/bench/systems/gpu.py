"""The GPU suite (``gpuload bench --suite gpu``, run by ``benchmarks/gpu_check.sh``): nvJPEG
batched decode through nvImageCodec by backend, torchvision's GPU decode, the fused kernel on
the device beside the device's own copy bandwidth, host-to-device copies from pinned and
pageable memory, and gpuload's GPU loader end to end beside torchvision + torch ops.

``a["dry"]``: the check's dry run on a machine without a GPU, under Numba's CUDA simulator with
decoding on the CPU: the same code paths at tiny sizes, so the check cannot rot; its figures
mean nothing and the report says so.
"""

from __future__ import annotations

import time

import numpy as np

from ..harness import open_src, run_timed, torch_sync
from ..workloads import MEAN, RATIO, SCALE, STD, kernel_sources

# nvImageCodec backends per row: the hardware JPEG engines alone, CUDA kernels alone, and the
# split nvImageCodec makes by default (hardware first, then hybrid and CUDA for the rest).
NV_BACKENDS = {
    "hw": ("HW_GPU_ONLY",),
    "cuda": ("GPU_ONLY",),
    "default": ("HW_GPU_ONLY", "HYBRID_CPU_GPU", "GPU_ONLY"),
}


def _batches(a: dict) -> list[list[bytes]]:
    """The table's first ``a["images"]`` encoded images in batches of ``a["batch_size"]``."""
    t = open_src(a)
    n = min(int(a.get("images", 512)), len(t))
    images = list(t[:n][a.get("image", "image")])
    bs = min(int(a["batch_size"]), n)
    return [images[i : i + bs] for i in range(0, n - bs + 1, bs)]


def _device_sync():
    from numba import cuda

    return cuda.synchronize


def nvjpeg_decode(a: dict) -> dict:
    """nvImageCodec's batched decode, JPEG -> interleaved RGB uint8 on the device, with the
    backends ``a["backend"]`` names (``NV_BACKENDS``); outputs stay on the device. Every image
    of the first batch must decode on those backends, or the row fails saying how many did."""
    import nvidia.nvimgcodec as nv

    batches = _batches(a)
    if a.get("dry"):  # no GPU: the CPU backend stands in, on the same batches
        dec = nv.Decoder(
            device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)]
        )
        sync = None
    else:
        kinds = NV_BACKENDS[a["backend"]]
        dec = nv.Decoder(
            device_id=0, backends=[nv.Backend(getattr(nv.BackendKind, k)) for k in kinds]
        )
        sync = _device_sync()
    streams = {id(b): [nv.CodeStream(np.frombuffer(x, dtype=np.uint8)) for x in b] for b in batches}
    params = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, sample_format=nv.SampleFormat.I_RGB)
    first = dec.decode(streams[id(batches[0])], params=params)
    ok = sum(o is not None for o in first)
    if ok < len(first):
        raise RuntimeError(
            f"nvImageCodec with backends {a.get('backend')} decoded {ok} of {len(first)} images"
        )
    nbytes = {id(b): sum(len(x) for x in b) for b in batches}

    def epoch(e):
        for b in batches:
            dec.decode(streams[id(b)], params=params)
            if sync is not None:
                sync()
            yield b

    return run_timed(a, epoch, rows=len, nbytes=lambda b: nbytes[id(b)])


def torchvision_decode(a: dict) -> dict:
    """``torchvision.io.decode_jpeg(list, device="cuda")``: torchvision's batched nvJPEG."""
    import torch
    from torchvision.io import decode_jpeg

    batches = _batches(a)
    tensors = {
        id(b): [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in b] for b in batches
    }
    nbytes = {id(b): sum(len(x) for x in b) for b in batches}

    def epoch(e):
        for b in batches:
            decode_jpeg(tensors[id(b)], device="cuda")
            torch.cuda.synchronize()
            yield b

    return run_timed(a, epoch, rows=len, nbytes=lambda b: nbytes[id(b)])


def _train_ops(size: int, dtype: str = "bfloat16"):
    from gpuload import ops

    return [
        ops.RandomResizedCrop(size, scale=SCALE, ratio=RATIO),
        ops.RandomHorizontalFlip(),
        ops.Normalize(mean=MEAN, std=STD),
        ops.ToDtype(dtype),
    ]


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """GB/s of device-to-device copies of ``nbytes`` (bytes copied per second): the ceiling a
    kernel writing that much output is compared with, measured in the same process."""
    from numba import cuda

    a = cuda.device_array(nbytes, dtype=np.uint8)
    b = cuda.device_array(nbytes, dtype=np.uint8)
    b.copy_to_device(a)  # first use outside the timing
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_to_device(a)
    cuda.synchronize()
    return nbytes * repeats / (time.perf_counter() - t) / 1e9


def cuda_kernel(a: dict) -> dict:
    """The fused kernel alone on the device: decoded images already in device memory ->
    ``a["size"]`` squared, RandomResizedCrop + flip + Normalize + ``a["dtype"]``, per-sample
    parameters cycling through 4 epochs' windows; the first launch (NVVM compilation) is timed
    apart as ``compile_s``, and the device's copy bandwidth for the same output is measured
    beside it (``copy_gb_s``; ``x_copy``: output GB/s over it)."""
    from numba import cuda

    from gpuload import ops

    bs = int(a["batch_size"])
    src, meta = kernel_sources(bs, int(a.get("height", 480)), int(a.get("width", 640)))
    plan = ops.compile_ops(_train_ops(int(a["size"]), a.get("dtype", "bfloat16")))
    H, W = meta[:, 1], meta[:, 2]
    sets = []
    for epoch in range(4):
        p = plan.sample_params(H, W, np.arange(bs), seed=1, epoch=epoch)
        sets.append((plan.scale_window(p, H, W), p))
    d_src = cuda.to_device(src)
    stage = ops.FusedImageStage(plan, batch_size=bs, device="cuda", depth=2)
    t = time.perf_counter()
    out = stage.run(d_src, meta, *sets[0])
    cuda.synchronize()
    compile_s = time.perf_counter() - t
    out_bytes = int(np.prod(out.shape)) * out.dtype.itemsize

    def epoch(e):
        for k in range(4):
            stage.run(d_src, meta, *sets[(e + k) % 4])
            yield bs

    rec = run_timed(a, epoch, rows=lambda b: b, nbytes=lambda b: out_bytes, sync=cuda.synchronize)
    r = rec[""]
    r["compile_s"] = compile_s
    r["copy_gb_s"] = copy_bandwidth(max(out_bytes, 1 << 20))
    r["x_copy"] = r["bytes"] / r["wall_s"] / 1e9 / r["copy_gb_s"]
    return rec


def h2d(a: dict) -> dict:
    """Host-to-device copies of ``a["mb"]`` MB from page-locked (pinned) and from ordinary
    (pageable) host memory, one phase each: what pinned staging buys."""
    from numba import cuda

    n = int(a["mb"]) << 20
    pinned = cuda.pinned_array(n, dtype=np.uint8)
    pageable = np.empty(n, dtype=np.uint8)
    pinned[:] = 7
    pageable[:] = 7
    dev = cuda.device_array(n, dtype=np.uint8)
    out = {}
    for name, host in (("pinned", pinned), ("pageable", pageable)):

        def epoch(e, host=host):
            for _ in range(4):
                dev.copy_to_device(host)
                yield 1

        out[name] = run_timed(
            a, epoch, rows=lambda b: b, nbytes=lambda b: n, sync=cuda.synchronize
        )[""]
    return out


def _shape_bytes(v) -> tuple[int, int]:
    """(rows, bytes) of one image batch: a torch tensor, a numba device array or BFloat16Bits."""
    v = getattr(v, "bits", v)
    shape = tuple(int(d) for d in v.shape)
    item = v.element_size() if hasattr(v, "element_size") else np.dtype(v.dtype).itemsize
    return shape[0], int(np.prod(shape)) * item


def gpuload_e2e(a: dict) -> dict:
    """``gpuload.pytorch(t, batch_size, shuffle=True, device=a["device"], image=[RRC(size),
    flip, Normalize, ToDtype(dtype)])`` (``a["front"] == "batches"``: the same loader through
    ``t.batches``, for the dry run, whose CPU-only torch holds no CUDA tensors). Besides the
    usual record: ``consumer_wait_ms``, the time the training loop waited per batch (the
    loader's own stats; a batch's device work is complete when it is handed over)."""
    import gpuload

    image = a.get("image", "image")
    bs = int(a["batch_size"])
    kw = dict(
        shuffle=True,
        seed=0,
        device=a["device"],
        columns=[image],
        image=_train_ops(int(a["size"]), a.get("dtype", "bfloat16")),
        decoder=a.get("decoder", "auto"),
    )
    t = open_src(a)
    if a.get("front") == "batches":
        loader = t.batches(bs, **kw)
        sync = _device_sync() if str(a["device"]).startswith("cuda") else None
    else:
        loader = gpuload.pytorch(t, batch_size=bs, **kw)
        sync = torch_sync(a["device"])

    def epoch(e):
        loader.set_epoch(e)
        return iter(loader)

    rec = run_timed(
        a,
        epoch,
        rows=lambda b: _shape_bytes(b[image])[0],
        nbytes=lambda b: _shape_bytes(b[image])[1],
        sync=sync,
        stats=loader.stats,
    )
    r = rec[""]
    waited = (r.get("stages") or {}).get("wait", 0.0)
    r["consumer_wait_ms"] = 1e3 * waited / max(1.0, r["rows"] / bs)
    return rec


def torchvision_e2e(a: dict) -> dict:
    """The usual way without gpuload's GPU path: encoded bytes of each shuffled batch (read by
    ``t.batches``), ``torchvision.io.decode_jpeg(device="cuda")``, then torchvision's v2
    RandomResizedCrop + flip + ToDtype + Normalize per image on the GPU, stacked, bfloat16."""
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    image = a.get("image", "image")
    size = int(a["size"])
    tf = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    loader = open_src(a).batches(int(a["batch_size"]), shuffle=True, seed=0, columns=[image])

    def epoch(e):
        loader.set_epoch(e)
        for b in loader:
            datas = [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in b[image]]
            imgs = decode_jpeg(datas, device="cuda")
            yield torch.stack([tf(x) for x in imgs]).to(torch.bfloat16)

    return run_timed(
        a,
        epoch,
        rows=lambda b: int(b.shape[0]),
        nbytes=lambda b: int(b.numel() * b.element_size()),
        sync=torch.cuda.synchronize,
    )


__all__ = [
    "NV_BACKENDS",
    "copy_bandwidth",
    "cuda_kernel",
    "gpuload_e2e",
    "h2d",
    "nvjpeg_decode",
    "torchvision_decode",
    "torchvision_e2e",
]
