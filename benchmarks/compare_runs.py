#!/usr/bin/env python
"""Two ``gpuload bench`` runs of the same machine side by side, per measurement: medians,
new/old, and whether their min-max ranges overlap. For checking that a change to the benchmark
itself (not to gpuload) left its figures unchanged within noise.

    git worktree add /tmp/old <commit>
    (cd /tmp/old && PYTHONPATH=/tmp/old python -m gpuload bench --cache-dir C --out OLD)
    python -m gpuload bench --cache-dir C --out NEW
    python benchmarks/compare_runs.py OLD/results.json NEW/results.json [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics


def compare(old: dict, new: dict) -> dict:
    o = {e["id"]: e for e in old["results"] if e["status"] == "ok"}
    n = {e["id"]: e for e in new["results"] if e["status"] == "ok"}
    rows = []
    for i in [i for i in o if i in n]:
        a, b = o[i]["metrics"]["rows_s"], n[i]["metrics"]["rows_s"]
        overlap = not (b["max"] < a["min"] or a["max"] < b["min"])
        rows.append({"id": i, "old": a, "new": b, "new_over_old": b["median"] / a["median"],
                     "ranges_overlap": overlap, "repeats": a["n"]})  # fmt: skip
    r = [x["new_over_old"] for x in rows]
    return {
        "rows": rows,
        "median_new_over_old": statistics.median(r),
        "min": min(r),
        "max": max(r),
        "overlapping": sum(x["ranges_overlap"] for x in rows),
        "compared": len(rows),
        "load_at_start": [d["machine"].get("loadavg_1min_at_start") for d in (old, new)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    with open(a.old) as f, open(a.new) as g:
        res = compare(json.load(f), json.load(g))
    for x in res["rows"]:
        print(f"{x['id']:45s} {x['old']['median']:9.0f} {x['new']['median']:9.0f} "
              f"{x['new_over_old']:5.2f} {'overlap' if x['ranges_overlap'] else '-'}")  # fmt: skip
    print(f"median new/old {res['median_new_over_old']:.2f} ({res['min']:.2f}-{res['max']:.2f}); "
          f"ranges overlap in {res['overlapping']} of {res['compared']}")  # fmt: skip
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
