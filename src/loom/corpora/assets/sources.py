"""Asset sources: where the `AssetRecord` list of a render job comes from.

``--assets SOURCE`` syntax, parsed by `resolve_source`:

- ``bundled``: the small permissively licensed assets shipped in ``loom/data/assets`` (see ``ASSETS.md``).
- ``bundled-animated``: Loom's own animated test assets in ``loom/data/assets/animated`` (CC0-1.0).
- ``bundled-scene``: Loom's own test scene in ``loom/data/assets/scenes`` (CC0-1.0).
- a folder, local path or fsspec URL (``/data/meshes``, ``memory://meshes``, ``s3://bucket/meshes``): every file
  with a supported extension below it, uid derived from its relative path (`uid_from_relpath`); files of mesh
  formats Loom does not import (``.dae``, ``.3ds``, ``.blend``, ``.usd``... `UNSUPPORTED_FORMATS`) are listed too,
  after the others, as records whose tasks fail saying how to convert them, never skipped silently.
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
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import threading
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import fsspec

from loom.corpora.assets.records import (FORMATS, UNSUPPORTED_FORMATS, AssetRecord, _display_path, _format_of,
                                         read_manifest, sha256_file, uid_from_relpath, validate_uid)

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


def scan_folder(url: str, formats: Sequence[str] = FORMATS, unsupported: bool = True) -> list[AssetRecord]:
    """Every mesh file below a local folder or fsspec URL, as records sorted by uid.

    Hidden files and folders (names starting with ``.``) are skipped. The licence comes from a
    ``<file>.license`` text sidecar (first line), else a ``LICENSES.json`` / ``bundled.json`` map in the file's
    folder or in `url`, else is ``"unknown"``. Two files mapping to the same uid raise ValueError naming both.

    ``unsupported`` (default): files of mesh formats Loom does not import (`UNSUPPORTED_FORMATS`) are records
    too, sorted by uid AFTER the others, so that their tasks fail saying how to convert the file instead of the
    file being skipped silently. Last, so the other assets keep their order (and a job its shard plan) and
    ``--limit N`` takes assets that render.
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
        fmt = _format_of(path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if fmt not in wanted and not (unsupported and fmt in UNSUPPORTED_FORMATS):
            continue
        record = _record_for_file(fs, path, root, url, cache)
        if record.uid in records:
            raise ValueError(f"{url}: {records[record.uid].path!r} and {record.path!r} both map to asset id "
                             f"{record.uid!r}; rename one of them")
        records[record.uid] = record
    return sorted(records.values(), key=lambda r: (not r.supported, r.uid))


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
        if not any(r.supported for r in records):
            others = [posixpath.basename(r.path) for r in records]
            found = (f"; it holds only files of mesh formats Loom does not import ({', '.join(others[:5])}"
                     f"{', ...' if len(others) > 5 else ''}): convert them to .glb" if others else "")
            raise ValueError(f"--assets {spec!r}: the folder holds no mesh files ({', '.join(FORMATS)}){found}")
        return records
    fmt = _format_of(path)
    if fmt in ("jsonl", "json"):
        return read_manifest(spec)
    if fmt in FORMATS:
        parent = posixpath.dirname(path)
        return [_record_for_file(fs, path, parent, spec, {})]
    if fmt in UNSUPPORTED_FORMATS:
        raise ValueError(f"--assets {spec!r}: .{fmt} is a mesh format Loom does not import; "
                         f"{UNSUPPORTED_FORMATS[fmt]}")
    raise ValueError(f"--assets {spec!r}: a file with extension {fmt or '(none)'!r} is not a source; "
                     f"accepted: {accepted}")

