"""gpuload's own fault-injection suite: storage faults, corrupt chunks, hostile files, stalls.

Every case reads a table whose every row is known (``fault_row``) and sorts the outcome into
rows delivered, rows wrong (must be 0) and one clear gpuload error (where the fault is
permanent). Servers inject faults by schedule and seeded rates (gpuload.testing.servers): an HTTP
server with Range support, and a proxy in front of moto's S3. The tests run small cases; the
benchmark (benchmarks/bench_faults.py) runs them all and records the counters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FaultCase",
    "HTTP_CASES",
    "S3_CASES",
    "fault_row",
    "make_fault_table",
    "run_case",
    "corrupt_chunk_cases",
    "hostile_manifest_cases",
    "sigint_during_stall",
    "suite_policy",
    "hostile_image",
    "hostile_image_cases",
]

COLUMNS = ["id", "payload", "state"]


def fault_row(i: int) -> dict[str, Any]:
    """Row ``i`` of a fault table: every byte follows from the id, so any wrong byte shows."""
    rng = np.random.default_rng(i)
    n = 200 + (i * 7919) % 6000
    return {
        "id": i,
        "payload": rng.bytes(n),
        "state": (np.arange(14, dtype=np.float32) + i).astype(np.float32),
    }


def make_fault_table(path: str, rows: int = 400, chunk_bytes: int = 256 << 10) -> str:
    """Write the fault table (id, payload bytes, float32[14] state) at ``path``."""
    import gpuload

    cols = {k: [] for k in COLUMNS}
    for i in range(rows):
        for k, v in fault_row(i).items():
            cols[k].append(v)
    data = {"id": np.array(cols["id"], np.int64), "payload": cols["payload"]}
    data["state"] = np.stack(cols["state"])
    gpuload.ingest(path, data, chunk_bytes=chunk_bytes, progress=False)
    return path


def suite_policy(**kw):
    """A retry policy with short timeouts so stalls end within seconds in the suite."""
    from gpuload.retry import RetryPolicy

    base = dict(
        tries=8, base_delay=0.01, max_delay=0.2, deadline=8.0, connect_timeout=1.0, read_timeout=1.0
    )
    return RetryPolicy(**{**base, **kw})


@dataclass
class FaultCase:
    """One fault scenario and what came of it."""

    store: str  # "http", "s3", "local"
    kind: str  # the fault kind (see gpuload.testing.servers.FAULT_KINDS), or a corruption
    schedule: str  # e.g. "p=0.2", "next 3", "always"
    target: str = "chunks"  # what the faults hit: "chunks" or "manifest"
    cached: bool = False  # through the on-disk block cache (and a second epoch from it)
    # "exact": every row right; "error": one clear gpuload error; "exact|error": either (a
    # corrupt response is fetched once more, then IntegrityError), never a wrong row
    expect: str = "exact"
    status: int = 503
    stall_s: float | None = None
    outcome: str = ""
    error: str = ""
    seconds: float = 0.0
    requests: int = 0
    faults: int = 0
    retries: int = 0
    refetches: int = 0
    rows_delivered: int = 0
    rows_wrong: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rows_wrong == 0 and self.outcome in self.expect.split("|")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _case(kind: str, schedule: str = "", **kw) -> FaultCase:
    return FaultCase(store="", kind=kind, schedule=schedule, **kw)


# Transient faults at a seeded rate: every row must arrive exactly. Permanent ones: one error.
# Corrupt bodies are refetched once: at a rate, a second corrupt answer is an IntegrityError.
_RATE = "p=0.25"
_CORRUPT = dict(schedule="p=0.05", expect="exact|error")
HTTP_CASES: tuple[FaultCase, ...] = (
    _case("reset", _RATE),
    _case("reset_mid", _RATE),
    _case("status", _RATE, status=503),
    _case("status", _RATE, status=500),
    _case("status", _RATE, status=429),
    _case("truncate", _RATE),
    _case("short", _RATE),
    _case("wrong_range", _RATE),
    _case("wrong_range_lying", **_CORRUPT),
    _case("bitflip", **_CORRUPT),
    _case("stall", "p=0.1", stall_s=3.0),
    _case("bitflip", "next 1", cached=True),  # refetched, verified, then cached
    _case("wrong_range_lying", "next 1", cached=True),
    _case("truncate", _RATE, cached=True),
    _case("status", "next 2", target="manifest", status=503),
    _case("reset", "next 2", target="manifest"),
    _case("truncate", "next 2", target="manifest"),
    _case("status", "always", status=503, expect="error"),
    _case("ignore_range", "always", expect="error"),
    _case("bitflip", "always", expect="error"),
    _case("stall", "always", stall_s=30.0, expect="error"),
)
S3_CASES: tuple[FaultCase, ...] = (
    _case("reset", _RATE),
    _case("status", _RATE, status=503),  # S3 SlowDown
    _case("status", _RATE, status=500),  # S3 InternalError
    _case("truncate", _RATE),
    _case("short", _RATE),
    _case("wrong_range_lying", **_CORRUPT),
    _case("bitflip", **_CORRUPT),
    _case("stall", "p=0.1", stall_s=3.0),
    _case("bitflip", "next 1", cached=True),
    _case("status", "next 2", target="manifest", status=503),
    _case("status", "always", status=503, expect="error"),
)


def _plan_for(case: FaultCase, seed: int):
    from .servers import FaultPlan

    path = "manifest.json" if case.target == "manifest" else "/chunks/"
    kw: dict[str, Any] = dict(
        kind=case.kind, seed=seed, path=path, status=case.status, stall_s=case.stall_s
    )
    if case.schedule == "always":
        kw["probability"] = 1.0
    elif case.schedule.startswith("p="):
        kw["probability"] = float(case.schedule[2:])
    elif case.schedule.startswith("next "):
        kw["fail_next"] = int(case.schedule[5:])
    return FaultPlan(**kw)


def check_batch(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(rows, wrong rows) of a batch of the fault table."""
    wrong = 0
    ids = np.asarray(batch["id"]).tolist()
    for k, i in enumerate(ids):
        want = fault_row(int(i))
        if bytes(batch["payload"][k]) != want["payload"] or not np.array_equal(
            np.asarray(batch["state"][k]), want["state"]
        ):
            wrong += 1
    return len(ids), wrong


