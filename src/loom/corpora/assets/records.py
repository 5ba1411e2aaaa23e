"""What a render job receives about each asset: the `AssetRecord`, its safe id, and the asset manifest.

A record names one mesh file (plus, for glTF and OBJ, the side files it names): uid, source, path, sha256, licence,
size, format and a few annotations. Records are made by the sources (`loom.corpora.assets.sources`), written to and
read from manifests here, and checked again before Blender sees the file (`loom.corpora.assets.checks`).

A record may name a file of a mesh format Loom does not import (`UNSUPPORTED_FORMATS`: ``.dae``, ``.3ds``,
``.usd``...) found in an asset folder: such a record becomes a failure row of the job that says how to convert the
file (`unsupported_reason`), so no file of an asset folder is skipped silently.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

#: Mesh formats the render worker imports, by lower-case file extension (without the dot).
FORMATS: tuple[str, ...] = ("glb", "gltf", "obj", "fbx", "ply", "stl")

_TO_GLB = "open it in Blender (File > Import) and export it as glTF 2.0 (.glb)"
#: Mesh formats found in asset collections that Loom does NOT import, and how to convert each. A file of one of
#: these in an asset folder is listed as an asset that fails with that advice, never skipped silently.
UNSUPPORTED_FORMATS: dict[str, str] = {
    "dae": f"convert it to .glb: {_TO_GLB}",
    "3ds": f"convert it to .glb: {_TO_GLB}",
    "blend": "export it from Blender as glTF 2.0 (.glb): File > Export > glTF 2.0",
    "usd": f"convert it to .glb: {_TO_GLB}",
    "usda": f"convert it to .glb: {_TO_GLB}",
    "usdc": f"convert it to .glb: {_TO_GLB}",
    "usdz": f"convert it to .glb: {_TO_GLB}",
    "x3d": f"convert it to .glb: {_TO_GLB}",
    "wrl": f"convert it to .glb: {_TO_GLB}",
    "abc": f"convert it to .glb: {_TO_GLB}",
    "off": "convert it to .glb or .ply (e.g. with trimesh: trimesh.load(path).export('mesh.glb'))",
    "3mf": "convert it to .glb or .stl (e.g. with trimesh: trimesh.load(path).export('mesh.glb'))",
    "dxf": f"convert it to .glb: {_TO_GLB}",
    "lwo": "convert it to .glb with the tool that made it",
    "max": "export it from 3ds Max as .fbx or .glb",
    "ma": "export it from Maya as .fbx or .glb",
    "mb": "export it from Maya as .fbx or .glb",
    "c4d": "export it from Cinema 4D as .fbx or .glb",
    "skp": "export it from SketchUp as .fbx or .glb",
}

_UID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_UID_RULE = "1 to 128 characters from [A-Za-z0-9_-], starting with a letter or digit"
# A path component that needs no sanitising: no '-', because '-' is what joins components in a uid.
_CLEAN_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")


# --------------------------------------------------------------------------------------------------------- record


@dataclass(frozen=True)
class AssetRecord:
    """One asset of a manifest: what a render task receives.

    Attributes:
        uid: safe identifier (see `validate_uid`); output paths are built from it.
        source: where the record came from: ``bundled``, ``objaverse``, or the folder/file/manifest spec.
        path: local path or fsspec URL of the main file; glTF/OBJ side files are found relative to it.
        sha256: hex digest of the main file, checked again by `fetch_local`.
        license: SPDX id where known (``CC0-1.0``, ``CC-BY-4.0``), else the source's own string, else ``unknown``.
        size: bytes of the main file.
        format: one of `FORMATS`, or of `UNSUPPORTED_FORMATS` for a file Loom does not import (a failure row).
        annotations: source metadata worth keeping (Objaverse: name, license, categories, animationCount...).
    """

    uid: str
    source: str
    path: str
    sha256: str
    license: str
    size: int
    format: str
    annotations: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_uid(self.uid)
        if self.format not in FORMATS and self.format not in UNSUPPORTED_FORMATS:
            raise ValueError(f"AssetRecord {self.uid!r}: format {self.format!r} is not one of {FORMATS} (nor a "
                             f"known format Loom does not import: {tuple(UNSUPPORTED_FORMATS)})")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"AssetRecord {self.uid!r}: sha256 {self.sha256!r} is not 64 lower-case hex digits")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"AssetRecord {self.uid!r}: size {self.size!r} is not a non-negative int")
        for name in ("source", "path", "license"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"AssetRecord {self.uid!r}: {name} must be a non-empty string")
        if not isinstance(self.annotations, dict):
            raise ValueError(f"AssetRecord {self.uid!r}: annotations must be a dict, got {type(self.annotations)}")

    # A dict field makes the generated hash fail; identity of an asset is its id and content.
    def __hash__(self) -> int:
        return hash((self.uid, self.source, self.path, self.sha256))

    @property
    def supported(self) -> bool:
        """Whether Loom imports this record's format (else its tasks fail with `unsupported_reason`)."""
        return self.format in FORMATS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (one manifest line)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssetRecord:
        """Inverse of `to_dict`; refuses missing and unknown keys, naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"an asset record must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = names - {"annotations"}
        missing = sorted(required - data.keys())
        unknown = sorted(data.keys() - names)
        if missing or unknown:
            raise ValueError(
                f"asset record {data.get('uid')!r}: missing keys {missing}, unknown keys {unknown}; "
                f"expected {sorted(names)}"
            )
        return cls(**{**data, "annotations": dict(data.get("annotations") or {})})


def unsupported_reason(record: AssetRecord) -> str:
    """The failure reason of a record of a format Loom does not import: names the format, the file and the fix."""
    return (f"unsupported format .{record.format}: {record.path} is a mesh format Loom does not import (it imports "
            f"{', '.join('.' + f for f in FORMATS)}); {UNSUPPORTED_FORMATS[record.format]}")


# ------------------------------------------------------------------------------------------------------------ ids


def validate_uid(uid: str) -> str:
    """Return `uid` if it is a safe asset id, else raise ValueError naming it.

    Allowed: `_UID_RULE`. That excludes dots (so no ``..`` and no extensions), slashes and backslashes,
    ``%`` (percent-encoding), NUL, whitespace and absolute paths, so ``out_dir / uid`` is always one entry of
    ``out_dir``.
    """
    if not isinstance(uid, str) or not _UID_RE.fullmatch(uid):
        raise ValueError(f"asset id {uid!r} is not allowed: an asset id is {_UID_RULE}")
    return uid


def uid_from_relpath(relpath: str) -> str:
    """A safe, deterministic asset id for the file at `relpath` (relative to the scanned folder, '/'-separated).

    ``bunny.glb`` -> ``bunny``; ``chairs/office.glb`` -> ``chairs-office``: path components without their
    extension, joined with ``-``. Whenever that would lose information (a character outside ``[A-Za-z0-9_]`` in a
    component, which is replaced by ``_``, a component starting with ``_``, a format other than ``.glb`` whose
    extension is dropped, an over-long id) the id instead ends in ``--`` and 8 hex digits of the SHA-256 of
    `relpath`: ``chairs/office chair.glb`` -> ``chairs-office_chair--1f0c...``. Ids without the suffix never
    contain ``--``, and the join is unambiguous for clean components, so two different paths never get the same
    id (up to a 32-bit hash collision between paths that also sanitise to the same text).
    """
    rel = relpath.replace("\\", "/").strip("/")
    parts = [p for p in rel.split("/") if p]
    if not parts:
        raise ValueError(f"cannot derive an asset id from the empty relative path {relpath!r}")
    stem, dot, ext = parts[-1].rpartition(".")
    if not dot:
        stem, ext = parts[-1], ""
    components = [*parts[:-1], stem]
    clean = ext.lower() == "glb" and all(_CLEAN_COMPONENT_RE.fullmatch(c) for c in components)
    base = "-".join(components)
    if clean and len(base) <= 128:
        return validate_uid(base)
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    base = "-".join(re.sub(r"[^A-Za-z0-9_]", "_", c) for c in components)[: 128 - 10].strip("_-") or "asset"
    return validate_uid(f"{base}--{digest}")

# ------------------------------------------------------------------------------------------------------- helpers


def sha256_file(path: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Hex SHA-256 of a file, local or on an fsspec filesystem, read in 1 MiB blocks."""
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _display_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What goes in AssetRecord.path: a plain path for local files, a full URL otherwise."""
    return os.path.abspath(path) if _is_local(fs) else fs.unstrip_protocol(path)


def _format_of(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""



# ------------------------------------------------------------------------------------------------------ manifest


def write_manifest(records: Iterable[AssetRecord], url: str) -> None:
    """Write records as JSON lines to a local path or fsspec URL; local writes are atomic (temp file + rename)."""
    lines = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records)
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(lines)
        os.replace(tmp, path)
    else:
        # A single put is atomic on object stores; there is no rename to lean on.
        with fs.open(path, "wb") as f:
            f.write(lines.encode("utf-8"))


def read_manifest(url: str) -> list[AssetRecord]:
    """Read a manifest (JSON lines; or a ``.json`` list of records). Refuses, naming the line, any record that is
    malformed or whose uid fails `validate_uid`, and duplicate uids. Relative paths are resolved against the
    manifest's folder."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"asset manifest {url!r} does not exist")
    with fs.open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    if _format_of(path) == "json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"asset manifest {url}: not valid JSON: {e}") from e
        if not isinstance(doc, list):
            raise ValueError(f"asset manifest {url}: a .json manifest must hold a list of records")
        items = [(f"item {i}", d) for i, d in enumerate(doc)]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"asset manifest {url} line {lineno}: not valid JSON: {e}") from e
    base = posixpath.dirname(path)
    records: list[AssetRecord] = []
    seen: dict[str, str] = {}
    for where, data in items:
        try:
            record = AssetRecord.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"asset manifest {url} {where}: {e}") from None
        if record.uid in seen:
            raise ValueError(f"asset manifest {url} {where}: uid {record.uid!r} already used at {seen[record.uid]}")
        seen[record.uid] = where
        if "://" not in record.path and not os.path.isabs(record.path):
            joined = posixpath.join(base, record.path)
            record = dataclasses.replace(record, path=_display_path(fs, joined))
        records.append(record)
    return records
