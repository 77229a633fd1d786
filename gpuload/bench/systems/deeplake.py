"""Deeplake 4, the reference product: local append + commit, ``ds.batches()``, torch's
DataLoader over ``ds.pytorch()``, and the same with a PIL transform end to end."""

from __future__ import annotations

import shutil

from ..harness import columns_nbytes, device_epochs, run_timed, torch_dataloader
from ..measure import timed_once


def deeplake_schema(src, image_kind: str):
    import deeplake

    types = deeplake.types
    out = {}
    for c in src.schema:
        if c.kind == "image":
            out[c.name] = (
                types.Image(dtype="uint8", sample_compression="jpg")
                if image_kind == "jpg"
                else types.Bytes()
            )
        elif c.kind == "bytes":
            out[c.name] = types.Bytes()
        elif c.kind == "text":
            out[c.name] = types.Text()
        elif c.kind == "array":
            out[c.name] = types.Array(c.dtype, shape=list(c.shape))
        elif c.kind == "scalar":
            out[c.name] = c.dtype
    return out


def deeplake_write(dest: str, cols: dict, schema: dict, block: int = 1000) -> None:
    import deeplake
    import numpy as np

    ds = deeplake.create(dest)
    for name, typ in schema.items():
        ds.add_column(name, typ)
    n = len(next(iter(cols.values())))
    for lo in range(0, n, block):
        part = {}
        for name in schema:
            v = cols[name][lo : lo + block]
            part[name] = v if isinstance(v, list) else np.asarray(v)
        ds.append(part)
    ds.commit()


def ingest(a: dict) -> dict:
    """Deeplake 4: the same rows appended to a local dataset (1,000-row appends + commit).
    With ``keep`` the dataset stays (the runner's local Deeplake copies are made this way)."""
    import gpuload

    src = gpuload.open_table(a["source"])
    n = min(int(a["rows"]), len(src))
    cols = src[:n].to_dict()
    schema = deeplake_schema(src, a.get("image_kind", "bytes"))
    cols = {k: v for k, v in cols.items() if k in schema}
    nbytes = columns_nbytes(cols)
    dest = a["dest"]
    shutil.rmtree(dest, ignore_errors=True)
    _, rec = timed_once(deeplake_write, dest, cols, schema)
    if not a.get("keep"):
        shutil.rmtree(dest, ignore_errors=True)
    rec.update(rows=n, bytes=nbytes)
    return {"": rec}


def stream(a: dict) -> dict:
    """Deeplake 4 ``ds.batches(bs)`` on the local copy (bytes column; no shuffle exists)."""
    import deeplake

    ds = deeplake.open_read_only(a["url"])
    bs = a["batch_size"]
    return run_timed(a, lambda e: ds.batches(bs))


def dataloader(a: dict) -> dict:
    """Deeplake 4 ``DataLoader(ds.pytorch(), batch_size, shuffle=True, num_workers=w)``."""
    import deeplake

    ds = deeplake.open_read_only(a["url"])
    dl = torch_dataloader(ds.pytorch(), a["batch_size"], a.get("workers", 0))
    return run_timed(a, lambda e: iter(dl))


def e2e_loader(a: dict, workers: int):
    """``DataLoader(ds.pytorch(transform=PIL), num_workers=workers)`` on a local JPEG copy."""
    import deeplake

    from ..workloads import DeeplakeRowTransform

    ds = deeplake.open_read_only(a["deeplake_url"])
    transform = DeeplakeRowTransform(a.get("image", "image"), a.get("label"))
    return device_epochs(ds.pytorch(transform=transform), a, workers)
