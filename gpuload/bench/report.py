"""The benchmark report: a terminal table shaped like the reference product's tables (rows/s,
MB/s, Gb/s ...), and ``--out DIR`` with report.md and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import textwrap
from typing import Any

from ..stats import STAGES

__all__ = ["terminal", "markdown", "write", "plots"]

log = logging.getLogger("gpuload.bench")

NOTES = {
    "train": (
        "On a machine without a GPU the loader's threads and the model share the same cores: "
        "'waiting on data' counts only the time the loop blocked on the next batch; the rest of "
        "the gap to the compute-bound ceiling is the two competing for the CPU."
    ),
    "codecs": (
        "x limit: images/s over raw libjpeg-turbo with the same threads; RRC windows: the "
        "e2e suite's RandomResizedCrop windows, decoded as the loader asks for them."
    ),
    "startup": (
        "first batch s: from the loader's iteration start (iter / first next) to the first "
        "batch in hand (after a device sync); stats() s: the same as the loader's own "
        "stats().time_to_first_batch_s (gpuload's torch and TF loaders); build s: making the "
        "loader or pipeline; import s: the framework and gpuload modules the script imports; "
        "python + harness s: process spawn to the task's first line (interpreter start and the "
        "harness's own import of gpuload); process start to first batch s: spawn to first batch. "
        "kernel / Numba files at start: files under $GPULOAD_CACHE_DIR/kernels and "
        "$NUMBA_CACHE_DIR as the task began (0 / 0 when cold)."
    ),
    "e2e": (
        "x limit: images/s over the limit (raw libjpeg-turbo full-size decode on all cores, "
        "decode suite); gpuload ÷ this: gpuload's default fast path over this row."
    ),
}

REMOTE_NOTE = (
    "HTTP object server rows: rows/s over whole epochs (the image row: images/s from the batch "
    "its label names on, as the local row excludes its warm-up). MB/s served: response bytes "
    "the server sent over the epoch's wall time. requests / peak in flight: the server's own "
    "counters over the whole epoch (peak: exact where the epoch raised the server's record, else "
    "'>=' the most seen polling it every 10 ms). first batch s: the loader's own stats(). x local: "
    "over the same read from local disk in this run (steady state, warm page cache); x http0: "
    "over the same row and epoch at 0 ms (the loopback HTTP stack's ceiling)."
)

STAGE_TITLE = "Where gpuload's loaders spend their time"
STAGE_NOTE = (
    "Read from each gpuload loader's own `stats()`: time to its first batch (building the image "
    "stage, compiling the kernel, first reads), then each stage's share of the stage time "
    "summed over the loader's threads in the timed window (wait = the consumer blocked on the "
    "next batch)."
)


# -- number formatting ---------------------------------------------------------------------------
def _num(v: float | None) -> str:
    """Three significant figures or so, thousands separated."""
    if v is None or not math.isfinite(v):
        return "-"
    spec = next((f for lim, f in ((100, ",.0f"), (10, ".1f"), (1, ".2f")) if abs(v) >= lim), ".3f")
    return format(v, spec)


def _mm(s: dict | None) -> str:
    """median (min-max), or the median alone for one repetition."""
    if not s:
        return "-"
    if s.get("n", 1) > 1:
        return f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})"
    return _num(s["median"])


def _med(s: dict | None) -> str:
    return _num(s["median"]) if s else "-"


def _f2(s: dict | None) -> str:
    return f"{s['median']:.2f}" if s else "-"


def _int(s: dict | None) -> str:
    return f"{s['median']:.0f}" if s else "-"


def _pct(s: dict | None) -> str:
    return f"{s['median']:.0f}%" if s else "-"


RATIO_TEXT = {
    "x_sequential": "{:.2f}x sequential",
    "gpuload_over_this": "gpuload {:.2f}x this",
    "gpuload_fast_path_over_this": "gpuload {:.2f}x this",
    "x_local": "{:.2f}x local",
}


def _stream_ratio(e: dict) -> str:
    r = e.get("ratios") or {}
    return next((f.format(r[k]) for k, f in RATIO_TEXT.items() if k in r), "-")


# -- columns per suite: (header, function(entry) -> text) ----------------------------------------
def _met(key: str, f=_mm):
    return lambda e: f(e["metrics"].get(key))


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ratio(key: str):
    return lambda e: _x(e.get("ratios", {}).get(key))


_CPU_RSS = [("CPU", _met("cpu_util_pct", _pct)), ("peak RSS MB", _met("peak_rss_mb", _med))]
_LATENCY = [("p50 ms", _met("p50_ms", _med)), ("p99 ms", _met("p99_ms", _med))]
_STREAM = [
    ("batch", lambda e: str(e.get("batch_size") or "-")),
    ("rows/s", _met("rows_s")),
    ("MB/s", _met("mb_s", _med)),
    ("Gb/s", _met("gbit_s", _f2)),
    *_LATENCY,
    *_CPU_RSS,
    ("ratio", _stream_ratio),
]


def _peak(e: dict) -> str:
    """Peak requests in flight (median of the runs)."""
    return _int(e["metrics"].get("peak_in_flight"))


# The HTTP object server's groups (entries whose info names the server): its counters and
# the ratios to local disk and to the same server without added delay.
_REMOTE = [
    ("batch", lambda e: str(e.get("batch_size") or "-")),
    ("rows/s", _met("rows_s")),
    ("MB/s served", _met("served_mb_s", lambda s: "0" if s and not s["median"] else _med(s))),
    ("first batch s", _met("first_batch_s", _f2)),
    ("requests", _met("server_requests", _int)),
    ("peak in flight", _peak),
    *_CPU_RSS,
    ("x local", _ratio("x_local")),
    ("x http0", _ratio("x_http0")),
]


def _columns(suite: str, entries: list[dict]) -> list[tuple[str, Any]]:
    """A group's columns: its suite's, or the HTTP object server's for the remote groups."""
    if any((e.get("info") or {}).get("server") == "http" for e in entries):
        return _REMOTE
    return COLUMNS.get(suite, [("rows/s", _met("rows_s"))])


