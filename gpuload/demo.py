"""A demo table shaped like the reference robot dataset, generated locally with no network.

Rows hold a 480x640 RGB JPEG of realistic content and size (about 20-30 KB), a float32[14] joint
state, an int label and a text instruction. Images are crops, flips and colour/noise variations of
the real photographs that scikit-image's wheel ships; without scikit-image, procedurally textured
scenes are used instead (never flat colours or pure noise, which decode unrealistically).
Deterministic for a seed; generated on all cores.

``make_episode_table`` makes an ALOHA-like table of robot episodes instead (two JPEG cameras,
observation.state and action float32[14], per-frame indices and timestamps, a task per episode),
whose images carry a corner tag naming their row (see ``frame_tag``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .table import Table

__all__ = [
    "make_demo_table",
    "demo_rows",
    "DEMO_HEIGHT",
    "DEMO_WIDTH",
    "TASKS",
    "make_episode_table",
    "ensure_episode_table",
    "episode_rows",
    "episode_lengths",
    "episode_metadata",
    "episode_table_name",
    "frame_tag",
    "EPISODE_FPS",
    "EPISODE_LENGTHS",
    "EPISODE_SCHEMA",
    "EPISODE_SIZE",
    "EPISODE_TASKS",
    "TAG_MODULUS",
    "TAG_SIZE",
]

DEMO_HEIGHT, DEMO_WIDTH = 480, 640
TARGET_BYTES = 25_000
TASKS = (
    "pick up the red cube",
    "place the cup on the plate",
    "open the drawer",
    "close the drawer",
    "stack the blocks",
    "push the button",
    "pour the beans",
    "wipe the table",
    "hand over the tool",
    "insert the peg",
)
_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "stereo_motorcycle",
)
_TEXTURES = ("brick", "grass", "gravel", "camera", "moon")


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _procedural(seed: int) -> np.ndarray:
    """A synthetic scene: a table top with perspective stripes, blobs and soft shading."""
    rng = np.random.default_rng(seed)
    h, w = 600, 800
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 200, 3)
    img = np.empty((h, w, 3), np.float32)
    stripes = 0.5 + 0.5 * np.sin((x - w / 2) / (y + 80) * rng.uniform(20, 60) + rng.uniform(0, 6))
    for c in range(3):
        img[..., c] = base[c] * (0.7 + 0.3 * stripes) * (0.6 + 0.4 * y / h)
    for _ in range(rng.integers(5, 12)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        m = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += m[..., None] * rng.uniform(-90, 90, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _bases() -> tuple[np.ndarray, ...]:
    """Base scenes at 600x800 (1.25x the output), so each row can take a shifted 480x640 crop."""
    out: list[np.ndarray] = []
    try:
        import skimage.data as data
    except ImportError:
        data = None
    if data is not None:
        for name in _PHOTOS:
            try:
                img = getattr(data, name)()
            except (ImportError, ModuleNotFoundError, OSError, AttributeError):
                continue  # a sample needing pooch/network: skip it
            if isinstance(img, tuple):
                img = img[0]
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            out.append(_resize(img[..., :3].astype(np.uint8), 600, 800))
        for k, name in enumerate(_TEXTURES):
            try:
                g = getattr(data, name)().astype(np.float32)
            except (ImportError, ModuleNotFoundError, OSError, AttributeError):
                continue
            tint = np.array(
                [
                    [1.0, 0.85, 0.7],
                    [0.75, 0.9, 1.0],
                    [0.9, 1.0, 0.8],
                    [1.0, 0.95, 0.9],
                    [0.8, 0.8, 1.0],
                ][k % 5]
            )
            out.append(_resize(np.clip(g[..., None] * tint, 0, 255).astype(np.uint8), 600, 800))
    if not out:
        out = [_procedural(s) for s in range(8)]
    return tuple(out)


@lru_cache(maxsize=1)
def _noisy_bases() -> tuple[np.ndarray, ...]:
    """Base scenes with sensor-like noise baked in once (per-row work then stays cheap)."""
    rng = np.random.default_rng(1234)
    return tuple(
        np.clip(b.astype(np.int16) + rng.normal(0, 3.0, b.shape).astype(np.int16), 0, 255).astype(
            np.uint8
        )
        for b in _bases()
    )


@lru_cache(maxsize=64)
def _quality_for(base_index: int) -> int:
    """The JPEG quality that lands this base scene near the target size (calibrated once)."""
    import simplejpeg

    img = np.ascontiguousarray(_noisy_bases()[base_index][:DEMO_HEIGHT, :DEMO_WIDTH])
    lo, hi = 20, 95
    while lo < hi:
        q = (lo + hi + 1) // 2
        if len(simplejpeg.encode_jpeg(img, quality=q)) <= TARGET_BYTES:
            lo = q
        else:
            hi = q - 1
    return lo


def _image(seed: int, i: int) -> bytes:
    import simplejpeg

    rng = np.random.default_rng([seed, i, 1])
    bases = _noisy_bases()
    b = int(rng.integers(len(bases)))
    src = bases[b]
    y0 = int(rng.integers(0, src.shape[0] - DEMO_HEIGHT + 1))
    x0 = int(rng.integers(0, src.shape[1] - DEMO_WIDTH + 1))
    crop = src[y0 : y0 + DEMO_HEIGHT, x0 : x0 + DEMO_WIDTH]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    # per-channel gain and offset through a lookup table: a colour/brightness variation per row
    lut = np.clip(
        np.arange(256)[None, :] * rng.uniform(0.8, 1.2, (3, 1)) + rng.uniform(-15, 15), 0, 255
    )
    lut = lut.astype(np.uint8)
    out = np.empty((DEMO_HEIGHT, DEMO_WIDTH, 3), np.uint8)
    for c in range(3):
        np.take(lut[c], crop[..., c], out=out[..., c])
    q = int(np.clip(_quality_for(b) + rng.integers(-3, 4), 15, 95))
    return simplejpeg.encode_jpeg(out, quality=q)


def _state(seed: int, i: int) -> np.ndarray:
    """A smooth 14-DOF joint trajectory: episodes of 400 steps."""
    ep, t = divmod(i, 400)
    rng = np.random.default_rng([seed, ep, 2])
    freq = rng.uniform(0.005, 0.03, 14)
    phase = rng.uniform(0, 2 * np.pi, 14)
    amp = rng.uniform(0.1, 1.2, 14)
    return (amp * np.sin(freq * t + phase)).astype(np.float32)


def _rows_block(args: tuple[int, int, int]) -> dict:
    seed, lo, hi = args
    labels = [(i // 400 + seed) % len(TASKS) for i in range(lo, hi)]
    return {
        "image": [_image(seed, i) for i in range(lo, hi)],
        "state": np.stack([_state(seed, i) for i in range(lo, hi)]),
        "label": np.array(labels, dtype=np.int64),
        "instruction": [TASKS[k] for k in labels],
    }


def demo_rows(
    rows: int, seed: int = 0, workers: int | None = None, block: int = 256
) -> Iterator[dict]:
    """Column batches of the demo table, generated in worker processes (all cores by default)."""
    blocks = [(seed, lo, min(rows, lo + block)) for lo in range(0, rows, block)]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(blocks) <= 1:
        for b in blocks:
            yield _rows_block(b)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(_rows_block, blocks)


class _Rows:
    """An iterable of row dicts fed from column batches (what ingest consumes), with a length."""

    def __init__(self, rows: int, batches: Callable[[], Iterator[dict]]) -> None:
        self.rows, self.batches = rows, batches

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[dict]:
        for b in self.batches():
            names = list(b)
            for j in range(len(b[names[0]])):
                yield {k: b[k][j] for k in names}


def make_demo_table(
    dest: str | os.PathLike,
    rows: int = 10_000,
    seed: int = 0,
    mode: str = "create",
    workers: int | None = None,
    progress: bool | None = None,
    storage_options=None,
) -> Table:
    """Generate the demo table at ``dest`` (a path or URL) and return it opened."""
    from .client import ingest

    schema = {
        "image": "image/jpeg",
        "state": "float32[14]",
        "label": "int64",
        "instruction": "text",
    }
    return ingest(
        os.fspath(dest),
        _Rows(rows, lambda: demo_rows(rows, seed, workers)),
        mode=mode,
        schema=schema,
        progress=progress,
        storage_options=storage_options,
    )


# -- the episode table: ALOHA-shaped robot episodes ---------------------------------------------
# One row per frame, rows grouped by episode in episode then frame order, like a LeRobot ALOHA
# table: episode_index, frame_index, index (global row), timestamp (frame_index / fps), two JPEG
# cameras, observation.state and action float32[14] (action[t] ~= state[t + 1]), task text.
#
# Frame tag: the top-left 16x32 pixels of every image are two solid 16x16 squares, the first
# encoding frame_index and the second episode_index, each modulo TAG_MODULUS (512): value v is
# the colour (16 + 32 * (v & 7), 16 + 32 * (v >> 3 & 7), 16 + 32 * (v >> 6 & 7)). The squares sit
# on JPEG block boundaries, so their centres survive quality-50 4:2:0 encoding within a few
# levels; `frame_tag(decoded)` reads them back.

EPISODE_SIZE = (480, 640)  # ALOHA's cameras
EPISODE_FPS = 50  # ALOHA's control rate
EPISODE_LENGTHS = (40, 120)  # frames per episode, both inclusive (seeded per episode)
EPISODE_QUALITY = 50  # the JPEG quality ALOHA's recorder uses
EPISODE_TASKS = (
    "insert the peg into the socket",
    "transfer the cube to the other arm",
    "put the battery in the remote",
    "open the ziploc bag",
    "thread the velcro strap",
    "tear off a paper towel",
    "stack the cups",
    "wipe up the spill",
)
EPISODE_SCHEMA = {
    "episode_index": "int64",
    "frame_index": "int64",
    "index": "int64",
    "timestamp": "float32",
    "cam_high": "image/jpeg",
    "cam_left_wrist": "image/jpeg",
    "observation.state": "float32[14]",
    "action": "float32[14]",
    "task": "text",
}
TAG_SIZE = 16
TAG_MODULUS = 512
_EPISODE_FORMAT = 1  # bump when the generated content changes (invalidates cached tables)
_MIN_SIDE = 32
_POOL_PIXELS = 150_000_000  # below this much image work, worker start-up costs more than it saves
_GRIPPERS = (6, 13)  # ALOHA's joint order: 6 arm joints + gripper, left arm then right


def episode_lengths(episodes: int, seed: int = 0) -> np.ndarray:
    """Frames in each episode, drawn per episode, so a longer table starts with a shorter one."""
    lo, hi = EPISODE_LENGTHS
    return np.array(
        [np.random.default_rng([seed, e, 10]).integers(lo, hi + 1) for e in range(episodes)],
        dtype=np.int64,
    )


def _tag_colour(value: int) -> np.ndarray:
    v = int(value) % TAG_MODULUS
    return np.array([16 + 32 * (v >> s & 7) for s in (0, 3, 6)], np.uint8)


def _tag_value(pixel: np.ndarray) -> int:
    k = np.clip(np.rint((np.asarray(pixel, np.float64) - 16) / 32), 0, 7).astype(int)
    return int(k[0] | k[1] << 3 | k[2] << 6)


def frame_tag(image: np.ndarray) -> tuple[int, int]:
    """(episode_index, frame_index), each modulo TAG_MODULUS, read from a decoded HxWx3 episode
    image's corner squares: lets a test check cheaply which row an image belongs to."""
    img = np.asarray(image)
    c = slice(TAG_SIZE // 4, TAG_SIZE - TAG_SIZE // 4)  # the centre, clear of chroma blending
    frame = img[c, c, :3].reshape(-1, 3).mean(0)
    episode = img[c, TAG_SIZE + c.start : TAG_SIZE + c.stop, :3].reshape(-1, 3).mean(0)
    return _tag_value(episode), _tag_value(frame)


def _trajectory(seed: int, episode: int, frames: int, fps: float) -> np.ndarray:
    """Joint positions at frames 0..frames (one past the end, for the last action): per joint a
    sum of three sines with seeded amplitudes, frequencies (0.1-1 Hz) and phases."""
    rng = np.random.default_rng([seed, episode, 11])
    t = np.arange(frames + 1, dtype=np.float64)[:, None, None] / fps
    amp = rng.uniform(0.05, 0.4, (1, 14, 3))
    freq = rng.uniform(0.1, 1.0, (1, 14, 3))
    phase = rng.uniform(0, 2 * np.pi, (1, 14, 3))
    q = rng.uniform(-0.5, 0.5, 14) + (amp * np.sin(2 * np.pi * freq * t + phase)).sum(-1)
    for g in _GRIPPERS:  # grippers open and close within [0.1, 0.9]
        q[:, g] = 0.5 + 0.4 * np.tanh(2 * np.sin(q[:, g] * 3))
    return q.astype(np.float32)


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A per-episode background: a crop of a base scene at the output's aspect, resized to
    (h, w), flipped, colour-shifted and with sensor noise baked in."""
    bases = _bases()
    src = bases[int(rng.integers(len(bases)))]
    sh, sw = src.shape[:2]
    ch = min(sh, int(sw * h / w)) * rng.uniform(0.6, 1.0)
    cw = ch * w / h
    y0, x0 = int(rng.uniform(0, sh - ch)), int(rng.uniform(0, sw - cw))
    crop = src[y0 : y0 + max(1, int(ch)), x0 : x0 + max(1, int(cw))]
    img = _resize(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop), h, w)
    gain = rng.uniform(0.8, 1.2, 3) * (1 + rng.normal(0, 0.02, (h, w, 1)))  # uneven lighting
    noisy = img * gain + rng.uniform(-15, 15) + rng.normal(0, 3.0, img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _disc(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _paste(img: np.ndarray, cy: float, cx: float, mask: np.ndarray, colour: np.ndarray) -> None:
    """Paint ``colour`` where ``mask`` (centred at cy, cx) covers ``img``, clipped to its edges."""
    r = mask.shape[0] // 2
    y0, x0 = int(round(cy)) - r, int(round(cx)) - r
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(img.shape[0], y0 + mask.shape[0]), min(img.shape[1], x0 + mask.shape[1])
    if ya < yb and xa < xb:
        img[ya:yb, xa:xb][mask[ya - y0 : yb - y0, xa - x0 : xb - x0]] = colour


def _tag(img: np.ndarray, episode: int, frame: int) -> np.ndarray:
    img[:TAG_SIZE, :TAG_SIZE] = _tag_colour(frame)
    img[:TAG_SIZE, TAG_SIZE : 2 * TAG_SIZE] = _tag_colour(episode)
    return img


def _encode(img: np.ndarray) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(img, quality=EPISODE_QUALITY, colorsubsampling="420")


def _cam_high(rng: np.random.Generator, q: np.ndarray, episode: int, h: int, w: int) -> list:
    """The overhead camera: a fixed scene with both arms' grippers (discs) moving over it."""
    bg = _scene(rng, h, w)
    mask = _disc(max(3, round(0.07 * min(h, w))))
    colours = rng.integers(0, 256, (2, 3)).astype(np.uint8)
    ys = h * (0.55 + 0.3 * np.sin(q[:, [1, 8]]))
    xs = w * (np.array([0.3, 0.7]) + 0.18 * np.sin(q[:, [0, 7]]))
    out = []
    for t in range(len(q) - 1):
        img = bg.copy()
        for arm in range(2):
            _paste(img, ys[t, arm], xs[t, arm], mask, colours[arm])
        out.append(_encode(_tag(img, episode, t)))
    return out


def _cam_wrist(rng: np.random.Generator, q: np.ndarray, episode: int, h: int, w: int) -> list:
    """The left wrist camera: the scene pans with the wrist joints; the gripper's two jaws open
    and close at the bottom of the view."""
    big_h, big_w = h + h // 4, w + w // 4
    bg = _scene(rng, big_h, big_w)
    mask = _disc(max(2, round(0.05 * min(h, w))))
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    oy = ((big_h - h) * (0.5 + 0.5 * np.sin(q[:, 2]))).astype(int)
    ox = ((big_w - w) * (0.5 + 0.5 * np.sin(q[:, 3]))).astype(int)
    out = []
    for t in range(len(q) - 1):
        img = bg[oy[t] : oy[t] + h, ox[t] : ox[t] + w].copy()
        gap = w * (0.05 + 0.2 * float(q[t, _GRIPPERS[0]]))
        for side in (-1, 1):
            _paste(img, 0.88 * h, w / 2 + side * gap, mask, colour)
        out.append(_encode(_tag(img, episode, t)))
    return out


def _episode_block(args: tuple[int, int, int, int, int, int, float]) -> dict:
    """The columns of one episode (runs in a worker process)."""
    seed, episode, frames, row0, h, w, fps = args
    rng = np.random.default_rng([seed, episode, 12])
    q = _trajectory(seed, episode, frames, fps)
    f = np.arange(frames, dtype=np.int64)
    task = EPISODE_TASKS[int(rng.integers(len(EPISODE_TASKS)))]
    return {
        "episode_index": np.full(frames, episode, np.int64),
        "frame_index": f,
        "index": row0 + f,
        "timestamp": (f / fps).astype(np.float32),
        "cam_high": _cam_high(rng, q, episode, h, w),
        "cam_left_wrist": _cam_wrist(rng, q, episode, h, w),
        "observation.state": q[:-1],
        "action": q[1:] + rng.normal(0, 1e-3, (frames, 14)).astype(np.float32),
        "task": [task] * frames,
    }


def _episode_args(episodes: int, size: tuple[int, int], fps: float) -> tuple[int, int]:
    """Validate the episode table's arguments; returns (height, width)."""
    h, w = (int(x) for x in size)
    if int(episodes) < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if h < _MIN_SIDE or w < _MIN_SIDE:
        raise ValueError(f"image size must be at least {_MIN_SIDE}x{_MIN_SIDE}, got {h}x{w}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return h, w


def episode_rows(
    episodes: int,
    seed: int = 0,
    size: tuple[int, int] = EPISODE_SIZE,
    fps: float = EPISODE_FPS,
    workers: int | None = None,
) -> Iterator[dict]:
    """Column batches of the episode table, one per episode, in order. Made in worker processes
    (all cores by default) when the image work outweighs their start-up."""
    h, w = _episode_args(episodes, size, fps)
    lengths = episode_lengths(episodes, seed)
    starts = np.cumsum(lengths) - lengths
    jobs = [(seed, e, int(lengths[e]), int(starts[e]), h, w, float(fps)) for e in range(episodes)]
    small = workers is None and 2 * int(lengths.sum()) * h * w < _POOL_PIXELS
    workers = min(workers or os.cpu_count() or 1, episodes)
    if workers <= 1 or small:
        yield from map(_episode_block, jobs)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(_episode_block, jobs)


def episode_metadata(
    episodes: int, seed: int = 0, size: tuple[int, int] = EPISODE_SIZE, fps: float = EPISODE_FPS
) -> dict:
    """The table metadata an episode table carries (fps above all; also what made it)."""
    h, w = _episode_args(episodes, size, fps)
    return {
        "fps": int(fps) if float(fps).is_integer() else float(fps),
        "episodes": int(episodes),
        "seed": int(seed),
        "image_size": [h, w],
        "generator": f"gpuload.demo.make_episode_table/{_EPISODE_FORMAT}",
        "frame_tag": "top-left 16x16 squares: frame_index, then episode_index (mod 512); "
        "gpuload.demo.frame_tag reads them",
    }


def make_episode_table(
    dest: str | os.PathLike,
    episodes: int = 50,
    seed: int = 0,
    size: tuple[int, int] = EPISODE_SIZE,
    fps: float = EPISODE_FPS,
    mode: str = "create",
    workers: int | None = None,
    progress: bool | None = None,
    storage_options=None,
) -> Table:
    """Generate an ALOHA-like episode table at ``dest`` (a path or URL) and return it opened:
    ``episodes`` episodes of 40-120 frames, two JPEG cameras of ``size`` (height, width)."""
    from .client import ingest
    from .schema import Schema

    meta = episode_metadata(episodes, seed, size, fps)
    schema = Schema(Schema.from_spec(EPISODE_SCHEMA).columns, meta)
    rows = int(episode_lengths(episodes, seed).sum())
    return ingest(
        os.fspath(dest),
        _Rows(rows, lambda: episode_rows(episodes, seed, size, fps, workers)),
        mode=mode,
        schema=schema,
        progress=progress,
        storage_options=storage_options,
    )


def episode_table_name(
    episodes: int, seed: int = 0, size: tuple[int, int] = EPISODE_SIZE, fps: float = EPISODE_FPS
) -> str:
    """The folder name of a cached episode table: ``episodes-<N>-<seed>-<H>x<W>[-<fps>fps]``."""
    h, w = _episode_args(episodes, size, fps)
    tail = "" if fps == EPISODE_FPS else f"-{fps:g}fps"
    return f"episodes-{episodes}-{seed}-{h}x{w}{tail}"


def ensure_episode_table(
    root: str | os.PathLike,
    episodes: int = 50,
    seed: int = 0,
    size: tuple[int, int] = EPISODE_SIZE,
    fps: float = EPISODE_FPS,
    progress: bool | None = None,
    workers: int | None = None,
) -> tuple[str, bool]:
    """The episode table ``<root>/<episode_table_name(...)>``, generated unless a table made
    with the same arguments (and generator version) is already there. Returns (path, generated)."""
    import json
    import shutil

    from .errors import GpuloadError
    from .table import open_table

    path = os.path.join(os.fspath(root), episode_table_name(episodes, seed, size, fps))
    want = json.loads(json.dumps(episode_metadata(episodes, seed, size, fps)))
    try:
        t = open_table(path)
        if dict(t.schema.metadata) == want and len(t) == episode_lengths(episodes, seed).sum():
            return path, False
    except GpuloadError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.fspath(root), exist_ok=True)
    make_episode_table(
        path, episodes, seed, size, fps, mode="overwrite", workers=workers, progress=progress
    )
    return path, True
