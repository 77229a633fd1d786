"""Ragged columns through every loader (issue 15): lists of arrays, or padded with lengths."""

from __future__ import annotations

import numpy as np
import pytest

import gpuload


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(4)
    n = 23
    lens = rng.integers(0, 7, size=n)
    lens[5] = 9
    return {
        "episode_index": np.repeat(np.arange(5), [4, 5, 6, 3, 5]).astype(np.int64),
        "id": np.arange(n, dtype=np.int64),
        "traj": [rng.standard_normal((k, 3)).astype(np.float32) for k in lens],
        "tokens": [rng.integers(0, 1000, size=k + 1).astype(np.int32) for k in lens],
    }


@pytest.fixture(scope="module")
def table(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("ragged")
    t = gpuload.ingest(str(root / "t"), data, chunk_bytes=512)
    assert t.schema["traj"].type_string() == "float32[*,3]"
    return t


def test_batches_give_lists_of_arrays(table, data):
    got = [a for b in table.batches(4) for a in b["traj"]]
    assert len(got) == len(data["traj"])
    for g, w in zip(got, data["traj"]):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("pad", [True, 12])
def test_padded_batches_with_lengths(table, data, pad):
    for b in table.batches(5, shuffle=True, seed=1, pad_ragged=pad):
        ids = b["id"]
        width = max(len(data["traj"][i]) for i in ids) if pad is True else pad
        assert b["traj"].shape == (len(ids), width, 3) and b["traj"].dtype == np.float32
        assert b["tokens"].shape == (
            len(ids),
            max(len(data["tokens"][i]) for i in ids) if pad is True else pad,
        )
        for j, i in enumerate(ids):
            k = len(data["traj"][i])
            assert b["traj_length"][j] == k and b["tokens_length"][j] == k + 1
            np.testing.assert_array_equal(b["traj"][j, :k], data["traj"][i])
            assert not b["traj"][j, k:].any()  # zeros past the end


def test_a_row_longer_than_the_fixed_length_is_an_error(table):
    with pytest.raises(ValueError, match=r"column 'tokens'.*row .* more than max_len=4"):
        list(table.batches(23, pad_ragged=4, columns=["tokens"]))


def test_windows_of_ragged_rows(table, data):
    kw = dict(episode="episode_index", window={"traj": [-1, 0]}, pad_ragged=True)
    for b in table.batches(6, **kw):
        assert b["traj"].ndim == 4 and b["traj_length"].shape == (len(b["id"]), 2)
        for j, i in enumerate(b["id"]):
            prev = i - 1 if not b["traj_is_pad"][j, 0] else i
            for k, r in enumerate((prev, i)):
                n = len(data["traj"][r])
                assert b["traj_length"][j, k] == n
                np.testing.assert_array_equal(b["traj"][j, k, :n], data["traj"][r])


def test_torch_doors(table, data):
    torch = pytest.importorskip("torch")
    b = next(iter(gpuload.pytorch(table, batch_size=8, pad_ragged=True)))
    assert isinstance(b["traj"], torch.Tensor) and b["traj"].shape[0] == 8
    b = next(iter(gpuload.pytorch(table, batch_size=8)))
    assert all(isinstance(x, torch.Tensor) for x in b["traj"])  # one tensor per row
    np.testing.assert_array_equal(b["traj"][5].numpy(), data["traj"][5])
    ds = gpuload.pytorch(table)
    np.testing.assert_array_equal(np.asarray(ds[5]["traj"]), data["traj"][5])


def test_tensorflow_needs_padding_and_gets_it(table, data):
    pytest.importorskip("tensorflow")
    with pytest.raises(ValueError, match="pad_ragged=True"):
        gpuload.tensorflow(table, batch_size=4)
    ds = gpuload.tensorflow(
        table, batch_size=4, pad_ragged=6, columns=["id", "tokens"], drop_last=True
    )
    with pytest.raises(Exception, match="more than max_len=6"):
        list(ds)  # row 5 has 10 tokens
    ds = gpuload.tensorflow(table, batch_size=4, pad_ragged=True, columns=["id", "traj"])
    assert ds.element_spec["traj"].shape.as_list() == [None, None, 3]
    rows = list(gpuload.tensorflow(table, pad_ragged=True, columns=["id", "traj"]))
    assert len(rows) == len(data["traj"])
    for r in rows:
        i, k = int(r["id"]), int(r["traj_length"])
        np.testing.assert_array_equal(r["traj"].numpy()[:k], data["traj"][i])


def test_pad_ragged_refused_where_it_would_do_nothing(table):
    with pytest.raises(ValueError, match="none of the loaded columns is ragged"):
        table.batches(4, pad_ragged=True, columns=["id"])
    with pytest.raises(ValueError, match="per-row transform"):
        gpuload.pytorch(table, batch_size=4, pad_ragged=True, transform=lambda r: r)
    with pytest.raises(ValueError, match="pad_ragged must be"):
        table.batches(4, pad_ragged=0)