def _cache_files(e: dict) -> str:
    """Files in the gpuload kernel cache / Numba's cache as a startup run began (medians)."""
    m = e["metrics"]
    return " / ".join(
        _int(m.get(k)) for k in ("kernel_cache_files_at_start", "numba_cache_files_at_start")
    )


COLUMNS: dict[str, list[tuple[str, Any]]] = {
    "ingest": [
        ("rows", lambda e: f"{e['info']['rows']:,}"),
        ("time s", _met("wall_s", _med)),
        ("rows/s", _met("rows_s")),
        ("MB/s", _met("mb_s")),
        ("of disk write", _met("fraction_of_disk", _f2)),
        *_CPU_RSS,
        ("gpuload ÷ this", _ratio("gpuload_over_this")),
    ],
    "stream": _STREAM,
    "memory": _STREAM,
    "decode": [
        ("images/s", _met("rows_s")),
        ("MB/s in", _met("mb_s", _med)),
        ("p50 ms/128", _met("p50_ms", _med)),
        ("p99 ms/128", _met("p99_ms", _med)),
        *_CPU_RSS,
        ("x limit", _ratio("x_limit")),
    ],
    "e2e": [
        ("images/s", _met("rows_s")),
        ("Gb/s out", _met("gbit_s", _f2)),
        *_LATENCY,
        *_CPU_RSS,
        ("x limit", _ratio("x_limit")),
        ("gpuload ÷ this", _ratio("gpuload_default_over_this")),
    ],
    "codecs": [
        ("images/s", _met("rows_s")),
        ("p50 ms/128", _met("p50_ms", _med)),
        *_CPU_RSS,
        ("x limit", _ratio("x_limit")),
    ],
    "kernel": [
        ("images/s", _met("rows_s")),
        ("us/image", lambda e: f"{1e6 / e['metrics']['rows_s']['median']:.0f}"),
        ("p50 ms/64", _met("p50_ms", _med)),
        ("compile s", _met("compile_s", _f2)),
        *_CPU_RSS,
    ],
    "startup": [
        ("first batch s", _met("first_batch_s")),
        ("stats() s", _met("loader_first_batch_s")),
        ("second batch s", _met("second_batch_s")),
        ("build s", _met("build_s")),
        ("import s", _met("import_s")),
        ("python + harness s", _met("harness_s")),
        ("process start to first batch s", _met("process_s")),
        ("kernel / Numba files at start", _cache_files),
    ],
    "train": [
        ("steps/s", _met("steps_s")),
        ("images/s", _met("rows_s")),
        ("waiting on data", _met("wait_pct", _pct)),
        *_CPU_RSS,
        ("x compute-bound", _ratio("x_compute_bound")),
    ],
}
GPU_COLUMNS = [("GPU util", _met("gpu_util_pct", _pct)), ("GPU mem MB", _met("gpu_mem_mb", _med))]


