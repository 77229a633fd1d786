"""The fault-injection servers themselves (gpuload.testing.servers), checked with raw clients: each
fault kind does exactly what it promises, schedules are reproducible, counters add up, and the
S3 proxy relays byte-exact when it injects nothing."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gpuload.testing.servers import FaultPlan, FaultRule, LoopbackS3, RangeHTTPServer, S3FaultProxy

from ..helpers import Reply, raw, stall_until_close

pytestmark = pytest.mark.timeout(60)

DATA = random.Random(1234).randbytes(64 << 10)
MANIFEST = json.dumps({"version": 1, "chunks": ["c0.chunk"]}).encode()
CHUNK_PATH = "/t/chunks/c0.chunk"
MANIFEST_PATH = "/t/manifest.json"


@dataclass
class Origin:
    """A server under test: where the 64 KiB chunk and the manifest are, and its plan."""

    name: str
    port: int
    chunk: str
    manifest: str
    server: RangeHTTPServer | S3FaultProxy

    @property
    def plan(self) -> FaultPlan:
        return self.server.faults

    def get(self, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
        return raw(self.port, self.chunk, headers, method)


def _www(root: Path) -> Path:
    (root / "t" / "chunks").mkdir(parents=True)
    (root / "t" / "chunks" / "c0.chunk").write_bytes(DATA)
    (root / "t" / "manifest.json").write_bytes(MANIFEST)
    return root


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    with RangeHTTPServer(str(_www(tmp_path / "www"))) as server:
        yield server


@pytest.fixture
def http_origin(http_server: RangeHTTPServer) -> Origin:
    return Origin("http", http_server.port, CHUNK_PATH, MANIFEST_PATH, http_server)


@pytest.fixture(scope="module")
def s3_proxy(s3) -> Iterator[S3FaultProxy]:
    """A proxy in front of the session's moto server, with the chunk and manifest uploaded."""
    with S3FaultProxy(s3) as proxy:
        client = proxy.client()
        client.put_object(Bucket=s3.bucket, Key="faults/t/chunks/c0.chunk", Body=DATA)
        client.put_object(Bucket=s3.bucket, Key="faults/t/manifest.json", Body=MANIFEST)
        yield proxy


def _presigned(proxy: S3FaultProxy, key: str) -> str:
    url = proxy.client().generate_presigned_url(
        "get_object", Params={"Bucket": proxy.bucket, "Key": key}
    )
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


@pytest.fixture
def s3_origin(s3_proxy: S3FaultProxy) -> Origin:
    s3_proxy.plan = FaultPlan()
    chunk = _presigned(s3_proxy, "faults/t/chunks/c0.chunk")
    manifest = _presigned(s3_proxy, "faults/t/manifest.json")
    return Origin("s3", s3_proxy.port, chunk, manifest, s3_proxy)


@pytest.fixture(params=["http", pytest.param("s3", marks=pytest.mark.s3)])
def origin(request: pytest.FixtureRequest) -> Origin:
    """Each fault test runs against the static server and against the S3 proxy."""
    return request.getfixturevalue(f"{request.param}_origin")


RANGE = {"Range": "bytes=1000-1999"}
START, N = 1000, 1000


# --- no faults ---------------------------------------------------------------------------------


def test_plain_answers_and_counters(origin: Origin) -> None:
    full = origin.get()
    assert full.status == 200 and full.body == DATA and full.error is None
    assert int(full.headers["content-length"]) == len(DATA)
    part = origin.get(RANGE)
    assert part.status == 206 and part.body == DATA[START : START + N]
    assert part.headers["content-range"] == f"bytes {START}-{START + N - 1}/{len(DATA)}"
    assert part.headers["content-length"] == str(N)
    snap = origin.plan.snapshot()
    assert snap == {
        "requests": 2,
        "range_requests": 1,
        "bytes_served": len(DATA) + N,
        "faults": {},
        "faults_total": 0,
        "fail_next": 0,
    }


# --- each kind ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,code", [(500, "InternalError"), (503, "SlowDown"), (429, "TooManyRequests")]
)
def test_status(origin: Origin, status: int, code: str) -> None:
    origin.plan.kind = "status"
    origin.plan.status = status
    origin.plan.fail_next = 1
    r = origin.get(RANGE)
    assert r.status == status
    assert len(r.body) == int(r.headers["content-length"])
    if origin.name == "s3":  # the way S3 sends it, so botocore reads the code
        assert r.headers["content-type"] == "application/xml"
        assert f"<Error><Code>{code}</Code>" in r.body.decode()
    assert origin.get(RANGE).body == DATA[START : START + N]
    assert origin.plan.snapshot()["faults"] == {"status": 1}


def test_reset_without_response(origin: Origin) -> None:
    origin.plan.add("reset", count=1)
    r = origin.get(RANGE)
    assert isinstance(r.error, ConnectionResetError) and r.status is None and r.body == b""
    assert origin.get(RANGE).body == DATA[START : START + N]


def test_reset_mid_body(origin: Origin) -> None:
    origin.plan.add("reset_mid", count=1)
    r = origin.get(RANGE)
    assert r.error is not None  # the RST may also discard what had arrived
    if r.status is not None:
        assert r.status == 206 and r.headers["content-length"] == str(N)
        assert len(r.body) < N and r.body == DATA[START : START + len(r.body)]


