import numpy as np
import pytest

from gpuload.sampling import EpochOrder, Permutation, derive_key, shard_for


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 1000, 4097, 100_003])
def test_permutation_is_a_permutation(n):
    p = Permutation(n, key=derive_key(1, 2))(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))


def test_permutation_deterministic_and_keyed():
    a = Permutation(1000, 5)(np.arange(1000))
    b = Permutation(1000, 5)(np.arange(1000))
    c = Permutation(1000, 6)(np.arange(1000))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.9


def test_permutation_looks_random():
    n = 10_000
    p = Permutation(n, 11)(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.05
    # adjacent positions should land far apart on average (not blocks of neighbours)
    assert np.median(np.abs(np.diff(p))) > n / 10
    # fixed points of a random permutation: about 1
    assert (p == np.arange(n)).sum() < 10


def test_permutation_random_access_matches_full():
    perm = Permutation(5000, 99)
    full = perm(np.arange(5000))
    pos = np.array([4999, 0, 17, 2500])
    np.testing.assert_array_equal(perm(pos), full[pos])
    with pytest.raises(IndexError):
        perm(np.array([5000]))


def _feistel_reference(x: int, n: int, half: int, keys) -> int:
    """The permutation's definition in plain Python integers (one position at a time)."""
    m64, mask = (1 << 64) - 1, (1 << half) - 1
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            z = ((right ^ int(k)) + 0x9E3779B97F4A7C15) & m64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
            z ^= z >> 31
            left, right = right, left ^ (z & mask)
        x = (left << half) | right
        if x < n:
            return x


@pytest.mark.parametrize("seed", range(4))
def test_permutation_matches_its_scalar_definition(seed):
    """The vectorised, block-cached evaluation equals the scalar definition (uint64 wrapping
    arithmetic) for random sizes and keys, through every access pattern the loaders use."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3 * Permutation.BLOCK))
    perm = Permutation(n, int(rng.integers(0, 2**63)))
    want = np.array([_feistel_reference(i, n, perm.half, perm.keys) for i in range(n)])
    np.testing.assert_array_equal(perm(np.arange(n)), want)
    fresh = Permutation(n, 0)
    fresh.__setstate__(perm.__getstate__())  # as unpickled: no blocks kept
    for a in range(0, n, 100):  # in order, as a loader reads an epoch (block cache)
        np.testing.assert_array_equal(fresh(np.arange(a, min(n, a + 100))), want[a : a + 100])
    q = rng.integers(0, n, size=64)  # scattered positions (computed directly)
    np.testing.assert_array_equal(fresh(q), want[q])
    assert len(fresh._blocks) <= Permutation.KEEP


@pytest.mark.parametrize("mode", ["none", "full", "block"])
def test_epoch_order_permutation_and_epochs(mode):
    rows = (100, 37, 250, 1, 90, 90, 12)
    n = sum(rows)
    o0 = EpochOrder(n, mode, seed=3, epoch=0, chunk_rows=rows, window_chunks=2)
    o1 = EpochOrder(n, mode, seed=3, epoch=1, chunk_rows=rows, window_chunks=2)
    a, b = o0.rows(0, n), o1.rows(0, n)
    assert sorted(a.tolist()) == list(range(n))
    np.testing.assert_array_equal(a, EpochOrder(n, mode, 3, 0, rows, 2).rows(0, n))
    if mode == "none":
        np.testing.assert_array_equal(a, np.arange(n))
    else:
        assert not np.array_equal(a, b)
    # resume: any window of positions equals the slice of the full order
    np.testing.assert_array_equal(o0.rows(123, 321), a[123:321])


def test_block_shuffle_stays_within_windows():
    rows = (50,) * 20
    n = sum(rows)
    o = EpochOrder(n, "block", seed=1, epoch=0, chunk_rows=rows, window_chunks=4)
    order = o.rows(0, n)
    chunks = order // 50
    # each window of 200 positions touches exactly 4 chunks
    for w in range(5):
        assert len(set(chunks[w * 200 : (w + 1) * 200].tolist())) == 4
    assert len(set(chunks[:200].tolist())) == 4 and not np.array_equal(order, np.arange(n))


@pytest.mark.parametrize("n,world", [(10, 3), (100, 4), (7, 8), (1000, 7), (0, 2)])
@pytest.mark.parametrize("uneven", ["pad", "drop"])
def test_shards_disjoint_equal_and_cover(n, world, uneven):
    shards = [shard_for(n, r, world, uneven) for r in range(world)]
    counts = {s.count for s in shards}
    assert len(counts) == 1  # every rank the same number of rows
    pos = [s.positions(0, s.count) for s in shards]
    allpos = np.concatenate(pos) if pos else np.array([], np.int64)
    if uneven == "drop":
        assert len(set(allpos.tolist())) == len(allpos)  # disjoint
        assert len(allpos) == (n // world) * world
    else:
        assert set(allpos.tolist()) == set(range(n))  # union covers the table
        assert len(allpos) == -(-n // world) * world
        # only padding repeats, and the ranks' distinct rows are disjoint before wrapping
        before_wrap = [np.arange(s.start, min(s.start + s.count, n)) for s in shards]
        flat = np.concatenate(before_wrap)
        assert len(set(flat.tolist())) == len(flat)


def test_shard_arguments_validated():
    with pytest.raises(ValueError):
        shard_for(10, 3, 3)
    with pytest.raises(ValueError):
        shard_for(10, 0, 2, "nope")
