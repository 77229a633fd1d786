"""Episodes and windows (issue 15): every front door against a NumPy reference built by hand."""

from __future__ import annotations

import numpy as np
import pytest

import gpuload
from gpuload import DecodeOptions, ops
from gpuload.errors import DecodeError, SchemaError
from tests.helpers import encode, textured_image

NO_ROI = DecodeOptions(dct=False, roi=False)


def episode_table(path, lens, seed=0, frames="per_row", size=(24, 32), bad_row=None):
    """Rows that say who they are: ``id`` = row, ``action`` = (row, 2 row, episode), text, a
    50 fps ``timestamp`` and an image ``cam`` (one texture per row, or per episode)."""
    rng = np.random.default_rng(seed)
    ep = np.concatenate([np.full(n, i) for i, n in enumerate(lens)]).astype(np.int64)
    n = len(ep)
    frame = np.concatenate([np.arange(k) for k in lens])
    ids = np.arange(n, dtype=np.int64)
    per_ep = [encode(textured_image(rng, *size), "PNG") for _ in lens]
    cams = [
        per_ep[e] if frames == "per_episode" else encode(textured_image(rng, *size), "PNG")
        for e in ep
    ]
    if bad_row is not None:
        cams[bad_row] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    cols = {
        "episode_index": ep,
        "id": ids,
        "action": np.stack([ids, 2 * ids, ep], 1).astype(np.float32),
        "text": [f"row {i}" for i in range(n)],
        "timestamp": (frame / 50.0).astype(np.float64),
        "cam": cams,
    }
    return gpuload.ingest(str(path), cols, chunk_bytes=4096)


def reference(lens, anchors, offsets):
    """(targets, pad) for anchor rows and row offsets, the slow and obvious way."""
    start, end = {}, {}
    r = 0
    for n in lens:
        for i in range(r, r + n):
            start[i], end[i] = r, r + n
        r += n
    targets = np.zeros((len(anchors), len(offsets)), np.int64)
    pad = np.zeros_like(targets, bool)
    for b, a in enumerate(anchors):
        for k, o in enumerate(offsets):
            t = a + o
            pad[b, k] = not start[a] <= t < end[a]
            targets[b, k] = min(max(t, start[a]), end[a] - 1)
    return targets, pad


def check_batch(b, lens, windows):
    anchors = np.asarray(b["episode_index_anchor"] if "episode_index_anchor" in b else b["id"])
    if anchors.ndim == 2:  # id itself windowed: the anchor is offset 0
        anchors = anchors[:, list(windows["id"]).index(0)]
    for col, off in windows.items():
        targets, pad = reference(lens, anchors.tolist(), list(off))
        np.testing.assert_array_equal(np.asarray(b[col + "_is_pad"]), pad)
        v = b[col]
        if col == "action":
            np.testing.assert_array_equal(np.asarray(v)[..., 0], targets)
        elif col == "text":
            assert v == [[f"row {t}" for t in row] for row in targets.tolist()]
        elif col == "id":
            np.testing.assert_array_equal(np.asarray(v), targets)
    return anchors


@pytest.fixture(scope="module")
def lens():
    rng = np.random.default_rng(7)
    return [1, 3] + rng.integers(2, 14, size=8).tolist()  # episodes shorter than the windows


@pytest.fixture(scope="module")
def table(tmp_path_factory, lens):
    return episode_table(tmp_path_factory.mktemp("ep") / "t", lens)


WINDOWS = {"action": range(0, 5), "id": [-2, -1, 0], "text": [-1, 0, 3]}


@pytest.mark.parametrize("shuffle", [False, True])
def test_windows_match_the_reference(table, lens, shuffle):
    loader = table.batches(7, shuffle=shuffle, seed=3, episode="episode_index", window=WINDOWS)
    seen = []
    for b in loader:
        assert np.asarray(b["action"]).shape[1:] == (5, 3)
        seen += check_batch(b, lens, WINDOWS).tolist()
        # a window never mixes episodes: every gathered row is in the anchor's episode
        ep = np.asarray(b["action"])[..., 2]
        assert (ep == ep[:, :1]).all()
    assert sorted(seen) == list(range(sum(lens)))
    assert (seen != sorted(seen)) == shuffle


