"""Asset sources and the asset manifest, the input of every render job.

An asset is one mesh file (plus, for glTF and OBJ, the side files it names) described by an `AssetRecord`:
uid, source, path, sha256, license, size, format and a few annotations. Sources:

``--assets SOURCE`` syntax, parsed by `resolve_source`:

- ``bundled``: the small permissively licensed assets shipped in ``loom/data/assets`` (see ``ASSETS.md``).
- ``bundled-animated``: Loom's own animated test assets in ``loom/data/assets/animated`` (CC0-1.0).
- ``bundled-scene``: Loom's own test scene in ``loom/data/assets/scenes`` (CC0-1.0).
- a folder, local path or fsspec URL (``/data/meshes``, ``memory://meshes``, ``s3://bucket/meshes``): every file
  with a supported extension below it, uid derived from its relative path (`uid_from_relpath`).
- a single mesh file (``.glb .gltf .obj .fbx .ply .stl``), local or fsspec URL.
- a manifest written by `write_manifest` (``.jsonl``; a ``.json`` holding a list of records is accepted too).
  Relative ``path`` values in a manifest are relative to the manifest's folder.
- ``objaverse:KEY=V[,V...][,KEY=V...]``: Objaverse 1.0 through the ``objaverse`` package. A token with ``=``
  starts a new key; tokens without ``=`` add values to the previous key. Keys:

  ===============  ==========================================================================================
  ``uids``         object uids (32 hex), e.g. ``objaverse:uids=8476c4170df24cf5bbe6967222d1a42d,8ff7f1f2...``
  ``license``      Objaverse license code or SPDX id, any of (``by``, ``by-sa``, ``cc0``, ``CC-BY-4.0``...)
  ``category``     Sketchfab category name or slug, any of (``furniture-home``, ``Cars & Vehicles``...)
  ``animated``     ``true`` / ``false`` (animationCount > 0)
  ``limit``        at most this many objects (the first ones in (folder, uid) order)
  ``cache``        cache folder (default: the package's ``~/.objaverse/hf-objaverse-v1``)
  ===============  ==========================================================================================

  e.g. ``objaverse:license=by,cc0,category=furniture-home,animated=false,limit=100``. Without ``uids`` the
  metadata of every selected folder is downloaded (Objaverse has 160 folders of ~5k objects each).

Trust. Asset ids and paths come from outside. `validate_uid` refuses any id that could name something other
than one folder entry (so an output path built from it cannot escape the output folder). Blender's importers are
no safety boundary: its glTF importer opens buffer and image URIs wherever they point (``../``, absolute paths,
percent-encoded ones) and its OBJ importer does the same with ``mtllib`` and ``map_Kd``. `check_gltf_uris` and
`check_obj_refs` refuse such files before Blender sees them, and `fetch_local` runs them on every asset it hands
out. FBX files also record texture paths; they are not checked here (binary FBX parsing is out of scope), so FBX
should only come from trusted sources.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import posixpath
import re
import struct
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import fsspec

from loom.platform.errors import TaskError

__all__ = [
    "FORMATS",
    "AssetRecord",
    "validate_uid",
    "uid_from_relpath",
    "check_gltf_uris",
    "check_obj_refs",
    "referenced_files",
    "scan_folder",
    "bundled_assets",
    "objaverse_assets",
    "resolve_source",
    "write_manifest",
    "read_manifest",
    "fetch_local",
    "sha256_file",
]

#: Mesh formats the render worker imports, by lower-case file extension (without the dot).
FORMATS: tuple[str, ...] = ("glb", "gltf", "obj", "fbx", "ply", "stl")

_UID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_UID_RULE = "1 to 128 characters from [A-Za-z0-9_-], starting with a letter or digit"
# A path component that needs no sanitising: no '-', because '-' is what joins components in a uid.
_CLEAN_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_OBJAVERSE_PATH_RE = re.compile(r"glbs/\d{3}-\d{3}/([A-Za-z0-9_-]+)\.glb")

# Objaverse 1.0 stores Sketchfab licence codes; all are version 4.0 except CC0 (README of allenai/objaverse).
_OBJAVERSE_SPDX = {
    "by": "CC-BY-4.0",
    "by-sa": "CC-BY-SA-4.0",
    "by-nd": "CC-BY-ND-4.0",
    "by-nc": "CC-BY-NC-4.0",
    "by-nc-sa": "CC-BY-NC-SA-4.0",
    "by-nc-nd": "CC-BY-NC-ND-4.0",
    "cc0": "CC0-1.0",
}
_ANNOTATION_KEYS = ("name", "license", "categories", "tags", "animationCount", "faceCount", "vertexCount", "uri")

_BUNDLED_PACKAGE = "loom.data"
_BUNDLED_DIR = "assets"
_BUNDLED_INDEX = "bundled.json"
_LICENSE_MAPS = ("LICENSES.json", "bundled.json")


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
        format: one of `FORMATS`.
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
        if self.format not in FORMATS:
            raise ValueError(f"AssetRecord {self.uid!r}: format {self.format!r} is not one of {FORMATS}")
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


# ------------------------------------------------------------------------------------------------ referenced files


def _read_glb_json(data: bytes, name: str, file_size: int | None = None) -> dict[str, Any]:
    """The JSON chunk of a binary glTF container (spec section 4.4), or TaskError.

    `data` may stop after the JSON chunk; `file_size` is then the whole file's size.
    """
    file_size = len(data) if file_size is None else file_size
    if len(data) < 20:
        raise TaskError(f"{name}: not a GLB file ({len(data)} bytes, shorter than a GLB header)")
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF":
        raise TaskError(f"{name}: not a GLB file (magic {magic!r}, expected b'glTF')")
    if version != 2:
        raise TaskError(f"{name}: GLB version {version} is not supported (only glTF 2.0)")
    if length > file_size:
        raise TaskError(f"{name}: GLB header says {length} bytes but the file has {file_size} (truncated?)")
    chunk_length, chunk_type = struct.unpack_from("<II", data, 12)
    if chunk_type != 0x4E4F534A:  # 'JSON'
        raise TaskError(f"{name}: the first GLB chunk is not JSON (type 0x{chunk_type:08x})")
    if 20 + chunk_length > min(length, len(data)):
        raise TaskError(f"{name}: the GLB JSON chunk ({chunk_length} bytes) runs past the end of the file")
    return _parse_gltf_json(data[20 : 20 + chunk_length], name)


def _parse_gltf_json(data: bytes, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{name}: not valid glTF JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("asset"), dict):
        raise TaskError(f"{name}: not valid glTF (no 'asset' object at the top level)")
    return doc


def _safe_relative_ref(ref: str, name: str, what: str, *, uri: bool) -> str | None:
    """Check one reference of an asset file; return it as a normalised relative POSIX path, or None for data:.

    `uri` selects percent-decoding (glTF URIs are URI references; OBJ/MTL names are plain paths).
    """

    def refuse(rule: str) -> TaskError:
        return TaskError(f"{name}: {what} {ref!r} refused: {rule}. Only data: URIs and relative paths that stay "
                         f"inside the asset's folder are allowed; fix or re-export the asset.")

    if not isinstance(ref, str):
        raise TaskError(f"{name}: {what} {ref!r} is not a string")
    if uri and ref[:5].lower() == "data:":
        return None
    if ref == "":
        raise refuse("it is empty")
    decoded = ref
    if uri:
        try:
            decoded = urllib.parse.unquote(ref, errors="strict")
        except UnicodeDecodeError as e:
            raise refuse("its percent-encoding is not valid UTF-8") from e
    for text in {ref, decoded}:
        if "\x00" in text:
            raise refuse("it contains a NUL character")
        if "\\" in text:
            raise refuse("it contains a backslash")
        if _SCHEME_RE.match(text):
            raise refuse("it has a URI scheme or drive letter (file:, http:, C: ...)")
        if text.startswith("/"):
            raise refuse("it is an absolute path")
        if text.startswith("~"):
            raise refuse("it starts with '~' (a home folder)")
        if ".." in text.split("/"):
            raise refuse("it contains a '..' segment")
    if uri and "%" in decoded:
        # Blender decodes once; a '%' left after decoding means double encoding, which has no honest use.
        raise refuse("it is percent-encoded twice")
    normal = posixpath.normpath(decoded)
    if normal in (".", "") or normal.startswith("../") or posixpath.isabs(normal):
        raise refuse("it does not name a file inside the asset's folder")
    return normal


def _check_inside(path: str, rel: str, name: str, what: str) -> None:
    """Refuse `rel` (already syntactically safe) if, with symlinks resolved, it lands outside `path`'s folder."""
    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(folder, rel))
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise TaskError(f"{name}: {what} {rel!r} refused: it resolves (through a symlink) to {real!r}, outside "
                        f"the asset's folder {real_folder!r}")


