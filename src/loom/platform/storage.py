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


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (``recursive``: a folder and everything below it); nothing if it does not exist."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def isfile(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.isfile(path))


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


# ------------------------------------------------------------------------------------------------ run folders on
# object storage: what trains, exports and evaluates locally (DeepSpeed, torch, diffusers need local files) is staged
# in a local folder and copied to/from the URL here.

CACHE_ENV = "LOOM_CACHE"  # local cache and staging root (else ~/.cache/loom)
SOURCES = ".loom-sources.json"  # in a downloaded folder: {relative path: the object's identity when fetched}


def is_remote(url: str) -> bool:
    """Whether ``url`` names object storage (``s3://``, ``gs://``, ``memory://``, ...) rather than a local path."""
    return "://" in str(url) and not str(url).startswith("file://")


def cache_root() -> str:
    """``$LOOM_CACHE``, else ``~/.cache/loom``: where remote run folders are downloaded and staged."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/loom"))


def local_folder(url: str, kind: str) -> str:
    """The local folder that stands for the remote ``url`` (one per URL and ``kind``, e.g. 'runs', 'stage'): the
    same on every call and in every process, so reruns find what they downloaded."""
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in posixpath.basename(url.rstrip("/")))[:60]
    return os.path.join(cache_root(), kind, f"{name or 'root'}-{key}")


def files_under(url: str) -> list[str]:
    """Relative paths of the files below a folder (any depth, sorted; temporaries of atomic writes left out); empty
    if it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    root = path.rstrip("/")
    rel = [p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/")]
    return sorted(r for r in rel if not posixpath.basename(r).startswith(TMP_MARK))


def upload_file(local: str, url: str, chunk: int = 1 << 22) -> None:
    """Copy a local file to ``url`` atomically (complete under its name, or not there)."""
    with open(local, "rb") as src, atomic_writer(url) as w:
        while b := src.read(chunk):
            w.write(b)


def upload_tree(local: str, url: str, *, last: tuple[str, ...] = (), skip=None) -> list[str]:
    """Copy the files of the local folder ``local`` to ``url`` (each atomically), the relative paths in ``last``
    after all others: a folder whose completeness a marker file says (a DeepSpeed checkpoint's ``latest``) is
    complete on the remote only once everything it marks is there. ``skip(rel)``: leave a file out. Returns the
    relative paths copied."""
    rels = []
    for d, _, names in os.walk(local):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), local).replace(os.sep, "/")
            if not n.startswith(TMP_MARK) and not (skip and skip(rel)):
                rels.append(rel)
    rels.sort(key=lambda r: (r in last, r))
    for rel in rels:
        upload_file(os.path.join(local, rel), join(url, rel))
    return rels


def _identity(fs: fsspec.AbstractFileSystem, path: str) -> str:
    info = fs.info(path)
    keep = {k: info.get(k) for k in ("size", "ETag", "etag", "LastModified", "mtime", "md5Hash", "generation")}
    return json.dumps({k: str(v) for k, v in keep.items() if v is not None}, sort_keys=True)


def download_file(url: str, local: str) -> None:
    """Copy ``url`` to the local path ``local`` (written beside it, then renamed: never a partial file)."""
    fs, path = filesystem(url)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def download_tree(url: str, local: str, rels: list[str] | None = None, *, prune: bool = False) -> list[str]:
    """Copy the files below the folder ``url`` (or only the relative paths ``rels``) into ``local``, skipping each
    whose object is the one already fetched (same size, ETag or mtime, recorded in ``local/.loom-sources.json``):
    a rerun downloads nothing again. ``prune``: also delete the local files that are not among them (a mirror).
    Returns the relative paths downloaded."""
    fs, _ = filesystem(url)
    rels = files_under(url) if rels is None else rels
    record = os.path.join(local, SOURCES)
    try:
        with open(record) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    got = []
    for rel in rels:
        src = join(url, rel)
        ident = _identity(fs, filesystem(src)[1])
        dest = os.path.join(local, *rel.split("/"))
        if seen.get(rel) == ident and os.path.isfile(dest):
            continue
        download_file(src, dest)
        seen[rel] = ident
        got.append(rel)
        os.makedirs(local, exist_ok=True)
        tmp = f"{record}{TMP_MARK}"
        with open(tmp, "w") as f:
            json.dump(seen, f, indent=1, sort_keys=True)
        os.replace(tmp, record)
    if prune:
        for rel in set(files_under(local)) - set(rels) - {SOURCES}:
            os.remove(os.path.join(local, *rel.split("/")))
    return got


def _bucket_there(url: str) -> tuple[bool, str]:
    """(whether the bucket of ``url`` exists and can be read, its name)."""
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        return bool(fs.exists(bucket)), bucket
    except Exception:  # noqa: BLE001 - credentials or endpoint: the callers say what to check
        return False, bucket


def missing_error(url: str, what: str, todo: str) -> FileNotFoundError:
    """The error for a missing object or bucket: the URL, what was looked for, what to do."""
    there, bucket = _bucket_there(url)
    return FileNotFoundError(f"{url}: no {what} there: {todo}") if there else _no_bucket(url, bucket, what)


def _no_bucket(url: str, bucket: str, what: str = "") -> FileNotFoundError:
    return FileNotFoundError(f"{url}: the bucket {bucket!r} does not exist or cannot be read with these credentials/"
                             f"endpoint{f' (looking for {what})' if what else ''}: create it, or check AWS_* / the URL")


def check_bucket(url: str) -> None:
    """Refuse a URL whose bucket does not exist (writing would otherwise create one, under a mistyped name)."""
    if not is_remote(url):
        return
    there, bucket = _bucket_there(url)
    if not there:
        raise _no_bucket(url, bucket)
