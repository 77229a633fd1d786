"""Concurrent writers, for the fault suite: real processes appending to one table at once.

Each trial starts every writer process at the same moment (a barrier) appending its own rows
(ids that name the writer, the trial and the row) to the trial's table; the data source sleeps
mid-way (``slow``) to widen the window between a writer reading the table's version and
committing, as a slow object store does. Afterwards the table must hold exactly the rows of
every append that reported success: a lost commit is a success whose rows are missing.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["WriterTrials", "concurrent_append_trials"]


@dataclass(frozen=True)
class WriterTrials:
    """What a run of concurrent-append trials saw."""

    store: str
    trials: int
    writers: int
    commits_ok: int  # appends that returned success
    conflicts: int  # appends that raised CommitConflictError (nothing committed, said so)
    errors: int  # appends that raised anything else
    rows_committed: int  # rows of the successful appends
    rows_found: int  # rows in the tables afterwards
    lost_commits: int  # successful appends with any row missing
    extra_rows: int  # rows present that no successful append wrote (or duplicates)
    version_mismatches: int  # tables whose version is not 1 per successful commit
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows(writer: int, trial: int, n: int, slow: float):
    """Row dicts with unique ids; sleeps half-way to keep the write open a while."""
    for i in range(n):
        if i == n // 2 and slow:
            time.sleep(slow)
        yield {"id": writer * 10**9 + trial * 10**5 + i, "payload": bytes([writer]) * (i % 97)}


def _writer(
    base: str,
    storage_options: Mapping[str, Any] | None,
    writer: int,
    trials: int,
    seed: int,
    slow: float,
    barrier,
    results,
) -> None:
    """One writer process: one append per trial, each started at the barrier."""
    import gpuload
    from gpuload.errors import CommitConflictError
    from gpuload.storage import join_url

    for trial in range(trials):
        rng = random.Random(seed * 7919 + trial * 31 + writer)
        n = rng.randint(1, 40)
        pause = slow * rng.random()
        barrier.wait(timeout=120)
        try:
            gpuload.ingest(
                join_url(base, f"trial{trial:04d}"),
                _rows(writer, trial, n, pause),
                mode="append",
                chunk_bytes=1 << 12,
                progress=False,
                storage_options=storage_options,
            )
            ids = [writer * 10**9 + trial * 10**5 + i for i in range(n)]
            results.put((trial, writer, "ok", ids))
        except CommitConflictError:
            results.put((trial, writer, "conflict", []))
        except Exception as e:  # reported to the parent, which counts it as an error
            results.put((trial, writer, f"error: {type(e).__name__}: {e}", []))


def concurrent_append_trials(
    base: str,
    storage_options: Mapping[str, Any] | None = None,
    writers: int = 4,
    trials: int = 10,
    slow: float = 0.0,
    seed: int = 0,
    timeout: float = 600.0,
    start_method: str = "spawn",
) -> WriterTrials:
    """Run ``trials`` rounds of ``writers`` processes appending to one table each round, and
    check every table against what the writers reported."""
    import gpuload
    from gpuload.storage import join_url

    ctx = mp.get_context(start_method)
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    t0 = time.perf_counter()
    procs = [
        ctx.Process(
            target=_writer,
            args=(base, dict(storage_options or {}), w, trials, seed, slow, barrier, results),
            daemon=True,
        )
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < writers * trials:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"writer trials did not finish within {timeout} s")
            got.append(results.get(timeout=left))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    seconds = time.perf_counter() - t0
    counts = {"ok": 0, "conflict": 0, "error": 0, "committed": 0, "found": 0}
    lost = extra = mismatched = 0
    for trial in range(trials):
        mine = [r for r in got if r[0] == trial]
        ok = [r for r in mine if r[2] == "ok"]
        counts["ok"] += len(ok)
        counts["conflict"] += sum(r[2] == "conflict" for r in mine)
        counts["error"] += sum(r[2].startswith("error") for r in mine)
        want = [i for r in ok for i in r[3]]
        counts["committed"] += len(want)
        url = join_url(base, f"trial{trial:04d}")
        try:
            t = gpuload.open_table(url, storage_options=storage_options, cache=False)
            ids = np.asarray(t[:]["id"]).tolist() if len(t) else []
            version = t.version
        except gpuload.errors.TableNotFoundError:
            ids, version = [], 0
        counts["found"] += len(ids)
        have = set(ids)
        lost += sum(any(i not in have for i in r[3]) for r in ok)
        extra += len(ids) - len(have) + len(have - set(want))
        mismatched += version != len(ok)
    return WriterTrials(
        store=base.split("://")[0] if "://" in base else "file",
        trials=trials,
        writers=writers,
        commits_ok=counts["ok"],
        conflicts=counts["conflict"],
        errors=counts["error"],
        rows_committed=counts["committed"],
        rows_found=counts["found"],
        lost_commits=lost,
        extra_rows=extra,
        version_mismatches=mismatched,
        seconds=seconds,
    )