def _gltf_refs(data: bytes, name: str, fmt: str, file_size: int | None = None) -> list[str]:
    doc = _read_glb_json(data, name, file_size) if fmt == "glb" else _parse_gltf_json(data, name)
    refs: list[str] = []
    for key in ("buffers", "images"):
        items = doc.get(key, [])
        if not isinstance(items, list):
            raise TaskError(f"{name}: glTF '{key}' is not a list")
        for i, item in enumerate(items):
            if isinstance(item, dict) and "uri" in item:
                rel = _safe_relative_ref(item["uri"], name, f"{key}[{i}].uri", uri=True)
                if rel is not None and rel not in refs:
                    refs.append(rel)
    return refs


def check_gltf_uris(path: str | os.PathLike[str]) -> list[str]:
    """Check every ``buffers[].uri`` and ``images[].uri`` of a local .gltf or .glb file before Blender opens it.

    Allowed: ``data:`` URIs, and relative paths that after percent-decoding and normalisation stay inside the
    file's own folder (symlinks resolved). Refused, with a TaskError naming the file, the URI and the rule:
    absolute paths, ``..`` segments, any scheme (``file:``, ``http:``...), backslashes, NUL, double encoding.
    A file that is not valid glTF/GLB also raises TaskError.

    Returns:
        the referenced local files, as normalised relative POSIX paths (relative to the file's folder), in order of
        first appearance; the caller copies them alongside the main file. They are not checked to exist.
    """
    path = os.fspath(path)
    fmt = path.rsplit(".", 1)[-1].lower()
    if fmt not in ("gltf", "glb"):
        raise TaskError(f"{path}: not a .gltf or .glb file")
    with open(path, "rb") as f:
        if fmt == "glb":
            # Only the header and the JSON chunk: an Objaverse GLB can be hundreds of MB of binary after it.
            data = f.read(20)
            if len(data) == 20:
                data += f.read(struct.unpack_from("<I", data, 12)[0])
        else:
            data = f.read()
    refs = _gltf_refs(data, path, fmt, os.path.getsize(path))
    for rel in refs:
        _check_inside(path, rel, path, "URI")
    return refs


