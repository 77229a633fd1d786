"""The PyTorch front door: fast path, DataLoader with workers (every start method, under a
timeout), the self-shuffling iterable form, resume, sharding and errors."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuload  # noqa: E402
from gpuload.errors import SchemaError, TableNotFoundError, TransformError  # noqa: E402

TIMEOUT = 180
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def robot(robot_table):
    return robot_table(203, seed=4, chunk_bytes=48 << 10)


def child(cfg):
    p = subprocess.run(
        [sys.executable, "-m", "tests.adapters._torch_child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the batched fast path --------------------------------------------------------------------
def test_fast_path_batches_are_tensors(robot):
    t, cols = robot
    loader = gpuload.pytorch(t, batch_size=32, device="cpu")
    assert len(loader) == 7
    got = list(loader)
    assert [len(b["image"]) for b in got] == [32] * 6 + [11]
    b = got[0]
    assert isinstance(b["label"], torch.Tensor) and b["label"].dtype == torch.int64
    assert b["state"].shape == (32, 14) and b["state"].dtype == torch.float32
    assert isinstance(b["image"][0], bytes) and isinstance(b["text"][0], str)
    assert sum((x["image"] for x in got), []) == cols["image"]
    np.testing.assert_array_equal(torch.cat([x["state"] for x in got]).numpy(), cols["state"])
    assert len(gpuload.pytorch(t, batch_size=32, drop_last=True)) == 6
    assert t.pytorch(batch_size=32).loader.spec.batch_size == 32  # Table method == function


def test_fast_path_shuffle_seeded_and_per_epoch(robot):
    t, cols = robot

    def epoch_texts(loader):
        return sum((b["text"] for b in loader), [])

    a = gpuload.pytorch(t, batch_size=50, shuffle=True, seed=1, columns=["text"])
    e0, e1 = epoch_texts(a), epoch_texts(a)
    assert sorted(e0) == sorted(cols["text"]) == sorted(e1)
    assert e0 != e1 and e0 != cols["text"]
    b = gpuload.pytorch(t, batch_size=50, shuffle=True, seed=1, columns=["text"])
    assert epoch_texts(b) == e0  # same seed, same epoch -> same order
    b.set_epoch(1)
    assert epoch_texts(b) == e1


@pytest.mark.parametrize("stop_after", [0, 1, 3, 6])
def test_resume_mid_epoch_exact(robot, stop_after):
    t, _ = robot
    full = gpuload.pytorch(t, batch_size=30, shuffle=True, seed=5, columns=["text"])
    full.set_epoch(2)
    reference = [b["text"] for b in full]
    run = gpuload.pytorch(t, batch_size=30, shuffle=True, seed=5, columns=["text"])
    run.set_epoch(2)
    seen = []
    if stop_after:
        for i, b in enumerate(run):
            seen.append(b["text"])  # the batch was used: a checkpoint now counts it as seen
            if i + 1 == stop_after:
                break
    state = run.state_dict()
    assert state["epoch"] == 2 and state["position"] == 30 * stop_after
    resumed = gpuload.pytorch(t, batch_size=30, shuffle=True, seed=5, columns=["text"])
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    rest = [b["text"] for b in resumed]
    assert seen + rest == reference
    after = resumed.state_dict()
    assert after["epoch"] == 3 and after["position"] == 0


def test_resume_rejects_mismatch(robot):
    t, _ = robot
    a = gpuload.pytorch(t, batch_size=30, shuffle=True, seed=5)
    b = gpuload.pytorch(t, batch_size=30, shuffle=True, seed=6)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("world,uneven", [(2, "pad"), (3, "pad"), (3, "drop"), (4, "drop")])
def test_rank_shards_disjoint_equal_cover(robot, world, uneven):
    t, cols = robot
    per_rank = []
    for r in range(world):
        loader = gpuload.pytorch(
            t,
            batch_size=16,
            shuffle=True,
            seed=9,
            columns=["text"],
            rank=r,
            world_size=world,
            uneven=uneven,
        )
        batches = list(loader)
        per_rank.append((len(batches), sum((b["text"] for b in batches), [])))
    assert len({n for n, _ in per_rank}) == 1  # every rank the same number of batches
    allrows = sum((rows for _, rows in per_rank), [])
    if uneven == "drop":
        assert len(set(allrows)) == len(allrows) == (len(t) // world) * world
    else:
        assert set(allrows) == set(cols["text"])  # the union covers the table


def test_transform_receives_row_and_errors_name_the_row(robot):
    t, cols = robot

    def fn(row):
        d = row.to_dict()
        d["label"] = d["label"] * 10
        d["n"] = len(d["image"])
        return d

    b = next(iter(gpuload.pytorch(t, fn, batch_size=8)))
    assert b["label"].tolist() == [int(x) * 10 for x in cols["label"][:8]]
    assert b["n"].tolist() == [len(x) for x in cols["image"][:8]]

    def bad(row):
        if row.index == 77:
            raise ValueError("bad pixel")
        return row.to_dict()

    with pytest.raises(TransformError, match=r"row 77 of table 'robot': ValueError: bad pixel"):
        for _ in gpuload.pytorch(t, bad, batch_size=8):
            pass
    loader = gpuload.pytorch(t, bad, batch_size=8, on_error="skip")
    n = sum(len(b["label"]) for b in loader)
    assert n == len(t) - 1 and loader.stats().skipped == 1


def test_construction_errors(robot, tmp_path):
    t, _ = robot
    with pytest.raises(ValueError, match="batch_size"):
        gpuload.pytorch(t, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        gpuload.pytorch(t, batch_size=-3)
    with pytest.raises(SchemaError, match="unknown column 'nope'"):
        gpuload.pytorch(t, batch_size=8, columns=["nope"])
    with pytest.raises(SchemaError, match="unknown column"):
        gpuload.pytorch(t, columns=["nope"])
    with pytest.raises(TableNotFoundError):
        gpuload.pytorch(str(tmp_path / "missing"), batch_size=8)
    with pytest.raises(TableNotFoundError, match="no table named"):
        gpuload.pytorch("no_such_table_here", batch_size=8)


def test_early_break_leaves_no_threads(robot):
    t, _ = robot
    before = set(threading.enumerate())
    loader = gpuload.pytorch(t, batch_size=4, prefetch=4, num_threads=3)
    for _ in range(5):
        for _b in loader:
            break
    mine = set(threading.enumerate()) - before
    assert len(mine) <= 3  # the loader's own pool, reused: repeated breaks add no threads
    loader.close()
    deadline = time.time() + 5
    while time.time() < deadline and any(th.is_alive() for th in mine):
        time.sleep(0.05)
    assert not any(th.is_alive() for th in mine)


def test_bounded_prefetch_does_not_run_ahead(robot):
    t, _ = robot
    loader = gpuload.pytorch(t, batch_size=4, prefetch=2, num_threads=1, columns=["label"])
    it = iter(loader)
    next(it)
    time.sleep(0.3)
    # at most window batches assembled beyond the one consumed
    assert loader.stats().batches == 1
    it.close()


# -- torch DataLoader over the map-style dataset, real worker processes -------------------------
def test_map_dataset_getitem_and_getitems(robot):
    t, cols = robot
    ds = gpuload.pytorch(t)
    assert len(ds) == 203
    r = ds[5]
    assert r["image"] == cols["image"][5] and r["label"] == cols["label"][5]
    rows = ds.__getitems__([9, 2, 200])
    assert [x["text"] for x in rows] == [cols["text"][i] for i in (9, 2, 200)]
    with pytest.raises(ValueError, match="shuffle=True to torch's DataLoader"):
        gpuload.pytorch(t, shuffle=True)


def test_dataloader_shuffle_workers0(robot):
    t, cols = robot
    out = child({"table": t.url, "kind": "map", "batch_size": 16, "workers": 0, "epochs": 2})
    e0, e1 = out["epochs"]
    assert sorted(e0) == sorted(cols["text"]) == sorted(e1) and e0 != e1


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dataloader_shuffle_with_workers_never_hangs(robot, method):
    """Two epochs with workers started anew each epoch, then two with persistent workers (one
    child process runs both, under the one timeout): every row once per epoch, reshuffled."""
    t, cols = robot
    out = child(
        {
            "table": t.url,
            "kind": "map",
            "batch_size": 16,
            "workers": 2,
            "method": method,
            "epochs": 2,
            "runs": [{"persistent": False}, {"persistent": True}],
        }
    )
    assert len(out["runs"]) == 2
    for persistent, run in zip((False, True), out["runs"], strict=True):
        for texts in run["epochs"]:
            # every row once, no duplicates or drops
            assert sorted(texts) == sorted(cols["text"]), persistent
        assert run["epochs"][0] != run["epochs"][1], persistent


def test_transform_error_reaches_loop_from_workers(robot):
    """From forked workers, then from spawned ones (one child process runs both)."""
    t, _ = robot
    methods = ["fork", "spawn"]
    out = child(
        {"table": t.url, "kind": "transform_error", "workers": 2, "bad_row": 42,
         "runs": [{"method": m} for m in methods]}
    )  # fmt: skip
    assert len(out["runs"]) == len(methods)
    for method, run in zip(methods, out["runs"], strict=True):
        assert run["error"] and "row 42 of table 'robot'" in run["error"], method


# -- the iterable form ----------------------------------------------------------------------
def test_iterable_shuffles_and_shards_across_workers(robot):
    """In the main process, over 2 forked workers, then over 3 spawned ones (one child process
    runs the three in turn): each epoch every row once, reshuffled by set_epoch."""
    t, cols = robot
    configs = [(0, None), (2, "fork"), (3, "spawn")]
    out = child(
        {
            "table": t.url,
            "kind": "iterable",
            "epochs": 2,
            "set_epoch": True,
            "runs": [{"workers": w, "method": m} for w, m in configs],
        }
    )
    assert len(out["runs"]) == len(configs)
    for config, run in zip(configs, out["runs"], strict=True):
        e0, e1 = run["epochs"]
        # no duplicate, no drop
        assert len(e0) == len(cols["text"]) and sorted(e0) == sorted(cols["text"]), config
        assert sorted(e1) == sorted(cols["text"]) and e0 != e1 and e0 != cols["text"], config


def test_iterable_persistent_workers_advance_epoch_without_set_epoch(robot):
    t, cols = robot
    out = child(
        {
            "table": t.url,
            "kind": "iterable",
            "workers": 2,
            "method": "fork",
            "persistent": True,
            "epochs": 2,
        }
    )
    e0, e1 = out["epochs"]
    assert sorted(e0) == sorted(e1) == sorted(cols["text"]) and e0 != e1


def test_iterable_in_process(robot):
    t, cols = robot
    ds = gpuload.pytorch(
        t, iterable=True, shuffle=True, seed=2, columns=["text"], rank=1, world_size=2
    )
    rows = [r["text"] for r in ds]
    other = [
        r["text"]
        for r in gpuload.pytorch(
            t, iterable=True, shuffle=True, seed=2, columns=["text"], rank=0, world_size=2
        )
    ]
    assert len(rows) == len(other) == len(ds) == 102
    assert set(rows) | set(other) == set(cols["text"])


# -- loopback S3: random access after the first epoch ------------------------------------------
@pytest.mark.s3
def test_dataloader_shuffle_from_s3(s3, robot, tmp_path):
    t, cols = robot
    url = s3.url("loader-robot")
    gpuload.ingest(url, t, storage_options=s3.storage_options, mode="overwrite")
    out = child(
        {
            "table": url,
            "storage_options": s3.storage_options,
            "cache": str(tmp_path / "c"),
            "kind": "map",
            "batch_size": 16,
            "workers": 2,
            "method": "fork",
            "epochs": 2,
        }
    )
    for texts in out["epochs"]:
        assert sorted(texts) == sorted(cols["text"])


def test_torch_export_zero_copy():
    from gpuload.collate import aligned_empty
    from gpuload.export import to_torch

    a = aligned_empty((8, 3, 4, 4), np.float32)
    a[...] = 1.5
    out = to_torch({"x": a, "b": [b"x"], "s": ["y"]})
    assert out["x"].data_ptr() == a.ctypes.data  # same memory
    assert out["b"] == [b"x"] and out["s"] == ["y"]
