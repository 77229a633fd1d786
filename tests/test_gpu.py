"""GPU-only tests of the GPU entry points that no other test runs on a real device (issue 13).

Every test here is marked ``gpu``: where no CUDA GPU exists, tests/conftest.py reports it NOT
RUN. Grouped by entry point, in the order a batch meets them:

1. the stage's pinned staging pool (page-locked for real, not just numpy);
2. stream/event hand-off (a consumer stream waits on the stage's event, nothing more);
3. zero-copy hand-off of device batches to torch;
4. device batches the user holds across more than ``ring_size`` batches;
5. nvImageCodec decoding on the GPU (no host fallback), with each ``roi`` mode.

Other GPU-only tests: every kernel dtype and layout (tests/ops/test_kernels.py), GPU decode
into device staging and mixed formats (tests/decode/test_decode.py), hostile headers on the
GPU loader (tests/decode/test_decode_bounds.py), the GPU loader against the CPU one and TF
on the device (tests/loader/test_image_stage.py), pin_memory (tests/adapters/
test_torch_options.py). The list with one line each is in README.md.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import gpuload
from gpuload import ops

from .helpers import encode, robot_columns, textured_image
from .ops._reference_ops import pack_images, random_image

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _page_locked(a: np.ndarray) -> bool:
    """Whether host array ``a`` is page-locked (CUDA reports it as host memory it mapped)."""
    return torch.from_numpy(a).is_pinned()


def _batch(plan, shapes, seed: int):
    """A packed batch of random images of ``shapes`` with the plan's parameters and windows."""
    rng = np.random.default_rng(seed)
    src, meta = pack_images([random_image(rng, *s) for s in shapes])
    params = plan.sample_params(meta[:, 1], meta[:, 2], np.arange(len(shapes)), seed, 0)
    windows = plan.scale_window(params, meta[:, 1], meta[:, 2]).astype(np.float32)
    return src, meta, windows, params


@pytest.fixture(scope="module")
def image_table(tmp_path_factory):
    """40 JPEG rows of three sizes, with a label."""
    rng = np.random.default_rng(0)
    sizes = ((48, 64), (60, 44), (37, 90))
    imgs = [encode(textured_image(rng, *sizes[i % 3]), "JPEG", quality=90) for i in range(40)]
    root = tmp_path_factory.mktemp("gpu")
    return gpuload.ingest(root / "imgs", {"image": imgs, "label": np.arange(40)})


# ---------------------------------------------------------------------------------------------
# 1. pinned staging pool


def test_stage_staging_pool_is_page_locked():
    """The stage's per-slot host buffers (src, meta, windows, params) are pinned memory, before
    and after the source buffers grow, and a batch through them equals the CPU stage's."""
    plan = ops.compile_ops([ops.Resize((8, 8)), ops.Normalize(MEAN, STD)])
    stage = ops.FusedImageStage(plan, batch_size=4, device="cuda", depth=3, src_capacity=1024)
    assert not _page_locked(np.zeros(1 << 16, np.uint8))  # the check tells the two apart
    pools = [stage._p_src, stage._p_meta, stage._p_windows, stage._p_params]
    assert [len(p) for p in pools] == [3] * 4
    assert all(_page_locked(b) for p in pools for b in p)
    src, meta, windows, params = _batch(plan, [(40, 50, 3), (33, 21, 3), (20, 30, 1)], seed=1)
    assert src.size > 1024  # larger than the pool: it grows, pinned again
    out = stage.run(src, meta, windows, params)
    stage.synchronize()
    assert stage._src_cap >= src.size and all(_page_locked(b) for b in stage._p_src)
    cpu = ops.FusedImageStage(plan, batch_size=4, device="cpu").run(src, meta, windows, params)
    np.testing.assert_allclose(out.copy_to_host(), cpu, atol=1e-3 * float(np.ptp(cpu)))


# ---------------------------------------------------------------------------------------------
# 2. stream and event hand-off