_MTL_MAP_RE = re.compile(r"(map_\w+|bump|disp|decal|refl|norm)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Texture options of MTL map statements and how many arguments each takes (at most).
_MTL_OPTIONS = {"-blendu": 1, "-blendv": 1, "-bm": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                "-mm": 2, "-o": 3, "-s": 3, "-t": 3, "-texres": 1, "-type": 1}


def _mtl_map_path(rest: str) -> str:
    """The file name of an MTL map statement after its options (``-s 1 1 1 tex.png`` -> ``tex.png``)."""
    tokens = rest.split()
    i = 0
    while i < len(tokens) and tokens[i].lower() in _MTL_OPTIONS:
        n = _MTL_OPTIONS[tokens[i].lower()]
        i += 1
        taken = 0
        while i < len(tokens) and taken < n and (taken == 0 or _NUMBER_RE.fullmatch(tokens[i])):
            i += 1
            taken += 1
    return " ".join(tokens[i:])


def _text_refs(data: bytes, name: str, fmt: str) -> list[str]:
    """Side files named by an OBJ (``mtllib``) or MTL (texture maps), checked like glTF URIs (no decoding)."""
    text = data.decode("utf-8", "surrogateescape")
    refs: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if fmt == "obj" and keyword.lower() == "mtllib":
            # The OBJ spec lists several libraries separated by spaces; some importers take the whole rest as one
            # name. Both readings are checked, the spec's is returned.
            names, checked = rest.split(), [rest]
        elif fmt == "mtl" and _MTL_MAP_RE.match(keyword):
            # Every token could be read as the file name by some importer; all are checked, the last is returned.
            names = [_mtl_map_path(rest)]
            checked = [t for t in rest.split() if not t.startswith("-") and not _NUMBER_RE.fullmatch(t)]
        else:
            continue
        where = f"line {lineno} ({keyword})"
        for cand in checked:
            _safe_relative_ref(cand, name, where, uri=False)
        for cand in names:
            if not cand:
                raise TaskError(f"{name}: {where} names no file")
            rel = _safe_relative_ref(cand, name, where, uri=False)
            if rel is not None and rel not in refs:
                refs.append(rel)
    return refs


def check_obj_refs(path: str | os.PathLike[str]) -> list[str]:
    """Check the side files of a local .obj: its ``mtllib`` files and, in each one present, the texture maps.

    Same rules and return value as `check_gltf_uris` (no percent-decoding: OBJ names are plain paths). Texture
    names are relative to their .mtl's folder, and must stay inside the .obj's folder too.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        libraries = _text_refs(f.read(), path, "obj")
    out = list(libraries)
    for rel in libraries:
        _check_inside(path, rel, path, "material library")
        mtl = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(mtl):
            continue
        with open(mtl, "rb") as f:
            for tex in _text_refs(f.read(), mtl, "mtl"):
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), tex))
                _check_inside(path, joined, mtl, "texture")
                if joined not in out:
                    out.append(joined)
    return out


def referenced_files(path: str | os.PathLike[str], fmt: str) -> list[str]:
    """Checked side files of a local asset of format `fmt` (glTF URIs, OBJ libraries and textures; none for the
    single-file formats)."""
    if fmt in ("gltf", "glb"):
        return check_gltf_uris(path)
    if fmt == "obj":
        return check_obj_refs(path)
    return []


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


def _license_maps(fs: fsspec.AbstractFileSystem, folder: str, cache: dict[str, dict[str, str]]) -> dict[str, str]:
    """file name -> licence from ``LICENSES.json`` (``{"file": "licence"}``) or ``bundled.json`` in `folder`."""
    if folder in cache:
        return cache[folder]
    mapping: dict[str, str] = {}
    for name in _LICENSE_MAPS:
        p = posixpath.join(folder, name)
        if not fs.isfile(p):
            continue
        with fs.open(p, "rb") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"licence map {fs.unstrip_protocol(p)} is not valid JSON: {e}") from e
        if isinstance(doc, dict) and isinstance(doc.get("assets"), list):
            for entry in doc["assets"]:
                mapping.setdefault(str(entry["file"]), str(entry["license"]))
        elif isinstance(doc, dict):
            for k, v in doc.items():
                mapping.setdefault(str(k), str(v))
        else:
            raise ValueError(f"licence map {fs.unstrip_protocol(p)} must be a JSON object")
    cache[folder] = mapping
    return mapping


def _license_for(fs: fsspec.AbstractFileSystem, path: str, root: str, cache: dict[str, dict[str, str]]) -> str:
    """A file's licence: ``<file>.license`` sidecar, else a licence map in its folder, else one in the scan root."""
    sidecar = path + ".license"
    if fs.isfile(sidecar):
        with fs.open(sidecar, "rb") as f:
            text = f.read(4096).decode("utf-8", "replace").strip()
        if text:
            return text.splitlines()[0].strip()
    folder = posixpath.dirname(path)
    rel_to_root = posixpath.relpath(path, root) if root else posixpath.basename(path)
    for where, key in ((folder, posixpath.basename(path)), (root, rel_to_root)):
        lic = _license_maps(fs, where, cache).get(key)
        if lic:
            return lic
    return "unknown"


def _record_for_file(fs: fsspec.AbstractFileSystem, path: str, root: str, source: str,
                     cache: dict[str, dict[str, str]]) -> AssetRecord:
    rel = posixpath.relpath(path, root) if root and path != root else posixpath.basename(path)
    return AssetRecord(
        uid=uid_from_relpath(rel),
        source=source,
        path=_display_path(fs, path),
        sha256=sha256_file(path, fs),
        license=_license_for(fs, path, root, cache),
        size=int(fs.size(path)),
        format=_format_of(path),
    )


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    out = tuple(f.lower().lstrip(".") for f in formats)
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"formats {list(formats)!r}: {bad or 'none given'} not supported; choose from {FORMATS}")
    return out


