"""WebDataset tar shards and their manifests: written atomically through fsspec, verified against checksums.

Layout of a job's output folder (any fsspec URL)::

    config.yaml              the resolved job config
    plan.json                every task and the shard it belongs to (fixed at the first run)
    shards/<prefix>-000000.tar   WebDataset shard: members ``<key>.<ext>``, grouped by key, sorted
    shards/<prefix>-000000.json  sidecar, written after the tar: samples, failures, size, sha256
    manifest.json            all sidecars gathered: shard list, counts, sizes, checksums
    failures.jsonl           one row per failed task: key, asset, reason

A shard is complete when its sidecar exists and names the tar's size; the sidecar is written only after the tar
has been moved into place, so an interrupted job leaves either a complete pair, a tar without sidecar (redone) or
a temporary file (removed). Tars are byte-deterministic: members are sorted, and mtime/uid/gid/mode are fixed.

Why tarfile instead of webdataset's ShardWriter or Ray Data's write_webdataset: ShardWriter never closes fsspec
handles and Ray's writer names files by uuid and leaves truncated tars when a task fails.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from loom.platform import storage

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
SHARDS_DIR = "shards"


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match its manifest. The message names the shard."""


@dataclass
class ShardRecord:
    name: str  # file name of the tar inside shards/
    samples: int
    size: int
    sha256: str
    keys: list[str]
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # {key, warnings}: e.g. a missing texture, rendered without
    stats: dict = field(default_factory=dict)  # timings etc. (informational)

    def to_dict(self) -> dict:
        return asdict(self)


def split_member(name: str) -> tuple[str, str]:
    """``dir/abc_v0.rgb.mkv`` -> (``abc_v0``, ``rgb.mkv``): WebDataset's rule, key up to the first dot of the
    base name."""
    base = posixpath.basename(name)
    key, dot, ext = base.partition(".")
    if not dot or not key:
        raise ShardError(f"tar member {name!r} is not of the form <key>.<ext>")
    return key, ext