def test_consumer_stream_waits_on_the_stage_event():
    """A batch large enough that its copies and kernel take milliseconds is read on another
    stream right after ``run`` returns, ordered only by ``event.wait(consumer)``: the result is
    the CPU stage's, never the sentinel the output buffers were filled with."""
    from numba import cuda

    plan = ops.compile_ops(
        [
            ops.RandomResizedCrop(224),
            ops.RandomHorizontalFlip(),
            ops.ColorJitter(0.3, 0.3, 0.3),
            ops.Normalize(MEAN, STD),
        ]
    )
    B = 48
    src, meta, windows, params = _batch(plan, [(480, 640, 3)] * B, seed=2)
    cpu = ops.FusedImageStage(plan, batch_size=B, device="cpu").run(src, meta, windows, params)
    bound = 2e-3 * float(np.ptp(cpu))  # two kernels, each within 1e-3 of the range
    stage = ops.FusedImageStage(plan, batch_size=B, device="cuda", depth=2)
    stage.run(src, meta, windows, params)  # slot 0; compiles the kernels, dropped at once
    stage.synchronize()
    sentinel = np.full(stage.out_shape, np.nan, np.float32)
    for o in stage.outputs:
        o.copy_to_device(sentinel)
    cuda.synchronize()
    consumer = cuda.stream()
    for k in (1, 0):  # both slots of the ring, each with its own event
        out = stage.run(src, meta, windows, params)
        assert stage.event is stage.events[k]
        stage.event.wait(consumer)
        got = out.copy_to_host(stream=consumer)
        consumer.synchronize()
        assert np.isfinite(got).all(), f"slot {k} was read before its kernel finished"
        assert np.abs(got - cpu).max() <= bound, f"slot {k}"


# ---------------------------------------------------------------------------------------------
# 3. zero-copy hand-off to torch


@pytest.mark.parametrize("dtype, layout", [("float32", "NCHW"), ("bfloat16", "NHWC")])
def test_torch_gets_device_batches_without_a_copy(image_table, dtype, layout):
    """``gpuload.pytorch(..., device="cuda", image=...)`` hands torch CUDA tensors that view the
    stage's own output buffers (same pointer: no copy, bfloat16 through its uint16 storage),
    equal to the CPU path's batches (same decoder, so the same pixels)."""
    image = [
        ops.RandomResizedCrop(16, scale=(0.3, 1.0)),
        ops.RandomHorizontalFlip(),
        ops.Normalize(MEAN, STD),
        ops.ToDtype(dtype),
        ops.ToLayout(layout),
    ]
    kw = dict(batch_size=8, shuffle=True, seed=3, image=image, decoder="cpu")
    cpu = [b["image"].float() for b in gpuload.pytorch(image_table, device="cpu", **kw)]
    loader = gpuload.pytorch(image_table, device="cuda", **kw)
    assert loader.device == torch.device("cuda", 0)
    n = 0
    for i, b in enumerate(loader):
        x = b["image"]
        assert x.is_cuda and x.device == torch.device("cuda", 0)
        assert x.dtype == getattr(torch, dtype) and x.shape == cpu[i].shape
        outputs = loader.loader.image_stage().kernels["image"].outputs
        assert x.data_ptr() in {o.__cuda_array_interface__["data"][0] for o in outputs}
        rtol = 2.0**-7 if dtype == "bfloat16" else 0.0  # one bfloat16 ulp
        torch.testing.assert_close(x.float().cpu(), cpu[i], atol=1e-2, rtol=rtol)
        n += 1
    assert n == len(cpu) == 5
    assert loader.stats().images["held_replaced"] == 0  # dropped batches: the ring is reused


# ---------------------------------------------------------------------------------------------
# 4. device batches held by the user


