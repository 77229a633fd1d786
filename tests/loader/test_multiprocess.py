"""Tables survive pickling and fork/spawn/forkserver; every child runs under a timeout."""

import multiprocessing as mp
import pickle

import numpy as np
import pytest

import gpuload

from ..helpers import robot_columns

TIMEOUT = 120


def _child_read(table, indices, q):
    try:
        out = [(table[i]["text"], int(table[i]["label"])) for i in indices]
        texts = sum((b["text"] for b in table.batches(16, shuffle=True, seed=5, epoch=0)), [])
        q.put(("ok", out, texts))
    except BaseException as e:  # report, never hang
        q.put(("error", repr(e), None))


def _run(ctx_name, table, indices):
    ctx = mp.get_context(ctx_name)
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(table, indices, q))
    p.start()
    try:
        status, out, texts = q.get(timeout=TIMEOUT)
    finally:
        p.join(timeout=TIMEOUT)
        if p.is_alive():
            p.kill()
            pytest.fail(f"{ctx_name} child hung")
    assert status == "ok", out
    return out, texts


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_table_in_child_processes(tmp_path, method):
    cols = robot_columns(64)
    t = gpuload.ingest(tmp_path / "t", cols, chunk_bytes=16 << 10)
    # use the table in the parent first: its thread pool, fds and prefetch threads exist now
    parent = sum((b["text"] for b in t.batches(16, shuffle=True, seed=5, epoch=0)), [])
    _ = [t[i]["image"] for i in range(0, 64, 5)]
    out, texts = _run(method, t, [0, 13, 63])
    assert out == [(cols["text"][i], int(cols["label"][i])) for i in [0, 13, 63]]
    assert texts == parent


@pytest.mark.s3
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_s3_table_in_child_processes(s3, tmp_path, method):
    cols = robot_columns(40)
    url = s3.url(f"mp-{method}")
    t = gpuload.ingest(
        url, cols, storage_options=s3.storage_options, mode="overwrite", cache=str(tmp_path / "c")
    )
    assert t[3]["text"] == cols["text"][3]  # the parent's s3fs session and event loop are live
    out, _ = _run(method, t, [1, 39])
    assert out == [(cols["text"][i], int(cols["label"][i])) for i in [1, 39]]


def test_pickle_roundtrip(tmp_path):
    cols = robot_columns(10)
    t = gpuload.ingest(tmp_path / "t", cols)
    t[0]["image"]
    t2 = pickle.loads(pickle.dumps(t))
    assert t2[4]["image"] == cols["image"][4]
    np.testing.assert_array_equal(t2[:]["state"], cols["state"])
    assert pickle.loads(pickle.dumps(t[3])).to_dict()["text"] == cols["text"][3]