def _groups(doc: dict) -> list[tuple[str, str, list[dict]]]:
    """(suite, group title, entries) in the order the groups first ran."""
    groups: dict[str, tuple[str, list[dict]]] = {}
    for e in doc["results"]:
        groups.setdefault(e["group"], (e["suite"], []))[1].append(e)
    return [(suite, title, entries) for title, (suite, entries) in groups.items()]


def _rows(doc: dict, suite: str, entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """A group's table: full rows for measured entries, [label, status text] for the others."""
    cols = _columns(suite, entries)
    if doc["machine"].get("gpu", "none") != "none":
        cols = cols + GPU_COLUMNS
    rows = []
    for e in entries:
        if e["status"] == "ok":
            rows.append([e["label"]] + [f(e) for _, f in cols])
        else:
            status = {"missing": "MISSING", "not run": "NOT RUN"}.get(e["status"], "FAILED")
            rows.append([e["label"], f"{status}: {e.get('reason', '')}"])
    return ["method"] + [h for h, _ in cols], rows


def stage_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Where each gpuload loader's time goes: time to first batch and per-stage shares."""
    rows = []
    for e in doc["results"]:
        m = e.get("metrics") or {}
        if e["status"] == "ok" and "stage_read_pct" in m:
            stages = [f"{m[f'stage_{s}_pct']['median']:.0f}" for s in STAGES]
            rows.append([e["label"], _med(m.get("first_batch_s"))] + stages)
    return ["method", "first batch s"] + [f"{s} %" for s in STAGES], rows


# -- text and markdown ---------------------------------------------------------------------------
def _machine_line(doc: dict) -> str:
    m = doc["machine"]
    gpu, drv = m.get("gpu", "none"), f", driver {m['driver']}" if m.get("driver") else ""
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {gpu}{drv}"


def _table_line(t: dict) -> str:
    return (
        f"{t['rows']:,} rows, {t['bytes'] / 1e6:,.0f} MB, "
        f"mean JPEG {t['mean_image_bytes'] / 1e3:.1f} kB"
    )


def _fmt_row(r: list[str], widths: list[int]) -> str:
    first = r[0][: widths[0]].ljust(widths[0])
    return "  ".join([first] + [x.rjust(w) for x, w in zip(r[1:], widths[1:])])


def terminal(doc: dict) -> str:
    """The report as plain-text tables (one per group)."""
    c, t = doc["config"], doc["table"]
    lines = [
        f"gpuload bench  {doc['versions'].get('gpuload', '?')}  on {_machine_line(doc)}",
        f"table {t['url']}: {_table_line(t)}; device {c['device']}; "
        f"median (min-max) of {c['repeats']} fresh process(es) per row",
    ]
    for suite, title, entries in _groups(doc):
        head, rows = _rows(doc, suite, entries)
        full = [r for r in rows if len(r) == len(head)]
        widths = [max(len(x) for x in col) for col in zip(head, *full)]
        widths[0] = min(max(widths[0], 20), 84)
        lines += ["", f"== {title}", _fmt_row(head, widths)]
        for r in rows:  # a row that did not run is its label and the status text
            lines.append(_fmt_row(r, widths if len(r) == len(head) else widths[:1] + [0]))
    for w in doc.get("warnings", []):
        lines += ["", f"WARNING {w}"]
    head, rows = stage_table(doc)
    if rows:
        widths = [min(max(len(x) for x in col), 84) for col in zip(head, *rows)]
        lines += ["", f"== {STAGE_TITLE}", _fmt_row(head, widths)]
        lines += [_fmt_row(r, widths) for r in rows]
    if c.get("device") == "cpu" and any(e["suite"] == "train" for e in doc["results"]):
        lines += ["", "note (training): " + NOTES["train"]]
    if any(_columns(s, es) is _REMOTE for s, _, es in _groups(doc)):
        lines += ["", "note (remote): " + REMOTE_NOTE]
    missing = sorted({e["system"] for e in doc["results"] if e["status"] == "missing"})
    if missing:
        hint = "(pip install 'gpuload[peers]', or gpuload bench --install-peers)"
        lines += ["", f"missing peers: {', '.join(missing)} {hint}"]
    if doc.get("prepare_s"):
        prep = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in doc["prepare_s"].items())
        lines.append("preparation: " + prep)
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]], escape: bool = True) -> list[str]:
    """A markdown table; short rows are padded, ``|`` in cells escaped when ``escape``."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        r = r + [""] * (len(head) - len(r))
        out.append("| " + " | ".join(x.replace("|", "\\|") if escape else x for x in r) + " |")
    return out + [""]


def markdown(doc: dict, images: dict[str, str]) -> str:
    """report.md: the run's description, one table per group with its suite's plots, stage
    shares, latency plot and failures."""
    c, t, m = doc["config"], doc["table"], doc["machine"]
    cols = ", ".join(f"{k}: {val}" for k, val in t["columns"].items())
    out = [
        "# gpuload bench report",
        "",
        f"- started {doc['started']}; run time {doc['total_s']:.0f} s (demo table generation and "
        f"the peers' copies included, report writing not)",
        f"- machine: {_machine_line(doc)}; {m['platform']}, Python {m['python']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in doc["versions"].items()),
        f"- table: `{t['url']}`, {_table_line(t)}, columns {cols}",
        f"- device {c['device']}, suites {', '.join(c['suites'])}, batch sizes "
        f"{', '.join(map(str, c['batch_sizes']))}, "
        f"{c['repeats']} repetition(s){' (quick)' if c['quick'] else ''}",
        f"- command: `{c['command']}`",
        "",
        "## Method",
        "",
        doc["method"],
        "",
    ]
    for w in doc.get("warnings", []):
        out += [f"> **Warning**: {w}", ""]
    groups = _groups(doc)
    last_of = {g[0]: i for i, g in enumerate(groups)}  # plots go after a suite's last table
    for gi, (suite, title, entries) in enumerate(groups):
        out += [f"## {title}", "", *_md_table(*_rows(doc, suite, entries))]
        if suite in NOTES and (suite != "train" or c.get("device") == "cpu"):
            out += [NOTES[suite], ""]
        if _columns(suite, entries) is _REMOTE and REMOTE_NOTE not in out:  # the first one
            out += [REMOTE_NOTE, ""]
        if suite in images and last_of[suite] == gi:
            out += [f"![{suite}]({images[suite]})", ""]
            if suite == "stream" and "stream_batch_sizes" in images:
                out += [f"![stream per batch size]({images['stream_batch_sizes']})", ""]
    head, rows = stage_table(doc)
    if rows:
        out += [f"## {STAGE_TITLE}", "", STAGE_NOTE, "", *_md_table(head, rows, escape=False)]
    if "latency" in images:
        out += ["## Batch latency", "", f"![latency]({images['latency']})", ""]
    failed = [e for e in doc["results"] if e["status"] == "failed"]
    if failed:
        out += ["## Failures", ""]
        for e in failed:
            out += [f"### {e['id']}", "", "```", e.get("error", e.get("reason", "")), "```", ""]
    return "\n".join(out)


# -- plots ---------------------------------------------------------------------------------------
GPULOAD_COLOR = "#1f77b4"
PEER_COLOR = "#9a9a9a"
FAIL_COLOR = "#b00"
PEERS = "peers / baselines"


def run_context(doc: dict) -> str:
    """The run in one line, stamped on every plot (a plot is often shared alone)."""
    m, t = doc["machine"], doc["table"]
    return (
        f"gpuload {doc['versions'].get('gpuload', '?')} · {m['cpu']}, {m['cores']} cores · "
        f"GPU: {m.get('gpu') or 'none'} · {t['rows']:,} rows · "
        f"{doc['config']['repeats']} process(es) per bar · {doc['started'][:10]}"
    )


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, context: str) -> None:
    """Stamp the run context and save without clipping titles, labels or whiskers."""
    fig.text(0.01, 0.005, context, fontsize=6, color="#555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    _pyplot().close(fig)


def _spread(s: dict | None) -> tuple[float, float, float]:
    """(median, distance down to min, distance up to max) for bars with whiskers; 0s if none."""
    return (s["median"], s["median"] - s["min"], s["max"] - s["median"]) if s else (0, 0, 0)


def _bar_chart(entries: list[dict], title: str, unit: str, path: str, context: str) -> None:
    """Horizontal rows/s bars, one per entry, gpuload coloured apart from the peers."""
    from matplotlib.patches import Patch

    n = len(entries)
    fig, ax = _pyplot().subplots(figsize=(10, 0.45 * n + 1.4 + 0.18 * title.count("\n")))
    labels = [e["label"] if len(e["label"]) <= 70 else e["label"][:67] + "..." for e in entries]
    spreads = [_spread(e["metrics"]["rows_s"] if e["status"] == "ok" else None) for e in entries]
    vals, lo, hi = (list(x) for x in zip(*spreads))
    colors = [GPULOAD_COLOR if e["system"] == "gpuload" else PEER_COLOR for e in entries]
    y = list(range(n))[::-1]
    ax.barh(y, vals, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ends = [v + h for v, h in zip(vals, hi)]  # where each whisker ends
    top = max(ends) if any(ends) else 1
    for yi, e, v, end in zip(y, entries, vals, ends):
        if e["status"] != "ok":
            ax.text(top * 0.01, yi, e["status"].upper(), va="center", fontsize=8, color=FAIL_COLOR)
            continue
        note = "  (above its ceiling: machine busy)" if e.get("above_ceiling") else ""
        color = FAIL_COLOR if note else "black"
        # the value goes past the whisker, never over it
        ax.text(end + top * 0.01, yi, f"{v:,.0f}{note}", va="center", fontsize=7, color=color)
    ax.set_xlabel(f"{unit}/s (median; whiskers min-max)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, top * 1.3)
    legend = [Patch(color=GPULOAD_COLOR, label="gpuload"), Patch(color=PEER_COLOR, label=PEERS)]
    ax.legend(handles=legend, fontsize=7, loc="lower right")
    _save(fig, path, context)


def _latency_chart(entries: list[dict], path: str, context: str) -> bool:
    """Box plots of the time between batches (log scale); False when no entry has latencies."""
    import matplotlib

    data = [e for e in entries if e["status"] == "ok" and e.get("latency_ms")][::-1]
    if not data:
        return False
    fig, ax = _pyplot().subplots(figsize=(10, 0.42 * len(data) + 1.4))
    # matplotlib 3.10 names the orientation; 3.11 deprecates the older vert=False
    new = tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    horizontal = {"orientation": "horizontal"} if new else {"vert": False}
    lat = [e["latency_ms"] for e in data]
    bp = ax.boxplot(lat, whis=(1, 99), showfliers=False, patch_artist=True, **horizontal)
    for patch, e in zip(bp["boxes"], data):
        patch.set_facecolor(GPULOAD_COLOR if e["system"] == "gpuload" else PEER_COLOR)
    ax.set_yticks(range(1, len(data) + 1))
    ax.set_yticklabels([e["label"][:60] for e in data], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("time between batches at the consumer, ms (box: quartiles; whiskers: p1-p99)")
    ax.set_title("Batch latency distribution", fontsize=9)
    _save(fig, path, context)
    return True


BATCH_SIZE_SERIES = {  # name -> (entry id prefix, colour)
    "gpuload batches()": ("stream.local.seq.bs", GPULOAD_COLOR),
    "gpuload batches(shuffle=True)": ("stream.local.shuffle.bs", "#6baed6"),
    "Deeplake ds.batches()": ("stream.deeplake.seq.bs", PEER_COLOR),
}


def _batch_size_chart(entries: list[dict], path: str, context: str) -> bool:
    """Raw stream rows/s per batch size: gpuload sequential, shuffled, Deeplake side by side
    (the reference's streaming table as bars)."""
    by_id = {e["id"]: e for e in entries}
    sizes = sorted({e["batch_size"] for e in entries if e["id"].startswith("stream.local.seq.bs")})
    if not sizes:
        return False
    fig, ax = _pyplot().subplots(figsize=(8, 4.2))
    width = 0.8 / len(BATCH_SIZE_SERIES)
    fail = {"rotation": 90, "ha": "center", "va": "bottom", "fontsize": 7, "color": FAIL_COLOR}
    for k, (name, (prefix, color)) in enumerate(BATCH_SIZE_SERIES.items()):
        xs, spreads = [], []
        for i, bs in enumerate(sizes):
            e = by_id.get(f"{prefix}{bs}")
            if e is None:
                continue
            x = i + (k - (len(BATCH_SIZE_SERIES) - 1) / 2) * width
            if e["status"] != "ok":
                ax.text(x, 0, e["status"].upper(), **fail)
                continue
            xs.append(x)
            spreads.append(_spread(e["metrics"]["rows_s"]))
        if xs:
            vals, lo, hi = (list(v) for v in zip(*spreads))
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=name, color=color)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"batch {b}" for b in sizes])
    ax.set_ylabel("rows/s (median; whiskers min-max)")
    ax.set_title("Raw stream, local, no decode: rows/s per batch size", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path, context)
    return True