def test_held_torch_cuda_batches_stay_valid(image_table):
    """CUDA tensors kept across three epochs (far more batches than the ring has slots) equal
    the ``.clone()`` taken when each arrived: the stage gave held slots fresh buffers instead of
    overwriting them; a loop that drops its batches allocates none."""
    image = [ops.RandomResizedCrop(16, scale=(0.3, 1.0)), ops.RandomHorizontalFlip()]
    kw = dict(batch_size=4, shuffle=True, seed=7, image=image, device="cuda", decoder="auto")
    loader = gpuload.pytorch(image_table, num_threads=2, prefetch=1, **kw)
    kept = [(b["image"], b["image"].clone()) for _ in range(3) for b in loader]
    assert len(kept) == 30 > loader.loader.ring_size
    for i, (x, copy) in enumerate(kept):
        assert x.is_cuda and torch.equal(x, copy), f"held batch {i} was overwritten"
    assert loader.stats().images["held_replaced"] > 0
    fresh = gpuload.pytorch(image_table, num_threads=2, prefetch=1, **kw)
    sums = [float(b["image"].float().sum()) for _ in range(3) for b in fresh]
    assert len(sums) == 30 and fresh.stats().images["held_replaced"] == 0


# ---------------------------------------------------------------------------------------------
# 5. nvImageCodec on the GPU


def _photos():
    from gpuload.decode._samples import photo_jpegs

    return photo_jpegs(8, size=(480, 640), target_bytes=(30_000, 60_000), seed=3)


def _decode_on_gpu(dec, datas, reqs, caplog):
    """Decode twice into one device staging buffer on a stream; (batch, host copy, records of
    the gpuload.decode logger at any level)."""
    from numba import cuda

    from gpuload.decode import read_header

    hdrs = [read_header(d) for d in datas]
    staging = cuda.device_array(dec.staging_nbytes(hdrs, reqs), np.uint8)
    stream = cuda.stream()
    with caplog.at_level(logging.DEBUG, logger="gpuload.decode"):
        for _ in range(2):
            batch = dec.decode_batch(datas, reqs, staging, stream=stream)
        stream.synchronize()
    records = [r for r in caplog.records if r.name.startswith("gpuload.decode")]
    return batch, staging.copy_to_host(), records


def _image(batch, host, i):
    off, h, w, c = (int(v) for v in batch.meta[i])
    return host[off : off + h * w * c].reshape(h, w, c)


@pytest.mark.parametrize("roi", ["region", "rows", "off"])
def test_nvimgcodec_decodes_on_the_gpu_without_falling_back(roi, caplog):
    """ "auto" on CUDA is nvImageCodec on the GPU; it decodes every image itself (nothing left to
    the host decoder, nothing logged), in each ``roi`` mode (DecodeOptions.roi), and the pixels
    are libjpeg-turbo's within the IDCT difference."""
    pytest.importorskip("nvidia.nvimgcodec")
    import simplejpeg

    from gpuload.decode import DecodeRequest, get_decoder

    dec = get_decoder("auto", "cuda", roi=roi)
    assert (dec.name, str(dec.device), dec.roi) == ("nvimgcodec", "cuda:0", roi)
    datas = _photos()
    windows = [(10, 20, 300, 400), None, (200, 100, 480, 640), (0, 0, 100, 100)] * 2
    reqs = [DecodeRequest(roi=w) for w in windows]
    batch, host, records = _decode_on_gpu(dec, datas, reqs, caplog)
    assert dec.host_decoded == 0 and not records, [r.getMessage() for r in records]
    for i, (d, w) in enumerate(zip(datas, windows)):
        full = simplejpeg.decode_jpeg(d, colorspace="RGB")
        y0, x0, y1, x1 = w or (0, 0, *full.shape[:2])
        want = {"region": (y0, x0, y1, x1), "rows": (0, 0, y1, full.shape[1])}.get(
            roi, (0, 0, *full.shape[:2])
        )
        oy, ox = (int(v) for v in batch.origin[i])
        img = _image(batch, host, i)
        assert (oy, ox, oy + img.shape[0], ox + img.shape[1]) == want, (roi, w)
        ref = full[oy : oy + img.shape[0], ox : ox + img.shape[1]]
        assert np.abs(img.astype(np.int16) - ref).mean() <= 2.0  # nvJPEG's IDCT vs libjpeg's


