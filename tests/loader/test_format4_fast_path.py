"""Format 4 through the loaders: the image fast path, the map-style dataset and ``t[i]`` over a
format-4 table deliver the same bytes as over a format-2 copy of the same rows (same chunks,
same seed). The index threshold is lowered (GPULOAD_INDEX_THRESHOLD) so a tiny table crosses
it; images are tiny JPEGs."""

from __future__ import annotations

import json
import multiprocessing
import tracemalloc

import numpy as np
import pytest

import gpuload
from gpuload import ops
from gpuload.errors import FormatError
from gpuload.format import record_dtype, version_path
from gpuload.index import ENV_MAX_SEGMENTS, ENV_THRESHOLD, SegmentIndex
from gpuload.storage import Store
from gpuload.vacuum import vacuum_store
from gpuload.writer import TableWriter

from ..helpers import encode, rewrite_segment, table_root, textured_image, write_table_root

torch = pytest.importorskip("torch")

N = 48
CHUNK = 1  # one row a chunk: 24 chunks a segment, records in blocks of 23 (two per segment)
SIZES = ((20, 28), (26, 18), (17, 33))


@pytest.fixture(scope="module")
def cols():
    rng = np.random.default_rng(11)
    imgs = [
        encode(textured_image(rng, *SIZES[i % len(SIZES)]), "JPEG", quality=90) for i in range(N)
    ]
    return {
        "image": imgs,
        "label": np.arange(N, dtype=np.int64),
        "state": rng.standard_normal((N, 3)).astype(np.float32),
        "text": [f"row {i} " + "x" * (i % 7) for i in range(N)],
    }


