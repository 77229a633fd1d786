import asyncio

import numpy as np
import pytest

import gpuload
from gpuload.errors import SchemaError, TableExistsError, TableNotFoundError

from ..helpers import jpeg, png, robot_columns


@pytest.fixture
def robot(client):
    cols = robot_columns(300, seed=1)
    t = client.ingest("robot", cols, chunk_bytes=64 << 10)
    return t, cols


def test_ingest_and_random_access(robot):
    t, cols = robot
    assert len(t) == 300
    assert t.num_chunks > 3  # several chunks, so reads cross chunk boundaries
    assert t.columns == ["image", "state", "label", "text"]
    assert t.schema["image"].codec == "jpeg"
    assert t.schema["state"].type_string() == "float32[14]"
    for i in [0, 1, 57, 123, 299, -1, -300]:
        row = t[i]
        j = i % 300
        assert row["image"] == cols["image"][j]
        assert isinstance(row["image"], bytes)
        np.testing.assert_array_equal(row["state"], cols["state"][j])
        assert row["label"] == cols["label"][j]
        assert row["text"] == cols["text"][j]


def test_index_errors(robot):
    t, _ = robot
    with pytest.raises(IndexError, match="out of range"):
        t[300]
    with pytest.raises(IndexError):
        t[-301]
    with pytest.raises(SchemaError, match="unknown column 'nope'"):
        t[0]["nope"]
    with pytest.raises(TypeError):
        t["image"]


def test_to_dict_is_new_and_mutable(robot):
    t, cols = robot
    d = t[5].to_dict()
    assert set(d) == {"image", "state", "label", "text"}
    d["image"] = "changed"
    d["state"][0] = 1e9
    assert t[5]["image"] == cols["image"][5]
    assert t[5]["state"][0] == cols["state"][5][0]


def test_slices_and_lists(robot):
    t, cols = robot
    r = t[10:20]
    assert len(r) == 10
    assert r["image"] == cols["image"][10:20]
    np.testing.assert_array_equal(r["label"], cols["label"][10:20])
    r = t[[3, 1, 4, 1, 299]]
    assert r["image"] == [cols["image"][i] for i in [3, 1, 4, 1, 299]]
    np.testing.assert_array_equal(r["state"], cols["state"][[3, 1, 4, 1, 299]])
    assert [row.index for row in r] == [3, 1, 4, 1, 299]
    d = t[::50].to_dict()
    np.testing.assert_array_equal(d["label"], cols["label"][::50])


def test_get_async_many_rows_concurrently(robot):
    t, cols = robot

    async def main():
        rows = [t[i] for i in range(0, 300, 7)]
        images = await asyncio.gather(*(r.get_async("image") for r in rows))
        labels = await asyncio.gather(*(r.get_async("label") for r in rows))
        states = await asyncio.gather(*(r.get_async("state") for r in rows))
        return images, labels, states

    before = t.fetcher.stats["requests"]
    images, labels, states = asyncio.run(main())
    idx = list(range(0, 300, 7))
    assert images == [cols["image"][i] for i in idx]
    assert list(labels) == [cols["label"][i] for i in idx]
    np.testing.assert_array_equal(np.stack(states), cols["state"][idx])
    # batched: far fewer storage requests than cells fetched
    assert t.fetcher.stats["requests"] - before < 3 * len(idx)


def test_get_async_unknown_column(robot):
    t, _ = robot

    async def main():
        return await t[0].get_async("missing")

    with pytest.raises(SchemaError, match="unknown column"):
        asyncio.run(main())


def test_batches_sequential(robot):
    t, cols = robot
    bs = list(t.batches(64))
    assert len(bs) == 5 == len(t.batches(64))
    assert [len(b["image"]) for b in bs] == [64, 64, 64, 64, 44]
    assert sum((b["image"] for b in bs), []) == cols["image"]
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in bs]), cols["state"])
    assert bs[0]["state"].shape == (64, 14) and bs[0]["state"].dtype == np.float32
    assert len(list(t.batches(64, drop_last=True))) == 4


def test_batches_columns_subset(robot):
    t, cols = robot
    b = next(iter(t.batches(32, columns=["label"])))
    assert list(b) == ["label"]
    with pytest.raises(SchemaError, match="unknown column"):
        t.batches(32, columns=["nope"])
    with pytest.raises(ValueError, match="batch_size"):
        t.batches(0)


def test_batches_shuffle_seeded_per_epoch(robot):
    t, cols = robot
    e0 = np.concatenate(
        [b["label"] for b in t.batches(50, shuffle=True, seed=7, epoch=0, columns=["label"])]
    )
    e0b = np.concatenate(
        [b["label"] for b in t.batches(50, shuffle=True, seed=7, epoch=0, columns=["label"])]
    )
    e1 = np.concatenate(
        [b["label"] for b in t.batches(50, shuffle=True, seed=7, epoch=1, columns=["label"])]
    )
    np.testing.assert_array_equal(e0, e0b)
    assert not np.array_equal(e0, e1)
    # every row exactly once: shuffle the text column, which is unique per row
    texts = sum((b["text"] for b in t.batches(50, shuffle=True, seed=7, columns=["text"])), [])
    assert sorted(texts) == sorted(cols["text"]) and texts != cols["text"]