def test_gpu_loader_with_roi_region_and_fast_matches_cpu(image_table):
    """DecodeOptions(roi="region", fast=True) with device="cuda" (the benchmark's e2e "fast"
    row; issue 13 bug A) runs on nvImageCodec, which decodes every image itself, and gives the
    CPU path's images (full-size accurate decode, same seed) within decoder differences."""
    pytest.importorskip("nvidia.nvimgcodec")
    image = [ops.RandomResizedCrop(16, scale=(0.2, 1.0)), ops.Normalize(MEAN, STD)]
    kw = dict(batch_size=40, seed=1, image=image)
    ref = gpuload.DecodeOptions(dct=False)
    cpu = next(iter(gpuload.pytorch(image_table, device="cpu", decode_options=ref, **kw)))
    opts = gpuload.DecodeOptions(roi="region", fast=True)
    loader = gpuload.pytorch(image_table, device="cuda", decoder="auto", decode_options=opts, **kw)
    gpu = next(iter(loader))["image"]
    dec = loader.loader.image_stage().decoder
    assert (dec.name, dec.roi, dec.fast, dec.host_decoded) == ("nvimgcodec", "region", True, 0)
    assert gpu.is_cuda and gpu.shape == cpu["image"].shape
    # IDCT and chroma upsampling differences: libjpeg-turbo's own fast mode moves the mean of
    # these textures by 0.06; another crop moves it by 0.6
    assert (gpu.cpu() - cpu["image"]).abs().mean() < 0.1


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_tf_device_iterator_keeps_gpu_batches_on_the_gpu(tmp_path):
    """``gpuload.tensorflow(..., device="cuda").as_device_iterator()``: image batches made on
    the GPU reach TF through DLPack and stay there (no host round trip), equal to the CPU
    path's within decoder differences."""
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("cupy")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("this TensorFlow build sees no GPU")
    gpuload.ingest(tmp_path / "r", robot_columns(16, seed=4))
    t = gpuload.open_table(tmp_path / "r")
    kw = dict(batch_size=8, seed=0, columns=["image"], image=[gpuload.ops.Resize((8, 8))],
              decode_options=gpuload.DecodeOptions(dct=False, roi=False))  # fmt: skip
    gpu = [b["image"] for b in gpuload.tensorflow(t, device="cuda", **kw).as_device_iterator()]
    cpu = [b["image"] for b in gpuload.tensorflow(t, device="cpu", **kw).as_device_iterator()]
    assert len(gpu) == len(cpu) == 2
    for g, c in zip(gpu, cpu):
        assert "GPU" in g.device and g.shape == (8, 8, 8, 3)
        assert float(np.abs(g.numpy() - c.numpy()).mean()) < 0.1


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_jax_gets_gpu_image_batches_on_the_gpu(tmp_path):
    """``gpuload.jax(..., device="cuda", image=...)``: image batches made on the GPU reach JAX
    through DLPack on the device, equal to the CPU path's within decoder differences."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("cupy")
    try:
        jax.devices("gpu")
    except RuntimeError:
        pytest.skip("this JAX build sees no GPU")
    gpuload.ingest(tmp_path / "r", robot_columns(16, seed=4))
    t = gpuload.open_table(tmp_path / "r")
    kw = dict(batch_size=8, seed=0, columns=["image", "label"], image=[ops.Resize((8, 8))],
              decode_options=gpuload.DecodeOptions(dct=False, roi=False))  # fmt: skip
    gpu = list(gpuload.jax(t, device="cuda", **kw))
    cpu = list(gpuload.jax(t, device="cpu", **kw))
    assert len(gpu) == len(cpu) == 2
    for g, c in zip(gpu, cpu):
        assert g["image"].devices() == {jax.devices("gpu")[0]} and g["image"].shape == (8, 3, 8, 8)
        assert float(np.abs(np.asarray(g["image"]) - np.asarray(c["image"])).mean()) < 0.1
        np.testing.assert_array_equal(np.asarray(g["label"]), np.asarray(c["label"]))
