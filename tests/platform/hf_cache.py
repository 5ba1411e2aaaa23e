"""A Hugging Face hub cache laid out as huggingface_hub writes it, without a network: for the tests of model names
that are repo ids (tests/platform/test_hub.py) and of feature networks found in the cache (tests/eval/).

Layout (huggingface_hub's ``file_download``): ``<cache>/models--ORG--NAME/blobs/<etag>`` holds each file once, under
its git blob sha1 (plain git files) or its sha256 (LFS files: weights); ``snapshots/<commit>/<path>`` are relative
symlinks to those blobs; ``refs/<branch>`` holds the commit hash. Tests check it with huggingface_hub's own reader,
``scan_cache_dir``, which reports a malformed cache in its ``warnings``."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack")


def _etag(path: str, data: bytes) -> str:
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache: str | os.PathLike, repo_id: str, files: dict[str, bytes], *, revision: str = "main",
               commit: str | None = None) -> Path:
    """Put ``files`` ({path in repo: bytes}) into ``cache`` as the snapshot of ``repo_id`` at ``revision``; returns
    the snapshot folder. ``commit`` defaults to a hash of the contents."""
    folder = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode() + revision.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for rel, data in files.items():
        blob = folder / "blobs" / _etag(rel, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if not _is_commit(revision):
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(commit)
    return snapshot


def cache_folder(cache: str | os.PathLike, repo_id: str, src: str | os.PathLike, **kw) -> Path:
    """:func:`cache_repo` with every file of the local folder ``src`` (e.g. one written by ``save_pretrained``)."""
    src = Path(src)
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    return cache_repo(cache, repo_id, files, **kw)


def _is_commit(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def remove_repo(cache: str | os.PathLike, repo_id: str) -> None:
    shutil.rmtree(Path(cache) / ("models--" + repo_id.replace("/", "--")), ignore_errors=True)