def _read_all(url: str, options, cache, policy, epochs: int, counts: dict) -> None:
    """Every row of every epoch through shuffled batches; counts rows and wrong rows."""
    import gpuload

    t = gpuload.open_table(
        url, storage_options=options, cache=cache, fetch=gpuload.FetchOptions(retry=policy)
    )
    try:
        for e in range(epochs):
            for b in t.batches(32, shuffle=True, seed=0, epoch=e, columns=COLUMNS):
                n, bad = check_batch(b)
                counts["rows"] += n
                counts["wrong"] += bad
    finally:
        counts["retries"] += t.fetcher.stats["retries"]
        counts["refetches"] += t.fetcher.stats["refetches"]


def run_case(
    case: FaultCase,
    store: str,
    url: str,
    server,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    policy=None,
) -> FaultCase:
    """Run one case against a table served by ``server`` (which holds the plan) at ``url``."""
    from gpuload.errors import GpuloadError

    from .servers import FaultPlan

    case = FaultCase(**{**asdict(case), "store": store})
    server.plan = _plan_for(case, seed)
    cache_dir = tempfile.mkdtemp(prefix="gpuload-faults-cache-") if case.cached else None
    counts = {"rows": 0, "wrong": 0, "retries": 0, "refetches": 0}
    t0 = time.perf_counter()
    snaps = []
    try:
        _read_all(url, options, cache_dir or False, policy or suite_policy(), 1, counts)
        if case.cached:  # a later run, the server healthy again: whatever the cache holds
            snaps.append(server.plan.snapshot())
            server.plan = FaultPlan()
            _read_all(url, options, cache_dir, policy or suite_policy(), 1, counts)
        case.outcome = "exact"
    except GpuloadError as e:
        case.outcome, case.error = "error", f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # noqa: BLE001 - a raw backend error is a finding, recorded as such
        case.outcome, case.error = "raw error", f"{type(e).__name__}: {e}"[:300]
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    case.seconds = time.perf_counter() - t0
    snaps.append(server.plan.snapshot())
    case.requests = sum(s["requests"] for s in snaps)
    case.faults = sum(s["faults_total"] for s in snaps)
    case.retries, case.refetches = counts["retries"], counts["refetches"]
    case.rows_delivered, case.rows_wrong = counts["rows"], counts["wrong"]
    return case


