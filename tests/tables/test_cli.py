import json
import subprocess
import sys

import numpy as np
import pytest

import gpuload

from ..helpers import jpeg


def run(*args, root, check=True, cwd=None):
    p = subprocess.run(
        [sys.executable, "-m", "gpuload", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
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
    p = run("rm", "mytable", root=root, check=False)  # no terminal to ask on: refused
    assert p.returncode == 2 and "--yes" in p.stderr and "mytable" in run("ls", root=root).stdout
    run("rm", "mytable", "--yes", root=root)
    assert "no tables" in run("ls", root=root).stdout


def _image_folder(path, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(1)
    for c in classes:
        (path / c).mkdir(parents=True)
        for i in range(per_class):
            (path / c / f"{i}.jpg").write_bytes(jpeg(rng, 16, 20))
    return path


def test_one_naming_rule_from_a_fresh_root(tmp_path):
    """A bare name is a table under --root in every command (demo-table and bench included); a
    path is anything with a separator."""
    root, work = tmp_path / "root", tmp_path / "cwd"
    work.mkdir()
    run("demo-table", "training_data", "--rows", "12", "--no-progress", root=root, cwd=work)
    assert not (work / "training_data").exists()
    assert "training_data" in run("ls", root=root).stdout
    assert len(gpuload.Client(root).open_table("training_data")) == 12
    run("demo-table", "./local_copy", "--rows", "5", "--no-progress", root=root, cwd=work)
    assert len(gpuload.open_table(work / "local_copy")) == 5
    assert "local_copy" not in run("ls", root=root).stdout
    assert "rows     5" in run("info", "./local_copy", root=root, cwd=work).stdout
    for cmd in (("info",), ("verify",), ("vacuum", "--dry-run"), ("rm", "--yes")):
        p = run(cmd[0], "no_such_table", *cmd[1:], root=root, check=False)
        assert p.returncode == 2 and "no_such_table" in p.stderr and "Traceback" not in p.stderr
    p = run("bench", "no_such_table", "--quick", "--suites", "ingest", root=root, check=False)
    assert p.returncode != 0 and "no_such_table" in p.stderr and "Traceback" not in p.stderr


def test_version_and_errors_in_the_command_lines_words(tmp_path):
    p = run("--version", root=tmp_path)
    assert p.stdout.strip() == f"gpuload {gpuload.__version__}"
    src = _image_folder(tmp_path / "imgs")
    run("ingest", str(src), "pets", "--no-progress", root=tmp_path / "r")
    p = run("ingest", str(src), "pets", "--no-progress", root=tmp_path / "r", check=False)
    assert p.returncode == 2 and "--mode append or --mode overwrite" in p.stderr
    assert "mode='append'" not in p.stderr
    p = run("--storage-options", "{not json", "ls", root=tmp_path, check=False)
    assert p.returncode == 2 and "--storage-options" in p.stderr and "not JSON" in p.stderr


def test_info_shows_column_metadata(tmp_path):
    run("ingest", str(_image_folder(tmp_path / "imgs")), "pets", "--no-progress", root=tmp_path)
    text = run("info", "pets", root=tmp_path).stdout
    assert 'metadata {"class_names": ["cat", "dog"]}' in text
    info = json.loads(run("info", "pets", "--json", root=tmp_path).stdout)
    assert info["column_metadata"]["label"] == {"class_names": ["cat", "dog"]}


def test_rm_asks_on_a_terminal(tmp_path, monkeypatch, capsys):
    from gpuload.cli import main

    gpuload.Client(tmp_path).ingest("t", {"x": np.arange(3)})
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["--root", str(tmp_path), "rm", "t"]) == 1
    assert gpuload.Client(tmp_path).exists("t")
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["--root", str(tmp_path), "rm", "t"]) == 0
    assert not gpuload.Client(tmp_path).exists("t")


@pytest.mark.s3
def test_storage_options_reach_remote_tables(s3, tmp_path):
    url = s3.url("cli-remote")
    gpuload.ingest(url, {"x": np.arange(7)}, storage_options=s3.storage_options)
    opts = json.dumps(s3.storage_options)
    p = run("--storage-options", opts, "info", url, "--json", root=tmp_path)
    assert json.loads(p.stdout)["rows"] == 7
    p = run("info", url, root=tmp_path, check=False)  # without them the endpoint is unknown
    assert p.returncode != 0
    p = run("--storage-options", opts, "bench", url, "--quick", root=tmp_path, check=False)
    assert p.returncode != 0 and "--storage-options is not passed on" in p.stderr
