import json
import subprocess
import sys

import numpy as np
import pytest

import gpuload

from ..helpers import jpeg


def run(*args, root, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "gpuload", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_cli_ingest_info_ls_rm(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pq.write_table(
        pa.table({"image": [jpeg(rng) for _ in range(30)], "label": list(range(30))}),
        tmp_path / "d.parquet",
    )
    root = tmp_path / "root"
    out = run("ingest", str(tmp_path / "d.parquet"), "mytable", root=root).stdout
    assert "ingested 30 rows" in out
    info = json.loads(run("info", "mytable", "--json", root=root).stdout)
    assert (
        info["rows"] == 30
        and info["schema"] == {"image": "image/jpeg", "label": "int64"}
        and info["chunks"] == 1
    )
    text = run("info", "mytable", root=root).stdout
    assert "image/jpeg" in text and "rows     30" in text
    assert "mytable" in run("ls", root=root).stdout
    # ingest to a path, then info on that path
    run("ingest", str(tmp_path / "d.parquet"), str(tmp_path / "elsewhere" / "t2"), root=root)
    assert len(gpuload.open_table(tmp_path / "elsewhere" / "t2")) == 30
    # errors: one line, exit code 2
    p = run("ingest", str(tmp_path / "d.parquet"), "mytable", root=root, check=False)
    assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
    p = run("info", "nope", root=root, check=False)
    assert p.returncode == 2 and "no table named 'nope'" in p.stderr
    run("rm", "mytable", root=root)
    assert "no tables" in run("ls", root=root).stdout
