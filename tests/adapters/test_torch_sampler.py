"""gpuload.torch_sampler: resume on the map-style path (issue 11). Seeded, per-epoch, DDP-aware
indices for torch's DataLoader; exact resume through torchdata's StatefulDataLoader with worker
processes, and through the sampler's own state without workers. Every resume check compares the
rows seen before the checkpoint plus the rows after it with one uninterrupted epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuload  # noqa: E402

from ..conftest import IDS_ROWS as N  # noqa: E402
from ..helpers import epoch_ids, ids_of  # noqa: E402

BS = 8


def _loader(ds, sampler, workers=0, stateful=False):
    kw = dict(batch_size=BS, sampler=sampler, num_workers=workers)
    if workers:
        kw["multiprocessing_context"] = "fork"
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(ds, **kw)
    return torch.utils.data.DataLoader(ds, **kw)


def test_every_row_once_new_order_each_epoch_and_seeds_reproduce(ids_table):
    ds = gpuload.pytorch(ids_table, columns=["id"])
    s = gpuload.torch_sampler(ids_table, seed=3)
    dl = _loader(ds, s)
    e0, e1 = epoch_ids(dl), epoch_ids(dl)
    assert sorted(e0) == sorted(e1) == list(range(N)) and e0 != e1
    again = _loader(ds, gpuload.torch_sampler(ids_table, seed=3))
    assert [epoch_ids(again), epoch_ids(again)] == [e0, e1]
    s2 = gpuload.torch_sampler(ids_table, seed=3)
    s2.set_epoch(1)
    assert epoch_ids(_loader(ds, s2)) == e1
    plain = gpuload.torch_sampler(ids_table, shuffle=False)
    assert list(plain) == list(range(N))
    # shuffled by default, as torch's RandomSampler, through every door
    assert list(ids_table.torch_sampler(seed=3)) == list(gpuload.torch_sampler(ids_table, seed=3))
    assert list(ids_table[:50].torch_sampler(seed=3)) != list(range(50))


def test_ranks_get_disjoint_equal_shares(ids_table):
    shares = [
        list(gpuload.torch_sampler(ids_table, seed=1, rank=r, world_size=3)) for r in range(3)
    ]
    assert len({len(x) for x in shares}) == 1 and len(shares[0]) == -(-N // 3)
    assert set().union(*map(set, shares)) == set(range(N))
    unseeded = [list(gpuload.torch_sampler(ids_table, rank=r, world_size=2)) for r in range(2)]
    assert set(unseeded[0]) | set(unseeded[1]) == set(range(N))  # ranks agree without a seed


def test_sampler_over_a_subset_indexes_the_subset_dataset(ids_table):
    rows = ids_table[30:80]
    ds, s = gpuload.pytorch(rows, columns=["id"]), gpuload.torch_sampler(rows, seed=0)
    assert len(s) == 50 and all(0 <= i < 50 for i in s)
    assert sorted(epoch_ids(_loader(ds, s))) == list(range(30, 80))


def test_resume_without_workers_from_the_samplers_state(ids_table):
    ds = gpuload.pytorch(ids_table, columns=["id"])
    whole = epoch_ids(_loader(ds, gpuload.torch_sampler(ids_table, seed=5)))
    for stop in (1, 6, 12):
        s = gpuload.torch_sampler(ids_table, seed=5)
        it = iter(_loader(ds, s))
        seen = [i for _ in range(stop) for i in ids_of(next(it))]
        state = json.loads(json.dumps(s.state_dict()))
        s2 = gpuload.torch_sampler(ids_table)  # no seed: the saved one is adopted
        s2.load_state_dict(state)
        assert seen + epoch_ids(_loader(ds, s2)) == whole, stop
        assert sorted(epoch_ids(_loader(ds, s2))) == list(range(N))  # then the next epoch


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seeded", [True, False])
def test_stateful_dataloader_with_two_workers_resumes_exactly(ids_table, seeded):
    pytest.importorskip("torchdata")
    ds = gpuload.pytorch(ids_table, columns=["id"])
    kw = {"seed": 9} if seeded else {}
    rng = np.random.default_rng(1)
    for stop in rng.integers(1, -(-N // BS), size=2).tolist():
        first_sampler = gpuload.torch_sampler(ids_table, **kw)
        first = _loader(ds, first_sampler, workers=2, stateful=True)
        it = iter(first)
        seen = [i for _ in range(stop) for i in ids_of(next(it))]
        state = first.state_dict()
        del it
        resumed = _loader(ds, gpuload.torch_sampler(ids_table), workers=2, stateful=True)
        resumed.load_state_dict(state)
        rest = epoch_ids(resumed)
        whole = epoch_ids(
            _loader(ds, gpuload.torch_sampler(ids_table, seed=first_sampler.seed), workers=2)
        )
        assert seen + rest == whole, stop
        assert sorted(epoch_ids(resumed)) == list(range(N))  # the next epoch is whole


def test_a_resume_that_does_not_fit_is_refused(ids_table):
    s = gpuload.torch_sampler(ids_table, seed=1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="cannot resume: the saved sampler had num_rows"):
        gpuload.torch_sampler(ids_table[:50], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        gpuload.torch_sampler(ids_table, seed=1, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        s.load_state_dict({**state, "yielded": N + 1})


# -- the iterable dataset ------------------------------------------------------------------------
def test_iterable_dataset_resumes_from_its_own_state(ids_table):
    """Without workers the DataLoader pulls exactly a batch of rows at a time, so the dataset's
    state after k batches resumes after exactly those rows (a drawn seed travels in it)."""
    for stop in (1, 5, 12):
        ds = gpuload.pytorch(ids_table, iterable=True, shuffle=True, columns=["id"])
        it = iter(torch.utils.data.DataLoader(ds, batch_size=BS))
        seen = [i for _ in range(stop) for i in ids_of(next(it))]
        state = json.loads(json.dumps(ds.state_dict()))
        whole = epoch_ids(
            torch.utils.data.DataLoader(
                gpuload.pytorch(ids_table, iterable=True, shuffle=True, seed=ds.seed,
                                columns=["id"]), batch_size=BS)
        )  # fmt: skip
        again = gpuload.pytorch(ids_table, iterable=True, shuffle=True, columns=["id"])
        again.load_state_dict(state)
        dl = torch.utils.data.DataLoader(again, batch_size=BS)
        assert seen + epoch_ids(dl) == whole, stop
        assert sorted(epoch_ids(dl)) == list(range(N))  # then the next epoch, whole


@pytest.mark.timeout(240)
def test_iterable_dataset_with_stateful_dataloader_and_two_workers(ids_table):
    pytest.importorskip("torchdata")
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        ds = gpuload.pytorch(ids_table, iterable=True, shuffle=True, seed=6, columns=["id"])
        return StatefulDataLoader(ds, batch_size=BS, num_workers=2, multiprocessing_context="fork")

    whole = epoch_ids(make())
    assert sorted(whole) == list(range(N))
    for stop in (2, 7):
        first = make()
        it = iter(first)
        seen = [i for _ in range(stop) for i in ids_of(next(it))]
        state = first.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        assert seen + epoch_ids(resumed) == whole, stop


def test_iterable_resume_with_a_skipping_transform_counts_rows_not_outputs(ids_table):
    """Rows a transform skips still count as handed out: the resume neither repeats nor
    loses any."""

    def odd_only(row):
        if int(row["id"]) % 2 == 0:
            raise ValueError("even")
        return {"id": row["id"]}

    def make(**kw):
        return gpuload.pytorch(ids_table, odd_only, iterable=True, shuffle=True, seed=2,
                               on_error="skip", columns=["id"], **kw)  # fmt: skip

    whole = epoch_ids(torch.utils.data.DataLoader(make(), batch_size=BS))
    ds = make()
    it = iter(torch.utils.data.DataLoader(ds, batch_size=BS))
    seen = [i for _ in range(3) for i in ids_of(next(it))]
    again = make()
    again.load_state_dict(ds.state_dict())
    assert seen + epoch_ids(torch.utils.data.DataLoader(again, batch_size=BS)) == whole


def test_set_epoch_of_the_saved_epoch_keeps_the_resume_position(ids_table):
    """A training loop calls set_epoch(e) at each epoch's start, also the first one after a
    resume: that must not restart the saved epoch (every resumable path)."""

    def fast():
        return gpuload.pytorch(ids_table, batch_size=BS, shuffle=True, seed=1, columns=["id"])

    def iterable():
        return gpuload.pytorch(ids_table, iterable=True, shuffle=True, seed=1, columns=["id"])

    def sampler():
        return gpuload.torch_sampler(ids_table, seed=1)

    ds = gpuload.pytorch(ids_table, columns=["id"])
    passes = {
        "fast path": (fast, lambda x: x),
        "iterable": (iterable, lambda x: torch.utils.data.DataLoader(x, batch_size=BS)),
        "sampler": (sampler, lambda s: torch.utils.data.DataLoader(ds, batch_size=BS, sampler=s)),
    }
    for name, (make, loader_of) in passes.items():
        first = make()
        first.set_epoch(2)
        it = iter(loader_of(first))
        seen = [i for _ in range(3) for i in ids_of(next(it))]
        state = first.state_dict()
        again = make()
        again.load_state_dict(state)
        again.set_epoch(2)
        rest = epoch_ids(loader_of(again))
        whole = make()
        whole.set_epoch(2)
        assert seen + rest == epoch_ids(loader_of(whole)), name
        again.set_epoch(3)  # another epoch: from its start
        assert sorted(epoch_ids(loader_of(again))) == list(range(N)), name
