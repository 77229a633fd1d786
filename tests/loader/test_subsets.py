"""Subsets through every front door (issue 11): ``t[a:b]``, ``t[[...]]``, a boolean mask and
``indices=`` give loaders over those rows only, with shuffling, sharding and resume running over
the subset; ``t.split()`` makes deterministic, disjoint parts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")

import gpuload  # noqa: E402

from ..helpers import epoch_ids as _epoch  # noqa: E402
from ..helpers import ids_of as _ids  # noqa: E402
from .test_front_door import BS, FRONT_DOORS, RESUMABLE, N, _resumed  # noqa: E402

RNG = np.random.default_rng(42)
PICKED = RNG.choice(N, size=37, replace=False)  # unsorted positions
MASK = RNG.random(N) < 0.4

SUBSETS = {
    "slice": (lambda t: t[10:70], list(range(10, 70))),
    "list": (lambda t: t[PICKED.tolist()], sorted(PICKED.tolist())),
    "negative": (lambda t: t[[-1, -2, 0, 5]], sorted([N - 1, N - 2, 0, 5])),
    "mask": (lambda t: t[MASK], np.flatnonzero(MASK).tolist()),
}


def _door(door, subset, t, **kw):
    """A front door over a subset: given as rows of the table, or as ``indices=``."""
    make, _ = SUBSETS[subset]
    return FRONT_DOORS[door](make(t), **kw)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("door", FRONT_DOORS)
def test_every_row_of_the_subset_once_per_epoch(ids_table, door, subset):
    want = SUBSETS[subset][1]
    loader = _door(door, subset, ids_table, shuffle=True, seed=3)
    e0, e1 = _epoch(loader), _epoch(loader)
    assert sorted(e0) == sorted(e1) == want
    if len(want) > 8:
        assert e0 != e1 and e0 != want


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_indices_option_equals_indexing_the_table(ids_table, door):
    by_rows = _epoch(FRONT_DOORS[door](ids_table[PICKED.tolist()], shuffle=True, seed=9))
    by_option = _epoch(FRONT_DOORS[door](ids_table, indices=PICKED, shuffle=True, seed=9))
    assert by_rows == by_option and sorted(by_rows) == sorted(PICKED.tolist())


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_shards_of_a_subset_are_disjoint_and_cover_it(ids_table, door):
    world, sub = 3, ids_table[5:90]
    parts = [
        _epoch(
            FRONT_DOORS[door](sub, shuffle=True, seed=1, rank=r, world_size=world, uneven="drop")
        )
        for r in range(world)
    ]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == (85 // world) * world
    assert set(flat) <= set(range(5, 90))


@pytest.mark.parametrize("door", RESUMABLE)
def test_resume_over_a_subset_at_random_points(ids_table, door):
    sub = ids_table[PICKED.tolist()]
    rng = np.random.default_rng(5)
    whole = _epoch(FRONT_DOORS[door](sub, shuffle=True, seed=4))
    for stop in rng.integers(1, -(-len(PICKED) // BS), size=3).tolist():
        first = FRONT_DOORS[door](sub, shuffle=True, seed=4)
        it = iter(first)
        seen = [i for _ in range(stop) for i in _ids(next(it))]
        state = first.state_dict()
        rest = _epoch(_resumed(FRONT_DOORS[door](sub, shuffle=True, seed=4), state))
        assert seen + rest == whole, (door, stop)


def test_a_resume_over_other_rows_is_refused(ids_table):
    a = ids_table[10:50].batches(BS, shuffle=True, seed=0, columns=["id"])
    next(iter(a))
    b = ids_table[11:51].batches(BS, shuffle=True, seed=0, columns=["id"])
    with pytest.raises(ValueError, match="subset"):
        b.load_state_dict(a.state_dict())
    whole = ids_table.batches(BS, shuffle=True, seed=0, columns=["id"])
    with pytest.raises(ValueError, match="cannot resume"):
        whole.load_state_dict(a.state_dict())


def test_map_style_dataset_over_a_subset(ids_table):
    ds = gpuload.pytorch(ids_table[20:50], columns=["id"])
    assert len(ds) == 30 and int(ds[0]["id"]) == 20 and int(ds[-1]["id"]) == 49
    with pytest.raises(IndexError, match="out of range"):
        ds[30]
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=BS, shuffle=True, generator=g)
    assert sorted(_epoch(loader)) == list(range(20, 50))


def test_subset_errors_name_the_table(ids_table):
    with pytest.raises(IndexError, match=f"out of range for table '{ids_table.name}'"):
        ids_table.batches(BS, indices=[0, N])
    with pytest.raises(IndexError, match="boolean mask"):
        gpuload.pytorch(ids_table, indices=np.ones(N + 1, bool), batch_size=BS)
    with pytest.raises(TypeError, match="indices must be"):
        ids_table.batches(BS, indices=[0.5, 1.5])
    with pytest.raises(ValueError, match="already a subset"):
        ids_table[:10].batches(BS, indices=[1, 2])


def test_split_is_deterministic_disjoint_and_complete(ids_table):
    parts = ids_table.split([0.8, 0.1, 0.1], seed=0)
    ids = [sorted(_epoch(p.batches(BS, columns=["id"]))) for p in parts]
    assert [len(x) for x in ids] == [81, 10, 10]  # 80.8 + 10.1 + 10.1: the remainder in turn
    assert sorted(i for x in ids for i in x) == list(range(N))
    again = ids_table.split([0.8, 0.1, 0.1], seed=0)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(parts, again))
    other = ids_table.split([0.8, 0.1, 0.1], seed=1)
    assert not np.array_equal(parts[1].indices, other[1].indices)
    assert ids[1] != list(range(81, 91))  # drawn, not the last rows
    assert [len(p) for p in ids_table.split([0.0, 0.5, 0.5])] == [0, 51, 50]  # none for 0
    counts = ids_table.split([90, 11], seed=0)
    assert [len(p) for p in counts] == [90, 11]
    for bad in ([0.5, 0.4], [-0.1, 1.1], [50, 50]):
        with pytest.raises(ValueError, match="split fractions"):
            ids_table.split(bad)
