"""Tables on a real Google Cloud Storage JSON-API endpoint on 127.0.0.1 (gcp-storage-emulator in
a child process) through gcsfs: write, list, range reads, shuffled batches, append, vacuum."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

import gpuload
from gpuload.errors import TableNotFoundError
from gpuload.storage import Store
from gpuload.vacuum import vacuum_store

from ..helpers import robot_columns

pytestmark = pytest.mark.gcs

# gcp-storage-emulator ignores upload preconditions; real GCS answers 412 to an upload with
# ifGenerationMatch=0 when the object exists (that is how gpuload creates a version only if it
# does not exist). The child adds exactly that check, under a lock, to the emulator's upload
# handlers, so the commit protocol is tested against GCS's documented behaviour.
_CHILD = r"""
import logging, socket, sys, threading
from http import HTTPStatus
logging.disable(logging.CRITICAL)
from gcp_storage_emulator.server import create_server
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.exceptions import NotFound

_lock = threading.Lock()

def _precondition(upload):
    def guarded(request, response, storage):
        if request.query.get("ifGenerationMatch") != ["0"]:
            return upload(request, response, storage)
        meta = request.data.get("meta", {}) if isinstance(request.data, dict) else {}
        name = request.query.get("name", [meta.get("name")])[0]
        with _lock:
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
            except NotFound:
                return upload(request, response, storage)
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "conditionNotMet", "errors": []}})
    return guarded

objects._multipart_upload = _precondition(objects._multipart_upload)
objects._media_upload = _precondition(objects._media_upload)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
server = create_server("127.0.0.1", port, in_memory=True, default_bucket="gpuload")
server.start()
print(port, flush=True)
sys.stdin.read()   # run until the parent closes our stdin (or dies)
server.stop()
"""


@pytest.fixture(scope="module")
def gcs():
    """(storage_options, bucket) of a loopback GCS endpoint, for this module."""
    # gcsfs >= 2025.x probes real GCS buckets over gRPC (zonal/HNS detection) first, which an
    # emulator cannot answer; its documented switch turns that off. Set before gcsfs loads.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    if "gcsfs" in sys.modules:
        import gcsfs

        if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
            pytest.fail("gcsfs was imported with its gRPC bucket probing on; run this module first")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            pytest.fail(f"gcp-storage-emulator did not start (printed {line!r})")
        endpoint = f"http://127.0.0.1:{int(line)}"
        yield {"endpoint_url": endpoint, "token": "anon", "project": "gpuload-test"}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_gcs_client_roundtrip(gcs, tmp_path):
    root = f"gs://gpuload/root-{uuid.uuid4().hex[:8]}"
    c = gpuload.Client(root, storage_options=gcs, cache=str(tmp_path / "cache"))
    cols = robot_columns(90)
    t = c.ingest("robot", cols, chunk_bytes=32 << 10)
    assert t.num_chunks > 2
    c.ingest("other", {"x": [1, 2]})
    assert c.list_tables() == ["other", "robot"]
    t = c.open_table("robot")
    assert t[5]["image"] == cols["image"][5] and t[-1]["text"] == cols["text"][-1]
    np.testing.assert_array_equal(t[[7, 3]].to_dict()["state"], cols["state"][[7, 3]])
    # a byte range is exactly that range (the fetcher relies on Range support)
    ch = t.manifest.chunks[1]
    whole = Store(t.url, gcs).read_bytes(ch.file)
    assert Store(t.url, gcs).read_range(ch.file, 100, 350) == whole[100:350]
    orders = []
    for epoch in range(2):  # the first epoch fills the disk cache, the second reads from it
        seen = []
        for b in t.batches(16, shuffle=True, seed=3, epoch=epoch):
            for img, text in zip(b["image"], b["text"]):
                i = int(text.split()[1].rstrip(":"))  # "row i: ..." names the row
                assert img == cols["image"][i]
                seen.append(i)
        assert sorted(seen) == list(range(90)) and seen != sorted(seen)
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order per epoch
    assert sum(len(f) for _, _, f in os.walk(tmp_path / "cache")) > 0  # remote chunks cached
    c.ingest("robot", {k: v[:10] for k, v in cols.items()}, mode="append")
    assert len(c.open_table("robot")) == 100
    c.delete_table("other")
    assert c.list_tables() == ["robot"]
    with pytest.raises(TableNotFoundError):
        c.open_table("other")


def test_gcs_uncached_loader_and_vacuum(gcs):
    url = f"gs://gpuload/t-{uuid.uuid4().hex[:8]}"
    cols = robot_columns(60)
    gpuload.ingest(url, cols, chunk_bytes=16 << 10, storage_options=gcs)
    t = gpuload.open_table(url, storage_options=gcs, cache=False)
    got = [
        int(s.split()[1].rstrip(":")) for b in t.batches(8, shuffle=True, seed=1) for s in b["text"]
    ]
    assert sorted(got) == list(range(60)) and got != sorted(got)
    store = Store(url, gcs)
    orphan = f"chunks/{uuid.uuid4().hex}.chunk"
    store.write_new(orphan, [b"z" * 32])
    assert vacuum_store(store, "t", older_than=3600).recent == (orphan,)
    r = vacuum_store(store, "t", older_than=3600, now=time.time() + 7200)
    assert r.removed == (orphan,) and not store.exists(orphan)
    assert len(gpuload.open_table(url, storage_options=gcs, cache=False)) == 60


def test_gcs_versions_are_created_only_if_absent_and_appends_race(gcs):
    """A version file is an upload with ifGenerationMatch=0: of two writers racing for one
    version, one wins; real processes appending at once lose nothing."""
    from gpuload.testing.writers import concurrent_append_trials

    store = Store(f"gs://gpuload/v-{uuid.uuid4().hex[:8]}", gcs)
    assert store.create_exclusive("versions/v000000000001.json", b"one")
    assert not store.create_exclusive("versions/v000000000001.json", b"two")
    assert store.read_bytes("versions/v000000000001.json") == b"one"
    r = concurrent_append_trials(
        f"gs://gpuload/race-{uuid.uuid4().hex[:8]}", gcs, writers=3, trials=2, slow=0.05
    )
    assert r.errors == 0 and r.conflicts == 0, r
    assert r.lost_commits == 0 and r.extra_rows == 0 and r.version_mismatches == 0, r
    assert r.rows_found == r.rows_committed > 0
