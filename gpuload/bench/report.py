"""The benchmark report: a terminal table shaped like the reference product's tables (rows/s,
MB/s, Gb/s ...), and ``--out DIR`` with report.md and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os
from typing import Any

from ..stats import STAGES

__all__ = ["terminal", "markdown", "write", "plots"]

SUITE_TITLES = {
    "ingest": "Ingest",
    "stream": "Streaming (no decode)",
    "memory": "Memory",
    "decode": "Decode",
    "e2e": "End to end",
    "train": "Training",
}


NOTES = {
    "train": (
        "On a machine without a GPU the loader's threads and the model share the same cores: "
        "'waiting on data' counts only the time the loop blocked on the next batch; the rest of "
        "the gap to the compute-bound ceiling is the two competing for the CPU."
    ),
    "e2e": (
        "x limit: images/s over the limit (raw libjpeg-turbo full-size decode on all cores, "
        "decode suite); gpuload ÷ this: gpuload's default fast path over this row."
    ),
}


# -- number formatting ---------------------------------------------------------------------------
def _num(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _mm(s: dict | None, spread: bool = True) -> str:
    """median (min-max), or the median alone for one repetition."""
    if not s:
        return "-"
    if s.get("n", 1) > 1 and spread:
        return f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})"
    return _num(s["median"])


def _pct(s: dict | None) -> str:
    return "-" if not s else f"{s['median']:.0f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


RATIO_TEXT = {
    "x_sequential": "{:.2f}x sequential",
    "gpuload_over_this": "gpuload {:.2f}x this",
    "gpuload_fast_path_over_this": "gpuload {:.2f}x this",
    "x_local": "{:.2f}x local",
}


def _stream_ratio(e: dict) -> str:
    r = e.get("ratios") or {}
    for k, f in RATIO_TEXT.items():
        if k in r:
            return f.format(r[k])
    return "-"


# -- columns per suite -----------------------------------------------------------------------------
def _columns(suite: str, gpu: bool) -> list[tuple[str, Any]]:
    """(header, function(entry) -> text) for a suite's table."""

    def met(key, f=_mm):
        return lambda e: f(e["metrics"].get(key))

    def ratio(key):
        return lambda e: _x(e.get("ratios", {}).get(key))

    rate = ("rows/s", met("rows_s"))
    if suite == "ingest":
        cols = [
            ("rows", lambda e: f"{e['info']['rows']:,}"),
            ("time s", met("wall_s", lambda s: _num(s["median"]) if s else "-")),
            rate,
            ("MB/s", met("mb_s")),
            (
                "of disk write",
                lambda e: (
                    f"{e['metrics']['fraction_of_disk']['median']:.2f}"
                    if "fraction_of_disk" in e["metrics"]
                    else "-"
                ),
            ),
            ("CPU", met("cpu_util_pct", _pct)),
            ("peak RSS MB", met("peak_rss_mb", lambda s: _num(s["median"]))),
            ("gpuload ÷ this", ratio("gpuload_over_this")),
        ]
    elif suite in ("stream", "memory"):
        cols = [
            ("batch", lambda e: str(e.get("batch_size") or "-")),
            rate,
            ("MB/s", met("mb_s", lambda s: _num(s["median"]) if s else "-")),
            ("Gb/s", met("gbit_s", lambda s: f"{s['median']:.2f}" if s else "-")),
            ("p50 ms", met("p50_ms", lambda s: _num(s["median"]) if s else "-")),
            ("p99 ms", met("p99_ms", lambda s: _num(s["median"]) if s else "-")),
            ("CPU", met("cpu_util_pct", _pct)),
            ("peak RSS MB", met("peak_rss_mb", lambda s: _num(s["median"]))),
            ("ratio", _stream_ratio),
        ]
    elif suite == "decode":
        cols = [
            ("images/s", met("rows_s")),
            ("MB/s in", met("mb_s", lambda s: _num(s["median"]) if s else "-")),
            ("p50 ms/128", met("p50_ms", lambda s: _num(s["median"]) if s else "-")),
            ("p99 ms/128", met("p99_ms", lambda s: _num(s["median"]) if s else "-")),
            ("CPU", met("cpu_util_pct", _pct)),
            ("peak RSS MB", met("peak_rss_mb", lambda s: _num(s["median"]))),
            ("x limit", ratio("x_limit")),
        ]
    elif suite == "e2e":
        cols = [
            ("images/s", met("rows_s")),
            ("Gb/s out", met("gbit_s", lambda s: f"{s['median']:.2f}" if s else "-")),
            ("p50 ms", met("p50_ms", lambda s: _num(s["median"]) if s else "-")),
            ("p99 ms", met("p99_ms", lambda s: _num(s["median"]) if s else "-")),
            ("CPU", met("cpu_util_pct", _pct)),
            ("peak RSS MB", met("peak_rss_mb", lambda s: _num(s["median"]))),
            ("x limit", ratio("x_limit")),
            ("gpuload ÷ this", ratio("gpuload_default_over_this")),
        ]
    elif suite == "train":
        cols = [
            ("steps/s", met("steps_s")),
            ("images/s", met("rows_s")),
            ("waiting on data", met("wait_pct", _pct)),
            ("CPU", met("cpu_util_pct", _pct)),
            ("peak RSS MB", met("peak_rss_mb", lambda s: _num(s["median"]))),
            ("x compute-bound", ratio("x_compute_bound")),
        ]
    else:  # pragma: no cover
        cols = [rate]
    if gpu:
        cols += [
            ("GPU util", met("gpu_util_pct", _pct)),
            ("GPU mem MB", met("gpu_mem_mb", lambda s: _num(s["median"]) if s else "-")),
        ]
    return cols