STARTUP_PARTS = (  # metric, legend, colour: the parts of process start -> first batch
    ("harness_s", "python + harness", "#c7c7c7"),
    ("import_s", "imports", "#9ecae1"),
    ("build_s", "build", "#4292c6"),
    ("first_batch_s", "first batch", GPULOAD_COLOR),
)


def _startup_chart(entries: list[dict], path: str, context: str) -> bool:
    """Process start -> first batch per startup case, stacked by part (medians), whiskers the
    min-max of the whole; cold and warm rows side by side."""
    data = [e for e in entries if e["status"] == "ok" and "process_s" in e["metrics"]][::-1]
    if not data:
        return False
    fig, ax = _pyplot().subplots(figsize=(10, 0.42 * len(data) + 1.6))
    y = range(len(data))
    left = [0.0] * len(data)
    for key, name, color in STARTUP_PARTS:
        w = [e["metrics"].get(key, {}).get("median", 0.0) for e in data]
        ax.barh(y, w, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, w)]
    med, lo, hi = zip(*(_spread(e["metrics"]["process_s"]) for e in data))
    ax.errorbar(med, y, xerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
    for yi, v, h, e in zip(y, med, hi, data):  # processes per row differ here (cold: fewer)
        n = e["metrics"]["process_s"]["n"]
        ax.text(
            v + h, yi, f"  {v:.2f} s ({n} process{'es' if n > 1 else ''})", va="center", fontsize=7
        )
    ax.set_yticks(list(y))
    ax.set_yticklabels([e["label"][:70] for e in data], fontsize=7)
    ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.2)
    ax.set_xlabel("seconds from process start to the first batch (median; whiskers min-max)")
    ax.set_title("Time to first batch in a fresh process, cold and warm caches", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path, context)
    return True