# -- corrupt chunk files on local disk --------------------------------------------------------
def _rows_one_by_one(url: str) -> tuple[int, int, list[str]]:
    """(rows delivered, rows wrong, distinct error types) reading every row alone."""
    import gpuload
    from gpuload.errors import GpuloadError

    t = gpuload.open_table(url)
    delivered = wrong = 0
    errors: set[str] = set()
    for i in range(len(t)):
        try:
            r = t[i].to_dict()
        except GpuloadError as e:
            errors.add(type(e).__name__)
            continue
        n, bad = check_batch({k: [v] for k, v in r.items()})
        delivered += n
        wrong += bad
    return delivered, wrong, sorted(errors)


def _edit_chunk(d: str, chunk, fn) -> None:
    """Rewrite one chunk file of the table at ``d`` through ``fn(bytearray)``."""
    path = Path(d, chunk.file)
    raw = bytearray(path.read_bytes())
    fn(raw)
    path.write_bytes(bytes(raw))


def _corruptions(rng: np.random.Generator) -> Iterator[tuple[str, Any]]:
    """(name, function(table dir, manifest) that damages the first chunk file)."""

    def flip(d, m, k=1):
        c = m.chunks[0]

        def edit(raw):
            for off in rng.integers(0, c.checksums.covers, size=k).tolist():
                raw[off] ^= 1 << int(rng.integers(0, 8))

        _edit_chunk(d, c, edit)

    def shift_offsets(d, m):
        c = m.chunks[0]
        sec = c.offsets["payload"]

        def edit(raw):
            offs = np.frombuffer(bytes(raw[sec.offset : sec.end]), "<i8").copy()
            offs[1:-1] += 3  # still increasing, still inside the data: row boundaries move
            raw[sec.offset : sec.end] = offs.tobytes()

        _edit_chunk(d, c, edit)

    def truncate(d, m):
        os.truncate(os.path.join(d, m.chunks[0].file), m.chunks[0].size // 2)

    def hash_table(d, m):
        c = m.chunks[0]
        _edit_chunk(
            d,
            c,
            lambda raw: raw.__setitem__(c.checksums.covers + 3, raw[c.checksums.covers + 3] ^ 0xFF),
        )

    yield "bit flip (1 byte)", flip
    yield "bit flips (20 bytes)", lambda d, m: flip(d, m, 20)
    yield "offsets shifted, still increasing", shift_offsets
    yield "chunk truncated", truncate
    yield "page hash table damaged", hash_table


def corrupt_chunk_cases(workdir: str, rows: int = 300, seed: int = 0) -> list[FaultCase]:
    """Damage a chunk of a local table in several ways; every row read alone is either exact or
    one gpuload error, never wrong bytes."""
    from gpuload.storage import Store
    from gpuload.versions import read_manifest

    src = make_fault_table(os.path.join(workdir, "clean"), rows)
    rng = np.random.default_rng(seed)
    out = []
    for name, damage in _corruptions(rng):
        d = os.path.join(workdir, f"damaged-{len(out)}")
        shutil.copytree(src, d)
        damage(d, read_manifest(Store(d)))
        t0 = time.perf_counter()
        delivered, wrong, errors = _rows_one_by_one(d)
        case = FaultCase(
            store="local",
            kind=name,
            schedule="once",
            expect="error",
            outcome="error" if errors else "exact",
            error=", ".join(errors),
            seconds=time.perf_counter() - t0,
            rows_delivered=delivered,
            rows_wrong=wrong,
            extra={"rows": rows},
        )
        out.append(case)
        shutil.rmtree(d, ignore_errors=True)
    return out


# -- hostile manifests, in a child process under an address-space limit ---------------------
_HOSTILE_CHILD = r"""
import json, os, resource, sys, copy
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import gpuload
from gpuload.errors import GpuloadError
base = sys.argv[1]
clean = json.load(open(os.path.join(base, "manifest.json")))
cases = json.loads(sys.stdin.read())
results = []
for name, patch in cases:
    d = copy.deepcopy(clean)
    exec(patch, {"d": d, "json": json})
    raw = json.dumps(d) if not isinstance(d.get("__raw__"), str) else d["__raw__"]
    target = os.path.join(base, "manifest.json")
    open(target, "w").write(raw)
    try:
        t = gpuload.open_table(base)
        t[0].to_dict()
        t[len(t) - 1].to_dict()
        outcome = "accepted"
    except GpuloadError as e:
        outcome = "error: " + type(e).__name__
    except MemoryError:
        outcome = "MemoryError"
    except Exception as e:
        outcome = "raw error: " + type(e).__name__ + ": " + str(e)[:200]
    results.append([name, outcome])
open(os.path.join(base, "manifest.json"), "w").write(json.dumps(clean))
# this process's own peak resident memory (ru_maxrss would carry the parent's over exec)
with open("/proc/self/status") as f:
    peak = int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
print(json.dumps({"results": results, "peak_rss": peak}))
"""

HOSTILE_MANIFESTS: tuple[tuple[str, str], ...] = (
    ("num_rows 10^12", "d['num_rows'] = 10**12"),
    ("chunk rows 10^9", "d['chunks'][0]['rows'] = 10**9"),
    ("chunk rows 10^12, size 10^13", "d['chunks'][0].update(rows=10**12, size=10**13)"),
    ("row of 10^11 bytes", "d['chunks'][0]['columns']['payload']['data'][1] = 10**11"),
    ("size claims 10^12", "d['chunks'][0]['size'] = 10**12"),
    ("section offset 2^64", "d['chunks'][0]['columns']['payload']['data'][0] = 2**64"),
    ("negative offset", "d['chunks'][0]['columns']['payload']['data'][0] = -8"),
    ("rows as a string", "d['chunks'][0]['rows'] = '10'"),
    ("rows as a float", "d['chunks'][0]['rows'] = 10.5"),
    ("rows as a bool", "d['chunks'][0]['rows'] = True"),
    ("rows null", "d['chunks'][0]['rows'] = None"),
    ("columns a list", "d['chunks'][0]['columns'] = []"),
    ("section not a pair", "d['chunks'][0]['columns']['payload']['data'] = [1]"),
    ("chunk path escapes", "d['chunks'][0]['file'] = 'chunks/../../etc/passwd'"),
    ("chunk path with newline", "d['chunks'][0]['file'] += '\\n'"),
    ("chunk listed twice", "d['chunks'].append(d['chunks'][0])"),
    ("shape 10^12", "d['schema']['columns'][2]['shape'] = [10**12]"),
    ("shape a string", "d['schema']['columns'][2]['shape'] = '14'"),
    ("column name with newline", "d['schema']['columns'][0]['name'] = 'id\\n'"),
    (
        "metadata nested 100000 deep",
        "d['__raw__'] = json.dumps(d)[:-1] + ',\"x\":' + '[' * 100000 + ']' * 100000 + '}'",
    ),
    (
        "metadata nested 40 deep",
        "m = {}; cur = m\nfor _ in range(40): cur['a'] = {}; cur = cur['a']\nd['schema']['metadata'] = m",
    ),
    ("page size 2^40", "d['chunks'][0]['checksums']['page'] = 2**40"),
    ("digest not hex", "d['chunks'][0]['checksums']['digest'] = 'zz' * 8"),
    ("format version 99", "d['format_version'] = 99"),
    ("version 0", "d['version'] = 0"),
    ("table_id with path", "d['table_id'] = '../x'"),
    ("not JSON", "d['__raw__'] = '{\"format\": '"),
)


def hostile_manifest_cases(workdir: str, limit_bytes: int = 3 << 30) -> dict[str, Any]:
    """Open and read a table under each hostile manifest in a child process limited to
    ``limit_bytes`` of address space; every one must be refused with one gpuload error."""
    src = make_fault_table(os.path.join(workdir, "hostile"), 60)
    if os.path.exists(os.path.join(src, "versions")):
        shutil.rmtree(os.path.join(src, "versions"))  # the pointer alone: what is tried is read
    script = "import json\n" + _HOSTILE_CHILD
    proc = subprocess.run(
        [sys.executable, "-c", script, src, str(limit_bytes)],
        input=__import__("json").dumps(HOSTILE_MANIFESTS),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hostile-manifest child failed: {proc.stderr[-2000:]}")
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- Ctrl-C while a read is stalled --------------------------------------------------------
_SIGINT_CHILD = r"""
import sys, gpuload
t = gpuload.open_table(sys.argv[1], cache=False)
print("reading", flush=True)
for b in t.batches(16, columns=["payload"]):
    pass
"""


def sigint_during_stall(workdir: str, timeout: float = 60.0) -> dict[str, Any]:
    """A process reading from a server that stalls every chunk read forever gets SIGINT: how
    long until it exits (must be under 2 s), and with what status."""
    from .servers import FaultPlan, RangeHTTPServer

    table = make_fault_table(os.path.join(workdir, "sigint"), 100)
    with RangeHTTPServer(os.path.dirname(table)) as server:
        server.plan = FaultPlan(kind="stall", probability=1.0, path="/chunks/", stall_s=None)
        url = f"{server.url}/{os.path.basename(table)}"
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_SIGINT_CHILD), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if p.stdout.readline().strip() != "reading":
                raise RuntimeError(f"the reader did not start: {p.stderr.read()[-2000:]}")
            time.sleep(1.0)  # well inside the stalled read
            stalled = server.plan.snapshot()["faults_total"]
            t0 = time.perf_counter()
            p.send_signal(signal.SIGINT)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            seconds = time.perf_counter() - t0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            with contextlib.suppress(OSError, ValueError):
                p.stdout.close()
    return {"stalled_requests": stalled, "exit_seconds": seconds, "returncode": rc}


# -- hostile image headers: the loader skips them without sizing anything from them ---------
def _small_image(fmt: str, **kw) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def hostile_image(kind: str, width: int = 65535, height: int = 65535) -> bytes:
    """A real small image (png, jpeg, bmp, gif, webp) whose header claims width x height."""
    import struct
    import zlib

    if kind == "png":
        d = bytearray(_small_image("PNG"))
        d[16:24] = struct.pack(">II", width, height)
        d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))
    elif kind == "jpeg":
        from gpuload.decode.header import read_header

        d = bytearray(_small_image("JPEG"))
        pos = read_header(bytes(d)).sof_pos
        d[pos : pos + 4] = struct.pack(">HH", height, width)
    elif kind == "bmp":
        d = bytearray(_small_image("BMP"))
        d[18:26] = struct.pack("<ii", width, height)
    elif kind == "gif":
        d = bytearray(_small_image("GIF"))
        d[6:10] = struct.pack("<HH", width, height)
    elif kind == "webp":  # lossless VP8L: 14-bit dimensions, at most 16384 x 16384
        d = bytearray(_small_image("WEBP", lossless=True))
        bits = int.from_bytes(d[21:25], "little") & ~((1 << 28) - 1)
        bits |= (min(width, 16384) - 1) | (min(height, 16384) - 1) << 14
        d[21:25] = bits.to_bytes(4, "little")
    else:
        raise ValueError(f"unknown hostile image kind {kind!r}")
    return bytes(d)


