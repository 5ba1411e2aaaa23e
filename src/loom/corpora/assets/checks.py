"""Checks of untrusted asset files, run before Blender opens them, and `fetch_local`, the gate that applies them.

Asset files come from outside. Blender's importers are no safety boundary: its glTF importer opens buffer and image
URIs wherever they point (``../``, absolute paths, percent-encoded ones) and its OBJ importer does the same with
``mtllib`` and ``map_Kd``. `check_gltf_uris` and `check_obj_refs` refuse such files before Blender sees them, and
`fetch_local` runs them on every asset it hands out (and refuses records of formats Loom does not import). FBX files
also record texture paths; they are not checked here (binary FBX parsing is out of scope), so FBX should only come
from trusted sources. Every refusal is a TaskError: one failure row naming the file and the rule, the job goes on.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import struct
import threading
import urllib.parse
from typing import Any

import fsspec

from loom.corpora.assets.records import AssetRecord, _is_local, sha256_file, unsupported_reason, validate_uid
from loom.platform.errors import TaskError

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


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


# ------------------------------------------------------------------------------------------------------- fetch


def fetch_local(record: AssetRecord, dest_dir: str | os.PathLike[str]) -> str:
    """A local path to `record`'s main file that Blender may open: side files present, references checked.

    Local files are used in place (after checking they exist); remote ones (any other fsspec URL) are copied to
    ``dest_dir/<uid>/<uid>.<format>`` with the side files their references name, at the same relative paths.
    Raises TaskError (one failure row, the job goes on) when the record's format is one Loom does not import
    (`unsupported_reason`), the file is missing, its sha256 differs from the record, or a reference is unsafe (see
    `check_gltf_uris`). A missing side file is left to the renderer.
    """
    uid = validate_uid(record.uid)
    if not record.supported:
        raise TaskError(f"asset {uid}: {unsupported_reason(record)}")
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