EXTRA_CHARTS = (  # (name, chart, suites it draws from); a chart returns False when it has nothing
    ("stream_batch_sizes", _batch_size_chart, ("stream",)),
    ("latency", _latency_chart, ("stream", "e2e")),
    ("startup", _startup_chart, ("startup",)),
)


def plots(doc: dict, out: str) -> dict[str, str]:
    """One throughput chart per suite and a latency chart; returns {suite: file name}."""
    images = {}
    context = run_context(doc)
    results = doc["results"]
    for suite in ("ingest", "stream", "memory", "decode", "codecs", "kernel", "e2e", "train"):
        entries = [e for e in results if e["suite"] == suite]
        if entries:
            unit = "rows" if suite in ("ingest", "stream", "memory") else "images"
            groups = dict.fromkeys(e["group"] for e in entries)
            title = "\n".join(textwrap.fill(g, 110) for g in groups)
            images[suite] = f"throughput_{suite}.png"
            _bar_chart(entries, title, unit, os.path.join(out, images[suite]), context)
    for name, chart, suites in EXTRA_CHARTS:
        entries = [e for e in results if e["suite"] in suites]
        if entries and chart(entries, os.path.join(out, f"{name}.png"), context):
            images[name] = f"{name}.png"
    return images


def write(doc: dict, out: str) -> None:
    """report.md and the PNG plots into ``out`` (results.json is written by the caller)."""
    os.makedirs(out, exist_ok=True)
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed, no plots (pip install 'gpuload[bench]')")
        images = {}
    else:
        images = plots(doc, out)
    doc["plots"] = sorted(images.values())
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(doc, images) + "\n")