_IMAGE_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import gpuload
from gpuload import ops
t = gpuload.open_table(sys.argv[1])
loader = t.batches(8, image=[ops.Resize((8, 8))], num_threads=2, on_error="skip",
                   decode_options=gpuload.DecodeOptions(threads=1))
labels = [int(x) for b in loader for x in b["label"]]
with open("/proc/self/status") as f:
    hwm = int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
print(json.dumps({"labels": labels, "skipped": loader.stats().skipped, "peak_rss": hwm}))
"""


def hostile_image_cases(workdir: str, limit_bytes: int = 4 << 30) -> dict[str, Any]:
    """A table mixing good images with every hostile header kind, loaded with image ops and
    on_error="skip" in a child under an address-space limit: hostile rows skipped, the rest
    delivered, peak resident memory reported."""
    import json

    import gpuload

    kinds = ["png", "jpeg", "bmp", "gif", "webp"]
    good = _small_image("JPEG")
    images, labels, bad = [], [], []
    for i in range(20):
        if i % 4 == 1:
            images.append(hostile_image(kinds[(i // 4) % len(kinds)]))
            bad.append(i)
        else:
            images.append(good)
        labels.append(i)
    url = os.path.join(workdir, "hostile-images")
    gpuload.ingest(
        url,
        {"image": images, "label": np.array(labels)},
        schema={"image": "image/mixed", "label": "int64"},
        progress=False,
    )
    env = dict(os.environ, NUMBA_NUM_THREADS="2", MALLOC_ARENA_MAX="2")
    proc = subprocess.run(
        [sys.executable, "-c", _IMAGE_CHILD, url, str(limit_bytes)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hostile-image child failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(tried=len(bad), hostile_rows=bad, kinds=kinds)
    return out
