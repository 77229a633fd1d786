"""The declarative ops API, compile_ops, per-sample parameter sampling, the decode-stage
helpers (scale_window, max_dct_scale, source_roi) and FusedImageStage (CPU, and CUDA under the
simulator in a subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _reference_ops as R  # noqa: E402

from gpuload import ops  # noqa: E402
from gpuload.errors import UnsupportedOpError  # noqa: E402

NORM = ops.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# ---------------------------------------------------------------------------------------------
# op validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ops.RandomResizedCrop(0),
        lambda: ops.RandomResizedCrop((224, -1)),
        lambda: ops.RandomResizedCrop(224.5),
        lambda: ops.RandomResizedCrop(224, scale=(0.5, 0.1)),
        lambda: ops.RandomResizedCrop(224, scale=(0.0, 1.0)),
        lambda: ops.RandomResizedCrop(224, ratio=(2.0, 1.0)),
        lambda: ops.RandomResizedCrop(224, ratio=(-1.0, 1.0)),
        lambda: ops.Resize(0),
        lambda: ops.Resize((10, 0)),
        lambda: ops.Resize("big"),
        lambda: ops.CenterCrop((1, 2, 3)),
        lambda: ops.RandomHorizontalFlip(1.5),
        lambda: ops.RandomHorizontalFlip("x"),
        lambda: ops.ColorJitter(brightness=-0.1),
        lambda: ops.ColorJitter(contrast=(1.5, 0.5)),
        lambda: ops.ColorJitter(saturation=(-0.5, 1.0)),
        lambda: ops.ColorJitter(brightness=float("nan")),
        lambda: ops.Normalize((0.5, 0.5), (0.2, 0.2, 0.2)),
        lambda: ops.Normalize(0.5, 0.0),
        lambda: ops.Normalize(0.5, (0.2, -0.2, 0.2)),
        lambda: ops.ToDtype("int32"),
        lambda: ops.ToLayout("CHW"),
    ],
)
def test_invalid_op_arguments_raise_value_error(make):
    with pytest.raises(ValueError) as ei:
        make()
    assert type(ei.value).__name__ == "ValueError"
    assert str(ei.value)


def test_ops_are_frozen_and_normalised():
    rrc = ops.RandomResizedCrop(224)
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0)
    with pytest.raises(AttributeError):
        rrc.size = (1, 1)  # type: ignore[misc]
    assert ops.Resize(256).size == 256 and ops.Resize([10, 20]).size == (10, 20)
    cj = ops.ColorJitter(0.4, (0.5, 1.5), 1.2)
    assert cj.brightness_range == (0.6, 1.4) and cj.contrast_range == (0.5, 1.5)
    assert cj.saturation_range == (0.0, 2.2)
    assert ops.Normalize(0.5, 0.25).std == (0.25, 0.25, 0.25)
    assert (
        ops.ToDtype(np.float16).dtype == "float16" and ops.ToDtype("BFloat16").dtype == "bfloat16"
    )
    assert ops.ToLayout("nhwc").layout == "NHWC"
    assert hash(ops.RandomResizedCrop(224)) == hash(ops.RandomResizedCrop((224, 224)))


def test_unsupported_ops_error_lists_supported_ops():
    class RandomRotation:  # stands in for a torchvision transform
        def __call__(self, img):
            return img

    for bad, name in [(lambda im: im, "<lambda>"), (RandomRotation(), "RandomRotation")]:
        with pytest.raises(UnsupportedOpError) as ei:
            ops.compile_ops([ops.RandomResizedCrop(224), bad])
        msg = str(ei.value)
        assert name in msg and "#1" in msg
        for supported in ops.supported_op_names():
            assert supported in msg
        assert isinstance(ei.value, ValueError)  # UnsupportedOpError is a ValueError too


def test_compile_ops_rejects_bad_lists():
    with pytest.raises(ValueError, match="output size"):
        ops.compile_ops([ops.RandomHorizontalFlip(), NORM])
    with pytest.raises(ValueError, match="output size"):
        ops.compile_ops([ops.Resize(256)])
    with pytest.raises(ValueError, match="output size"):
        ops.compile_ops([])
    with pytest.raises(ValueError, match="uint8"):
        ops.compile_ops([ops.RandomResizedCrop(8), NORM, ops.ToDtype("uint8")])
    with pytest.raises(ValueError, match="before Normalize"):
        ops.compile_ops([ops.RandomResizedCrop(8), NORM, ops.ColorJitter(0.1)])
    with pytest.raises(ValueError, match="one Normalize"):
        ops.compile_ops([ops.RandomResizedCrop(8), NORM, NORM])
    with pytest.raises(TypeError):
        ops.compile_ops("RandomResizedCrop")


def test_plan_properties():
    plan = ops.compile_ops(
        [
            ops.RandomResizedCrop((100, 120)),
            ops.RandomHorizontalFlip(),
            ops.ColorJitter(contrast=0.3),
            NORM,
            ops.ToDtype("bfloat16"),
            ops.ToLayout("NHWC"),
        ]
    )
    assert plan.out_shape(5) == (5, 100, 120, 3)
    assert plan.out_dtype == "bfloat16" and plan.storage_dtype == np.uint16
    assert plan.needs_flip and plan.needs_contrast and plan.needs_normalize
    assert not plan.needs_brightness and not plan.needs_saturation
    spec = plan.kernel_spec
    assert (spec.contrast, spec.brightness, spec.flip, spec.layout) == (True, False, True, "NHWC")
    p2 = ops.compile_ops([ops.Resize(256), ops.CenterCrop(224)])
    assert p2.out_shape(2) == (2, 3, 224, 224) and p2.out_dtype == "float32" and p2.layout == "NCHW"
    assert not p2.needs_flip and not p2.needs_normalize
    np.testing.assert_array_equal(p2.mean_array(), [0, 0, 0])
    np.testing.assert_array_equal(p2.inv_std_array(), [1, 1, 1])
    assert ops.compile_ops([ops.RandomResizedCrop(64), ops.Resize(32)]).out_size == (32, 32)
    assert ops.compile_ops([ops.RandomResizedCrop((64, 32)), ops.Resize(16)]).out_size == (32, 16)
    assert (
        ops.compile_ops([ops.Resize((30, 40)), ops.RandomHorizontalFlip(0.0)]).needs_flip is False
    )


# ---------------------------------------------------------------------------------------------
# geometry composition
# ---------------------------------------------------------------------------------------------


def _tv_resize_short(h, w, s):
    if h <= w:
        return s, int(s * w / h)
    return int(s * h / w), s


def test_resize_then_center_crop_window():
    plan = ops.compile_ops([ops.Resize(256), ops.CenterCrop(224)])
    H = np.array([480, 375, 500, 300, 1000, 257])
    W = np.array([640, 500, 375, 300, 200, 1001])
    p = plan.sample_params(H, W, np.arange(6), seed=0, epoch=0)
    for b in range(6):
        nh, nw = _tv_resize_short(H[b], W[b], 256)
        top = int(round((nh - 224) / 2.0))
        left = int(round((nw - 224) / 2.0))
        sy, sx = H[b] / nh, W[b] / nw
        np.testing.assert_allclose(
            p[b, :4], [top * sy, left * sx, 224 * sy, 224 * sx], rtol=1e-6, atol=1e-4
        )
    assert (p[:, ops.PARAM_FLIP] == 0).all() and (p[:, ops.PARAM_BRIGHTNESS :] == 1).all()


def test_resize_exact_and_crop_larger_than_image():
    plan = ops.compile_ops([ops.Resize((50, 60))])
    p = plan.sample_params([100], [90], [0], 0, 0)
    np.testing.assert_allclose(p[0, :4], [0, 0, 100, 90])
    # CenterCrop larger than the image: placed as torchvision pads (window starts before 0)
    plan = ops.compile_ops([ops.CenterCrop((9, 4))])
    p = plan.sample_params([5], [8], [0], 0, 0)
    np.testing.assert_allclose(p[0, :4], [-2, 2, 9, 4])


def test_flip_before_crop_mirrors_the_window():
    plan = ops.compile_ops([ops.Resize((100, 100)), ops.CenterCrop((50, 21))])
    p = plan.sample_params([200], [400], [0], 0, 0)
    # virtual 100x100 image (x4 in x, x2 in y); crop cols [40, 61) (round(39.5) = 40)
    np.testing.assert_allclose(p[0, :4], [50, 160, 100, 84])
    plan = ops.compile_ops(
        [ops.RandomHorizontalFlip(1.0), ops.Resize((100, 100)), ops.CenterCrop((50, 21))]
    )
    p = plan.sample_params([200], [400], [0], 0, 0)
    # cropped after the flip: cols [40, 61) of the mirrored image = cols [39, 60) of the source
    np.testing.assert_allclose(p[0, :4], [50, 156, 100, 84])
    assert p[0, ops.PARAM_FLIP] == 1
    plan = ops.compile_ops(
        [
            ops.RandomHorizontalFlip(1.0),
            ops.Resize((100, 100)),
            ops.CenterCrop((50, 21)),
            ops.RandomHorizontalFlip(1.0),
        ]
    )
    assert plan.sample_params([200], [400], [0], 0, 0)[0, ops.PARAM_FLIP] == 0


def _torchvision_rrc(height, width, scale, ratio, u):
    """torchvision RandomResizedCrop.get_params, scalar loop, fed the same uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[k, 0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[k, 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[k, 2] * (height - h + 1))
            j = int(u[k, 3] * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_rrc_matches_torchvision_algorithm_on_same_uniforms():
    from gpuload.ops import rng as grng

    rng = np.random.default_rng(4)
    B = 400
    H = rng.integers(1, 900, B)
    W = rng.integers(1, 900, B)
    H[:20], W[:20] = 10, 1000  # extreme aspect: forces the fallback
    H[20:40], W[20:40] = 1, 1
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    plan = ops.compile_ops([ops.RandomResizedCrop(32, scale, ratio)])
    rows = rng.integers(0, 2**40, B)
    p = plan.sample_params(H, W, rows, seed=9, epoch=2)
    u = grng.uniform(9, 2, rows, np.arange(40)).reshape(B, 10, 4)
    for b in range(B):
        want = _torchvision_rrc(int(H[b]), int(W[b]), scale, ratio, u[b])
        np.testing.assert_array_equal(p[b, :4], np.array(want, np.float32), err_msg=f"sample {b}")


def test_rrc_windows_in_range():
    plan = ops.compile_ops([ops.RandomResizedCrop(224, scale=(0.2, 0.9), ratio=(0.5, 2.0))])
    B = 5000
    rng = np.random.default_rng(0)
    H = rng.integers(600, 1000, B)  # aspect within the ratio range: the fallback is the whole image
    W = rng.integers(600, 1000, B)
    p = plan.sample_params(H, W, np.arange(B), seed=1, epoch=0).astype(np.float64)
    y0, x0, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= H).all() and (x0 + w <= W).all()
    assert (y0 == np.floor(y0)).all() and (h == np.floor(h)).all()
    area = h * w / (H * W)
    fallback = (h == H) & (w == W)  # the fallback (at these aspects) is the whole image
    ok = ~fallback
    assert ok.mean() > 0.95
    # (h and w are rounded to integers: allow the rounding error)
    assert area[ok].min() >= 0.2 * 0.97 and area[ok].max() <= 0.9 * 1.03
    r = w[ok] / h[ok]
    assert r.min() >= 0.5 * 0.97 and r.max() <= 2.0 * 1.03
    # the area fraction is spread over the range, not clustered
    assert np.quantile(area[ok], 0.1) < 0.35 and np.quantile(area[ok], 0.9) > 0.7


def test_sample_params_reproducible_and_varied():
    plan = ops.compile_ops(
        [
            ops.RandomResizedCrop(64),
            ops.RandomHorizontalFlip(),
            ops.ColorJitter(0.4, 0.4, 0.4),
            NORM,
        ]
    )
    H = np.array([480, 500, 333, 1024])
    W = np.array([640, 375, 333, 768])
    rows = np.array([0, 1, 2, 10**12])
    a = plan.sample_params(H, W, rows, seed=42, epoch=0)
    b = plan.sample_params(H, W, rows, seed=42, epoch=0)
    np.testing.assert_array_equal(a, b)
    # per-row purity: a row's parameters do not depend on the rest of the batch
    c = plan.sample_params(H[::-1], W[::-1], rows[::-1], seed=42, epoch=0)
    np.testing.assert_array_equal(a, c[::-1])
    one = plan.sample_params(H[2:3], W[2:3], rows[2:3], seed=42, epoch=0)
    np.testing.assert_array_equal(one[0], a[2])
    for other in (
        plan.sample_params(H, W, rows, seed=42, epoch=1),
        plan.sample_params(H, W, rows, seed=43, epoch=0),
    ):
        assert (np.abs(other - a).max(axis=1) > 0).all()
    # rows differ from each other (same source size)
    many = plan.sample_params(480, 640, np.arange(1000), seed=1, epoch=0)
    assert len(np.unique(many[:, :4], axis=0)) > 990
    assert len(np.unique(many[:, ops.PARAM_BRIGHTNESS])) > 990
    assert a.dtype == np.float32 and a.shape == (4, ops.NUM_PARAMS)


def test_flip_frequency_and_jitter_ranges():
    for p_flip in (0.5, 0.2):
        plan = ops.compile_ops(
            [
                ops.RandomResizedCrop(8),
                ops.RandomHorizontalFlip(p_flip),
                ops.ColorJitter(brightness=0.4, contrast=(0.5, 0.7), saturation=0.9),
            ]
        )
        n = 20000
        p = plan.sample_params(100, 100, np.arange(n), seed=3, epoch=5)
        freq = p[:, ops.PARAM_FLIP].mean()
        assert set(np.unique(p[:, ops.PARAM_FLIP])) <= {0.0, 1.0}
        assert abs(freq - p_flip) < 4 * math.sqrt(p_flip * (1 - p_flip) / n)
        for col, lo, hi in (
            (ops.PARAM_BRIGHTNESS, 0.6, 1.4),
            (ops.PARAM_CONTRAST, 0.5, 0.7),
            (ops.PARAM_SATURATION, 0.1, 1.9),
        ):
            v = p[:, col].astype(np.float64)
            assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
            assert abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
            assert v.max() - v.min() > 0.95 * (hi - lo)
        # draws are independent across columns
        assert abs(np.corrcoef(p[:, ops.PARAM_BRIGHTNESS], p[:, ops.PARAM_CONTRAST])[0, 1]) < 0.05


def test_sample_params_is_fast():
    plan = ops.compile_ops(
        [ops.RandomResizedCrop(224), ops.RandomHorizontalFlip(), ops.ColorJitter(0.4, 0.4, 0.4)]
    )
    H = np.full(128, 480)
    W = np.full(128, 640)
    rows = np.arange(128)
    plan.sample_params(H, W, rows, 0, 0)
    times = []
    for e in range(30):
        t = time.perf_counter()
        plan.sample_params(H, W, rows, 0, e)
        times.append(time.perf_counter() - t)
    # typically ~0.25 ms here; generous bound for a shared 2-core machine
    assert np.median(times) < 2e-3, f"sample_params(B=128) median {np.median(times) * 1e3:.2f} ms"


def test_sample_params_validation():
    plan = ops.compile_ops([ops.RandomResizedCrop(8)])
    with pytest.raises(ValueError):
        plan.sample_params([0], [10], [0], 0, 0)
    with pytest.raises(ValueError):
        plan.sample_params([10], [10], [0.5], 0, 0)
    assert plan.sample_params([], [], np.array([], np.int64), 0, 0).shape == (0, ops.NUM_PARAMS)


# ---------------------------------------------------------------------------------------------
# decode-stage helpers
# ---------------------------------------------------------------------------------------------


def test_max_dct_scale():
    plan = ops.compile_ops([ops.RandomResizedCrop((50, 40))])
    rng = np.random.default_rng(1)
    H = rng.integers(20, 2000, 3000)
    W = rng.integers(20, 2000, 3000)
    p = plan.sample_params(H, W, np.arange(3000), 0, 0)
    s = plan.max_dct_scale(p, H, W)
    assert set(np.unique(s)) <= {1, 2, 4, 8} and len(np.unique(s)) == 4
    h, w = p[:, ops.PARAM_H], p[:, ops.PARAM_W]
    assert ((h / s >= 50) & (w / s >= 40) | (s == 1)).all()
    bigger_ok = (h / (2 * s) >= 50) & (w / (2 * s) >= 40)
    assert not (bigger_ok & (s < 8)).any()


def test_scale_window():
    plan = ops.compile_ops([ops.RandomResizedCrop(16)])
    p = plan.sample_params([481, 300], [641, 200], [0, 1], 0, 0)
    w4 = plan.scale_window(p, [481, 300], [641, 200], dct_scale=4)
    np.testing.assert_allclose(w4, p[:, :4] / 4, rtol=1e-6)
    # DCT detected from decoded sizes ceil(H/s): exact 1/s, not dec/src
    auto = plan.scale_window(p, [481, 300], [641, 200], dec_h=[61, 150], dec_w=[81, 100])
    np.testing.assert_allclose(auto[0], p[0, :4] / 8, rtol=1e-6)
    np.testing.assert_allclose(auto[1], p[1, :4] / 2, rtol=1e-6)
    # a plain resize to other sizes scales by dec/src
    rs = plan.scale_window(p, [481, 300], [641, 200], dec_h=[100, 100], dec_w=[100, 100])
    np.testing.assert_allclose(
        rs[:, [0, 2]], p[:, [0, 2]] * (100 / np.array([481, 300]))[:, None], rtol=1e-5
    )
    roi = plan.scale_window(p, [481, 300], [641, 200], dct_scale=2, roi_y0=[3, 4], roi_x0=[5, 6])
    np.testing.assert_allclose(roi[:, 0], p[:, 0] / 2 - [3, 4], rtol=1e-6)
    np.testing.assert_allclose(roi[:, 1], p[:, 1] / 2 - [5, 6], rtol=1e-6)
    with pytest.raises(ValueError):
        plan.scale_window(p, 481, 641, dec_h=61)


def test_source_roi_decoding_gives_identical_output():
    plan = ops.compile_ops(
        [
            ops.RandomResizedCrop((12, 14)),
            ops.RandomHorizontalFlip(),
            ops.ColorJitter(0.3, 0.3, 0.3),
        ]
    )
    rng = np.random.default_rng(8)
    imgs = [
        R.random_image(rng, 90, 120, 3),
        R.random_image(rng, 40, 31, 1),
        R.random_image(rng, 200, 60, 3),
    ]
    src, meta = R.pack_images(imgs)
    p = plan.sample_params(meta[:, 1], meta[:, 2], np.arange(3), 0, 0)
    wins = plan.scale_window(p, meta[:, 1], meta[:, 2])
    roi = plan.source_roi(wins, meta[:, 1], meta[:, 2])
    assert (roi[:, 2] > roi[:, 0]).all() and (roi[:, 3] > roi[:, 1]).all()
    crops = [np.ascontiguousarray(im[r[0] : r[2], r[1] : r[3]]) for im, r in zip(imgs, roi)]
    assert sum(c.size for c in crops) < src.size
    csrc, cmeta = R.pack_images(crops)
    cwins = plan.scale_window(p, meta[:, 1], meta[:, 2], roi_y0=roi[:, 0], roi_x0=roi[:, 1])
    st = ops.FusedImageStage(plan, 3, "cpu")
    full = st.run(src, meta, wins, p).copy()
    part = st.run(csrc, cmeta, cwins, p).copy()
    np.testing.assert_allclose(part, full, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# stage
# ---------------------------------------------------------------------------------------------


def _batch(plan, sizes, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [R.random_image(rng, *s) for s in sizes]
    src, meta = R.pack_images(imgs)
    p = plan.sample_params(meta[:, 1], meta[:, 2], np.arange(len(imgs)) + 100 * seed, seed, 0)
    return src, meta, plan.scale_window(p, meta[:, 1], meta[:, 2]), p


def test_cpu_stage_ring_short_batch_alignment_and_parity():
    plan = ops.compile_ops(
        [ops.RandomResizedCrop((20, 18)), ops.RandomHorizontalFlip(), NORM, ops.ToDtype("float16")]
    )
    stage = ops.FusedImageStage(plan, batch_size=4, device="cpu", depth=2)
    assert len(stage.outputs) == 2
    for o in stage.outputs:
        assert o.ctypes.data % 64 == 0 and o.flags.c_contiguous and o.dtype == np.float16
        assert o.shape == (4, 3, 20, 18)
    b1 = _batch(plan, [(50, 60, 3), (31, 17, 1), (100, 90, 3), (8, 9, 3)], 1)
    b2 = _batch(plan, [(40, 41, 3), (60, 20, 3)], 2)
    o1 = stage.run(*b1)
    assert np.shares_memory(o1, stage.outputs[0]) and o1.shape == (4, 3, 20, 18)
    o1_copy = o1.copy()
    o2 = stage.run(*b2)  # short last batch -> a view of the first 2 rows of the next buffer
    assert np.shares_memory(o2, stage.outputs[1]) and o2.shape == (2, 3, 20, 18)
    np.testing.assert_array_equal(o1, o1_copy)  # the previous batch is still intact
    o3 = stage.run(*b2, out_index=1)
    assert np.shares_memory(o3, stage.outputs[1])
    o4 = stage.run(*b1)  # ring wraps around to buffer 0
    assert np.shares_memory(o4, stage.outputs[0])
    for (src, meta, wins, p), out in ((b1, o4), (b2, o3)):
        ref = R.reference_batch(src, meta, wins, p, plan)
        err = np.abs(out.astype(np.float64) - ref)
        assert (err <= 1e-3 * (ref.max() - ref.min()) + 2**-10 * np.abs(ref)).all()


_NO_ALLOC = """
import json, tracemalloc
import numpy as np
from gpuload import ops
plan = ops.compile_ops([ops.RandomResizedCrop((64, 64)), ops.Normalize((0.5,) * 3, (0.25,) * 3)])
stage = ops.FusedImageStage(plan, batch_size=8, device="cpu")
rng = np.random.default_rng(3)
src = rng.integers(0, 256, 8 * 120 * 160 * 3, dtype=np.uint8)
meta = np.array([[i * 120 * 160 * 3, 120, 160, 3] for i in range(8)], np.int64)
p = plan.sample_params(meta[:, 1], meta[:, 2], np.arange(8), 3, 0)
batch = (src, meta, plan.scale_window(p, meta[:, 1], meta[:, 2]), p)
stage.run(*batch)  # compile + warm-up
ptrs = {o.ctypes.data for o in stage.outputs}
same = all(stage.run(*batch).ctypes.data in ptrs for _ in range(2 * stage.depth))
tracemalloc.start()
for _ in range(3):
    stage.run(*batch)
print(json.dumps({"same": same, "peak": tracemalloc.get_traced_memory()[1],
                  "out": stage.outputs[0].nbytes, "replaced": stage.held_replaced}))
"""


def test_cpu_stage_run_does_not_allocate_outputs():
    """In the usual loop (each batch dropped before its slot comes round) run() reuses the
    preallocated outputs and allocates nothing through Python. In a fresh process: tracemalloc
    sees every thread, and threads other tests leave behind would be counted."""
    p = subprocess.run(
        [sys.executable, "-c", _NO_ALLOC], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["same"] and r["replaced"] == 0  # always one of the preallocated buffers
    assert r["peak"] < 16 * 1024, f"run() allocated {r['peak']} bytes (output is {r['out']})"


def test_cpu_stage_validation():
    plan = ops.compile_ops([ops.RandomResizedCrop(8)])
    stage = ops.FusedImageStage(plan, batch_size=2, device="cpu")
    src, meta, wins, p = _batch(plan, [(20, 20, 3), (10, 12, 3), (9, 9, 3)])
    with pytest.raises(ValueError, match="batch_size"):
        stage.run(src, meta, wins, p)
    bad = meta[:2].copy()
    bad[1, 0] = src.size - 10
    with pytest.raises(ValueError, match="sample 1"):
        stage.run(src, bad, wins[:2], p[:2])
    w = wins[:2].copy()
    w[0, 2] = 0
    with pytest.raises(ValueError, match="sample 0"):
        stage.run(src, meta[:2], w, p[:2])
    with pytest.raises(ValueError, match="uint8"):
        stage.run(src.astype(np.float32), meta[:2], wins[:2], p[:2])
    with pytest.raises(ValueError, match="columns"):
        stage.run(src, meta[:2], wins[:2], p[:2, :4])
    with pytest.raises(ValueError):
        stage.run(src, meta[:2], wins[:2], p[:2], out_index=5)
    with pytest.raises(ValueError):
        ops.FusedImageStage(plan, batch_size=0)
    with pytest.raises(TypeError):
        ops.FusedImageStage([ops.RandomResizedCrop(8)], batch_size=2)
    assert stage.run(src, meta[:0], wins[:0], p[:0]).shape == (0, 3, 8, 8)


def test_import_does_not_touch_numba_cuda():
    code = (
        "import sys; from gpuload import ops; ops.compile_ops([ops.RandomResizedCrop(8)]); "
        "print('numba.cuda' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


_STAGE_SIM = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from numba import cuda
from gpuload import ops
d = np.load(sys.argv[2])
plan = ops.compile_ops([ops.RandomResizedCrop((6, 7)), ops.RandomHorizontalFlip(), ops.ColorJitter(0.3, 0.3, 0.3),
                        ops.Normalize(0.5, 0.25), ops.ToLayout("NHWC")])
stage = ops.FusedImageStage(plan, batch_size=3, device="cuda", depth=2, src_capacity=64)
o1 = stage.run(d["src1"], d["meta1"], d["win1"], d["p1"])
e1 = stage.event
o2 = stage.run(d["src2"], d["meta2"], d["win2"], d["p2"])   # short batch, src larger than capacity
e2 = stage.event
assert e1 is not e2 and e1 is stage.events[0] and e2 is stage.events[1]
consumer = cuda.stream()
e2.wait(consumer)
# device-resident inputs are used in place
h1 = o1.copy_to_host()
h2 = o2.copy_to_host(stream=consumer)
consumer.synchronize()
o3 = stage.run(cuda.to_device(d["src2"]), d["meta2"], cuda.to_device(d["win2"]), cuda.to_device(d["p2"]))
stage.synchronize()
res = dict(o1=h1, o2=h2, o3=o3.copy_to_host(),
           shapes=json.dumps([list(o1.shape), list(o2.shape)]),
           dev=json.dumps([cuda.devicearray.is_cuda_ndarray(o) for o in (o1, o2, o3)]))
np.savez(sys.argv[3], **res)
"""


@pytest.mark.cudasim
def test_cuda_stage_under_simulator(tmp_path):
    plan = ops.compile_ops(
        [
            ops.RandomResizedCrop((6, 7)),
            ops.RandomHorizontalFlip(),
            ops.ColorJitter(0.3, 0.3, 0.3),
            ops.Normalize(0.5, 0.25),
            ops.ToLayout("NHWC"),
        ]
    )
    b1 = _batch(plan, [(9, 11, 3), (20, 30, 1), (5, 4, 3)], 5)
    b2 = _batch(plan, [(33, 21, 3), (12, 40, 3)], 6)
    np.savez(
        tmp_path / "in.npz",
        src1=b1[0],
        meta1=b1[1],
        win1=b1[2],
        p1=b1[3],
        src2=b2[0],
        meta2=b2[1],
        win2=b2[2],
        p2=b2[3],
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _STAGE_SIM,
            str(HERE),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    res = np.load(tmp_path / "out.npz")
    assert json.loads(str(res["shapes"])) == [[3, 6, 7, 3], [2, 6, 7, 3]]
    assert json.loads(str(res["dev"])) == [True, True, True]
    cpu = ops.FusedImageStage(plan, batch_size=3, device="cpu")
    for batch, key in ((b1, "o1"), (b2, "o2"), (b2, "o3")):
        want = cpu.run(*batch)
        ref = R.reference_batch(*batch, plan)
        np.testing.assert_allclose(res[key], want, atol=1e-4 * float(ref.max() - ref.min()))
        np.testing.assert_allclose(res[key], ref, atol=1e-3 * float(ref.max() - ref.min()))


def test_cpu_kernel_in_forked_child_after_parent_used_it():
    """GNU OpenMP aborts a forked child that starts a parallel region after its parent did;
    the stage then runs the serial build of the same kernel. Runs in a subprocess (timeout)."""
    import subprocess
    import sys

    code = """
import multiprocessing as mp, numpy as np
from gpuload import ops
from gpuload.ops import FusedImageStage, compile_ops
plan = compile_ops([ops.Resize((8, 8)), ops.Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))])
st = FusedImageStage(plan, 2, "cpu")
rng = np.random.default_rng(0)
src = rng.integers(0, 255, 2 * 20 * 30 * 3, dtype=np.uint8)
meta = np.array([[0, 20, 30, 3], [1800, 20, 30, 3]], np.int64)
params = plan.sample_params([20, 20], [30, 30], np.arange(2), 0, 0)
win = plan.scale_window(params, 20, 30)
parent = st.run(src, meta, win, params).copy()
def child(q):
    q.put(st.run(src, meta, win, params).copy())
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
got = q.get(timeout=120)
p.join(30)
assert p.exitcode == 0, p.exitcode
np.testing.assert_allclose(got, parent, atol=1e-5)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