def write_tar(url: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, str, list[str]]:
    """Write samples ``(key, {ext: bytes})`` as a tar at ``url``, atomically. Returns (size, sha256, keys)."""
    keys: list[str] = []
    with storage.atomic_writer(url) as w:
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, files in samples:
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
                keys.append(key)
                for ext in sorted(files):
                    data = files[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    return w.size, w.sha256.hexdigest(), keys


def iter_tar(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample of a tar shard, streaming. A truncated or corrupt tar raises
    ShardError naming the shard (never a silent partial read)."""
    fs, path = storage.filesystem(url)
    try:
        total = int(fs.size(path))
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            cur_key, cur = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_member(m.name)
                if key != cur_key and cur_key is not None:
                    yield cur_key, cur
                    cur = {}
                cur_key = key
                fobj = tar.extractfile(m)
                data = fobj.read() if fobj else b""
                if len(data) != m.size:
                    raise ShardError(f"shard {url}: member {m.name} is truncated ({len(data)} of {m.size} bytes)")
                cur[ext] = data
            # tarfile takes a file cut at a header boundary for a clean end: insist on the end-of-archive
            # marker (two zero blocks) after the last member.
            if total < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise ShardError(f"shard {url} is truncated after {tar.offset} bytes (no end-of-archive marker); "
                                 "rerun the job to rewrite it")
            if cur_key is not None:
                yield cur_key, cur
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(
            f"shard {url} is corrupt or truncated ({type(e).__name__}: {e}); run `loom shards verify` on its "
            "folder and rerun the job to rewrite it"
        ) from e


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sidecar_url(out: str, name: str) -> str:
    return storage.join(out, SHARDS_DIR, name.removesuffix(".tar") + ".json")


def shard_url(out: str, name: str) -> str:
    return storage.join(out, SHARDS_DIR, name)


def read_sidecar(out: str, name: str) -> ShardRecord | None:
    """The sidecar of a shard if the shard is complete (sidecar present, tar present with the recorded size)."""
    sc = sidecar_url(out, name)
    if not storage.exists(sc):
        return None
    try:
        rec = ShardRecord(**storage.read_json(sc))
    except (ValueError, TypeError):
        return None  # an unreadable sidecar means the shard is redone
    tar = shard_url(out, name)
    if not storage.exists(tar) or storage.size(tar) != rec.size:
        return None
    return rec


def write_sidecar(out: str, rec: ShardRecord) -> None:
    storage.write_json(sidecar_url(out, rec.name), rec.to_dict())


def write_manifest(out: str, names: list[str], extra: dict | None = None) -> dict:
    """Gather the sidecars of ``names`` (in plan order) into manifest.json and failures.jsonl."""
    shards, failures, warned, missing = [], [], 0, []
    for name in names:
        rec = read_sidecar(out, name)
        if rec is None:
            missing.append(name)
            continue
        shards.append({k: v for k, v in rec.to_dict().items() if k not in ("failures", "warnings")})
        failures += [dict(f, shard=name) for f in rec.failures]
        warned += len(rec.warnings)
    manifest = {
        "format": "loom-shards/1",
        **(extra or {}),
        "complete": not missing,
        "shards": shards,
        "missing_shards": missing,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["size"] for s in shards),
            "failures": len(failures),
            "samples_with_warnings": warned,
        },
    }
    storage.write_json(storage.join(out, MANIFEST), manifest)
    storage.write_bytes(
        storage.join(out, FAILURES), "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode()
    )
    return manifest


def read_manifest(out: str) -> dict:
    url = storage.join(out, MANIFEST)
    if not storage.exists(url):
        raise FileNotFoundError(f"no {MANIFEST} in {out}: is this a Loom output folder? (run a render job first)")
    return storage.read_json(url)


def manifest_kind(url: str) -> str | None:
    """The corpus kind its manifest names ('ttv', 'latents', '4d', 'latents4d', ...), or None for a bare shard or
    folder of tars (no manifest)."""
    try:
        return read_manifest(url).get("kind")
    except FileNotFoundError:
        return None


def shard_urls(url: str) -> list[str]:
    """The shard tars a URL stands for: an output folder (its manifest's shards, in order), a single .tar, or a
    folder of tars (sorted)."""
    if url.endswith(".tar"):
        if not storage.exists(url):
            raise FileNotFoundError(f"shard {url} does not exist")
        return [url]
    if storage.exists(storage.join(url, MANIFEST)):
        return [shard_url(url, s["name"]) for s in read_manifest(url)["shards"]]
    names = [n for n in storage.listdir(url) if n.endswith(".tar")]
    if names:
        return [storage.join(url, n) for n in names]
    sub = storage.join(url, SHARDS_DIR)
    names = [n for n in storage.listdir(sub) if n.endswith(".tar")]
    if not names:
        raise FileNotFoundError(f"no shards found at {url} (expected a .tar, a folder of tars or a Loom output folder)")
    return [storage.join(sub, n) for n in names]


def is_shards(url: str) -> bool:
    """Whether ``url`` is shards (an output folder, a folder of tars, a .tar) rather than a folder of other files."""
    try:
        return bool(shard_urls(url))
    except (FileNotFoundError, NotADirectoryError):
        return False


def verify(out: str, deep: bool = True) -> list[str]:
    """Check every shard of an output folder against its manifest: present, same size, same sha256, and (deep)
    readable to the end with the recorded keys. Returns a list of problems (empty: all good)."""
    manifest = read_manifest(out)
    problems = []
    if manifest.get("missing_shards"):
        problems.append(f"manifest lists {len(manifest['missing_shards'])} unfinished shard(s): "
                        f"{manifest['missing_shards'][:5]} (rerun the job to finish them)")
    listed = set()
    for s in manifest["shards"]:
        url = shard_url(out, s["name"])
        listed.add(s["name"])
        if not storage.exists(url):
            problems.append(f"{s['name']}: missing")
            continue
        if storage.size(url) != s["size"]:
            problems.append(f"{s['name']}: size {storage.size(url)} != manifest {s['size']}")
            continue
        if storage.sha256_of(url) != s["sha256"]:
            problems.append(f"{s['name']}: sha256 differs from the manifest")
            continue
        if deep:
            try:
                keys = [k for k, _ in iter_tar(url)]
            except ShardError as e:
                problems.append(f"{s['name']}: {e}")
                continue
            if keys != s["keys"]:
                problems.append(f"{s['name']}: keys {keys[:3]}... differ from the manifest's {s['keys'][:3]}...")
    for name in storage.listdir(storage.join(out, SHARDS_DIR)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: on disk but not in the manifest (an unfinished shard? rerun the job)")
        if name.startswith(storage.TMP_MARK):
            problems.append(f"{name}: leftover temporary file of an interrupted write (a rerun removes it)")
    return problems