def test_drop_incomplete_keeps_only_whole_windows(table, lens):
    loader = table.batches(
        4, episode="episode_index", window=WINDOWS, drop_incomplete=True, shuffle=True, seed=1
    )
    anchors = []
    for b in loader:
        anchors += check_batch(b, lens, WINDOWS).tolist()
        assert not any(np.asarray(b[c + "_is_pad"]).any() for c in WINDOWS)
    everyone = np.arange(sum(lens))
    _, pad = reference(lens, everyone.tolist(), [-2, -1, 0, 1, 2, 3, 4])
    assert sorted(anchors) == everyone[~pad.any(1)].tolist()
    assert len(loader) == -(-len(anchors) // 4)


def test_sharded_over_two_ranks_and_resumed(table, lens):
    opts = dict(episode="episode_index", window=WINDOWS, shuffle=True, seed=5, world_size=2)
    shares = []
    for rank in (0, 1):
        full = [check_batch(b, lens, WINDOWS).tolist() for b in table.batches(3, rank=rank, **opts)]
        shares.append([a for b in full for a in b])
        # stop after two batches, resume in a new loader: the rest is exactly what was left
        first = table.batches(3, rank=rank, **opts)
        it = iter(first)
        got = [next(it)["id"][:, 2].tolist() for _ in range(2)]
        state = first.state_dict()
        second = table.batches(3, rank=rank, **opts)
        second.load_state_dict(state)
        rest = [b["id"][:, 2].tolist() for b in second]
        assert [a for b in got + rest for a in b] == shares[rank]
    # 83 anchors over 2 ranks: one is repeated to even the shares out (uneven="pad")
    assert len(set(shares[0]) & set(shares[1])) == sum(lens) % 2
    assert set(shares[0]) | set(shares[1]) == set(range(sum(lens)))


def test_window_in_seconds_picks_the_nearest_row(table, lens):
    # 50 fps: -0.04 s = 2 rows back, 0.02 s = 1 row on (LeRobot's delta_timestamps)
    loader = table.batches(
        6, episode="episode_index", window_seconds={"id": [-0.04, 0.0, 0.02]}, tolerance_s=1e-4
    )
    for b in loader:
        anchors = np.asarray(b["id"])[:, 1]
        targets, pad = reference(lens, anchors.tolist(), [-2, 0, 1])
        np.testing.assert_array_equal(np.asarray(b["id"]), targets)
        np.testing.assert_array_equal(np.asarray(b["id_is_pad"]), pad)


def test_window_in_seconds_refuses_offsets_off_the_frame_grid(table):
    loader = table.batches(4, episode="episode_index", window_seconds={"id": [0.01]})
    with pytest.raises(ValueError, match="tolerance_s=.*cannot serve this window"):
        next(iter(loader))


def test_same_crop_across_a_samples_frames_different_across_samples(tmp_path):
    lens = [6, 5, 7]
    t = episode_table(tmp_path / "t", lens, frames="per_episode")
    image = [ops.RandomResizedCrop(12, scale=(0.2, 0.5)), ops.RandomHorizontalFlip()]
    loader = t.batches(6, episode="episode_index", window={"cam": [-1, 0, 2], "id": [0]},
                       image=image, seed=2, decode_options=NO_ROI)  # fmt: skip
    outs = []
    for b in loader:
        cam = np.asarray(b["cam"])
        assert cam.shape == (len(b["id"]), 3, 3, 12, 12)
        # every frame of an episode is the same picture: the same crop gives the same output
        np.testing.assert_array_equal(cam[:, 0], cam[:, 1])
        np.testing.assert_array_equal(cam[:, 0], cam[:, 2])
        outs += list(cam[:, 0])
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) == len(outs)  # 18 samples, 18 different crops


