"""One spec, every front door: the loader invariants (every row once per epoch, disjoint equal
shards, seeds reproduce, each pass is the next epoch, exact resume) written once and run through
``t.batches``, the torch fast path, the torch map-style and iterable datasets (through torch's
DataLoader) and both TF forms; plus the drifts the front doors once had (columns=[], the device
default, options accepted and ignored)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")

import gpuload  # noqa: E402
from gpuload import LoaderSpec, ops  # noqa: E402

from ..conftest import IDS_ROWS  # noqa: E402
from ..helpers import epoch_ids as _epoch  # noqa: E402
from ..helpers import ids_of as _ids  # noqa: E402
from ..helpers import jpeg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = IDS_ROWS
BS = 8


FRONT_DOORS = {
    "t.batches": lambda t, **kw: t.batches(BS, columns=["id"], **kw),
    "torch fast path": lambda t, **kw: gpuload.pytorch(t, batch_size=BS, columns=["id"], **kw),
    "t.pytorch iterable + DataLoader": lambda t, **kw: torch.utils.data.DataLoader(
        t.pytorch(iterable=True, columns=["id"], **kw), batch_size=BS
    ),
    "tf batches": lambda t, **kw: gpuload.tensorflow(t, batch_size=BS, columns=["id"], **kw),
    "tf rows": lambda t, **kw: t.tensorflow(columns=["id"], **kw),
}
RESUMABLE = ("t.batches", "torch fast path", "tf batches", "tf rows")


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_every_row_once_and_each_pass_is_the_next_epoch(ids_table, door):
    loader = FRONT_DOORS[door](ids_table, shuffle=True, seed=5)
    e0, e1 = _epoch(loader), _epoch(loader)
    assert sorted(e0) == sorted(e1) == list(range(N))
    assert e0 != e1 and e0 != list(range(N))


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_seeds_reproduce_across_loaders(ids_table, door):
    a = FRONT_DOORS[door](ids_table, shuffle=True, seed=11)
    b = FRONT_DOORS[door](ids_table, shuffle=True, seed=11)
    assert [_epoch(a), _epoch(a)] == [_epoch(b), _epoch(b)]
    c = FRONT_DOORS[door](ids_table, shuffle=True, seed=11, epoch=1)
    assert _epoch(c) == _epoch(FRONT_DOORS[door](ids_table, shuffle=True, seed=11, epoch=1))
    assert _epoch(FRONT_DOORS[door](ids_table, shuffle=True, seed=12)) != _epoch(
        FRONT_DOORS[door](ids_table, shuffle=True, seed=11)
    )


def test_seeds_reproduce_after_other_loaders_ran(ids_table):
    """The epoch belongs to the loader, not the table: other loaders on the same table object
    do not move a new loader's first epoch."""
    first = _epoch(ids_table.batches(BS, shuffle=True, seed=3, columns=["id"]))
    for _ in range(3):
        _epoch(ids_table.batches(BS, shuffle=True, seed=3, columns=["id"]))
    assert _epoch(ids_table.batches(BS, shuffle=True, seed=3, columns=["id"])) == first


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_disjoint_equal_shards(ids_table, door):
    world = 3
    parts = [
        _epoch(FRONT_DOORS[door](ids_table, shuffle=True, seed=2, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-N // world)
    assert set().union(*parts) == set(range(N))
    drop = [
        _epoch(
            FRONT_DOORS[door](
                ids_table, shuffle=True, seed=2, rank=r, world_size=world, uneven="drop"
            )
        )
        for r in range(world)
    ]
    flat = [i for p in drop for i in p]
    assert len(flat) == len(set(flat)) == (N // world) * world


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_ranks_without_a_seed_still_agree_on_one_order(ids_table, door):
    """seed=None draws a random seed in a single process, but ranks cannot agree on a random
    one without talking: they use one fixed seed, so their shares still cover every row once."""
    world = 2
    parts = [
        _epoch(FRONT_DOORS[door](ids_table, shuffle=True, rank=r, world_size=world))
        for r in range(world)
    ]
    assert set(parts[0]) | set(parts[1]) == set(range(N))
    assert len(set(parts[0]) & set(parts[1])) <= 1  # padding repeats one row (N is odd)


@pytest.mark.parametrize("door", RESUMABLE)
@pytest.mark.parametrize("seeded", [True, False])
def test_exact_resume_at_random_points(ids_table, door, seeded):
    """Rows seen before a checkpoint + rows after resuming in a new loader == one uninterrupted
    epoch, in order; without a seed the drawn one travels in the state."""
    rng = np.random.default_rng(7 if seeded else 8)
    kw = {"shuffle": True, "seed": 4} if seeded else {"shuffle": True}
    for stop in rng.integers(1, -(-N // BS), size=3).tolist():
        first = FRONT_DOORS[door](ids_table, **kw)
        whole = None
        if seeded:
            whole = _epoch(FRONT_DOORS[door](ids_table, **kw))
        it = iter(first)
        seen = [i for _ in range(stop) for i in _ids(next(it))]
        state = first.state_dict()
        assert _json_plain(state)
        rest = _epoch(_resumed(FRONT_DOORS[door](ids_table, **kw), state))
        if whole is None:
            whole = _epoch(_resumed(FRONT_DOORS[door](ids_table, **kw), {**state, "position": 0}))
        assert seen + rest == whole, (door, stop)


def _resumed(loader, state):
    """The loader to iterate after a resume: TF datasets return a new one (their length is
    fixed when built), the others resume in place."""
    out = loader.load_state_dict(state)
    return loader if out is None else out


def _json_plain(state) -> bool:
    import json

    return json.loads(json.dumps(state)) == state


def test_tf_resume_returns_the_dataset_to_iterate(ids_table):
    ds = gpuload.tensorflow(ids_table, batch_size=BS, shuffle=True, seed=1, columns=["id"])
    assert ds.cardinality().numpy() == -(-N // BS)
    it = iter(ds)
    seen = _ids(next(it)) + _ids(next(it))
    resumed = ds.load_state_dict(ds.state_dict())
    assert resumed.cardinality().numpy() == tf.data.UNKNOWN_CARDINALITY
    rest = _epoch(resumed)
    assert sorted(seen + rest) == list(range(N))
    assert sorted(_epoch(resumed)) == list(range(N))  # then whole epochs
    with pytest.raises(Exception, match="iterate the dataset load_state_dict"):
        _epoch(ds)


def test_map_style_with_dataloader_every_row(ids_table):
    ds = gpuload.pytorch(ids_table, columns=["id"])
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=BS, shuffle=True, generator=g)
    assert sorted(_epoch(loader)) == list(range(N))


# -- the drifts ---------------------------------------------------------------------------------
FRONT_DOOR_FUNCTIONS = {
    "gpuload.pytorch": gpuload.pytorch,
    "gpuload.tensorflow": gpuload.tensorflow,
    "Table.batches": gpuload.Table.batches,
    "Table.pytorch": gpuload.Table.pytorch,
    "Table.tensorflow": gpuload.Table.tensorflow,
}


@pytest.mark.parametrize("name", FRONT_DOOR_FUNCTIONS)
def test_signatures_show_every_option_with_one_default(name):
    params = inspect.signature(FRONT_DOOR_FUNCTIONS[name]).parameters
    spec = inspect.signature(LoaderSpec).parameters
    for opt, p in spec.items():
        assert opt in params, f"{name} does not show {opt}"
        if not (name == "Table.batches" and opt == "batch_size"):  # required there
            assert params[opt].default == p.default, (name, opt)
    assert params["device"].default == "auto"
    assert "Options (gpuload.LoaderSpec)" in FRONT_DOOR_FUNCTIONS[name].__doc__
    assert "**" not in str(inspect.signature(FRONT_DOOR_FUNCTIONS[name]))


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.batches(4, columns=[]),
        lambda t: gpuload.pytorch(t, columns=[]),
        lambda t: gpuload.pytorch(t, iterable=True, columns=[]),
        lambda t: gpuload.pytorch(t, batch_size=4, columns=[]),
        lambda t: gpuload.tensorflow(t, columns=[]),
        lambda t: gpuload.tensorflow(t, batch_size=4, columns=[]),
    ],
)
def test_empty_columns_is_refused_everywhere(ids_table, make):
    with pytest.raises(ValueError, match=r"columns=\[\] selects no columns"):
        make(ids_table)


def test_columns_none_is_all_columns_everywhere(ids_table):
    assert set(next(iter(ids_table.batches(4)))) == set(ids_table.columns)
    assert set(gpuload.pytorch(ids_table)[0]) == set(ids_table.columns)
    assert set(next(iter(gpuload.pytorch(ids_table, batch_size=4)))) == set(ids_table.columns)
    assert set(next(iter(gpuload.tensorflow(ids_table)))) == set(ids_table.columns)


MAP_REFUSED = {
    "on_error": "skip",
    "seed": 1,
    "epoch": 2,
    "device": "cpu",
    "decoder": "cpu",
    "drop_last": True,
    "prefetch": 4,
    "num_threads": 2,
    "uneven": "drop",
    "rank": 0,
}


@pytest.mark.parametrize("option", MAP_REFUSED)
def test_map_style_refuses_options_it_would_ignore(ids_table, option):
    kw = {option: MAP_REFUSED[option]}
    if option == "rank":
        kw["world_size"] = 2
    with pytest.raises(
        ValueError, match=rf"{option}=.*not used by the map-style dataset.*batch_size="
    ):
        gpuload.pytorch(ids_table, **kw)


@pytest.mark.parametrize("option", ["image", "device", "drop_last", "prefetch", "num_threads"])
def test_iterable_refuses_options_it_would_ignore(ids_table, option):
    value = {
        "image": [ops.Resize((4, 4))],
        "device": "cpu",
        "drop_last": True,
        "prefetch": 3,
        "num_threads": 2,
    }[option]
    with pytest.raises(ValueError, match=rf"{option}=.*not used by the iterable dataset"):
        gpuload.pytorch(ids_table, iterable=True, **{option: value})


@pytest.mark.parametrize("option", ["image", "drop_last", "device"])
def test_tf_rows_refuse_batch_options(ids_table, option):
    value = {"image": [ops.Resize((4, 4))], "drop_last": True, "device": "cpu"}[option]
    with pytest.raises(ValueError, match=rf"{option}=.*not used by a dataset of rows"):
        gpuload.tensorflow(ids_table, **{option: value})


def test_device_without_image_ops_is_refused_where_it_does_nothing(ids_table):
    with pytest.raises(ValueError, match="device='cpu'.*none were given"):
        ids_table.batches(4, device="cpu")
    with pytest.raises(ValueError, match="device='cpu'.*none were given"):
        gpuload.tensorflow(ids_table, batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="decoder only apply to image= ops"):
        ids_table.batches(4, decoder="cpu")
    # the torch fast path puts its tensors on the device: honoured
    assert (
        next(iter(gpuload.pytorch(ids_table, batch_size=4, device="cpu")))["id"].device.type
        == "cpu"
    )


def test_iterable_on_error_skip_is_honoured(ids_table):
    def bad_on_7(row):
        if row["id"] == 7:
            raise RuntimeError("bad row")
        return {"id": row["id"]}

    with pytest.raises(gpuload.errors.TransformError, match="row 7"):
        list(gpuload.pytorch(ids_table, bad_on_7, iterable=True, columns=["id"]))
    ds = gpuload.pytorch(ids_table, bad_on_7, iterable=True, columns=["id"], on_error="skip")
    got = sorted(int(r["id"]) for r in ds)
    assert got == [i for i in range(N) if i != 7] and ds.skipped == 1


@pytest.mark.parametrize("door", ["t.batches", "torch fast path", "tf batches"])
def test_on_error_skip_drops_undecodable_rows_everywhere(tmp_path, door):
    rng = np.random.default_rng(1)
    images = [jpeg(rng, 16, 20) for _ in range(12)]
    images[3] = b"\xff\xd8\xff\xe0" + b"not a jpeg" * 4  # a JPEG signature, then garbage
    t = gpuload.ingest(tmp_path / "bad", {"id": np.arange(12), "image": images})
    make = {
        "t.batches": lambda **kw: t.batches(4, **kw),
        "torch fast path": lambda **kw: gpuload.pytorch(t, batch_size=4, **kw),
        "tf batches": lambda **kw: gpuload.tensorflow(t, batch_size=4, **kw),
    }[door]
    resize = [ops.Resize((8, 8))]
    # through tf.data's generator the DecodeError arrives wrapped in a tf.errors.OpError
    with pytest.raises((gpuload.DecodeError, tf.errors.OpError), match="DecodeError.*row 3|row 3"):
        _epoch(make(image=resize))
    assert sorted(_epoch(make(image=resize, on_error="skip"))) == [i for i in range(12) if i != 3]


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.batches(4, on_error="skip"),
        lambda t: gpuload.pytorch(t, batch_size=4, on_error="skip"),
        lambda t: gpuload.pytorch(t, iterable=True, on_error="skip"),
        lambda t: gpuload.tensorflow(t, on_error="skip"),
        lambda t: gpuload.tensorflow(t, batch_size=4, on_error="skip"),
    ],
)
def test_skip_with_nothing_to_skip_is_refused(ids_table, make):
    """Without image ops or a transform nothing can be skipped (read and integrity errors always
    raise), so on_error="skip" would be accepted and do nothing."""
    with pytest.raises(ValueError, match="on_error='skip'.*(has neither|not used)"):
        make(ids_table)
    # with a transform it is honoured
    assert len(gpuload.pytorch(ids_table, lambda r: r["id"], batch_size=4, on_error="skip")) > 0


def test_torch_iterable_with_batch_size_is_refused(ids_table):
    with pytest.raises(ValueError, match="iterable=True yields rows"):
        gpuload.pytorch(ids_table, batch_size=4, iterable=True)


def test_stats_times_the_stages_and_the_first_batch(ids_table):
    loader = ids_table.batches(16, image=[ops.Resize((8, 8))], columns=["id", "image"])
    assert loader.stats().time_to_first_batch_s is None
    n = sum(len(b["id"]) for b in loader)
    s = loader.stats()
    assert n == N and s.rows == N and s.batches == -(-N // 16)
    assert s.time_to_first_batch_s is not None and s.time_to_first_batch_s > 0
    for stage in ("read", "decode", "kernel", "export", "wait"):
        assert stage in s.stages
    assert s.stages["decode"] > 0 and s.stages["kernel"] > 0 and s.stages["read"] > 0
    assert s.images["decoded"] == N


def test_spec_validates_once_with_clear_errors():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LoaderSpec(batch_size=0)
    with pytest.raises(ValueError, match="prefetch must be an integer >= 0"):
        LoaderSpec(prefetch=-1)
    with pytest.raises(ValueError, match="rank must be in"):
        LoaderSpec(rank=3, world_size=2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        LoaderSpec(num_workers=2)
    s = LoaderSpec(shuffle=True, on_error="skip", uneven="drop")
    assert s.shuffle is gpuload.Shuffle.AUTO and s.on_error is gpuload.OnError.SKIP
    assert s.uneven is gpuload.Tail.DROP and set(s.given()) == {"shuffle", "on_error", "uneven"}
    assert LoaderSpec().given() == []


def test_import_layers_hold():
    """The import-linter contracts in pyproject.toml: data flows down, no circle, the core never
    imports a framework."""
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    p = subprocess.run([exe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout
