"""The ALOHA-like demo episode table (`gpuload.demo.make_episode_table`, `gpuload demo-table
--episodes`): row order, per-episode indices and timestamps, seeding, images whose corner tags
name their row, state/action trajectories, and the command line."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import gpuload
from gpuload import demo
from gpuload.cli import main

SEED, EPISODES, SIZE = 3, 6, (48, 80)  # a non-square size not a multiple of 16


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("episodes") / "t"
    return demo.make_episode_table(path, episodes=EPISODES, seed=SEED, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def cols(table):
    rows = table[: len(table)]
    return {name: rows[name] for name in table.schema.names}


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_rows_grouped_by_episode_and_frame(table, cols):
    lengths = demo.episode_lengths(EPISODES, SEED)
    lo, hi = demo.EPISODE_LENGTHS
    assert ((lengths >= lo) & (lengths <= hi)).all() and len(set(lengths.tolist())) > 1
    assert len(table) == lengths.sum()
    assert np.array_equal(cols["episode_index"], np.repeat(np.arange(EPISODES), lengths))
    frames = np.concatenate([np.arange(n) for n in lengths])
    assert np.array_equal(cols["frame_index"], frames)  # restarts at 0 in each episode
    assert np.array_equal(cols["index"], np.arange(len(table)))
    for name in ("episode_index", "frame_index", "index"):
        assert cols[name].dtype == np.int64


def test_timestamps_and_fps_metadata(table, cols):
    assert cols["timestamp"].dtype == np.float32
    expected = (cols["frame_index"] / demo.EPISODE_FPS).astype(np.float32)
    assert np.array_equal(cols["timestamp"], expected)
    meta = table.schema.metadata
    assert meta["fps"] == 50 and meta["episodes"] == EPISODES and meta["seed"] == SEED
    assert meta["image_size"] == list(SIZE)


def test_other_fps(tmp_path):
    t = demo.make_episode_table(tmp_path / "t", episodes=1, seed=0, size=(32, 32), fps=30)
    rows = t[: len(t)]
    assert t.schema.metadata["fps"] == 30
    assert np.allclose(rows["timestamp"][1:3], [1 / 30, 2 / 30])


def test_seeded(table, cols, tmp_path):
    again = demo.make_episode_table(tmp_path / "same", episodes=EPISODES, seed=SEED, size=SIZE)
    rows = again[: len(again)]
    for name, values in cols.items():
        if isinstance(values, np.ndarray):
            assert np.array_equal(rows[name], values), name
        else:
            assert list(rows[name]) == list(values), name
    # a longer table starts with the shorter one's episodes; another seed differs
    assert np.array_equal(demo.episode_lengths(EPISODES + 4, SEED)[:EPISODES], len_of(cols))
    assert not np.array_equal(demo.episode_lengths(EPISODES, SEED + 1), len_of(cols))
    other = demo.make_episode_table(tmp_path / "other", episodes=1, seed=SEED + 1, size=SIZE)
    assert other[0]["cam_high"] != cols["cam_high"][0]
    assert not np.array_equal(other[0]["observation.state"], cols["observation.state"][0])


def len_of(cols) -> np.ndarray:
    return np.bincount(cols["episode_index"])


def test_images_decode_to_size_and_tags_name_their_row(cols):
    for cam in ("cam_high", "cam_left_wrist"):
        for i, jpeg in enumerate(cols[cam]):
            img = _decode(jpeg)
            assert img.shape == (*SIZE, 3)
            assert demo.frame_tag(img) == (cols["episode_index"][i], cols["frame_index"][i])


def test_tag_codes_as_documented():
    """The documented code: value v is the colour 16 + 32 * (v & 7, v >> 3 & 7, v >> 6 & 7);
    the frame's square first, then the episode's; both modulo TAG_MODULUS."""

    def colour(v):
        return [16 + 32 * (v >> s & 7) for s in (0, 3, 6)]

    img = np.zeros((32, 64, 3), np.uint8)
    n, side = demo.TAG_MODULUS, demo.TAG_SIZE
    for v in range(0, n + 3, 7):
        img[:side, :side] = colour((n - 1 - v) % n)
        img[:side, side : 2 * side] = colour(v % n)
        assert demo.frame_tag(img + 5) == (v % n, (n - 1 - v) % n)  # a few levels off is fine


def test_frames_change_smoothly_within_an_episode(cols):
    """Consecutive frames of an episode differ, by much less than frames 20 apart do."""
    ep = cols["episode_index"]
    for cam in ("cam_high", "cam_left_wrist"):
        imgs = np.stack([_decode(b)[demo.TAG_SIZE :] for b in cols[cam]]).astype(np.float32)

        def apart(k, imgs=imgs):
            return np.abs(imgs[k:] - imgs[:-k]).mean(axis=(1, 2, 3))[ep[k:] == ep[:-k]]

        assert (apart(1) > 0).mean() > 0.9, cam
        assert np.median(apart(1)) < 0.5 * np.median(apart(20)), cam


def test_state_and_action(cols):
    state, action, ep = cols["observation.state"], cols["action"], cols["episode_index"]
    assert state.shape == action.shape == (len(ep), 14)
    assert state.dtype == action.dtype == np.float32
    same = ep[1:] == ep[:-1]
    assert np.abs(action[:-1][same] - state[1:][same]).max() < 0.01  # action[t] ~ state[t + 1]
    assert np.abs(np.diff(state, axis=0)[same]).max() < 0.2  # smooth at 50 fps
    assert (state.std(axis=0) > 0.01).all()
    assert not np.array_equal(action[:-1][same], state[1:][same])  # commanded, not copied


def test_one_task_per_episode(cols):
    tasks, ep = cols["task"], cols["episode_index"]
    assert set(tasks) <= set(demo.EPISODE_TASKS)
    for e in range(EPISODES):
        assert len({tasks[i] for i in np.flatnonzero(ep == e)}) == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 32x32"):
        demo.make_episode_table(tmp_path / "a", episodes=1, size=(16, 64))
    with pytest.raises(ValueError, match="episodes"):
        demo.make_episode_table(tmp_path / "b", episodes=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "gpuload", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_cli_episode_table(tmp_path):
    """End to end in a subprocess, with worker processes: the rows equal those made in-process."""
    out = tmp_path / "eps"
    args = ("demo-table", "--episodes", "2", "--size", "32x64", "--seed", "5", "--no-progress")
    text = _cli(*args, "--out", str(out), "--workers", "2").stdout
    t = gpuload.open_table(out)
    assert f"{len(t)} rows" in text and "2 episodes" in text
    assert t.schema.metadata["image_size"] == [32, 64] and t.schema.metadata["seed"] == 5
    rows = t[: len(t)]
    local = list(demo.episode_rows(2, seed=5, size=(32, 64), workers=1))
    for name in ("episode_index", "index", "action"):
        assert np.array_equal(rows[name], np.concatenate([b[name] for b in local])), name
    assert list(rows["cam_left_wrist"]) == [x for b in local for x in b["cam_left_wrist"]]
    assert _decode(rows["cam_high"][0]).shape == (32, 64, 3)
    # no TABLE or --out: the benchmark cache, generated once and then reused
    env = {"GPULOAD_BENCH_CACHE": str(tmp_path / "cache")}
    first, second = _cli(*args, env=env).stdout, _cli(*args, env=env).stdout
    cached = tmp_path / "cache" / demo.episode_table_name(2, 5, (32, 64))
    assert "already there" not in first and "already there" in second
    assert len(gpuload.open_table(cached)) == len(t)


@pytest.mark.parametrize(
    "args, message",
    [
        (("t/x", "--size", "32x32"), "apply to --episodes"),
        (("a/b", "--out", "c/d", "--episodes", "1"), "not both"),
        (("--episodes", "1", "--size", "8x8"), "HxW"),
        (("--rows", "3", "--episodes", "1"), "not allowed with"),
        (("--episodes", "0"), ">= 1"),
        (("--rows", "3"), "name the table"),
    ],
)
def test_cli_episode_errors(args, message, capsys, tmp_path):
    try:
        code = main(["--root", str(tmp_path), "demo-table", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