def test_windowed_frames_are_the_right_frames_each_decoded_once(tmp_path):
    lens = [9, 2, 12]
    t = episode_table(tmp_path / "t", lens)
    image = [ops.Resize((12, 16))]  # deterministic: a frame's output does not depend on its sample
    offsets = [-3, -1, 0, 1]
    kw = dict(image=image, decode_options=NO_ROI)
    plain = np.concatenate([np.asarray(b["cam"]) for b in t.batches(8, **kw)])
    loader = t.batches(5, episode="episode_index", window={"cam": offsets}, **kw)
    expect_decoded = 0
    for b in loader:
        anchors = np.asarray(b["id"])
        targets, pad = reference(lens, anchors.tolist(), offsets)
        np.testing.assert_array_equal(np.asarray(b["cam"]), plain[targets])
        np.testing.assert_array_equal(np.asarray(b["cam_is_pad"]), pad)
        expect_decoded += len(np.unique(targets))  # each distinct frame once per batch
    assert loader.stats().images["decoded"] == expect_decoded < sum(lens) * len(offsets)


def test_a_bad_frame_drops_the_samples_that_need_it(tmp_path):
    lens = [6, 6]
    t = episode_table(tmp_path / "t", lens, bad_row=3)
    kw = dict(episode="episode_index", window={"cam": [-1, 0]}, image=[ops.Resize((8, 8))])
    with pytest.raises(DecodeError, match=r"row 3, column 'cam'"):
        list(t.batches(4, **kw))
    got = [a for b in t.batches(4, on_error="skip", **kw) for a in b["id"].tolist()]
    assert got == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]  # anchors 3 and 4 read frame 3


def test_map_style_dataset_serves_the_same_windows(table, lens):
    pytest.importorskip("torch")
    ds = gpuload.pytorch(table, episode="episode_index", window=WINDOWS, drop_incomplete=True)
    batched = [
        {k: np.asarray(v) for k, v in b.items() if k != "text"}
        for b in table.batches(1000, episode="episode_index", window=WINDOWS, drop_incomplete=True)
    ][0]
    assert len(ds) == len(batched["id"])
    for i in (0, len(ds) // 2, len(ds) - 1):
        row = ds[i]
        for k in ("id", "action", "action_is_pad", "id_is_pad"):
            np.testing.assert_array_equal(np.asarray(row[k]), batched[k][i])


def test_tensorflow_dataset_has_window_shapes(table, lens):
    tf = pytest.importorskip("tensorflow")
    ds = gpuload.tensorflow(table, batch_size=4, episode="episode_index", window=WINDOWS,
                            columns=["episode_index", "id", "action", "text"])  # fmt: skip
    spec = ds.element_spec
    assert spec["action"].shape.as_list() == [None, 5, 3]
    assert spec["text"].shape.as_list() == [None, 3] and spec["text"].dtype == tf.string
    assert spec["id_is_pad"].dtype == tf.bool
    for b in ds:
        b = {k: v.numpy() for k, v in b.items()}
        b["text"] = [[s.decode() for s in row] for row in b["text"]]
        check_batch(b, lens, WINDOWS)


def test_per_column_image_ops(tmp_path):
    rng = np.random.default_rng(0)
    t = gpuload.ingest(str(tmp_path / "t"), {
        "a": [encode(textured_image(rng, 20, 30), "PNG") for _ in range(5)],
        "b": [encode(textured_image(rng, 30, 20), "PNG") for _ in range(5)],
        "c": [encode(textured_image(rng, 10, 10), "PNG") for _ in range(5)],
    })  # fmt: skip
    b = next(
        iter(
            t.batches(
                5,
                image={"a": [ops.Resize((8, 12))], "b": [ops.Resize((6, 6)), ops.ToDtype("uint8")]},
            )
        )
    )
    assert np.asarray(b["a"]).shape == (5, 3, 8, 12) and np.asarray(b["a"]).dtype == np.float32
    assert np.asarray(b["b"]).shape == (5, 3, 6, 6) and np.asarray(b["b"]).dtype == np.uint8
    assert isinstance(b["c"][0], bytes)  # a column without ops stays encoded
    every = next(iter(t.batches(5, image=[ops.Resize((4, 4))])))
    assert all(np.asarray(every[c]).shape == (5, 3, 4, 4) for c in "abc")
    with pytest.raises(ValueError, match="not among the loaded columns"):
        t.batches(5, columns=["a"], image={"b": [ops.Resize(4)]})


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(window={"id": [0]}), ValueError, "need episode="),
        (dict(episode="episode_index"), ValueError, "needs window="),
        (dict(episode="episode_index", window={"id": [0.5]}), TypeError, "integers"),
        (dict(episode="episode_index", window={"id": []}), ValueError, "no offsets"),
        (dict(episode="episode_index", window={"nope": [0]}), SchemaError, "nope"),
        (
            dict(episode="episode_index", window={"id": [0]}, columns=["episode_index"]),
            ValueError,
            "not among the loaded columns",
        ),  # fmt: skip
        (dict(episode="text", window={"id": [0]}), SchemaError, "integer scalars"),
        (
            dict(episode="episode_index", window={"id": [0]}, tolerance_s=1.0),
            ValueError,
            "for window_seconds",
        ),  # fmt: skip
    ],
)
def test_bad_window_options_get_one_clear_error(table, kw, err, match):
    with pytest.raises(err, match=match):
        table.batches(4, **kw)


