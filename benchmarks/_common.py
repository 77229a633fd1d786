"""Shared plumbing of the scripts under benchmarks/: they run the suites of ``gpuload bench``
(gpuload/bench/) and pick the figures their issue quotes out of its results. Every
measurement, its fresh processes, warm-up and repetitions live there, once."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpuload.bench.machine import machine  # noqa: E402
from gpuload.bench.measure import fmt, summarize  # noqa: E402
from gpuload.bench.runner import BenchConfig, run  # noqa: E402

__all__ = ["machine", "summarize", "fmt", "run_suites", "Results", "write_json"]


class Results:
    """The entries of one run, by id."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.by_id = {e["id"]: e for e in doc["results"]}

    def ok(self, id: str) -> bool:
        e = self.by_id.get(id)
        return e is not None and e["status"] == "ok"

    def metric(self, id: str, key: str = "rows_s") -> dict[str, float]:
        """``{median, min, max, n}`` of one metric of one measurement."""
        e = self.by_id[id]
        if e["status"] != "ok":
            raise KeyError(f"{id} did not run: {e['status']}: {e.get('reason', '')}")
        return e["metrics"][key]

    def median(self, id: str, key: str = "rows_s") -> float:
        return self.metric(id, key)["median"]

    def status(self, id: str) -> str:
        e = self.by_id.get(id)
        if e is None:
            return "not measured"
        if e["status"] == "ok":
            return "ok"
        return f"{e['status']} ({e.get('reason', '')})"


def run_suites(
    suites: list[str],
    rows: int,
    repeats: int,
    workdir: str,
    batch_sizes: list[int] | None = None,
    remote: bool = False,
    only: list[str] | None = None,
    device: str = "cpu",
    loader_workers: int | None = None,
    train_repeats: int | None = None,
) -> Results:
    cfg = BenchConfig(
        rows=rows,
        repeats=repeats,
        train_repeats=train_repeats,
        suites=suites,
        batch_sizes=batch_sizes or [64, 128, 256],
        remote=remote,
        cache_dir=workdir,
        only=only,
        device=device,
        loader_workers=loader_workers,
    )
    return Results(run(cfg))


def write_json(res: dict[str, Any], out: str | None) -> None:
    text = json.dumps(res, indent=2)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
