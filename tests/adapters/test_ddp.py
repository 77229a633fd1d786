"""torchrun with two processes on the gloo backend: disjoint equal shards covering the table."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")

import gpuload  # noqa: E402

from ..helpers import robot_columns  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rows,uneven", [(101, "pad"), (101, "drop"), (3, "pad")])
def test_torchrun_gloo_two_ranks(tmp_path, rows, uneven):
    cols = robot_columns(rows, seed=8)
    t = gpuload.ingest(tmp_path / "t", cols, chunk_bytes=16 << 10)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        os.path.join(ROOT, "tests", "adapters", "_ddp_child.py"),
        t.url,
        str(out),
        uneven,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for e in range(2):
        a, b = (r["epochs"][e] for r in ranks)
        assert a["batches"] == b["batches"] > 0
        if uneven == "drop":
            assert not set(a["texts"]) & set(b["texts"])  # disjoint
            assert len(a["texts"]) == len(b["texts"]) == rows // 2
        else:
            assert set(a["texts"]) | set(b["texts"]) == set(cols["text"])  # covers the table
            assert len(a["texts"]) == len(b["texts"]) == -(-rows // 2)
    if rows > 10:
        assert (
            ranks[0]["epochs"][0]["texts"] != ranks[0]["epochs"][1]["texts"]
        )  # new order per epoch
