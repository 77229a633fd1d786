"""torch's option names at gpuload's front door (issue 11): each DataLoader name gets one clear
error saying what gpuload uses instead; pin_memory is honoured or refused, never ignored; a
batched loader handed to torch's DataLoader explains the two modes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gpuload  # noqa: E402

from ..helpers import epoch_ids  # noqa: E402


@pytest.mark.parametrize(
    "name, value, instead",
    [
        ("num_workers", 4, "num_threads="),
        ("prefetch_factor", 2, "prefetch="),
        ("persistent_workers", True, "its threads live as long as the loader"),
    ],
)
def test_dataloader_names_say_what_gpuload_uses_instead(ids_table, name, value, instead):
    with pytest.raises(TypeError) as e:
        gpuload.pytorch(ids_table, batch_size=8, **{name: value})
    msg = str(e.value)
    assert f"{name}={value!r}" in msg and instead in msg and "threads" in msg
    assert "DataLoader(gpuload.pytorch(t), ...)" in msg
    with pytest.raises(TypeError, match=name):
        ids_table.pytorch(**{name: value})  # the same through every torch front door


def test_pin_memory_is_honoured_or_refused(ids_table):
    loader = gpuload.pytorch(ids_table, batch_size=8, columns=["id"], pin_memory=True)
    b = next(iter(loader))
    # page-locked where CUDA exists; without CUDA there is nothing to pin for (documented)
    assert b["id"].is_pinned() == torch.cuda.is_available()
    assert sorted(epoch_ids(loader)) == list(range(len(ids_table)))
    with pytest.raises(ValueError, match="pass pin_memory=True to DataLoader"):
        gpuload.pytorch(ids_table, pin_memory=True)
    with pytest.raises(ValueError, match="pass pin_memory=True to DataLoader"):
        gpuload.pytorch(ids_table, iterable=True, pin_memory=True)


def test_pin_memory_with_device_auto_where_a_gpu_is_found(ids_table, monkeypatch):
    """device="auto" picks the GPU on a GPU machine (here: made to believe it is one). Without
    image= ops the batches are still made on the host, so pin_memory=True gives host batches
    (pinned where torch has CUDA), as torch's DataLoader does, instead of refusing (issue 13);
    with image= ops the batches are made on the GPU, and pin_memory is refused."""
    import gpuload.device

    monkeypatch.setattr(gpuload.device, "cuda_available", lambda: True)
    loader = gpuload.pytorch(ids_table, batch_size=8, columns=["id"], pin_memory=True)
    assert loader.device == torch.device("cpu")
    b = next(iter(loader))
    assert b["id"].device.type == "cpu"
    assert b["id"].is_pinned() == torch.cuda.is_available()
    assert sorted(epoch_ids(loader)) == list(range(len(ids_table)))
    made_on_gpu = "image= ops and device='auto' the batches are made on the GPU already"
    with pytest.raises(ValueError, match=made_on_gpu):
        gpuload.pytorch(ids_table, batch_size=8, image=[gpuload.ops.Resize(8)], pin_memory=True)


@pytest.mark.gpu
def test_pin_memory_pins_on_a_gpu_machine(ids_table):
    for device in ("cpu", "auto"):  # host batches, page-locked (device="auto" included)
        b = next(iter(gpuload.pytorch(ids_table, batch_size=8, device=device, pin_memory=True)))
        assert b["id"].device.type == "cpu" and b["id"].is_pinned(), device
    # device="cuda" without image ops: pinned, then copied to the GPU
    loader = gpuload.pytorch(
        ids_table, batch_size=8, columns=["id"], device="cuda", pin_memory=True
    )
    batches = list(loader)
    assert all(b["id"].is_cuda for b in batches)
    assert sorted(torch.cat([b["id"] for b in batches]).cpu().tolist()) == list(
        range(len(ids_table))
    )
    with pytest.raises(ValueError, match="made on the GPU already"):
        gpuload.pytorch(ids_table, batch_size=8, image=[gpuload.ops.Resize(8)], device="cuda",
                        pin_memory=True)  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batched_loader_in_a_dataloader_explains_the_two_modes(ids_table, workers):
    loader = gpuload.pytorch(ids_table, batch_size=8, columns=["id"])
    kw = {"multiprocessing_context": "fork"} if workers else {}
    dl = torch.utils.data.DataLoader(loader, batch_size=4, num_workers=workers, **kw)
    with pytest.raises(TypeError, match="is already a loader: iterate it"):
        next(iter(dl))
