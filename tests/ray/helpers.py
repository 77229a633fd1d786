"""Data and checks shared by the Ray tests: rows whose ``id`` is their row number, with a tiny
JPEG, a float32[14] state, an int label and a text, as pyarrow blocks for ``ray.data``; and the
shared local Ray's on/off switch (conftest.py's ``ray_local`` starts it)."""

from __future__ import annotations

import io
import os
from functools import cache

import numpy as np
import pyarrow as pa

from gpuload.format import CHUNK_RE

LOCAL_RAY = {"up": False}  # whether conftest.py's local Ray is running


def start_local():
    """Start the shared local Ray (2 CPUs, no dashboard) unless it is running; returns ``ray``."""
    import ray

    if not LOCAL_RAY["up"]:
        assert not ray.is_initialized(), "another Ray connection is still open"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        LOCAL_RAY["up"] = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def stop_local() -> None:
    """Shut the shared local Ray down if it is running (before connecting elsewhere)."""
    import ray

    if LOCAL_RAY["up"]:
        LOCAL_RAY["up"] = False
        ray.shutdown()


@cache
def jpegs(k: int = 64) -> tuple[bytes, ...]:
    """``k`` distinct 8x8 JPEGs (tiny, so 50k rows stay small)."""
    from PIL import Image

    out = []
    for i in range(k):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), (i * 4) % 256, np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return tuple(out)


def columns(lo: int, hi: int) -> dict:
    """Rows ``lo`` to ``hi``: id, image, state, label, text (all derived from the id)."""
    ids = np.arange(lo, hi, dtype=np.int64)
    pool = jpegs()
    return {
        "id": ids,
        "image": [pool[i % len(pool)] for i in range(lo, hi)],
        "state": (ids[:, None] + np.arange(14, dtype=np.float32) / 16).astype(np.float32),
        "label": ids % 10,
        "text": [f"instruction {i}" for i in range(lo, hi)],
    }


def arrow_table(lo: int, hi: int) -> pa.Table:
    c = columns(lo, hi)
    state = pa.FixedSizeListArray.from_arrays(pa.array(c["state"].reshape(-1)), 14)
    return pa.table(
        {
            "id": c["id"],
            "image": pa.array(c["image"], pa.binary()),
            "state": state,
            "label": c["label"],
            "text": pa.array(c["text"], pa.string()),
        }
    )


def dataset(lo: int, hi: int, blocks: int):
    """A Ray dataset of rows ``lo`` to ``hi`` in ``blocks`` equal pyarrow blocks."""
    import ray.data

    cuts = np.linspace(lo, hi, blocks + 1).astype(int)
    return ray.data.from_arrow([arrow_table(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])])


def check_rows(t, ids) -> None:
    """Table ``t`` holds exactly the rows ``ids`` (in that order), byte for byte."""
    ids = np.asarray(list(ids), dtype=np.int64)
    got = t[:].to_dict()
    assert np.array_equal(got["id"], ids)
    pool = jpegs()
    assert got["image"] == [pool[i % len(pool)] for i in ids.tolist()]
    assert np.array_equal(got["state"], ids[:, None] + np.arange(14, dtype=np.float32) / 16)
    assert np.array_equal(got["label"], ids % 10)
    assert got["text"] == [f"instruction {i}" for i in ids.tolist()]


def chunk_files(path) -> set[str]:
    """The chunk files in a local table's folder."""
    folder = os.path.join(os.fspath(path), "chunks")
    return {f"chunks/{n}" for n in os.listdir(folder) if CHUNK_RE.fullmatch(f"chunks/{n}")}


def named_chunks(path) -> set[str]:
    """Chunk files that any committed version of a local table names."""
    from gpuload.storage import Store
    from gpuload.versions import read_manifest, read_version

    store = Store(os.fspath(path))
    latest = read_manifest(store)
    names = set()
    for v in range(1, latest.version + 1):
        m = read_version(store, v)
        names.update(c.file for c in m.chunks)
    return names