def test_an_episode_split_in_two_is_refused(tmp_path):
    t = gpuload.ingest(str(tmp_path / "t"), {"e": np.array([0, 0, 1, 1, 0], np.int64)})
    with pytest.raises(SchemaError, match="episode 0 .* rows 0-1 and 4-4.*contiguous"):
        t.batches(2, episode="e", window={"e": [0]})


def test_a_resume_needs_the_same_windows(table):
    windowed = table.batches(4, episode="episode_index", window=WINDOWS, seed=0)
    next(iter(windowed))
    for other in (
        table.batches(4, seed=0),
        table.batches(4, episode="episode_index", window={**WINDOWS, "id": [-1, 0]}, seed=0),
    ):
        with pytest.raises(ValueError, match="windows"):
            other.load_state_dict(windowed.state_dict())


def test_held_windowed_image_batches_stay_valid(tmp_path):
    torch = pytest.importorskip("torch")
    t = episode_table(tmp_path / "t", [7, 9, 8])
    kw = dict(batch_size=4, shuffle=True, seed=1, episode="episode_index", columns=["cam", "episode_index"],
              window={"cam": [-1, 0]}, image=[ops.RandomResizedCrop(8)])  # fmt: skip
    held = gpuload.pytorch(t, **kw)
    kept = [b["cam"] for _ in range(3) for b in held]  # the tensors themselves, not copies
    fresh = gpuload.pytorch(t, **kw)
    ref = [b["cam"].clone() for _ in range(3) for b in fresh]
    assert len(kept) == 18 and kept[0].shape == (4, 2, 3, 8, 8)
    for i, (a, b) in enumerate(zip(kept, ref)):
        assert torch.equal(a, b), f"kept batch {i} was overwritten"
    assert held.stats().images["held_replaced"] > 0
    assert fresh.stats().images["held_replaced"] == 0


@pytest.mark.cudasim
def test_windows_on_the_cuda_path_under_the_simulator(tmp_path):
    """The CUDA path (device arrays, one kernel launch per column over every sample x offset)
    gives the CPU path's windows, and held device batches keep their slots."""
    import os
    import subprocess
    import sys

    episode_table(tmp_path / "t", [3, 4])
    code = f"""
import numpy as np, gpuload
from gpuload import ops
t = gpuload.open_table({str(tmp_path / "t")!r})
def run(device, keep):
    # the simulator runs kernels in Python threads and is not thread-safe: one loader thread
    L = t.batches(3, shuffle=True, seed=1, num_threads=1, prefetch=1, decoder="cpu",
                  device=device, episode="episode_index", window={{"cam": [-1, 0]}},
                  columns=["cam", "episode_index"], image=[ops.RandomResizedCrop(6)])
    out = [keep(b["cam"]) for _ in range(2) for b in L]
    return out, L.stats().images["held_replaced"]
held, n_held = run("cuda", lambda x: x)
cpu, _ = run("cpu", lambda x: x.copy())
assert n_held > 0 and held[0].shape == (3, 2, 3, 6, 6), (n_held, held[0].shape)
np.save({str(tmp_path / "sim.npy")!r},
        np.stack([np.concatenate([h.copy_to_host() for h in held]), np.concatenate(cpu)]))
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=root
    )
    assert p.returncode == 0, p.stderr[-3000:]
    gpu, cpu = np.load(tmp_path / "sim.npy")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
