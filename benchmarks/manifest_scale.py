"""How the table format scales with the number of chunks (issue 16 part 4, "Measure first").

    python benchmarks/manifest_scale.py [--chunks 1000,10000,100000,1000000]
        [--format json|4|both] [--rows-per-chunk 1000] [--image-bytes 26000] [--timeout 900]
        [--mem-limit-gb G] [--work DIR] [--keep] [--profile] [--out FILE.json]

For each chunk count N it writes a synthetic table of N chunks x ``--rows-per-chunk`` rows with
the demo table's schema (image/jpeg, state float32[14], label int64, instruction text) and then
measures it, each measurement in a fresh child process with a timeout and an address-space limit
(a failure, a MemoryError, a kill or a timeout is recorded as that measurement's result):

* ``phases``: the manifest read from disk, ``json.loads`` alone, ``Manifest.loads`` (JSON +
  ChunkInfo objects + validation) and ``TableReader.__init__``, with the RSS after each.
* ``open``: ``gpuload.open_table(path)``: seconds, RSS after it (psutil) and peak RSS
  (``ru_maxrss``), the import of gpuload excluded and reported apart.
* ``access``: ``t[i].to_dict()`` (every column) at random rows, each in a chunk not read before
  (cold: the chunk's small sections are fetched), the first one apart (it also pays per-table
  first-use costs) and the median of the others; ``t[i]["label"]`` the same way, and warm (a
  row of a chunk already read: only the lookup path). Every value is checked.
* ``batch_full`` / ``batch_block``: building ``t.batches(128, shuffle=..., seed=0)`` and taking
  its first batch (every column; ``shuffle=True`` is a full shuffle on a local table, ``"block"``
  what a remote table without the cache gets); the batch's labels are checked against the rows
  the epoch order names.
* ``append``: one ``gpuload.ingest(path, 8 rows, mode="append")``, runs last. Format json: it
  rewrites the whole manifest (twice: the version file and the ``manifest.json`` pointer; the
  index threshold is lifted in that child so it measures exactly that, not a conversion).
  Format 4: it writes one segment of one record and a root listing two segments.

``--format``: ``json`` (the default, and what formats 1-3 store: the chunk list in the
manifest), ``4`` (docs/FORMAT.md "Format 4": a small root and binary index segments), or
``both`` (each N measured in both, one result per N and format).

How the table is made (the cheapest honest way): the manifest is exactly what gpuload writes
(``Manifest.to_json`` of real ``ChunkInfo`` objects, serialised as ``Manifest.dumps`` does, only
streamed so N = 10^6 does not need the writer's memory; the test checks the bytes round-trip
through ``Manifest.loads(...).dumps()``), published as ``versions/v000000000001.json`` plus the
``manifest.json`` pointer. Only the chunks a measurement touches are real files: each is written
by ``gpuload.ingest`` into a scratch table (so its layout, page hashes and row hashes are the
writer's own) and moved in; the other N - k entries copy a real chunk's entry with a new random
file name and digest (no file: opening never touches a chunk, and those rows are never read).
Row ``g`` holds label ``g``, state ``[g % 65536, g // 65536, (g % 1000) / 1000, ...]``, the
demo instruction ``TASKS[g % 10]`` and the ``g % 8``-th of eight JPEGs padded (after EOI) to
exactly ``--image-bytes`` (26,000: the demo's 480x640 JPEGs average ~26 KB, so 1,000 rows make
a ~26 MB chunk, and the manifest's numbers have today's digit counts).

Format 4 tables are made the same way, only their index is written directly instead of a
manifest: one segment of N records (``gpuload.segments.encode_segment``; each a copy of a real
chunk's record with a random id and digest, the real chunks' records their own, N x
``--rows-per-chunk`` rows) and a root naming it (``Manifest.dumps`` of an ``IndexRoot``), as a
create of that table writes them.

Prints a markdown table and the machine, writes every result to ``--out`` (JSON).
``--profile``: also profiles ``open_table`` of the largest N with cProfile (top functions by
own time); for a sampling profile keep the tables (``--keep --work DIR``) and run ``py-spy
record -f raw --threads -- python benchmarks/manifest_scale.py --child open --info
DIR/n<N>/info.json`` (run it before the append measurement's version 2, or on the table as is).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np

SCHEMA = {
    "image": "image/jpeg",
    "state": "float32[14]",
    "label": "int64",
    "instruction": "text",
}
BATCH = 128
ACCESS_ROWS = 9  # the first is reported apart; the median is over the other 8
POOL = 8  # distinct JPEGs, row g holds the (g % POOL)-th
APPEND_ROWS = 8
KINDS = ("phases", "open", "access", "batch_full", "batch_block", "append")
FORMATS = ("json", "4")


# -- the synthetic table ------------------------------------------------------------------------
def image_pool(nbytes: int, count: int = POOL) -> list[bytes]:
    """``count`` distinct small JPEGs, each padded after its EOI marker to exactly ``nbytes``
    (decoders stop at EOI; the padding only gives the chunk today's size)."""
    import simplejpeg

    rng = np.random.default_rng(16)
    out = []
    for _ in range(count):
        side = 64
        while True:
            img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            jpg = simplejpeg.encode_jpeg(img, quality=90)
            if len(jpg) <= nbytes or side <= 8:
                break
            side //= 2
        out.append(jpg + bytes(max(0, nbytes - len(jpg))))
    return out


def row_values(rows: np.ndarray, pool: list[bytes]) -> dict[str, Any]:
    """Column values of global rows ``rows`` (what every real chunk holds and every check
    expects)."""
    from gpuload.demo import TASKS

    g = np.asarray(rows, dtype=np.int64)
    state = np.empty((len(g), 14), dtype=np.float32)
    state[:, 0] = g % 65536
    state[:, 1] = g // 65536
    state[:, 2:] = ((g % 1000) / 1000.0)[:, None]
    return {
        "image": [pool[int(x) % len(pool)] for x in g],
        "state": state,
        "label": g.copy(),
        "instruction": [TASKS[int(x) % len(TASKS)] for x in g],
    }


def touched_chunks(n_chunks: int, rpc: int) -> dict[str, list[int]]:
    """The rows each measurement reads (deterministic), so their chunks can be made real."""
    from gpuload.sampling import EpochOrder

    n = n_chunks * rpc
    rng = np.random.default_rng(4)
    k = min(ACCESS_ROWS, n_chunks)
    chunks = np.sort(rng.choice(n_chunks, size=k, replace=False))
    rng.shuffle(chunks)
    access = (chunks * rpc + rng.integers(0, rpc, size=k)).tolist()
    b = min(BATCH, n)
    full = EpochOrder(n, "full", 0, 0).at(np.arange(b)).tolist()
    block = EpochOrder(n, "block", 0, 0, (rpc,) * n_chunks).at(np.arange(b)).tolist()
    return {"access": access, "batch_full": full, "batch_block": block}


def real_chunk(table: str, k: int, rpc: int, pool: list[bytes], scratch: str):
    """Chunk ``k`` (rows [k * rpc, (k + 1) * rpc)) written by gpuload's own writer into a scratch
    table and moved into ``table``: its ChunkInfo and the scratch table's schema (what ingest
    derives from SCHEMA)."""
    import gpuload

    tmp = os.path.join(scratch, f"c{k}")
    rows = np.arange(k * rpc, (k + 1) * rpc, dtype=np.int64)
    t = gpuload.ingest(tmp, row_values(rows, pool), schema=SCHEMA, chunk_bytes=1 << 45,
                       progress=False)  # fmt: skip
    (info,) = t.manifest.chunks
    os.replace(os.path.join(tmp, info.file), os.path.join(table, info.file))
    shutil.rmtree(tmp)
    return info, t.schema


def _real_chunks(table: str, n_chunks: int, rpc: int, image_bytes: int):
    """The chunks the measurements read, written for real: (ChunkInfo by chunk number, schema
    JSON, the rows each measurement reads)."""
    os.makedirs(os.path.join(table, "chunks"))
    os.makedirs(os.path.join(table, "versions"))
    pool = image_pool(image_bytes)
    rows = touched_chunks(n_chunks, rpc)
    real_ids = sorted({r // rpc for v in rows.values() for r in v} | {0})
    scratch = tempfile.mkdtemp(prefix="scratch-", dir=os.path.dirname(table))
    real, schemas = {}, []
    for k in real_ids:
        real[k], schema = real_chunk(table, k, rpc, pool, scratch)
        schemas.append(schema.to_json())
    assert all(s == schemas[0] for s in schemas), "the real chunks' schemas differ"
    shutil.rmtree(scratch)
    return real, schemas[0], rows


def write_table(
    table: str, n_chunks: int, rpc: int, image_bytes: int, fmt: str = "json"
) -> dict[str, Any]:
    """Write the synthetic table (see the module docstring) as a JSON manifest (``fmt="json"``)
    or a format-4 index (``"4"``); returns what the children need."""
    t0 = time.perf_counter()
    real, schema, rows = _real_chunks(table, n_chunks, rpc, image_bytes)
    t_real = time.perf_counter() - t0
    write = _write_index if fmt == "4" else _write_json
    info = write(table, n_chunks, rpc, real, schema)
    return {
        "table": table,
        "format": fmt,
        "chunks": n_chunks,
        "rows_per_chunk": rpc,
        "rows": n_chunks * rpc,
        "image_bytes": image_bytes,
        "real_chunks": sorted(real),
        "rows_read": rows,
        "chunk_bytes": real[0].size,
        **info,
        "write_real_chunks_s": t_real,
        "write_s": time.perf_counter() - t0,
    }


def _write_json(table: str, n_chunks: int, rpc: int, real: dict, schema: dict) -> dict[str, Any]:
    """The JSON manifest, streamed (the writer's objects for N = 10^6 would not fit)."""
    from gpuload.format import Manifest, version_path
    from gpuload.schema import Schema

    template = real[0]
    rng = np.random.default_rng(n_chunks)
    now = time.time()
    head = Manifest(uuid.uuid4().hex, 1, Schema.from_json(schema), (), now, now)
    d = head.to_json()
    d["num_rows"] = n_chunks * rpc
    text = json.dumps(d, separators=(",", ":"))
    tail = '"chunks":[]}'
    assert text.endswith(tail), text[-40:]
    rel = version_path(1)
    path = os.path.join(table, rel)
    with open(path, "w") as f:
        f.write(text[: -len(tail)] + '"chunks":[')
        step = 10_000
        for lo in range(0, n_chunks, step):
            hi = min(n_chunks, lo + step)
            names = [uuid.UUID(bytes=b).hex for b in _random_bytes(rng, hi - lo)]
            digests = rng.integers(0, 1 << 63, size=hi - lo, dtype=np.int64).tolist()
            parts = []
            for k, name, dig in zip(range(lo, hi), names, digests):
                c = real.get(k)
                if c is None:
                    sums = dataclasses.replace(template.checksums, digest=dig)
                    c = dataclasses.replace(template, file=f"chunks/{name}.chunk", checksums=sums)
                parts.append(json.dumps(c.to_json(), separators=(",", ":")))
            f.write(("," if lo else "") + ",".join(parts))
        f.write("]}")
    shutil.copyfile(path, os.path.join(table, "manifest.json"))  # the pointer, as a commit writes
    return {"manifest_bytes": os.path.getsize(path), "index_bytes": 0}


def _write_index(table: str, n_chunks: int, rpc: int, real: dict, schema: dict) -> dict[str, Any]:
    """A format-4 root and one segment of ``n_chunks`` records, as a create writes them."""
    from gpuload.format import INDEXED_SINCE, IndexRoot, Manifest, SegmentInfo, version_path
    from gpuload.index import SEGMENT_PAGE
    from gpuload.schema import Schema
    from gpuload.segments import encode_segment, records_from_chunks

    sch = Schema.from_json(schema)
    _, template = records_from_chunks([real[0]], sch)
    recs = np.repeat(template, n_chunks)
    rng = np.random.default_rng(n_chunks)
    recs["id"] = rng.integers(0, 256, (n_chunks, 16), dtype=np.uint8)
    recs["digest"] = rng.integers(0, 1 << 63, n_chunks, dtype=np.int64).astype(np.uint64)
    for k, c in real.items():
        recs[k] = records_from_chunks([c], sch)[1][0]
    rows = np.full(n_chunks, rpc, dtype=np.int64)
    parts, lay, sums = encode_segment(rows, recs, SEGMENT_PAGE)
    seg = f"index/{uuid.uuid4().hex}.idx"
    os.makedirs(os.path.join(table, "index"))
    with open(os.path.join(table, seg), "wb") as f:
        for part in parts:
            f.write(part)
    del parts
    cols = {c.name: int(recs[f"c{i}.data"][:, 1].sum()) for i, c in enumerate(sch)}
    root = IndexRoot(
        segments=(SegmentInfo(seg, n_chunks, n_chunks * rpc, lay.size, sums),),
        num_chunks=n_chunks,
        num_rows=n_chunks * rpc,
        nbytes=int(recs["size"].sum()),
        column_bytes=cols,
    )
    now = time.time()
    m = Manifest(uuid.uuid4().hex, 1, sch, (), now, now, INDEXED_SINCE, root)
    raw = m.dumps()
    for rel in (version_path(1), "manifest.json"):
        with open(os.path.join(table, rel), "wb") as f:
            f.write(raw)
    return {"manifest_bytes": len(raw), "index_bytes": lay.size}


def _random_bytes(rng: np.random.Generator, n: int) -> list[bytes]:
    raw = rng.bytes(16 * n)
    return [raw[i : i + 16] for i in range(0, 16 * n, 16)]


# -- the measurements (one per child process) ---------------------------------------------------
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _import() -> tuple[Any, float]:
    t0 = time.perf_counter()
    import gpuload

    return gpuload, time.perf_counter() - t0


def child_phases(info: dict[str, Any]) -> dict[str, Any]:
    """Where open time and memory go, step by step."""
    _, imp = _import()
    from gpuload.format import Manifest
    from gpuload.reader import TableReader
    from gpuload.storage import Store

    path = os.path.join(info["table"], "manifest.json")
    out: dict[str, Any] = {"import_s": imp, "rss_start": _rss()}
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        raw = f.read()
    out["read_s"] = time.perf_counter() - t0
    out["rss_raw"] = _rss()
    t0 = time.perf_counter()
    d = json.loads(raw)
    out["json_s"] = time.perf_counter() - t0
    out["rss_json"] = _rss()
    del d
    gc.collect()
    out["rss_json_freed"] = _rss()
    t0 = time.perf_counter()
    m = Manifest.loads(raw, path)
    out["manifest_loads_s"] = time.perf_counter() - t0
    out["objects_and_validation_s"] = out["manifest_loads_s"] - out["json_s"]
    gc.collect()
    out["rss_manifest"] = _rss()
    del raw
    gc.collect()
    out["rss_manifest_no_raw"] = _rss()
    t0 = time.perf_counter()
    m.validate(path)
    out["validate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = TableReader(Store(info["table"]), m)
    out["reader_init_s"] = time.perf_counter() - t0
    out["rss_reader"] = _rss()
    t0 = time.perf_counter()
    rows = r.chunk_rows
    out["chunk_rows_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = m.dumps()
    out["dumps_s"] = time.perf_counter() - t0
    out["dumps_bytes"] = len(blob)
    out["peak_rss"] = _peak()
    out["bytes_per_chunk_manifest"] = (out["rss_manifest_no_raw"] - out["rss_start"]) / max(
        1, len(rows)
    )
    return out


def child_open(info: dict[str, Any]) -> dict[str, Any]:
    gpuload, imp = _import()
    rss0 = _rss()
    t0 = time.perf_counter()
    t = gpuload.open_table(info["table"])
    dt = time.perf_counter() - t0
    assert len(t) == info["rows"] and t.num_chunks == info["chunks"], (len(t), t.num_chunks)
    return {"import_s": imp, "open_s": dt, "rss_before": rss0, "rss_after": _rss(),
            "peak_rss": _peak()}  # fmt: skip


def _check_row(got: dict[str, Any], g: int, pool: list[bytes]) -> None:
    want = row_values(np.array([g]), pool)
    assert got["label"] == g, (got["label"], g)
    np.testing.assert_array_equal(got["state"], want["state"][0])
    assert got["instruction"] == want["instruction"][0], got["instruction"]
    assert got["image"] == want["image"][0], "image bytes differ"


def child_access(info: dict[str, Any]) -> dict[str, Any]:
    gpuload, imp = _import()
    pool = image_pool(info["image_bytes"])
    t = gpuload.open_table(info["table"])
    rpc = info["rows_per_chunk"]
    rows = info["rows_read"]["access"]
    times = []
    for g in rows:
        t0 = time.perf_counter()
        row = t[g].to_dict()
        times.append(time.perf_counter() - t0)
        _check_row(row, g, pool)
    t2 = gpuload.open_table(info["table"])  # a fresh snapshot: every chunk cold again
    label, warm = [], []
    for g in rows:
        t0 = time.perf_counter()
        v = t2[g]["label"]
        label.append(time.perf_counter() - t0)
        assert v == g, (v, g)
        h = g - g % rpc + (g + 1) % rpc  # another row of the same (now read) chunk
        t0 = time.perf_counter()
        v = t2[h]["label"]
        warm.append(time.perf_counter() - t0)
        assert v == h, (v, h)
    return {
        "import_s": imp,
        "first_row_s": times[0],
        "row_cold_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "first_label_s": label[0],
        "label_cold_s": statistics.median(label[1:]) if len(label) > 1 else None,
        "label_warm_s": statistics.median(warm[1:]) if len(warm) > 1 else None,
        "rows_checked": len(rows),
        "peak_rss": _peak(),
    }


def _child_batch(info: dict[str, Any], mode: str) -> dict[str, Any]:
    gpuload, imp = _import()
    pool = image_pool(info["image_bytes"])
    t = gpuload.open_table(info["table"])
    shuffle = True if mode == "full" else mode
    t0 = time.perf_counter()
    loader = t.batches(BATCH, shuffle=shuffle, seed=0)
    t1 = time.perf_counter()
    it = iter(loader)
    b = next(it)
    t2 = time.perf_counter()
    want = info["rows_read"][f"batch_{mode}"]
    got = np.asarray(b["label"]).tolist()
    assert got == want, "the batch's rows are not the ones the epoch order names"
    for k in (0, len(got) - 1):
        _check_row({c: b[c][k] for c in b}, got[k], pool)
    return {"import_s": imp, "build_s": t1 - t0, "first_batch_s": t2 - t1,
            "total_s": t2 - t0, "rows_checked": len(got), "peak_rss": _peak()}  # fmt: skip


def child_append(info: dict[str, Any]) -> dict[str, Any]:
    if info.get("format", "json") == "json":  # the JSON path itself, not a conversion to 4
        os.environ["GPULOAD_INDEX_THRESHOLD"] = str(1 << 50)
    gpuload, imp = _import()
    n = info["rows"]
    pool = image_pool(info["image_bytes"])
    t0 = time.perf_counter()
    t = gpuload.ingest(info["table"], row_values(np.arange(n, n + APPEND_ROWS), pool),
                       mode="append", schema=SCHEMA, progress=False)  # fmt: skip
    dt = time.perf_counter() - t0
    assert t.version == 2 and len(t) == n + APPEND_ROWS, (t.version, len(t))
    assert t.manifest.format_version == (4 if info.get("format") == "4" else 2)
    index = os.path.join(info["table"], "index")
    return {"import_s": imp, "append_s": dt, "peak_rss": _peak(),
            "manifest_bytes_after": os.path.getsize(
                os.path.join(info["table"], "versions", "v000000000002.json")),
            "index_files_after": len(os.listdir(index)) if os.path.isdir(index) else 0}  # fmt: skip


def child_profile(info: dict[str, Any]) -> dict[str, Any]:
    gpuload, _ = _import()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    gpuload.open_table(info["table"])
    prof.disable()
    total = time.perf_counter() - t0
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    top = []
    for (file, line, fn), (_, ncalls, tt, ct, _) in sorted(
        st.stats.items(), key=lambda kv: -kv[1][2]
    )[:20]:
        top.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": ncalls,
                    "own_s": round(tt, 3), "cum_s": round(ct, 3)})  # fmt: skip
    return {"profiled_open_s": total, "top_own_time": top}


CHILDREN = {
    "phases": child_phases,
    "open": child_open,
    "access": child_access,
    "batch_full": lambda info: _child_batch(info, "full"),
    "batch_block": lambda info: _child_batch(info, "block"),
    "append": child_append,
    "profile": child_profile,
}


# -- the parent ---------------------------------------------------------------------------------
def run_child(kind: str, info_path: str, timeout: float, mem_limit: int | None) -> dict[str, Any]:
    """One measurement in a fresh process; a failure of any kind is the result."""

    def limit() -> None:
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--info", info_path]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return {"ok": True, "wall_s": wall, **json.loads(lines[-1])}
    err = p.stderr.strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
    if p.returncode < 0:
        oom = " (out of memory?)" if p.returncode == -9 else ""
        err = [f"killed by signal {-p.returncode}{oom}"]
    return {"ok": False, "error": err[0][:300], "rc": p.returncode, "wall_s": wall}


def measure(n: int, args: argparse.Namespace, fmt: str = "json") -> dict[str, Any]:
    work = os.path.join(args.work, f"n{n}" if fmt == "json" else f"n{n}-f{fmt}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    info_path = os.path.join(work, "info.json")
    info = write_table(os.path.join(work, "table"), n, args.rows_per_chunk, args.image_bytes, fmt)
    with open(info_path, "w") as f:
        json.dump(info, f)
    res: dict[str, Any] = {"n": n, "format": fmt,
                           "table": {k: v for k, v in info.items() if k != "rows_read"}}  # fmt: skip
    res["loadavg_1min"] = os.getloadavg()[0]
    kinds = [*KINDS[:-1], *(["profile"] if args.profile and n == max(args.chunks) else []),
             KINDS[-1]]  # fmt: skip
    for kind in kinds:
        res[kind] = run_child(kind, info_path, args.timeout, args.mem_limit)
        print(f"  N={n:,} format {fmt} {kind}: {_brief(res[kind])}", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _brief(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"FAILED: {r.get('error')}"
    keys = ("open_s", "json_s", "manifest_loads_s", "row_cold_s", "first_batch_s", "append_s",
            "profiled_open_s")  # fmt: skip
    return ", ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), float))


def _fmt(r: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    if not r.get("ok"):
        return "fail: " + str(r.get("error", ""))[:40]
    v = r.get(key)
    return "-" if v is None else f"{v * scale:.{digits}g}"


def table_md(results: list[dict[str, Any]]) -> str:
    head = ("| N chunks | format | rows | manifest MB | index MB | open s | RSS after open MB | peak RSS MB | "
            "json.loads s | Manifest objects+checks s | reader init s | t[i] cold ms | "
            "t[i] first ms | t[i]['label'] warm ms | shuffled batch (full) s | "
            "(block) s | append commit s |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        t, o, p, a = r["table"], r["open"], r["phases"], r["access"]
        lines.append(
            "| " + " | ".join([
                f"{r['n']:,}", r.get("format", "json"), f"{t['rows']:,}",
                f"{t['manifest_bytes'] / 1e6:.3g}", f"{t.get('index_bytes', 0) / 1e6:.3g}",
                _fmt(o, "open_s"), _fmt(o, "rss_after", 1e-6, 4), _fmt(o, "peak_rss", 1e-6, 4),
                _fmt(p, "json_s"), _fmt(p, "objects_and_validation_s"),
                _fmt(p, "reader_init_s"), _fmt(a, "row_cold_s", 1e3),
                _fmt(a, "first_row_s", 1e3), _fmt(a, "label_warm_s", 1e3),
                _fmt(r["batch_full"], "total_s"), _fmt(r["batch_block"], "total_s"),
                _fmt(r["append"], "append_s"),
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="1000,10000,100000,1000000")
    ap.add_argument("--format", choices=("json", "4", "both"), default="json",
                    help="json: the chunk list in the manifest (formats 1-3); 4: index segments")  # fmt: skip
    ap.add_argument("--rows-per-chunk", type=int, default=1000)
    ap.add_argument("--image-bytes", type=int, default=26_000)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="address-space limit per child (default: 70%% of RAM)")  # fmt: skip
    ap.add_argument("--work", default=None, help="where tables are written (default: a tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the tables")
    ap.add_argument("--profile", action="store_true", help="cProfile the largest N's open")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        with open(args.info) as f:
            info = json.load(f)
        print(json.dumps(CHILDREN[args.child](info)))
        return 0
    args.chunks = [int(x) for x in args.chunks.split(",") if x.strip()]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gpuload.bench.machine import machine

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gb = args.mem_limit_gb
    args.mem_limit = int(gb * 2**30) if gb else int(0.7 * ram)
    cleanup = None
    if args.work is None:
        cleanup = args.work = tempfile.mkdtemp(prefix="manifest-scale-")
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['usable_cores']} cores, {mach['ram_gib']} GiB, "
          f"GPU {mach['gpu']}, load {mach['loadavg_1min_at_start']}", file=sys.stderr)  # fmt: skip
    results: list[dict[str, Any]] = []
    try:
        formats = FORMATS if args.format == "both" else (args.format,)
        for n in args.chunks:
            for fmt in formats:
                results.append(measure(n, args, fmt))
                _save(args, mach, results)  # after every N: a run stopped early keeps its data
    finally:
        if cleanup and not args.keep:
            shutil.rmtree(cleanup, ignore_errors=True)
    md = table_md(results)
    print(md)
    print(f"\nmachine: {mach['cpu']}, {mach['usable_cores']} usable cores, {mach['ram_gib']} GiB "
          f"RAM, GPU {mach['gpu']}, Python {mach['python']}; 1-min load at start "
          f"{mach['loadavg_1min_at_start']}")  # fmt: skip
    for r in results:
        prof = r.get("profile")
        if prof and prof.get("ok"):
            print(f"\ncProfile of open_table, N={r['n']:,} ({prof['profiled_open_s']:.2f} s):")
            for e in prof["top_own_time"][:12]:
                print(f"  {e['own_s']:8.3f} s own {e['cum_s']:8.3f} s cum {e['calls']:>9} "
                      f"{e['function']}")  # fmt: skip
    return 0


def _save(args: argparse.Namespace, mach: dict[str, Any], results: list[dict[str, Any]]) -> None:
    if args.out:
        skip = ("child", "info")
        doc = {"machine": mach, "args": {k: v for k, v in vars(args).items() if k not in skip},
               "results": results}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
