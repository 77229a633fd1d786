"""Where tables live: a local directory or any fsspec URL.

A Store holds only (url, storage_options, retry policy) and builds its filesystem lazily in each
process, so it pickles cleanly and survives fork (a forked child never reuses the parent's
sockets or loops). Local paths bypass fsspec: files are opened relative to the table's root
without following symbolic links, and read with os.pread.

Every remote operation goes through gpuload's one retry layer (gpuload.retry); the backends'
own retries are turned down to one try and every backend gets connect and read timeouts, so a
stalled or failing store surfaces as one gpuload error naming the table and object.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import stat
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import FetchError, FormatError, GpuloadError, MissingDependencyError
from .retry import RetryPolicy, call_with_retry

__all__ = ["Store", "join_url", "is_local_url", "check_relpath", "ATOMIC_CREATE"]

log = logging.getLogger("gpuload.storage")
T = TypeVar("T")

# Protocol -> pip extra that provides it (an install hint when the backend is missing).
_PROTOCOL_HINTS = {
    "s3": "s3fs (pip install 'gpuload[s3]')",
    "s3a": "s3fs (pip install 'gpuload[s3]')",
    "gs": "gcsfs (pip install 'gpuload[gcs]')",
    "gcs": "gcsfs (pip install 'gpuload[gcs]')",
    "http": "aiohttp (pip install 'gpuload[http]')",
    "https": "aiohttp (pip install 'gpuload[http]')",
}
# Stores where "create this object unless it exists" is one atomic operation: a hard link on
# local disks, a conditional PUT (If-None-Match: *) on S3, a generation precondition of 0 on
# GCS, and a process-wide lock for the in-process memory filesystem. Elsewhere gpuload commits
# in single-writer mode (see Store.create_exclusive).
ATOMIC_CREATE = frozenset({"file", "s3", "s3a", "gs", "gcs", "memory"})
_MEMORY_LOCK = threading.Lock()
_SINGLE_WRITER_LOCKS: dict[str, threading.Lock] = {}
_SINGLE_WRITER_GUARD = threading.Lock()


class RangeNotSupportedError(FetchError):
    """The server answered a byte-range request with the whole object (it ignores Range)."""


def split_protocol(url: str) -> tuple[str, str]:
    """("s3", "bucket/path") for "s3://bucket/path"; ("file", abs path) for local paths."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        proto = proto.lower()
        if proto == "file":
            return "file", os.path.abspath(rest)
        if proto in ("http", "https"):
            return proto, url  # fsspec's HTTP filesystem addresses files by full URL
        return proto, rest
    return "file", os.path.abspath(os.path.expanduser(url))


