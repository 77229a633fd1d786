"""Run torch DataLoader configurations in a child process (the parent applies a timeout, so a
hang fails the test instead of blocking the suite). Prints one JSON line."""

import json
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

import gpuload


class FailOn:
    """A picklable transform (spawn workers import it) that raises on one row."""

    def __init__(self, row: int) -> None:
        self.row = row

    def __call__(self, row):
        if row.index == self.row:
            raise ValueError("boom")
        return row.to_dict()


def main() -> None:
    """One configuration, or with ``"runs"`` (a list of overrides) each of them in turn, in
    this one process: ``{"runs": [result, ...]}``."""
    cfg = json.loads(sys.argv[1])
    t = gpuload.open_table(
        cfg["table"], storage_options=cfg.get("storage_options"), cache=cfg.get("cache")
    )
    runs = cfg.pop("runs", None)
    out = run(t, cfg) if runs is None else {"runs": [run(t, {**cfg, **r}) for r in runs]}
    print(json.dumps(out, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


def run(t, cfg: dict) -> dict:
    """The DataLoader configuration ``cfg`` on table ``t``: what the parent checks."""
    out: dict = {}
    kind = cfg["kind"]
    if kind == "map":
        ds = gpuload.pytorch(t)
        dl = DataLoader(
            ds,
            batch_size=cfg["batch_size"],
            shuffle=True,
            num_workers=cfg["workers"],
            multiprocessing_context=cfg.get("method") if cfg["workers"] else None,
            persistent_workers=cfg.get("persistent", False) and cfg["workers"] > 0,
            generator=torch.Generator().manual_seed(0),
        )
        epochs = []
        for _ in range(cfg.get("epochs", 1)):
            texts, labels = [], []
            for b in dl:
                assert isinstance(b["label"], torch.Tensor) and isinstance(b["image"], list)
                assert isinstance(b["image"][0], bytes)
                texts += b["text"]
                labels += b["label"].tolist()
            epochs.append(texts)
        out["epochs"] = epochs
    elif kind == "iterable":
        ds = gpuload.pytorch(t, iterable=True, shuffle=True, seed=3, columns=["text"])
        dl = DataLoader(
            ds,
            batch_size=7,
            num_workers=cfg["workers"],
            multiprocessing_context=cfg.get("method") if cfg["workers"] else None,
            persistent_workers=cfg.get("persistent", False) and cfg["workers"] > 0,
        )
        epochs = []
        for e in range(cfg.get("epochs", 1)):
            if cfg.get("set_epoch"):
                ds.set_epoch(e)
            epochs.append(sum((b["text"] for b in dl), []))
        out["epochs"] = epochs
    elif kind == "transform_error":
        dl = DataLoader(
            gpuload.pytorch(t, transform=FailOn(cfg["bad_row"])),
            batch_size=8,
            num_workers=cfg["workers"],
            multiprocessing_context=cfg.get("method") if cfg["workers"] else None,
        )
        try:
            for _ in dl:
                pass
            out["error"] = None
        except Exception as e:  # the training loop sees the error
            out["error"] = str(e)
    return out


if __name__ == "__main__":
    main()