@pytest.mark.parametrize("ranged", [True, False])
def test_truncate(origin: Origin, ranged: bool) -> None:
    origin.plan.add("truncate", count=1)
    r = origin.get(RANGE if ranged else None)
    start, n = (START, N) if ranged else (0, len(DATA))
    assert r.error is None and r.status == (206 if ranged else 200)
    assert r.headers["content-length"] == str(n)
    assert r.body == DATA[start : start + n // 2]  # half, then a clean close


def test_short(origin: Origin) -> None:
    origin.plan.add("short", count=1)
    r = origin.get(RANGE)
    k = N // 2
    assert r.status == 206 and r.error is None
    assert r.headers["content-range"] == f"bytes {START}-{START + k - 1}/{len(DATA)}"
    assert r.headers["content-length"] == str(k) and r.body == DATA[START : START + k]


def _content_range(value: str) -> tuple[int, int, int]:
    unit, _, rest = value.partition(" ")
    span, _, size = rest.partition("/")
    first, _, last = span.partition("-")
    assert unit == "bytes"
    return int(first), int(last), int(size)


def test_wrong_range_honest_header(origin: Origin) -> None:
    origin.plan.add("wrong_range", count=1)
    r = origin.get(RANGE)
    assert r.status == 206 and r.headers["content-length"] == str(N) and len(r.body) == N
    first, last, size = _content_range(r.headers["content-range"])
    assert first != START and last - first + 1 == N and size == len(DATA)
    assert r.body == DATA[first : last + 1] and r.body != DATA[START : START + N]


def test_wrong_range_lying_header(origin: Origin) -> None:
    origin.plan.add("wrong_range_lying", count=1)
    r = origin.get(RANGE)
    assert r.status == 206 and r.headers["content-length"] == str(N) and len(r.body) == N
    assert r.headers["content-range"] == f"bytes {START}-{START + N - 1}/{len(DATA)}"
    assert r.body != DATA[START : START + N]
    assert DATA.find(r.body) not in (-1, START)  # real bytes of the object, from elsewhere


def test_ignore_range(origin: Origin) -> None:
    origin.plan.add("ignore_range", count=1)
    r = origin.get(RANGE)
    assert r.status == 200 and "content-range" not in r.headers
    assert r.headers["content-length"] == str(len(DATA)) and r.body == DATA


@pytest.mark.parametrize("ranged", [True, False])
def test_bitflip(origin: Origin, ranged: bool) -> None:
    origin.plan.add("bitflip", count=1)
    r = origin.get(RANGE if ranged else None)
    want = DATA[START : START + N] if ranged else DATA
    assert r.status == (206 if ranged else 200) and r.error is None
    assert r.headers["content-length"] == str(len(want))
    if ranged:
        assert r.headers["content-range"] == f"bytes {START}-{START + N - 1}/{len(DATA)}"
    assert len(r.body) == len(want)
    assert sum(a != b for a, b in zip(r.body, want)) == 1


def test_stall_then_answer(origin: Origin) -> None:
    origin.plan.add("stall", count=1, stall_s=0.5)
    r = origin.get(RANGE)
    assert r.seconds >= 0.5 and r.status == 206 and r.body == DATA[START : START + N]
    assert origin.get(RANGE).seconds < 0.5


def test_latency_on_every_response(origin: Origin) -> None:
    origin.plan.latency_s = 0.2
    t0 = time.monotonic()
    assert origin.get(RANGE).status == 206 and origin.get().status == 200
    assert time.monotonic() - t0 >= 0.4


# --- stalls end when the server closes ---------------------------------------------------------


def _stall_until_close(server: RangeHTTPServer | S3FaultProxy, port: int, target: str) -> None:
    server.faults.add("stall")  # every GET, forever
    stalls = lambda: server.faults.snapshot()["faults"].get("stall", 0)  # noqa: E731
    stall_until_close(port, target, stalls, server.close)
    assert server.httpd.live_threads() == [] and not server.thread.is_alive()


def test_stall_forever_ends_on_close_http(tmp_path: Path) -> None:
    server = RangeHTTPServer(str(_www(tmp_path)))
    _stall_until_close(server, server.port, CHUNK_PATH)


@pytest.mark.s3
def test_stall_forever_ends_on_close_s3(s3_proxy: S3FaultProxy) -> None:
    target = _presigned(s3_proxy, "faults/t/chunks/c0.chunk")
    proxy = S3FaultProxy(s3_proxy.upstream_endpoint)
    _stall_until_close(proxy, proxy.port, target)


# --- schedules, filters, counters ----------------------------------------------------------


def _faulted(origin: Origin, n: int) -> list[bool]:
    return [origin.get(RANGE).status != 206 for _ in range(n)]


def test_probability_is_reproducible_with_a_seed(http_origin: Origin) -> None:
    gen = random.Random(7)
    expect = [gen.random() < 0.3 for _ in range(40)]  # one draw per eligible request
    http_origin.server.faults = FaultPlan(kind="status", probability=0.3, seed=7)
    first = _faulted(http_origin, 40)
    assert first == expect and 3 < sum(first) < 25
    http_origin.server.faults = FaultPlan(kind="status", probability=0.3, seed=7)
    assert _faulted(http_origin, 40) == first
    http_origin.server.faults = FaultPlan(kind="status", probability=0.3, seed=8)
    other = _faulted(http_origin, 40)
    assert other != first and http_origin.plan.snapshot()["faults"]["status"] == sum(other)


def test_rule_probability_reproducible_and_counted(http_origin: Origin) -> None:
    runs = []
    for _ in range(2):
        http_origin.plan.clear()  # counters and schedule cleared, generator re-seeded
        http_origin.plan.add("status", probability=0.5, count=5, status=500)
        runs.append(_faulted(http_origin, 30))
        assert sum(runs[-1]) == 5  # at most count, and 30 tries at p=0.5 reach it
    assert runs[0] == runs[1]


def test_rules_apply_in_order_with_counts(http_origin: Origin) -> None:
    plan = http_origin.plan
    plan.add("status", count=2, status=500)
    plan.add("status", count=1, status=429)
    plan.fail_next, plan.status = 1, 503  # the top-level rule comes first
    assert [http_origin.get(RANGE).status for _ in range(5)] == [503, 500, 500, 429, 206]
    assert plan.snapshot()["faults"] == {"status": 4}


def test_kinds_wait_for_a_request_they_apply_to(http_origin: Origin) -> None:
    plan = http_origin.plan
    plan.add("short", count=1)
    assert http_origin.get().body == DATA  # not ranged
    assert http_origin.get(method="HEAD").status == 200
    assert plan.rules[0].count == 1 and plan.snapshot()["faults_total"] == 0
    assert len(http_origin.get(RANGE).body) == N // 2
    assert plan.rules[0].count == 0 and plan.snapshot()["faults"] == {"short": 1}


def test_path_filter(origin: Origin) -> None:
    origin.plan.add("status", path="manifest.json", status=500)
    assert origin.get(RANGE).status == 206 and origin.get().status == 200
    assert raw(origin.port, origin.manifest).status == 500
    origin.plan.clear()
    origin.plan.add("status", path="/chunks/", status=500)
    assert raw(origin.port, origin.manifest).body == MANIFEST
    assert origin.get().status == 500


def test_method_filter(http_origin: Origin) -> None:
    http_origin.plan.add("status", methods="HEAD", status=500)
    assert http_origin.get().status == 200 and http_origin.get(RANGE).status == 206
    assert http_origin.get(method="HEAD").status == 500


def test_counters_add_up_under_concurrency(http_origin: Origin) -> None:
    plan = http_origin.plan
    plan.add("status", count=10, status=503)

    def worker(out: list[int]) -> None:
        out.extend(http_origin.get(RANGE).status for _ in range(20))

    results: list[list[int]] = [[] for _ in range(8)]
    threads = [threading.Thread(target=worker, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = sum(results, [])
    assert len(statuses) == 160 and statuses.count(503) == 10 and statuses.count(206) == 150
    snap = plan.snapshot()
    assert snap["requests"] == snap["range_requests"] == 160
    assert snap["bytes_served"] == 150 * N and snap["faults"] == {"status": 10}
    assert json.loads(json.dumps(snap)) == snap  # a plain dict
    plan.clear()
    assert plan.snapshot()["requests"] == 0 and plan.rules == []


def test_legacy_fields(http_origin: Origin) -> None:
    plan = http_origin.plan
    assert not plan.reset and plan.kind == "status"
    plan.fail_next = 2
    plan.status = 429
    assert [http_origin.get(RANGE).status for _ in range(3)] == [429, 429, 206]
    assert plan.requests == 3 and plan.range_requests == 3 and plan.fail_next == 0
    plan.reset = True
    plan.fail_next = 1
    assert plan.reset and plan.kind == "reset"
    assert http_origin.get(RANGE).status is None
    plan.clear()  # zero the counters and the schedule
    plan.reset = False
    assert plan.requests == 0 and plan.snapshot()["faults"] == {}
    legacy = FaultPlan(fail_next=1, status=500, reset=False)
    assert legacy.kind == "status" and legacy.fail_next == 1


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultPlan(kind="gremlins")
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultRule("gremlins")


# --- the S3 proxy ------------------------------------------------------------------------------


@pytest.mark.s3
def test_proxy_s3fs_round_trip(s3, s3_proxy: S3FaultProxy) -> None:
    import s3fs

    s3_proxy.plan = FaultPlan()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_proxy.storage_options)
    rnd = random.Random(5)
    objects = {f"rt/o{i}.bin": rnd.randbytes(n) for i, n in enumerate([1, 5000, 3 << 20])}
    for key, blob in objects.items():
        fs.pipe_file(f"{s3.bucket}/{key}", blob)
    assert sorted(fs.ls(f"{s3.bucket}/rt", refresh=True)) == [f"{s3.bucket}/{k}" for k in objects]
    data_bytes = 0  # object bytes read back; bytes_served adds the listings' XML
    for key, blob in objects.items():
        path = f"{s3.bucket}/{key}"
        assert fs.info(path)["size"] == len(blob) and fs.cat_file(path) == blob
        data_bytes += len(blob)
        spans = [(0, 1), (len(blob) // 3, len(blob) // 2), (len(blob) - 1, len(blob))]
        for a, b in (ab for ab in spans if ab[0] < ab[1]):
            assert fs.cat_file(path, start=a, end=b) == blob[a:b]
            data_bytes += b - a
    fs.rm(f"{s3.bucket}/rt/o0.bin")
    assert f"{s3.bucket}/rt/o0.bin" not in fs.ls(f"{s3.bucket}/rt", refresh=True)
    snap = s3_proxy.plan.snapshot()
    assert snap["faults_total"] == 0 and snap["range_requests"] == 8
    assert data_bytes <= snap["bytes_served"] < data_bytes + 10_000


@pytest.mark.s3
def test_proxy_passes_conditional_put(s3, s3_proxy: S3FaultProxy) -> None:
    from botocore.exceptions import ClientError

    s3_proxy.plan = FaultPlan()
    client = s3_proxy.client(retries={"total_max_attempts": 1})
    client.put_object(Bucket=s3.bucket, Key="cond/k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        client.put_object(Bucket=s3.bucket, Key="cond/k", Body=b"second", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3.bucket, Key="cond/k")["Body"].read() == b"first"


@pytest.mark.s3
@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError")])
def test_proxy_errors_parse_in_botocore(s3, s3_proxy: S3FaultProxy, status: int, code: str) -> None:
    from botocore.exceptions import ClientError

    s3_proxy.plan = FaultPlan(fail_next=1, status=status)
    client = s3_proxy.client(retries={"total_max_attempts": 1})
    with pytest.raises(ClientError) as e:
        client.get_object(Bucket=s3.bucket, Key="faults/t/chunks/c0.chunk")
    assert e.value.response["Error"]["Code"] == code
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    got = client.get_object(Bucket=s3.bucket, Key="faults/t/chunks/c0.chunk", Range="bytes=0-9")
    assert got["Body"].read() == DATA[:10]


@pytest.mark.s3
def test_proxy_method_filter(s3, s3_proxy: S3FaultProxy) -> None:
    from botocore.exceptions import ClientError

    s3_proxy.plan = FaultPlan(fail_next=100)  # default: only GETs of objects
    client = s3_proxy.client(retries={"total_max_attempts": 1})
    client.put_object(Bucket=s3.bucket, Key="mf/k", Body=b"x")
    assert client.head_object(Bucket=s3.bucket, Key="mf/k")["ContentLength"] == 1
    assert [
        o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="mf/")["Contents"]
    ] == ["mf/k"]
    with pytest.raises(ClientError):
        client.get_object(Bucket=s3.bucket, Key="mf/k")
    assert s3_proxy.plan.fail_next == 99
    s3_proxy.plan = FaultPlan()
    s3_proxy.plan.add("status", count=1, methods="PUT", status=503)
    with pytest.raises(ClientError, match="SlowDown"):
        client.put_object(Bucket=s3.bucket, Key="mf/new", Body=b"y")
    assert "Contents" not in client.list_objects_v2(Bucket=s3.bucket, Prefix="mf/new")
    assert client.get_object(Bucket=s3.bucket, Key="mf/k")["Body"].read() == b"x"
    s3_proxy.plan.add("status", count=1, methods="LIST", status=500)
    with pytest.raises(ClientError, match="InternalError"):
        client.list_objects_v2(Bucket=s3.bucket)


@pytest.mark.s3
def test_proxy_gives_back_a_fault_that_cannot_apply(s3_origin: Origin) -> None:
    rule = s3_origin.plan.add("bitflip", count=1)
    missing = s3_origin.chunk.replace("c0.chunk", "nope.chunk")
    assert raw(s3_origin.port, missing).status in (403, 404)
    assert rule.count == 1 and s3_origin.plan.snapshot()["faults_total"] == 0
    assert sum(a != b for a, b in zip(s3_origin.get().body, DATA)) == 1


@pytest.mark.s3
def test_proxy_keeps_signatures_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """With moto checking SigV4 (after its first 4 unauthenticated calls), signed requests
    through the proxy verify, and a wrong secret still fails."""
    import boto3
    from botocore.exceptions import ClientError

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")
    with LoopbackS3(bucket="signed") as moto, S3FaultProxy(moto) as proxy:  # call 1
        iam = boto3.client("iam", **_creds(moto.endpoint, "testing", "testing"))
        iam.create_user(UserName="u")  # call 2
        allow_all = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow_all]}
        iam.put_user_policy(UserName="u", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="u")["AccessKey"]  # call 4
        good = boto3.client(
            "s3", **_creds(proxy.endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        )
        good.put_object(Bucket="signed", Key="k", Body=DATA)
        assert (
            good.get_object(Bucket="signed", Key="k", Range="bytes=5-9")["Body"].read()
            == DATA[5:10]
        )
        bad = boto3.client("s3", **_creds(proxy.endpoint, key["AccessKeyId"], "wrong"))
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            bad.get_object(Bucket="signed", Key="k")


def _creds(endpoint: str, key: str, secret: str) -> dict:
    from botocore.config import Config

    return {
        "endpoint_url": endpoint,
        "aws_access_key_id": key,
        "aws_secret_access_key": secret,
        "region_name": "us-east-1",
        "config": Config(retries={"total_max_attempts": 1}),
    }