def is_local_url(url: str) -> bool:
    return split_protocol(url)[0] == "file"


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL, with '/' separators for URLs."""
    proto, _ = split_protocol(base)
    if proto == "file" and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def _transient(err: GpuloadError) -> GpuloadError:
    err.gpuload_transient = True  # type: ignore[attr-defined]
    return err


class Store:
    """Byte-level access to one table directory (local or remote). Picklable and fork-safe."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        self.protocol, self.root = split_protocol(url)
        self._fs = None
        self._pid = -1
        self._lock = threading.Lock()
        self._conditional: bool | None = None  # does the server honour create-only-if-absent?

    # -- pickling: drop live handles --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options, "retry": self.retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state.get("retry"))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def atomic_create(self) -> bool:
        """True when this store can create an object only-if-absent in one atomic step."""
        return self.protocol in ATOMIC_CREATE

    @property
    def fs(self):
        """The fsspec filesystem, created lazily per process (reset after fork)."""
        pid = os.getpid()
        if self._fs is None or self._pid != pid:
            with self._lock:
                if self._fs is None or self._pid != pid:
                    self._fs = self._make_fs()
                    self._pid = pid
        return self._fs

    def _make_fs(self):
        import fsspec

        opts = self._backend_options()
        try:
            fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **opts)
        except (ImportError, ValueError) as e:
            hint = _PROTOCOL_HINTS.get(self.protocol)
            if hint and ("install" in str(e).lower() or isinstance(e, ImportError)):
                raise MissingDependencyError(
                    f"reading {self.protocol}:// URLs needs {hint}: {e}"
                ) from e
            raise
        if self.protocol in ("s3", "s3a"):
            fs.retries = 1  # s3fs's own retry loop: gpuload's layer retries instead
        return fs

    def _backend_options(self) -> dict[str, Any]:
        """storage_options plus gpuload's defaults: timeouts on every backend, one try each."""
        opts = dict(self.storage_options)
        r = self.retry
        if self.protocol in ("s3", "s3a"):
            conf = dict(opts.get("config_kwargs") or {})
            conf.setdefault("connect_timeout", r.connect_timeout)
            conf.setdefault("read_timeout", r.read_timeout)
            conf.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            opts["config_kwargs"] = conf
        elif self.protocol in ("http", "https"):
            import aiohttp

            client = dict(opts.get("client_kwargs") or {})
            client.setdefault(
                "timeout",
                aiohttp.ClientTimeout(
                    total=None, sock_connect=r.connect_timeout, sock_read=r.read_timeout
                ),
            )
            opts["client_kwargs"] = client
        elif self.protocol in ("gs", "gcs"):
            opts.setdefault("requests_timeout", r.connect_timeout + r.read_timeout)
        return opts

    def path(self, rel: str) -> str:
        """Absolute path (local) or protocol-less path (remote) of a file inside the store."""
        check_relpath(rel)
        if self.is_local:
            return os.path.join(self.root, *rel.split("/"))
        return posixpath.join(self.root.rstrip("/"), rel) if self.root else rel

    def url_of(self, rel: str) -> str:
        return join_url(self.url, rel)

    # -- the retry layer -------------------------------------------------------------------
    def call(self, fn: Callable[[], T], rel: str, what: str = "reading") -> T:
        """Run a storage operation on ``rel`` under the retry policy; any failure but a missing
        or existing file becomes a FetchError naming the object."""
        try:
            return call_with_retry(fn, self.retry, lambda: self.url_of(rel))
        except (FileNotFoundError, FileExistsError, GpuloadError):
            raise
        except Exception as e:  # a backend's own error type: named once, original as cause
            tries = getattr(e, "gpuload_tries", 1)
            raise FetchError(
                f"{what} {self.url_of(rel)} failed after {tries} tr{'y' if tries == 1 else 'ies'}: "
                f"{type(e).__name__}: {e}"
            ) from e

    # -- local files, never following links ------------------------------------------------
    def open_local(self, rel: str) -> int:
        """A descriptor for a file inside the local table, opened relative to the root without
        following symbolic links in any component (a link could point outside the table)."""
        parts = check_relpath(rel).split("/")
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for p in parts[:-1]:
                nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FormatError(
                    f"{self.url_of(rel)}: a symbolic link or non-directory on the path; gpuload "
                    "does not follow links inside a table"
                ) from None
            raise
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FormatError(f"{self.url_of(rel)} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    # -- reads -----------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        """A whole (small) file, retried."""
        if self.is_local:
            fd = self.open_local(rel)
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    return f.read()
            finally:
                os.close(fd)
        return self.call(lambda: self.fs.cat_file(self.path(rel)), rel)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file in one try, checked: exactly the range asked for
        (length; Content-Range where the protocol returns it) or a FetchError."""
        if end <= start:
            return b""
        if self.is_local:
            fd = self.open_local(rel)
            try:
                data = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        elif self.protocol in ("http", "https"):
            data = _http_range(self, rel, start, end)
        elif self.protocol in ("s3", "s3a"):
            data = _s3_range(self, rel, start, end)
        else:
            data = self.fs.cat_file(self.path(rel), start=start, end=end)
        if len(data) != end - start:
            err = FetchError(
                f"short read of {self.url_of(rel)}, bytes [{start}, {end}): got {len(data)} bytes"
            )
            # remote: a body cut short is worth another try; a local file simply ends there
            raise err if self.is_local else _transient(err)
        return data

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return os.path.lexists(self.path(rel))
        return self.call(lambda: self.fs.exists(self.path(rel)), rel, "checking")

    def size(self, rel: str) -> int:
        if self.is_local:
            fd = self.open_local(rel)
            try:
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        return int(self.call(lambda: self.fs.size(self.path(rel)), rel, "checking the size of"))

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries directly under a folder of the store ([] when absent)."""
        if self.is_local:
            p = self.path(rel) if rel else self.root
            try:
                return sorted(os.listdir(p))
            except FileNotFoundError:
                return []
        p = self.path(rel) if rel else self.root
        try:
            entries = self.call(lambda: self.fs.ls(p, detail=False), rel or ".", "listing")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def list_files(self, rel: str = "") -> list[tuple[str, int, float | None]]:
        """(name, size, modification time in epoch seconds or None when the store does not say)
        of the files directly under a folder of the store ([] when absent)."""
        if self.is_local:
            return _list_local(self.path(rel) if rel else self.root)
        p = self.path(rel) if rel else self.root

        def ls():
            self.fs.invalidate_cache(p)  # listings are cached per instance; others may write
            return self.fs.ls(p, detail=True)

        try:
            entries = self.call(ls, rel or ".", "listing")
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.get("type", "file") != "file":
                continue
            name = posixpath.basename(str(e["name"]).rstrip("/"))
            out.append((name, int(e.get("size") or 0), _mtime_of(e)))
        return sorted(out)

    # -- writes ----------------------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a whole file in one atomic step (rename locally; a single PUT remotely)."""
        if self.is_local:
            p = self.path(rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex}"
            try:
                _write_file(tmp, [data])
                os.replace(tmp, p)
            finally:
                with contextlib.suppress(FileNotFoundError):  # renamed: nothing left to remove
                    os.unlink(tmp)
            _fsync_dir(os.path.dirname(p))
            return
        self.call(lambda: self.fs.pipe_file(self.path(rel), data), rel, "writing")

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Publish a whole file only if no file of that name exists: True when this call
        created it, False when it existed already (another writer won). Atomic where
        ``atomic_create``; elsewhere single-writer mode (see ``_create_single_writer``)."""
        if self.is_local:
            return _link_exclusive(self.path(rel), data)
        if not self.atomic_create or not self._honours_conditions():
            return self._create_single_writer(rel, data)

        def put() -> None:
            if self.protocol == "memory":
                with _MEMORY_LOCK:  # the memory filesystem is one process's: a lock is atomic
                    if self.fs.exists(self.path(rel)):
                        raise FileExistsError(rel)
                    self.fs.pipe_file(self.path(rel), data)
                return
            self.fs.pipe_file(self.path(rel), data, mode="create")

        try:
            self.call(put, rel, "committing")
            return True
        except FileExistsError:
            # A retried PUT whose first try landed (its answer was lost) finds its own file.
            return self.read_bytes(rel) == data

    def _put_if_absent(self, rel: str, data: bytes) -> bool:
        try:
            self.call(
                lambda: self.fs.pipe_file(self.path(rel), data, mode="create"), rel, "probing"
            )
            return True
        except FileExistsError:
            return False

    def _honours_conditions(self) -> bool:
        """Whether this S3/GCS endpoint refuses a conditional create of an existing object:
        S3-compatible servers that ignore If-None-Match would silently overwrite a version.
        Probed once per process with a throwaway object."""
        if self.protocol == "memory":
            return True
        if self._conditional is None:
            probe = f"_gpuload_probe/{uuid.uuid4().hex}"
            try:
                self._put_if_absent(probe, b"1")
                self._conditional = not self._put_if_absent(probe, b"2")
            finally:
                self.remove(probe)
            if not self._conditional:
                log.warning(
                    "%s does not honour conditional writes (If-None-Match / ifGenerationMatch): "
                    "gpuload commits to it in single-writer mode",
                    self.url,
                )
        return self._conditional

    def _create_single_writer(self, rel: str, data: bytes) -> bool:
        """Stores without an atomic create: check-then-put under a process-wide lock, then read
        back. Safe for one writing process at a time (docs/FORMAT.md); a clobber by another
        process is detected when the read-back differs and raised as an error."""
        from .errors import CommitConflictError

        with _SINGLE_WRITER_GUARD:
            lock = _SINGLE_WRITER_LOCKS.setdefault(self.url, threading.Lock())
        with lock:
            if self.exists(rel):
                return False
            self.call(lambda: self.fs.pipe_file(self.path(rel), data), rel, "committing")
            if self.read_bytes(rel) != data:
                raise CommitConflictError(
                    f"{self.url_of(rel)} was overwritten by another writer: {self.protocol}:// "
                    "has no atomic create, so gpuload supports one writing process at a time "
                    "there; the other writer's commit may have replaced this one"
                )
            return True

    def write_new(self, rel: str, parts: list) -> int:
        """Write a new immutable file from buffers; returns its size. Not visible to readers
        until a manifest that names it is committed."""
        if self.is_local:
            p = self.path(rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            return _write_file(p, parts, exclusive=True)
        data = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
        self.call(lambda: self.fs.pipe_file(self.path(rel), data), rel, "writing")
        return len(data)

    def makedirs(self, rel: str = "") -> None:
        # Object stores have no directories: files appear with their keys.
        if self.is_local:
            os.makedirs(self.path(rel) if rel else self.root, exist_ok=True)
        elif self.protocol in ("memory", "ftp", "sftp", "smb"):
            self.fs.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

    def remove(self, rel: str) -> None:
        """Delete a file; a file that is already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            if self.is_local:
                os.unlink(self.path(rel))
            else:
                self.call(lambda: self.fs.rm_file(self.path(rel)), rel, "deleting")

    def remove_tree(self) -> None:
        """Delete the whole store directory."""
        if self.is_local:
            import shutil

            shutil.rmtree(self.root, ignore_errors=False)
            return
        self.call(lambda: self.fs.rm(self.root, recursive=True), ".", "deleting")


def _list_local(p: str) -> list[tuple[str, int, float | None]]:
    out = []
    try:
        with os.scandir(p) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out.append((e.name, st.st_size, st.st_mtime))
    except FileNotFoundError:
        return []
    return sorted(out)


def _write_file(path: str, parts: list, exclusive: bool = False) -> int:
    """Write buffers to a new file and fsync it; returns its size."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    n = 0
    with os.fdopen(fd, "wb") as f:
        for part in parts:
            n += f.write(part)
        f.flush()
        os.fsync(f.fileno())
    return n


def _link_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists, atomically: write and fsync a temporary
    file, then hard-link it to the final name (link fails if the name exists)."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        _write_file(tmp, [data], exclusive=True)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):  # removed already by a failed write
            os.unlink(tmp)
    _fsync_dir(d)
    return True


def _mtime_of(info: Mapping[str, Any]) -> float | None:
    """Modification time of an fsspec ``info`` dict (local: mtime; S3: LastModified; GCS:
    updated; memory: created), or None."""
    import datetime as _dt

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=_dt.timezone.utc)
            return v.timestamp()
        if isinstance(v, str):
            try:
                d = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
            if d.tzinfo is None:
                d = d.replace(tzinfo=_dt.timezone.utc)
            return d.timestamp()
    return None


def check_relpath(rel: str) -> str:
    """Refuse paths that could leave the table root (absolute, '..', backslashes, empty parts,
    control characters such as a trailing newline)."""
    if (
        not isinstance(rel, str)
        or not rel
        or rel.startswith("/")
        or "\\" in rel
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in rel)
        or any(part in ("", ".", "..") for part in rel.split("/"))
        or "://" in rel
    ):
        raise FormatError(f"refusing path {rel!r}: it would leave the table root")
    return rel


def _fsync_dir(path: str) -> None:
    # Make the rename durable; some filesystems refuse fsync on a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- checked range reads over HTTP and S3 ------------------------------------------------------
def _check_content_range(store: Store, rel: str, start: int, end: int, header: str | None) -> None:
    """A 206's Content-Range must name exactly the bytes asked for."""
    want = f"bytes {start}-{end - 1}/"
    if header is not None and not header.strip().startswith(want):
        raise _transient(
            FetchError(
                f"{store.url_of(rel)}: asked for bytes [{start}, {end}), the server answered "
                f"Content-Range {header!r}"
            )
        )


def _http_range(store: Store, rel: str, start: int, end: int) -> bytes:
    from fsspec.asyn import sync

    fs = store.fs
    return sync(fs.loop, _http_range_async, store, fs, rel, start, end)


async def _http_range_async(store: Store, fs, rel: str, start: int, end: int) -> bytes:
    kw = dict(fs.kwargs)
    headers = dict(kw.pop("headers", None) or {})
    headers["Range"] = f"bytes={start}-{end - 1}"
    session = await fs.set_session()
    async with session.get(fs.encode_url(store.path(rel)), headers=headers, **kw) as r:
        if r.status == 404:
            raise FileNotFoundError(store.url_of(rel))
        if r.status >= 400:
            err = FetchError(f"{store.url_of(rel)}: HTTP {r.status} {r.reason}")
            err.status = r.status  # type: ignore[attr-defined]
            raise err
        length = r.headers.get("Content-Length")
        if r.status == 200:
            total = int(length) if length is not None and length.isdigit() else None
            if start != 0 or total != end:
                raise RangeNotSupportedError(
                    f"{store.url_of(rel)}: the server ignored the Range header (HTTP 200 with "
                    f"{total if total is not None else 'an unknown number of'} bytes for bytes "
                    f"[{start}, {end})); serve the table from a server that supports Range"
                )
        else:
            _check_content_range(store, rel, start, end, r.headers.get("Content-Range"))
        if length is not None and length.isdigit() and int(length) > end - start:
            raise _transient(
                FetchError(f"{store.url_of(rel)}: {length} bytes for a {end - start}-byte range")
            )
        return await _read_upto(r.content, end - start + 1)


async def _read_upto(content, n: int) -> bytes:
    """At most ``n`` bytes of a response body (fewer when it ends first)."""
    parts, got = [], 0
    while got < n:
        b = await content.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _s3_range(store: Store, rel: str, start: int, end: int) -> bytes:
    from fsspec.asyn import sync

    fs = store.fs
    return sync(fs.loop, _s3_range_async, store, fs, rel, start, end)


async def _s3_range_async(store: Store, fs, rel: str, start: int, end: int) -> bytes:
    bucket, key, _ = fs.split_path(store.path(rel))
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
    try:
        _check_content_range(store, rel, start, end, resp.get("ContentRange"))
        if resp.get("ContentRange") is None and resp.get("ContentLength") != end - start:
            raise RangeNotSupportedError(
                f"{store.url_of(rel)}: the S3 endpoint ignored the Range header"
            )
        return await resp["Body"].read()
    finally:
        resp["Body"].close()