def test_batches_with_a_seed_reproduce_and_each_pass_is_the_next_epoch(client):
    t = client.ingest("n", {"i": np.arange(200)})
    loader = t.batches(200, shuffle=True, seed=3)
    a = np.concatenate([b["i"] for b in loader])
    b = np.concatenate([b["i"] for b in loader])
    assert not np.array_equal(a, b)  # the second pass is epoch 1
    again = np.concatenate([b["i"] for b in t.batches(200, shuffle=True, seed=3)])
    np.testing.assert_array_equal(a, again)  # a new loader with the same seed starts at epoch 0
    fresh = gpuload.open_table(t.url)
    a2 = np.concatenate([b["i"] for b in fresh.batches(200, shuffle=True, seed=3)])
    np.testing.assert_array_equal(a, a2)


def test_batches_early_break_stops_thread(robot):
    import gc
    import threading
    import time

    t, _ = robot
    before = set(threading.enumerate())
    for _ in range(5):
        for _b in t.batches(8, prefetch=2):
            break
    gc.collect()  # each batches() loader is dropped after its loop: its pool shuts down
    deadline = time.time() + 5
    while time.time() < deadline and any(
        th.is_alive() for th in set(threading.enumerate()) - before
    ):
        time.sleep(0.05)
    assert not [th for th in set(threading.enumerate()) - before if th.is_alive()]


def test_batches_with_image_ops(robot):
    from gpuload import ops

    t, cols = robot
    it = t.batches(
        32,
        image=[ops.CenterCrop(40), ops.Resize((16, 16)), ops.ToLayout("NHWC")],
        columns=["image", "label"],
    )
    b = next(iter(it))
    assert (
        isinstance(b["image"], np.ndarray)
        and b["image"].shape == (32, 16, 16, 3)
        and b["image"].dtype == np.float32
    )
    np.testing.assert_array_equal(b["label"], cols["label"][:32])
    assert b["image"].min() >= 0.0 and b["image"].max() <= 1.0 and b["image"].std() > 0.01


def test_mixed_image_codecs(client):
    rng = np.random.default_rng(3)
    imgs = [jpeg(rng), png(rng), jpeg(rng)]
    t = client.ingest("mix", {"image": imgs})
    assert t.schema["image"].codec == "mixed"
    assert t[1]["image"] == imgs[1]


def test_client_list_delete_modes(client):
    client.ingest("a", {"x": [1, 2]})
    client.ingest("b", {"x": [1.5]})
    assert client.list_tables() == ["a", "b"]
    with pytest.raises(TableExistsError, match="already exists"):
        client.ingest("a", {"x": [3]})
    t = client.ingest("a", {"x": [3, 4]}, mode="append")
    assert list(t[:]["x"]) == [1, 2, 3, 4] and t.version == 2
    t = client.ingest("a", {"x": [9]}, mode="overwrite")
    assert list(t[:]["x"]) == [9] and t.version == 3
    client.delete_table("b")
    assert client.list_tables() == ["a"]
    with pytest.raises(TableNotFoundError, match="no table named 'b'"):
        client.open_table("b")
    with pytest.raises(TableNotFoundError):
        client.delete_table("b")


def test_client_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPULOAD_ROOT", str(tmp_path / "envroot"))
    c = gpuload.Client()
    c.ingest("t", {"x": [1]})
    assert (tmp_path / "envroot" / "t" / "manifest.json").exists()
    assert gpuload.Client().open_table("t")[0]["x"] == 1


def test_table_name_validation(client):
    with pytest.raises(SchemaError, match="invalid table name"):
        client.ingest("../escape", {"x": [1]})
    with pytest.raises(SchemaError, match="invalid table name"):
        client.open_table("a/b")


def test_refresh_sees_new_version_old_snapshot_stable(client):
    t1 = client.ingest("s", {"x": [1, 2]})
    client.ingest("s", {"x": [3]}, mode="append")
    assert len(t1) == 2 and list(t1[:]["x"]) == [1, 2]  # the old snapshot is unchanged
    t2 = t1.refresh()
    assert len(t2) == 3 and t2.version == 2


def test_empty_table_with_schema(client):
    t = client.ingest("e", [], schema={"image": "image/jpeg", "label": "int64"})
    assert len(t) == 0 and list(t.batches(4)) == []
    with pytest.raises(SchemaError, match="empty data"):
        client.ingest("e2", [])


def test_small_and_large_columns_random_access(client):
    """Both read paths: small columns (whole sections cached) and large ones (per-row ranges)."""
    rng = np.random.default_rng(9)
    n = 500
    cols = {
        "big": rng.standard_normal((n, 256)).astype(np.float32),  # 1 KiB a row: per-row ranges
        "tiny": rng.integers(0, 1000, n).astype(np.int16),  # small: section cache
        "blob": [rng.bytes(int(rng.integers(600, 3000))) for _ in range(n)],  # large variable
        "short": [
            rng.bytes(int(rng.integers(0, 40))) for _ in range(n)
        ],  # small variable, some empty
    }
    t = client.ingest("sizes", cols, chunk_bytes=100 << 10)
    assert t.num_chunks > 5
    assert t._is_small(t.schema["tiny"]) and t._is_small(t.schema["short"])
    assert not t._is_small(t.schema["big"]) and not t._is_small(t.schema["blob"])
    idx = rng.permutation(n)[:200]
    d = t[idx].to_dict()
    np.testing.assert_array_equal(d["big"], cols["big"][idx])
    np.testing.assert_array_equal(d["tiny"], cols["tiny"][idx])
    assert d["blob"] == [cols["blob"][i] for i in idx]
    assert d["short"] == [cols["short"][i] for i in idx]