def _write(path, data, threshold: str, mp, mode="create"):
    mp.setenv(ENV_THRESHOLD, threshold)
    return gpuload.ingest(path, data, mode=mode, chunk_bytes=CHUNK, progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, cols):
    """The same rows as a format-2 table and as a format-4 table of two segments (created,
    then appended to), with the same chunks."""
    base = tmp_path_factory.mktemp("f4fast")
    mp = pytest.MonkeyPatch()
    try:
        half = {k: v[: N // 2] for k, v in cols.items()}
        rest = {k: v[N // 2 :] for k, v in cols.items()}
        _write(base / "f2", half, "100000", mp)
        _write(base / "f2", rest, "100000", mp, mode="append")
        _write(base / "f4", half, "2", mp)
        _write(base / "f4", rest, "2", mp, mode="append")
    finally:
        mp.undo()
    t2, t4 = gpuload.open_table(base / "f2"), gpuload.open_table(base / "f4")
    assert t2.manifest.format_version == 2 and t4.manifest.format_version == 4
    assert isinstance(t4.index, SegmentIndex) and len(t4.manifest.index.segments) == 2
    assert t2.chunk_rows == t4.chunk_rows and t4.num_chunks == N
    return t2, t4


def _image_ops():
    return [
        ops.RandomResizedCrop(12, scale=(0.3, 1.0)),
        ops.RandomHorizontalFlip(),
        ops.ColorJitter(0.2, 0.2, 0.2),
        ops.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    ]


def _fast_batches(t, **kw):
    loader = gpuload.pytorch(
        t,
        batch_size=10,
        seed=5,
        image=_image_ops(),
        device="cpu",
        decoder="cpu",
        num_threads=1,
        **kw,
    )
    return [_plain(b) for b in loader]


def _plain(batch) -> dict:
    """A batch with tensors as NumPy copies (text and bytes stay lists)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.numpy()
        out[k] = np.array(v, copy=True) if isinstance(v, np.ndarray) else list(v)
    return out


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], np.ndarray):
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
                assert x[k].tobytes() == y[k].tobytes(), k
            else:
                assert x[k] == y[k], k


@pytest.mark.parametrize("shuffle", [False, True, "block"])
def test_image_fast_path_equals_the_format2_copy_byte_for_byte(pair, cols, shuffle):
    t2, t4 = pair
    b2 = _fast_batches(t2, shuffle=shuffle)
    b4 = _fast_batches(t4, shuffle=shuffle)
    _same_batches(b2, b4)
    assert b4[0]["image"].shape == (10, 3, 12, 12)
    labels = np.concatenate([b["label"] for b in b4])
    assert sorted(labels.tolist()) == list(range(N))
    if shuffle is False:
        assert labels.tolist() == list(range(N))


def test_image_fast_path_sharded_equals_the_format2_copy(pair):
    t2, t4 = pair
    for rank in range(2):
        kw = {"shuffle": True, "rank": rank, "world_size": 2}
        _same_batches(_fast_batches(t2, **kw), _fast_batches(t4, **kw))


def test_table_batches_with_image_ops_equal_the_format2_copy(pair):
    t2, t4 = pair

    def run(t):
        it = t.batches(7, shuffle=True, seed=9, image=_image_ops(), device="cpu", decoder="cpu")
        return [_plain(b) for b in it]

    _same_batches(run(t2), run(t4))


def test_map_style_dataset_and_rows_equal_the_format2_copy(pair, cols):
    t2, t4 = pair
    ds2, ds4 = gpuload.pytorch(t2), gpuload.pytorch(t4)
    assert len(ds4) == len(ds2) == N
    for i in (0, 1, 13, N // 2, N - 1, -1, -N):
        r2, r4 = ds2[i], ds4[i]
        assert r4["image"] == r2["image"] == cols["image"][i]
        assert r4["text"] == r2["text"] and r4["label"] == r2["label"]
        assert np.asarray(r4["state"]).tobytes() == np.asarray(r2["state"]).tobytes()
        assert t4[i]["image"] == t2[i]["image"] and t4[i].to_dict()["text"] == cols["text"][i]
    idx = [N - 1, 3, 30, 3, 17, 0, 45]  # chunks out of order, a repeat, both segments
    got4, got2 = ds4.__getitems__(idx), ds2.__getitems__(idx)
    for a, b, i in zip(got4, got2, idx, strict=True):
        assert a["image"] == b["image"] == cols["image"][i] and a["text"] == b["text"]
    with pytest.raises(IndexError):
        ds4[N]
    with pytest.raises(IndexError):
        t4[-N - 1]


def test_map_style_dataset_in_forked_dataloader_workers(pair, cols):
    """A SegmentIndex crosses into DataLoader workers (forked after the parent read records)."""
    _, t4 = pair
    t4[N - 1].to_dict()  # the parent's record cache and fetcher catalog hold entries
    dl = torch.utils.data.DataLoader(
        gpuload.pytorch(t4),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=lambda rows: rows,
        generator=torch.Generator().manual_seed(0),
    )
    seen = [r["text"] for batch in dl for r in batch]
    assert sorted(seen) == sorted(cols["text"])
    imgs = {r["label"]: r["image"] for batch in dl for r in batch}
    assert all(imgs[i] == cols["image"][i] for i in range(N))


def test_image_fast_path_after_a_merge_equals_the_format2_copy(tmp_path, monkeypatch, cols):
    """Three appends with at most two segments: the trailing ones are merged; reads still match
    the format-2 copy."""
    monkeypatch.setenv(ENV_MAX_SEGMENTS, "2")
    parts = [(0, 32), (32, 40), (40, N)]  # the last two merge; the first is kept
    for name, threshold in (("f2", "100000"), ("f4", "2")):
        for k, (lo, hi) in enumerate(parts):
            part = {c: v[lo:hi] for c, v in cols.items()}
            _write(tmp_path / name, part, threshold, monkeypatch, "create" if k == 0 else "append")
    t2, t4 = gpuload.open_table(tmp_path / "f2"), gpuload.open_table(tmp_path / "f4")
    assert len(t4.manifest.index.segments) == 2 and t4.chunk_rows == t2.chunk_rows
    _same_batches(_fast_batches(t2, shuffle=True), _fast_batches(t4, shuffle=True))


# -- bugs found in review (these fail until fixed) ---------------------------------------------
def _child_reads_last_row(t, q) -> None:
    q.put(t[len(t) - 1].to_dict()["text"])


def test_a_forked_child_does_not_deadlock_on_the_fetcher_catalog_lock(pair, cols):
    """Fetcher.ensure_sizes reads the FileCatalog (taking its lock) before ``_check_pid`` gives
    a forked child a fresh lock: a child forked while a parent thread held it hangs forever."""
    _, t4 = pair
    t = gpuload.open_table(t4.url)
    t[0].to_dict()  # the last row's chunk is not sized yet
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    lock = t.fetcher.catalog._lock
    with lock:  # a parent thread inside FileCatalog at the moment of the fork
        proc = ctx.Process(target=_child_reads_last_row, args=(t, q))
        proc.start()
    proc.join(5)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    assert not hung, "the forked child deadlocked on the catalog lock it inherited held"
    assert q.get(timeout=5) == cols["text"][-1]


def _two_segment_table(path, mp):
    n = 40
    data = {"blob": [bytes([i]) * 100 for i in range(n)], "label": np.arange(n)}
    mp.setenv(ENV_THRESHOLD, "0")
    for k, part in enumerate((slice(0, 20), slice(20, n))):
        gpuload.ingest(
            path,
            {c: v[part] for c, v in data.items()},
            mode="create" if k == 0 else "append",
            chunk_bytes=1,
            progress=False,
        )
    return gpuload.open_table(path)


def test_a_chunk_file_named_twice_with_another_size_is_refused_before_allocating(
    tmp_path, monkeypatch
):
    """Two records (in different segments) name the same chunk file; the second claims a huge
    size and sections. The fetcher's catalog is keyed by file name, so the first record's size
    check is taken for the second's, and a 32 TiB buffer is sized from its unchecked section
    (MemoryError) instead of a FormatError."""
    p = tmp_path / "t"
    t = _two_segment_table(p, monkeypatch)
    m = t.manifest
    dt = record_dtype(m.schema)
    seg0 = m.index.segments[0]
    lay0 = seg0.layout(dt.itemsize)
    raw0 = (p / seg0.file).read_bytes()
    first_id = np.frombuffer(raw0[lay0.records_offset : lay0.records_end], dt)[0]["id"]
    big = 1 << 45

    def edit(rows, recs):
        r = recs[0]  # chunk 20 now names chunk 0's file
        r["id"], r["size"], r["page"], r["covers"], r["digest"] = first_id, big, 0, 0, 0
        r["c0.data"], r["c0.offsets"] = (0, big - 4096), (big - 4096, 16)
        r["c0.rowhash"], r["c1.data"] = (-1, 0), (big - 1024, 8)

    rewrite_segment(p, 1, edit)
    t = gpuload.open_table(p)
    assert t[0]["label"] == 0  # chunk 0's file: sized and checked under its own record
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            t[20]["blob"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_a_format4_commit_refuses_a_staged_chunk_the_base_already_has(tmp_path, monkeypatch):
    """Format 2 refuses a commit naming a chunk twice ("the chunk is listed twice"); a format-4
    commit checks only its own new chunks, so it publishes the duplicate and rows repeat."""
    monkeypatch.setenv(ENV_THRESHOLD, "2")
    p = tmp_path / "t"
    t = gpuload.ingest(p, {"label": np.arange(40)}, chunk_bytes=64, progress=False)
    assert t.manifest.format_version == 4
    w = TableWriter(Store(str(p)), t.schema, "append", 1 << 20, "t")
    w.stage([t.index.chunk(0)])
    try:
        with pytest.raises(FormatError, match="twice"):
            w.commit()
    finally:
        assert len(gpuload.open_table(p)) == 40, "a version naming chunk 0 twice was published"


def test_a_lying_column_bytes_hint_does_not_make_row_reads_read_whole_chunks(tmp_path, monkeypatch):
    """The small-column heuristic trusts the root's ``column_bytes``: a root that says 0 for a
    20 KB-a-row column makes every row read fetch (and allocate) whole data sections of every
    chunk a batch touches (bytes per batch grow with chunk size, not row size)."""
    monkeypatch.setenv(ENV_THRESHOLD, "2")
    p = tmp_path / "t"
    rng = np.random.default_rng(0)
    n = 64
    data = {"blob": [rng.bytes(20000) for _ in range(n)], "label": np.arange(n)}
    gpuload.ingest(p, data, chunk_bytes=256 << 10, progress=False)
    root = table_root(p)
    root["column_bytes"]["blob"] = 0
    write_table_root(p, root)
    t = gpuload.open_table(p)
    rows = [1, 20, 40, 63]
    assert t[rows].to_dict()["blob"] == [data["blob"][i] for i in rows]
    assert t.fetcher.stats["bytes"] < 4 * 20000 + (128 << 10), t.fetcher.stats["bytes"]


def test_vacuum_with_a_missing_segment_of_a_recent_version_keeps_everything(
    tmp_path, monkeypatch, cols
):
    """docs/FORMAT.md: a version replaced within the grace period that cannot be read makes
    vacuum keep every chunk, with a warning. A format-4 version whose segment is gone makes
    vacuum raise a FetchError ("chunk index/....idx") instead."""
    p = tmp_path / "t"
    _write(p, cols, "2", monkeypatch)
    _write(p, {k: v[:4] for k, v in cols.items()}, "100000", monkeypatch, mode="overwrite")
    v1 = json.loads((p / version_path(1)).read_text())
    (p / v1["segments"][0]["file"]).unlink()
    report = vacuum_store(Store(str(p)), "t")
    assert report.removed == ()


def test_a_record_with_a_row_hash_offset_near_2_63_is_refused(tmp_path, monkeypatch):
    """``_check_rowhash`` (gpuload/segments.py) tests ``off + ln > limit`` without bounding
    ``off`` first: an offset near 2^63 wraps the int64 sum negative and the record passes its
    checks (the JSON path refuses any offset >= 2^50). Reads then fail with a FetchError on a
    byte range past 2^63, and ``verify`` reports the table ok."""
    monkeypatch.setenv(ENV_THRESHOLD, "0")
    p = tmp_path / "t"
    n = 10
    data = {"blob": [bytes([i]) * 2000 for i in range(n)], "label": np.arange(n)}
    t = gpuload.ingest(p, data, chunk_bytes=1, progress=False)
    (seg,) = t.manifest.index.segments

    def edit(rows, recs):
        recs[3]["c0.rowhash"][0] = (1 << 63) - 4

    rewrite_segment(p, 0, edit)
    t = gpuload.open_table(p)
    with pytest.raises(FormatError, match=rf"segment {seg.file}, chunk 3: column 'blob' row"):
        t[3]["blob"]
