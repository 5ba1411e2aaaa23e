"""Storage through fsspec: one set of helpers for local paths, s3://, gs:// and memory:// (tests).

Writes are atomic: bytes go to a temporary name beside the destination and are moved into place only once
complete, so a reader (or a rerun after a crash) never sees a truncated file under its final name. On object
stores the move is a server-side copy; the temporary object is never listed as a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

TMP_MARK = ".tmp-"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join relative ``parts`` under ``url``, refusing any part that would leave it (``..``, absolute, empty)."""
    out = url.rstrip("/")
    for p in parts:
        if not p or p.startswith("/") or "\\" in p or "\x00" in p:
            raise ValueError(f"refusing path component {p!r}: it must be a relative name inside {url}")
        norm = posixpath.normpath(p)
        if norm == ".." or norm.startswith("../") or norm == ".":
            raise ValueError(f"refusing path component {p!r}: it escapes {url}")
        out = f"{out}/{norm}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries of a folder; empty if it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


class _HashingWriter:
    """File-like wrapper that hashes and counts what passes through it."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> int:
        self.sha256.update(b)
        self.size += len(b)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[_HashingWriter]:
    """Open ``url`` for writing so that it appears complete or not at all. Yields a writer exposing ``sha256``
    and ``size`` of what was written. On an exception the temporary file is removed and the destination is left
    as it was."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(path)}" if parent else f"{TMP_MARK}{path}"
    try:
        with fs.open(tmp, "wb") as f:
            w = _HashingWriter(f)
            yield w
            f.flush()
            if hasattr(f, "fileno"):
                with contextlib.suppress(Exception):
                    os.fsync(f.fileno())
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def write_bytes(url: str, data: bytes) -> str:
    """Atomically write ``data``; returns its sha256."""
    with atomic_writer(url) as w:
        w.write(data)
    return w.sha256.hexdigest()


def write_json(url: str, obj: Any) -> str:
    return write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def remove_stale_temporaries(url: str) -> list[str]:
    """Delete leftovers of interrupted atomic writes in a folder; returns their names."""
    gone = []
    for name in listdir(url):
        if name.startswith(TMP_MARK):
            remove(join(url, name))
            gone.append(name)
    return gone


def check_writable(url: str) -> None:
    """Fail early, naming the destination, if it cannot be written (before any rendering starts)."""
    probe = join(url, f"{TMP_MARK}probe-{uuid.uuid4().hex}")
    try:
        makedirs(url)
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - any backend error means the same thing to the user
        raise PermissionError(
            f"cannot write to output {url!r} ({type(e).__name__}: {e}); choose a writable --out "
            "or fix the permissions/credentials"
        ) from e