# ------------------------------------------------------------------------------------------------------- sources


def scan_folder(url: str, formats: Sequence[str] = FORMATS) -> list[AssetRecord]:
    """Every mesh file below a local folder or fsspec URL, as records sorted by uid.

    Hidden files and folders (names starting with ``.``) are skipped. The licence comes from a
    ``<file>.license`` text sidecar (first line), else a ``LICENSES.json`` / ``bundled.json`` map in the file's
    folder or in `url`, else is ``"unknown"``. Two files mapping to the same uid raise ValueError naming both.
    """
    wanted = _check_formats(formats)
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"asset folder {url!r} does not exist or is not a folder")
    root = root.rstrip("/") or "/"
    cache: dict[str, dict[str, str]] = {}
    records: dict[str, AssetRecord] = {}
    for path in sorted(fs.find(root)):
        rel = posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")) or _format_of(path) not in wanted:
            continue
        record = _record_for_file(fs, path, root, url, cache)
        if record.uid in records:
            raise ValueError(f"{url}: {records[record.uid].path!r} and {record.path!r} both map to asset id "
                             f"{record.uid!r}; rename one of them")
        records[record.uid] = record
    return [records[k] for k in sorted(records)]


def _bundled_dir() -> str:
    return str(resources.files(_BUNDLED_PACKAGE).joinpath(_BUNDLED_DIR))


