"""Test data made on the fly: small textured images (never flat colours), robot-like rows."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

DECODERS = ["cpu", "pil", "nvimgcodec", "dali"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as module ``name`` (registered in sys.modules while
    it loads: dataclasses look their module up); the scripts are not a package."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def have_decoder(name: str) -> bool:
    """Whether a decoder backend's library is installed (cpu and pil always are)."""
    mod = {"nvimgcodec": "nvidia.nvimgcodec", "dali": "nvidia.dali"}.get(name)
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def decoder_params() -> list:
    """pytest params of every decoder backend, each skipped where its library is missing."""
    return [
        pytest.param(b, marks=pytest.mark.skipif(not have_decoder(b), reason=f"{b} not installed"))
        for b in DECODERS
    ]


def textured_image(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """A smooth random texture with edges and noise, uint8 HxWxC (or HxW for channels=1)."""
    y = np.linspace(0, 1, h)[:, None]
    x = np.linspace(0, 1, w)[None, :]
    planes = []
    for _ in range(channels):
        f = rng.uniform(1, 6, size=4)
        p = rng.uniform(0, 2 * np.pi, size=4)
        v = (
            np.sin(2 * np.pi * f[0] * x + p[0]) * np.cos(2 * np.pi * f[1] * y + p[1])
            + 0.5 * np.sin(2 * np.pi * (f[2] * x + f[3] * y) + p[2])
            + 0.3 * ((x * f[3] + y * f[2]) % 1.0 > 0.5)
        )
        v = (v - v.min()) / (np.ptp(v) + 1e-9)
        planes.append(v)
    img = np.stack(planes, axis=-1) * 200 + 25 + rng.normal(0, 6, size=(h, w, channels))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def encode(img: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def ids_columns(n: int) -> dict:
    """Rows that say who they are: an int64 ``id`` (= row number), a small image and text."""
    rng = np.random.default_rng(0)
    return {
        "id": np.arange(n, dtype=np.int64),
        "image": [jpeg(rng, 16, 20) for _ in range(n)],
        "text": [f"row {i}" for i in range(n)],
    }


def ids_of(batch) -> list[int]:
    """The row ids in a batch (a dict with ``id``, or the ids themselves), as Python ints."""
    x = batch["id"] if isinstance(batch, dict) else batch
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x).reshape(-1).tolist()


def epoch_ids(loader) -> list[int]:
    """The row ids of one pass over a loader, in order."""
    return [i for b in loader for i in ids_of(b)]


def jpeg(rng: np.random.Generator, h: int = 48, w: int = 64, quality: int = 85) -> bytes:
    return encode(textured_image(rng, h, w), "JPEG", quality=quality)


def png(rng: np.random.Generator, h: int = 40, w: int = 56, channels: int = 3) -> bytes:
    return encode(textured_image(rng, h, w, channels), "PNG")


def robot_columns(n: int, seed: int = 0, h: int = 48, w: int = 64) -> dict:
    """Columns shaped like the reference robot dataset, small: image, state[14], label, text."""
    rng = np.random.default_rng(seed)
    return {
        "image": [jpeg(rng, h, w) for _ in range(n)],
        "state": rng.standard_normal((n, 14)).astype(np.float32),
        "label": rng.integers(0, 10, size=n).astype(np.int64),
        "text": [f"row {i}: pick {'abc'[i % 3]}" for i in range(n)],
    }


def kill_writer_midway(root, table: str, image: bytes) -> None:
    """Start a real process appending rows to ``table`` under client root ``root``, and SIGKILL
    it once it has written some chunks (never committed): what a crash or OOM kill leaves."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import numpy as np, gpuload
        def rows():
            for i in range(10**7):
                if i == 2000:
                    print("writing", flush=True)
                yield {{"image": {image!r}, "state": np.ones(14, np.float32), "label": i, "text": "x"}}
        gpuload.Client({str(root)!r}).ingest({table!r}, rows(), mode="append", chunk_bytes=1 << 16)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().strip()
        if line != "writing":
            raise RuntimeError(f"the writer process did not start writing (printed {line!r})")
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


# -- raw HTTP: one request on its own socket, every byte as it came ------------------------
@dataclass
class Reply:
    """What came back over one connection: the parsed answer (if any) and how it ended."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: OSError | None = None
    seconds: float = 0.0


def raw(
    port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> Reply:
    """One request on a fresh socket (Connection: close); reads everything until EOF or reset."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    buf, error, t0 = bytearray(), None, time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            while chunk := s.recv(1 << 16):
                buf += chunk
        except ConnectionResetError as e:
            error = e
    seconds = time.monotonic() - t0
    if b"\r\n\r\n" not in buf:
        return Reply(None, body=bytes(buf), error=error, seconds=seconds)
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    status_line, *rest = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}
    return Reply(int(status_line.split()[1]), hdrs, body, error, seconds)


def stall_until_close(
    port: int, target: str, stalls: Callable[[], int], close: Callable[[], None]
) -> None:
    """A GET that the server stalls forever (``stalls()`` counts the stalls it injected) must
    end, with no answer, as soon as ``close()`` stops the server: within 3 s."""
    got: list[Reply] = []
    client = threading.Thread(target=lambda: got.append(raw(port, target)), daemon=True)
    client.start()
    deadline = time.monotonic() + 10
    while stalls() < 1:
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.01)
    t0 = time.monotonic()
    close()
    assert time.monotonic() - t0 < 3
    client.join(5)
    assert not client.is_alive() and got and got[0].status is None and got[0].body == b""


# -- format 4 table surgery (tests that damage a segment on purpose) ---------------------------
def table_root(path) -> dict:
    """The table's root manifest (``manifest.json``) as JSON."""
    import json

    return json.loads((path / "manifest.json").read_text())


def write_table_root(path, root: dict) -> None:
    """Publish ``root`` as the table's root and as its version file, as a commit would."""
    import json

    from gpuload.format import version_path

    raw = json.dumps(root).encode()
    (path / "manifest.json").write_bytes(raw)
    (path / version_path(root["version"])).write_bytes(raw)


def rewrite_segment(path, k: int, edit) -> dict:
    """Re-encode segment ``k`` of the table at ``path`` after ``edit(rows, records)``, with
    fresh checksums in its root (so only ``edit``'s damage remains). Returns the new root."""
    import json

    from gpuload.format import Manifest, record_dtype
    from gpuload.segments import encode_segment

    root = table_root(path)
    m = Manifest.loads(json.dumps(root).encode(), "t")
    seg = m.index.segments[k]
    dt = record_dtype(m.schema)
    lay = seg.layout(dt.itemsize)
    raw = (path / seg.file).read_bytes()
    rows = np.frombuffer(raw[lay.rows_offset : lay.rows_end], "<i8").copy()
    recs = np.frombuffer(raw[lay.records_offset : lay.records_end], dt).copy()
    edit(rows, recs)
    parts, lay, sums = encode_segment(rows, recs, seg.checksums.page)
    (path / seg.file).write_bytes(b"".join(bytes(p) for p in parts))
    root["segments"][k].update(size=lay.size, checksums=sums.to_json(), rows=int(rows.sum()))
    root["num_rows"] = sum(s["rows"] for s in root["segments"])
    write_table_root(path, root)
    return root