def _groups(doc: dict) -> list[tuple[str, str, list[dict]]]:
    """(suite, group title, entries) in the order they ran."""
    out: list[tuple[str, str, list[dict]]] = []
    for e in doc["results"]:
        if out and out[-1][1] == e["group"]:
            out[-1][2].append(e)
        else:
            found = next((g for g in out if g[1] == e["group"]), None)
            if found:
                found[2].append(e)
            else:
                out.append((e["suite"], e["group"], [e]))
    return out


def _status_text(e: dict) -> str:
    if e["status"] == "missing":
        return f"MISSING: {e['reason']}"
    if e["status"] == "not run":
        return f"NOT RUN: {e['reason']}"
    return f"FAILED: {e.get('reason', '')}"


def _rows(doc: dict, suite: str, entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    gpu = doc["machine"].get("gpu", "none") != "none"
    cols = _columns(suite, gpu)
    head = ["method"] + [c[0] for c in cols]
    rows = []
    for e in entries:
        name = e["label"]
        if e["status"] == "ok":
            rows.append([name] + [f(e) for _, f in cols])
        else:
            rows.append([name, _status_text(e)])
    return head, rows


STAGE_NOTE = (
    "Read from each gpuload loader's own `stats()`: time to its first batch (building the image "
    "stage, compiling the kernel, first reads), then each stage's share of the stage time "
    "summed over the loader's threads in the timed window (wait = the consumer blocked on the "
    "next batch)."
)


def stage_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Where each gpuload loader's time goes: time to first batch and per-stage shares."""
    head = ["method", "first batch s"] + [f"{s} %" for s in STAGES]
    rows = []
    for e in doc["results"]:
        m = e.get("metrics") or {}
        if e["status"] != "ok" or "stage_read_pct" not in m:
            continue
        first = m.get("first_batch_s")
        rows.append(
            [e["label"], _num(first["median"]) if first else "-"]
            + [f"{m[f'stage_{s}_pct']['median']:.0f}" for s in STAGES]
        )
    return head, rows


def _machine_line(doc: dict) -> str:
    m = doc["machine"]
    gpu = m.get("gpu", "none")
    drv = f", driver {m['driver']}" if m.get("driver") else ""
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {gpu}{drv}"


def _fmt_row(r: list[str], widths: list[int]) -> str:
    return "  ".join(
        (x[: widths[0]].ljust(widths[0]) if i == 0 else x.rjust(widths[i])) for i, x in enumerate(r)
    )


def terminal(doc: dict) -> str:
    """The report as plain-text tables (one per group)."""
    c = doc["config"]
    t = doc["table"]
    lines = [
        f"gpuload bench  {doc['versions'].get('gpuload', '?')}  on {_machine_line(doc)}",
        f"table {t['url']}: {t['rows']:,} rows, {t['bytes'] / 1e6:,.0f} MB, mean JPEG {t['mean_image_bytes'] / 1e3:.1f} kB; "
        f"device {c['device']}; median (min-max) of {c['repeats']} fresh process(es) per row",
    ]
    for suite, title, entries in _groups(doc):
        head, rows = _rows(doc, suite, entries)
        lines.append("")
        lines.append(f"== {title}")
        widths = [len(h) for h in head]
        for r in rows:
            if len(r) == len(head):
                widths = [max(w, len(x)) for w, x in zip(widths, r)]
        widths[0] = min(max(widths[0], 20), 84)
        lines.append(_fmt_row(head, widths))
        for r in rows:
            if len(r) == len(head):
                lines.append(_fmt_row(r, widths))
            else:
                lines.append(r[0][: widths[0]].ljust(widths[0]) + "  " + r[1])
    for w in doc.get("warnings", []):
        lines += ["", f"WARNING {w}"]
    head, rows = stage_table(doc)
    if rows:
        lines += ["", "== Where gpuload's loaders spend their time"]
        widths = [min(max(len(h), *(len(r[i]) for r in rows)), 84) for i, h in enumerate(head)]
        lines += [_fmt_row(head, widths)] + [_fmt_row(r, widths) for r in rows]
    if doc["config"].get("device") == "cpu" and any(e["suite"] == "train" for e in doc["results"]):
        lines += ["", "note (training): " + NOTES["train"]]
    missing = sorted({e["system"] for e in doc["results"] if e["status"] == "missing"})
    if missing:
        lines.append("")
        lines.append(
            f"missing peers: {', '.join(missing)} (pip install 'gpuload[peers]', or gpuload bench --install-peers)"
        )
    prep = doc.get("prepare_s") or {}
    if prep:
        lines.append("preparation: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in prep.items()))
    return "\n".join(lines)


def markdown(doc: dict, images: dict[str, str]) -> str:
    c = doc["config"]
    t = doc["table"]
    v = doc["versions"]
    out = [
        "# gpuload bench report",
        "",
        f"- started {doc['started']}; run time {doc['total_s']:.0f} s (demo table generation and "
        f"the peers' copies included, report writing not)",
        f"- machine: {_machine_line(doc)}; {doc['machine']['platform']}, Python {doc['machine']['python']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- table: `{t['url']}`, {t['rows']:,} rows, {t['bytes'] / 1e6:,.0f} MB, mean JPEG {t['mean_image_bytes'] / 1e3:.1f} kB, "
        f"columns {', '.join(f'{k}: {val}' for k, val in t['columns'].items())}",
        f"- device {c['device']}, suites {', '.join(c['suites'])}, batch sizes {', '.join(map(str, c['batch_sizes']))}, "
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
        head, rows = _rows(doc, suite, entries)
        out += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if len(r) < len(head):
                r = r + [""] * (len(head) - len(r))
            out.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
        out.append("")
        if suite in NOTES and (suite != "train" or c.get("device") == "cpu"):
            out += [NOTES[suite], ""]
        if suite in images and last_of[suite] == gi:
            out += [f"![{suite}]({images[suite]})", ""]
            if suite == "stream" and "stream_batch_sizes" in images:
                out += [f"![stream per batch size]({images['stream_batch_sizes']})", ""]
    head, rows = stage_table(doc)
    if rows:
        out += ["## Where gpuload's loaders spend their time", "", STAGE_NOTE, ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
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


def run_context(doc: dict) -> str:
    """The run in one line, stamped on every plot (a plot is often shared alone)."""
    m, t = doc["machine"], doc["table"]
    gpu = m.get("gpu") or "none"
    return (
        f"gpuload {doc['versions'].get('gpuload', '?')} · {m['cpu']}, {m['cores']} cores · "
        f"GPU: {gpu} · {t['rows']:,} rows · {doc['config']['repeats']} process(es) per bar · "
        f"{doc['started'][:10]}"
    )


def _save(fig, path: str, context: str) -> None:
    """Stamp the run context and save without clipping titles, labels or whiskers."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.005, context, fontsize=6, color="#555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def _bar_chart(entries: list[dict], title: str, unit: str, path: str, context: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(entries)
    fig, ax = plt.subplots(figsize=(10, 0.45 * n + 1.4 + 0.18 * title.count("\n")))
    labels, vals, lo, hi, colors = [], [], [], [], []
    for e in entries:
        lab = e["label"]
        labels.append(lab if len(lab) <= 70 else lab[:67] + "...")
        s = e["metrics"]["rows_s"] if e["status"] == "ok" else None
        vals.append(s["median"] if s else 0)
        lo.append(s["median"] - s["min"] if s else 0)
        hi.append(s["max"] - s["median"] if s else 0)
        colors.append(GPULOAD_COLOR if e["system"] == "gpuload" else PEER_COLOR)
    y = list(range(n))[::-1]
    ax.barh(y, vals, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ends = [v + h for v, h in zip(vals, hi)]  # where each whisker ends
    top = max(ends) if any(ends) else 1
    for yi, e, v, end in zip(y, entries, vals, ends):
        if e["status"] != "ok":
            ax.text(top * 0.01, yi, e["status"].upper(), va="center", fontsize=8, color="#b00")
            continue
        note = "  (above its ceiling: machine busy)" if e.get("above_ceiling") else ""
        color = "#b00" if note else "black"
        # the value goes past the whisker, never over it
        ax.text(end + top * 0.01, yi, f"{v:,.0f}{note}", va="center", fontsize=7, color=color)
    ax.set_xlabel(f"{unit}/s (median; whiskers min-max)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, top * 1.3)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=GPULOAD_COLOR, label="gpuload"),
            Patch(color=PEER_COLOR, label="peers / baselines"),
        ],
        fontsize=7,
        loc="lower right",
    )
    _save(fig, path, context)


def _latency_chart(entries: list[dict], path: str, context: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [
        (e["label"][:60], e["latency_ms"], e["system"])
        for e in entries
        if e["status"] == "ok" and e.get("latency_ms")
    ]
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(data) + 1.4))
    # matplotlib 3.10 names the orientation; 3.11 deprecates the older vert=False
    horizontal = (
        {"orientation": "horizontal"}
        if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10)
        else {"vert": False}
    )
    bp = ax.boxplot(
        [d[1] for d in data][::-1],
        whis=(1, 99),
        showfliers=False,
        patch_artist=True,
        **horizontal,
    )
    for patch, d in zip(bp["boxes"], data[::-1]):
        patch.set_facecolor(GPULOAD_COLOR if d[2] == "gpuload" else PEER_COLOR)
    ax.set_yticks(range(1, len(data) + 1))
    ax.set_yticklabels([d[0] for d in data][::-1], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("time between batches at the consumer, ms (box: quartiles; whiskers: p1-p99)")
    ax.set_title("Batch latency distribution", fontsize=9)
    _save(fig, path, context)
    return True


def _batch_size_chart(entries: list[dict], path: str, context: str) -> bool:
    """Raw stream rows/s per batch size: gpuload sequential, shuffled, Deeplake side by side
    (the reference's streaming table as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "gpuload batches()": "stream.local.seq.bs",
        "gpuload batches(shuffle=True)": "stream.local.shuffle.bs",
        "Deeplake ds.batches()": "stream.deeplake.seq.bs",
    }
    by_id = {e["id"]: e for e in entries}
    sizes = sorted({e["batch_size"] for e in entries if e["id"].startswith("stream.local.seq.bs")})
    if not sizes:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(series)
    colors = [GPULOAD_COLOR, "#6baed6", PEER_COLOR]
    for k, (name, prefix) in enumerate(series.items()):
        xs, vals, lo, hi = [], [], [], []
        for i, bs in enumerate(sizes):
            e = by_id.get(f"{prefix}{bs}")
            if e is None:
                continue
            x = i + (k - (len(series) - 1) / 2) * width
            if e["status"] != "ok":
                ax.text(
                    x,
                    0,
                    e["status"].upper(),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="#b00",
                )
                continue
            s = e["metrics"]["rows_s"]
            xs.append(x)
            vals.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        if xs:
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=name, color=colors[k])
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"batch {b}" for b in sizes])
    ax.set_ylabel("rows/s (median; whiskers min-max)")
    ax.set_title("Raw stream, local, no decode: rows/s per batch size", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path, context)
    return True


def plots(doc: dict, out: str) -> dict[str, str]:
    """One throughput chart per suite and a latency chart; returns {suite: file name}."""
    images = {}
    context = run_context(doc)
    for suite in ("ingest", "stream", "memory", "decode", "e2e", "train"):
        entries = [e for e in doc["results"] if e["suite"] == suite]
        if not entries:
            continue
        unit = "rows" if suite in ("ingest", "stream", "memory") else "images"
        name = f"throughput_{suite}.png"
        import textwrap

        title = "\n".join(textwrap.fill(g, 110) for g in dict.fromkeys(e["group"] for e in entries))
        _bar_chart(entries, title, unit, os.path.join(out, name), context)
        images[suite] = name
    stream = [e for e in doc["results"] if e["suite"] == "stream"]
    if stream and _batch_size_chart(stream, os.path.join(out, "stream_batch_sizes.png"), context):
        images["stream_batch_sizes"] = "stream_batch_sizes.png"
    lat = [e for e in doc["results"] if e["suite"] in ("stream", "e2e") and e.get("latency_ms")]
    if lat and _latency_chart(lat, os.path.join(out, "latency.png"), context):
        images["latency"] = "latency.png"
    return images


def write(doc: dict, out: str) -> None:
    """report.md and the PNG plots into ``out`` (results.json is written by the caller)."""
    import importlib.util

    os.makedirs(out, exist_ok=True)
    if importlib.util.find_spec("matplotlib") is None:
        import sys

        print(
            "gpuload bench: matplotlib is not installed, no plots (pip install 'gpuload[bench]')",
            file=sys.stderr,
        )
        images = {}
    else:
        images = plots(doc, out)
    doc["plots"] = sorted(images.values())
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(doc, images) + "\n")