def bundled_assets() -> list[AssetRecord]:
    """The assets shipped in ``loom/data/assets``, as listed (with licences and provenance) in ``bundled.json``.

    The sha256 recorded in bundled.json is checked against the file, so a corrupted install fails here, loudly.
    """
    folder = _bundled_dir()
    with open(os.path.join(folder, _BUNDLED_INDEX), encoding="utf-8") as f:
        index = json.load(f)
    records = []
    for entry in index["assets"]:
        path = os.path.join(folder, entry["file"])
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise RuntimeError(f"bundled asset {path} has sha256 {digest}, bundled.json records {entry['sha256']}: "
                               f"the installed package is corrupt; reinstall loom")
        records.append(AssetRecord(
            uid=entry["uid"], source="bundled", path=path, sha256=digest, license=entry["license"],
            size=os.path.getsize(path), format=entry["format"],
            annotations={"name": entry["shows"], "textured": entry["textured"], "faces": entry["faces"]},
        ))
    return sorted(records, key=lambda r: r.uid)


# The objaverse package keeps its cache root in a module global; one lock serialises the swap of that global.
_OBJAVERSE_LOCK = threading.Lock()


def bundled_animated_assets() -> list[AssetRecord]:
    """Loom's own animated test assets (made with bpy by ``loom.render.testassets``; CC0-1.0)."""
    folder = os.path.join(_bundled_dir(), "animated")
    return [dataclasses.replace(r, source="bundled-animated") for r in scan_folder(folder)]


def _objaverse_annotation_subset(ann: dict[str, Any]) -> dict[str, Any]:
    out = {k: ann[k] for k in _ANNOTATION_KEYS if k in ann}
    for k in ("categories", "tags"):
        if k in out:
            out[k] = [c.get("name") if isinstance(c, dict) else c for c in out[k] or []]
    return out


def _objaverse_categories(ann: dict[str, Any]) -> set[str]:
    names = set()
    for c in ann.get("categories") or []:
        for v in (c.get("name"), c.get("slug")) if isinstance(c, dict) else (c,):
            if isinstance(v, str):
                names.add(v.lower())
    return names


def objaverse_assets(
    uids: Sequence[str] | None = None,
    license: str | Sequence[str] | None = None,
    categories: str | Sequence[str] | None = None,
    animated: bool | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
    download_processes: int = 1,
) -> list[AssetRecord]:
    """Select Objaverse 1.0 objects by their annotations and download them with the ``objaverse`` package.

    Args:
        uids: only these objects (unknown uids raise ValueError naming them).
        license: keep objects whose licence is any of these, as Objaverse code (``by``, ``cc0``) or SPDX id
            (``CC-BY-4.0``), case-insensitive.
        categories: keep objects in any of these Sketchfab categories (name or slug, case-insensitive).
        animated: True keeps objects with animationCount > 0, False those without.
        limit: stop after this many selected objects, in (metadata folder, uid) order.
        cache_dir: the package's cache root (holds ``object-paths.json.gz``, ``metadata/``, ``glbs/``); default
            the package's own (``~/.objaverse/hf-objaverse-v1``).
        download_processes: parallel downloads (threads, each calling ``objaverse.load_objects``).

    Returns:
        records sorted by uid, ``source="objaverse"``, path = the downloaded .glb, licence as SPDX id.
    """
    import objaverse  # optional dependency (the ``render`` extra)

    if limit is not None and limit < 1:
        raise ValueError(f"objaverse limit={limit!r}: must be a positive integer")
    if download_processes < 1:
        raise ValueError(f"download_processes={download_processes!r}: must be >= 1")
    licenses = {license} if isinstance(license, str) else set(license or ())
    licenses = {x.lower() for x in licenses}
    cats = {categories} if isinstance(categories, str) else set(categories or ())
    cats = {c.lower() for c in cats}
    if uids is not None:
        uids = [validate_uid(u) for u in uids]

    with _OBJAVERSE_LOCK:
        saved = objaverse.BASE_PATH, objaverse._VERSIONED_PATH
        if cache_dir is not None:
            objaverse._VERSIONED_PATH = os.path.abspath(os.fspath(cache_dir))
            objaverse.BASE_PATH = os.path.dirname(objaverse._VERSIONED_PATH)
        try:
            cache_root = objaverse._VERSIONED_PATH
            object_paths = objaverse._load_object_paths()
            if uids is None:
                candidates = sorted(object_paths)  # what objaverse.load_uids() returns, without a second read
            else:
                unknown = sorted(set(uids) - object_paths.keys())
                if unknown:
                    raise ValueError(f"objaverse uids not in Objaverse 1.0 (object-paths.json.gz): {unknown}")
                candidates = sorted(set(uids))
            # The object path becomes a local file name inside the package: refuse anything but glbs/NNN-NNN/uid.glb.
            by_folder: dict[str, list[str]] = {}
            for uid in candidates:
                validate_uid(uid)
                m = _OBJAVERSE_PATH_RE.fullmatch(str(object_paths[uid]))
                if m is None or m.group(1) != uid:
                    raise ValueError(f"objaverse object path {object_paths[uid]!r} of uid {uid!r} is not "
                                     f"glbs/NNN-NNN/{uid}.glb; refusing a cache that names other files")
                by_folder.setdefault(object_paths[uid].split("/")[1], []).append(uid)

            selected: dict[str, dict[str, Any]] = {}
            # One metadata folder at a time keeps memory bounded and lets `limit` stop early.
            for folder in sorted(by_folder):
                annotations = objaverse.load_annotations(by_folder[folder])
                for uid in by_folder[folder]:
                    ann = annotations.get(uid)
                    if ann is None:
                        continue
                    lic = str(ann.get("license") or "").lower()
                    if licenses and lic not in licenses and _OBJAVERSE_SPDX.get(lic, "").lower() not in licenses:
                        continue
                    if cats and not (cats & _objaverse_categories(ann)):
                        continue
                    if animated is not None and (int(ann.get("animationCount") or 0) > 0) != animated:
                        continue
                    selected[uid] = ann
                    if limit is not None and len(selected) >= limit:
                        break
                if limit is not None and len(selected) >= limit:
                    break

            paths = _objaverse_download(objaverse, sorted(selected), download_processes)
        finally:
            objaverse.BASE_PATH, objaverse._VERSIONED_PATH = saved

    records = []
    for uid in sorted(selected):
        path = paths.get(uid)
        if path is None:
            raise RuntimeError(f"objaverse did not return a file for uid {uid!r} (cache {cache_root})")
        lic = str(selected[uid].get("license") or "")
        records.append(AssetRecord(
            uid=uid, source="objaverse", path=os.path.abspath(path), sha256=sha256_file(path),
            license=_OBJAVERSE_SPDX.get(lic.lower(), lic or "unknown"), size=os.path.getsize(path), format="glb",
            annotations=_objaverse_annotation_subset(selected[uid]),
        ))
    return records


def _objaverse_download(objaverse: Any, uids: list[str], processes: int) -> dict[str, str]:
    """``objaverse.load_objects`` over `uids`; parallel in threads, because the package's own process pool
    would not see the patched cache root under the spawn/forkserver start methods."""
    if not uids:
        return {}
    if processes == 1:
        return objaverse.load_objects(uids, download_processes=1)
    from concurrent.futures import ThreadPoolExecutor

    chunks = [uids[i::processes] for i in range(processes)]
    out: dict[str, str] = {}
    with ThreadPoolExecutor(processes) as pool:
        for part in pool.map(lambda c: objaverse.load_objects(c, download_processes=1), [c for c in chunks if c]):
            out.update(part)
    return out


_OBJAVERSE_KEYS = {"uids": "uids", "uid": "uids", "license": "license", "licence": "license",
                   "category": "categories", "categories": "categories", "animated": "animated", "limit": "limit",
                   "cache": "cache_dir"}
_SINGLE_VALUED = {"animated", "limit", "cache_dir"}


def _parse_objaverse_spec(spec: str) -> dict[str, Any]:
    """``objaverse:KEY=V[,V...][,KEY=V...]`` -> keyword arguments of `objaverse_assets`."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    accepted = ("objaverse:uids=U1,U2 | objaverse:license=by,cc0,category=NAME,animated=true|false,limit=N"
                "[,cache=DIR]")
    values: dict[str, list[str]] = {}
    key = None
    for token in (t.strip() for t in body.split(",")):
        if not token:
            raise ValueError(f"--assets {spec!r}: empty item between commas; accepted: {accepted}")
        if "=" in token:
            name, _, value = token.partition("=")
            key = _OBJAVERSE_KEYS.get(name.strip().lower())
            if key is None:
                raise ValueError(f"--assets {spec!r}: unknown key {name!r}; keys: {sorted(set(_OBJAVERSE_KEYS))}; "
                                 f"accepted: {accepted}")
            if key in values:
                raise ValueError(f"--assets {spec!r}: key {name!r} given twice; list values after one '='")
            values[key] = [value.strip()] if value.strip() else []
        elif key is None:
            raise ValueError(f"--assets {spec!r}: {token!r} has no key; accepted: {accepted}")
        else:
            values[key].append(token)
    kwargs: dict[str, Any] = {}
    for key, vals in values.items():
        if not vals:
            raise ValueError(f"--assets {spec!r}: key {key!r} has no value; accepted: {accepted}")
        if key in _SINGLE_VALUED and len(vals) > 1:
            raise ValueError(f"--assets {spec!r}: {key!r} takes one value, got {vals}")
        if key == "animated":
            if vals[0].lower() not in ("true", "false"):
                raise ValueError(f"--assets {spec!r}: animated={vals[0]!r} must be true or false")
            kwargs[key] = vals[0].lower() == "true"
        elif key == "limit":
            if not vals[0].isdigit() or int(vals[0]) < 1:
                raise ValueError(f"--assets {spec!r}: limit={vals[0]!r} must be a positive integer")
            kwargs[key] = int(vals[0])
        elif key == "cache_dir":
            kwargs[key] = vals[0]
        elif key == "uids":
            for u in vals:
                try:
                    validate_uid(u)
                except ValueError as e:
                    raise ValueError(f"--assets {spec!r}: {e}") from None
            kwargs[key] = vals
        else:
            kwargs[key] = vals
    return kwargs


def resolve_source(spec: str) -> list[AssetRecord]:
    """Parse an ``--assets SOURCE`` string (syntax in the module docstring) and return its records."""
    accepted = ("'bundled', 'bundled-animated', 'bundled-scene', a folder path/URL, a mesh file (" + ", ".join("." + f for f in FORMATS) + "), a "
                "manifest (.jsonl/.json), or 'objaverse:KEY=V,...' (keys uids, license, category, animated, limit, "
                "cache)")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--assets {spec!r} is empty; accepted: {accepted}")
    spec = spec.strip()
    if spec == "bundled":
        return bundled_assets()
    if spec == "bundled-animated":
        return bundled_animated_assets()
    if spec == "bundled-scene":
        folder = os.path.join(_bundled_dir(), "scenes")
        return [dataclasses.replace(r, source="bundled-scene") for r in scan_folder(folder)]
    if spec == "objaverse" or spec.startswith("objaverse:"):
        return objaverse_assets(**_parse_objaverse_spec(spec))
    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except (ValueError, ImportError) as e:
        raise ValueError(f"--assets {spec!r} is not understood ({e}); accepted: {accepted}") from e
    if not fs.exists(path):
        raise FileNotFoundError(f"--assets {spec!r}: no such file or folder")
    if fs.isdir(path):
        records = scan_folder(spec)
        if not records:
            raise ValueError(f"--assets {spec!r}: the folder holds no mesh files ({', '.join(FORMATS)})")
        return records
    fmt = _format_of(path)
    if fmt in ("jsonl", "json"):
        return read_manifest(spec)
    if fmt in FORMATS:
        parent = posixpath.dirname(path)
        return [_record_for_file(fs, path, parent, spec, {})]
    raise ValueError(f"--assets {spec!r}: a file with extension {fmt or '(none)'!r} is not a source; "
                     f"accepted: {accepted}")


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


# ------------------------------------------------------------------------------------------------------- fetch


def fetch_local(record: AssetRecord, dest_dir: str | os.PathLike[str]) -> str:
    """A local path to `record`'s main file that Blender may open: side files present, references checked.

    Local files are used in place (after checking they exist); remote ones (any other fsspec URL) are copied to
    ``dest_dir/<uid>/<uid>.<format>`` with the side files their references name, at the same relative paths.
    Raises TaskError (one failure row, the job goes on) when the file is missing, its sha256 differs from the
    record, or a reference is unsafe (see `check_gltf_uris`). A missing side file is left to the renderer.
    """
    uid = validate_uid(record.uid)
    fs, src = fsspec.core.url_to_fs(record.path)
    if not fs.isfile(src):
        raise TaskError(f"asset {uid}: file {record.path!r} does not exist")
    remote = not _is_local(fs)
    if remote:
        local = os.path.join(os.fspath(dest_dir), uid, f"{uid}.{record.format}")
        if not (os.path.isfile(local) and sha256_file(local) == record.sha256):
            _get_atomic(fs, src, local)
    else:
        local = src
    digest = sha256_file(local)
    if digest != record.sha256:
        raise TaskError(f"asset {uid}: {record.path} has sha256 {digest}, the manifest records {record.sha256}; "
                        f"the file changed since the manifest was written: rebuild the manifest")
    folder = os.path.dirname(os.path.abspath(local))
    refs = referenced_files(local, record.format)
    # Copying an OBJ's .mtl reveals the textures it names, hence a second round; each round is re-checked.
    for _ in range(3 if remote else 0):
        todo = [rel for rel in refs if not os.path.isfile(os.path.join(folder, *rel.split("/")))]
        todo = [rel for rel in todo if fs.isfile(posixpath.join(posixpath.dirname(src), rel))]
        if not todo:
            break
        for rel in todo:
            _get_atomic(fs, posixpath.join(posixpath.dirname(src), rel), os.path.join(folder, *rel.split("/")))
        refs = referenced_files(local, record.format)
    # Missing side files are not refused here: a missing texture renders without it and the renderer records a
    # warning in the sample (the rule), and a missing glTF buffer fails in Blender's importer as a task error.
    return local


def _get_atomic(fs: fsspec.AbstractFileSystem, src: str, dest: str) -> None:
    """Copy `src` from `fs` to the local `dest` through a temporary name, so a killed copy leaves no partial file."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        fs.get_file(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
