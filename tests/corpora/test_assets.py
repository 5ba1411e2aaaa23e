"""Asset sources, manifest and the checks that run before Blender sees a file.

Nothing here touches the internet: the Objaverse tests run the real ``objaverse`` package against a mirror in a
temporary folder, served from a loopback HTTP server, with every non-loopback connection refused.
"""

import base64
import functools
import gzip
import hashlib
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
import uuid

import fsspec
import pytest

from loom.corpora import assets as A
from loom.corpora.assets.sources import _bundled_dir
from loom.platform.errors import TaskError

HEX_UIDS = ["0a1b2c3d4e5f60718293a4b5c6d7e8f9", "8476c4170df24cf5bbe6967222d1a42d", "ffffffff000000001111111122222222"]
HF_PREFIX = "https://huggingface.co/datasets/allenai/objaverse/resolve/main/"


# ------------------------------------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def triangle_gltf(offset: float = 0.0, *, images=(), buffer_uri=None):
    """A one-triangle glTF document and its binary buffer; `buffer_uri` None means GLB-internal buffer."""
    pos = struct.pack("<9f", offset, 0, 0, offset + 1, 0, 0, offset, 1, 0)
    buffer = {"byteLength": len(pos)}
    if buffer_uri is not None:
        buffer["uri"] = buffer_uri
    doc = {
        "asset": {"version": "2.0"},
        "buffers": [buffer],
        "bufferViews": [{"buffer": 0, "byteLength": len(pos)}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3",
                       "min": [offset, 0, 0], "max": [offset + 1, 1, 0]}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
        "nodes": [{"mesh": 0}],
        "scenes": [{"nodes": [0]}],
        "scene": 0,
    }
    if images:
        doc["images"] = [{"uri": u} for u in images]
    return doc, pos


def glb_bytes(doc: dict, binary: bytes) -> bytes:
    """Pack a GLB container (glTF 2.0 spec 4.4): header, JSON chunk, BIN chunk, each 4-byte aligned."""
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(binary), 0x004E4942) + binary
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def write_gltf(folder, name, buffer_uri, images=()):
    doc, _ = triangle_gltf(images=images, buffer_uri=buffer_uri)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def no_internet(monkeypatch):
    """Refuse every connection and name lookup that is not loopback, as a test failure would want to see."""
    loopback = {"127.0.0.1", "::1", "localhost"}
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in loopback and self.family in (socket.AF_INET, socket.AF_INET6):
            raise ConnectionRefusedError(f"test forbids network access to {address!r}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in loopback and host is not None:
            raise socket.gaierror(f"test forbids resolving {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# --------------------------------------------------------------------------------------------------------- uids


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", "%2e%2e", "a.b", "", "..", "a\\b", "a\x00b", " a",
                                 "-lead", "x" * 129, "é"])
def test_validate_uid_refuses_unsafe_ids(bad):
    with pytest.raises(ValueError) as e:
        A.validate_uid(bad)
    assert repr(bad) in str(e.value) and "[A-Za-z0-9_-]" in str(e.value)


@pytest.mark.parametrize("good", HEX_UIDS + ["bunny", "a", "chairs-office_chair--a9eca2e8", "x" * 128])
def test_validate_uid_accepts_safe_ids(good):
    assert A.validate_uid(good) == good


def test_uid_from_relpath_is_readable_safe_and_injective():
    assert A.uid_from_relpath("bunny.glb") == "bunny"
    assert A.uid_from_relpath("chairs/office.glb") == "chairs-office"
    sanitised = A.uid_from_relpath("chairs/office chair.glb")
    assert sanitised.startswith("chairs-office_chair--") and len(sanitised) == len("chairs-office_chair--") + 8
    assert A.uid_from_relpath("chairs/office chair.glb") == sanitised  # deterministic
    # Pairs a naive mapping would merge.
    pairs = [("a/b.glb", "a-b.glb"), ("a b.glb", "a_b.glb"), ("a.glb", "a.obj"), ("x/../y.glb", "y.glb"),
             ("a_/b.glb", "a/b.glb"), ("a.b.glb", "a_b.glb"), ("deep/" * 40 + "x.glb", "deep/" * 40 + "y.glb")]
    for p, q in pairs:
        assert A.uid_from_relpath(p) != A.uid_from_relpath(q), (p, q)
    for p in ["../../etc/passwd", "/abs/x.glb", "%2e%2e/x.glb", "ü/ñ.glb", "..", "weird\x00.glb"]:
        A.validate_uid(A.uid_from_relpath(p))


# ------------------------------------------------------------------------------------------------ glTF / OBJ URIs


@pytest.mark.parametrize("uri", ["../secret.bin", "/etc/passwd", "%2E%2E/secret.bin", "file:///etc/passwd",
                                 "http://x/y.bin", "https://x/y.bin", "sub/../../secret.bin", "sub\\..\\secret.bin",
                                 "%2Fetc%2Fpasswd", "C:/secret.bin", "a%00.bin", "%252e%252e/secret.bin", "",
                                 "~/secret.bin", "sub/%2e%2e/%2e%2e/secret.bin"])
def test_check_gltf_uris_refuses_escaping_buffer_uri(tmp_path, uri):
    (tmp_path / "secret.bin").write_bytes(b"top secret")
    asset_dir = tmp_path / "asset"
    asset_dir.mkdir()
    path = write_gltf(asset_dir, "a.gltf", uri)
    with pytest.raises(TaskError) as e:
        A.check_gltf_uris(path)
    assert str(path) in str(e.value) and repr(uri) in str(e.value) and "refused" in str(e.value)


def test_check_gltf_uris_refuses_escaping_image_in_glb(tmp_path):
    doc, binary = triangle_gltf(images=["textures/ok.png", "textures/%2e%2e/%2e%2e/etc/passwd"])
    path = tmp_path / "a.glb"
    path.write_bytes(glb_bytes(doc, binary))
    with pytest.raises(TaskError, match=r"images\[1\]\.uri"):
        A.check_gltf_uris(path)


def test_check_gltf_uris_accepts_data_and_relative_uris(tmp_path):
    (tmp_path / "textures").mkdir()
    (tmp_path / "textures" / "a.png").write_bytes(b"png")
    (tmp_path / "buf.bin").write_bytes(b"\0" * 36)
    data_uri = "data:application/octet-stream;base64," + base64.b64encode(b"\0" * 36).decode()
    path = write_gltf(tmp_path, "a.gltf", data_uri, images=["textures/a.png", "textures/./a.png",
                                                             "data:image/png;base64,iVBORw0KGgo="])
    assert A.check_gltf_uris(path) == ["textures/a.png"]
    path = write_gltf(tmp_path, "b.gltf", "buf%20.bin", images=["textures/a.png"])
    assert A.check_gltf_uris(path) == ["buf .bin", "textures/a.png"]
    doc, binary = triangle_gltf(images=["textures/a.png"])
    glb = tmp_path / "c.glb"
    glb.write_bytes(glb_bytes(doc, binary))
    assert A.check_gltf_uris(glb) == ["textures/a.png"]


def test_check_gltf_uris_refuses_symlink_out_of_folder(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"secret")
    asset_dir = tmp_path / "asset"
    (asset_dir / "textures").mkdir(parents=True)
    os.symlink(tmp_path / "secret.png", asset_dir / "textures" / "a.png")
    path = write_gltf(asset_dir, "a.gltf", "data:,", images=["textures/a.png"])
    with pytest.raises(TaskError, match="symlink"):
        A.check_gltf_uris(path)
    # A symlink that stays inside is fine.
    (asset_dir / "real.png").write_bytes(b"png")
    os.remove(asset_dir / "textures" / "a.png")
    os.symlink(asset_dir / "real.png", asset_dir / "textures" / "a.png")
    assert A.check_gltf_uris(path) == ["textures/a.png"]


@pytest.mark.parametrize("content", [b"", b"not a glb at all, just text", b"glTF\x01\0\0\0" + b"\0" * 20,
                                     struct.pack("<4sII", b"glTF", 2, 10_000) + b"\0" * 20])
def test_check_gltf_uris_refuses_invalid_glb(tmp_path, content):
    path = tmp_path / "bad.glb"
    path.write_bytes(content)
    with pytest.raises(TaskError, match="bad.glb"):
        A.check_gltf_uris(path)


def test_check_gltf_uris_refuses_invalid_gltf_json(tmp_path):
    path = tmp_path / "bad.gltf"
    path.write_text("{not json")
    with pytest.raises(TaskError, match="not valid glTF"):
        A.check_gltf_uris(path)
    path.write_text(json.dumps({"buffers": []}))
    with pytest.raises(TaskError, match="asset"):
        A.check_gltf_uris(path)


@pytest.mark.parametrize("obj_line, mtl_line", [
    ("mtllib ../evil.mtl", None),
    ("mtllib /etc/evil.mtl", None),
    ("mtllib m.mtl", "map_Kd /etc/passwd"),
    ("mtllib m.mtl", "map_Kd -s 1 1 1 ../../secret.png"),
    ("mtllib m.mtl", "bump sub\\..\\..\\secret.png"),
])
def test_check_obj_refs_refuses_escaping_references(tmp_path, obj_line, mtl_line):
    (tmp_path / "a.obj").write_text(f"{obj_line}\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    if mtl_line:
        (tmp_path / "m.mtl").write_text(f"newmtl x\n{mtl_line}\n")
    with pytest.raises(TaskError, match="refused"):
        A.check_obj_refs(tmp_path / "a.obj")


def test_check_obj_refs_returns_library_and_textures(tmp_path):
    (tmp_path / "a.obj").write_text("mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "m.mtl").write_text("newmtl x\nmap_Kd -s 1 1 1 -o 0 0 0 tex/a.png\nnorm tex/n.png\n")
    assert A.check_obj_refs(tmp_path / "a.obj") == ["m.mtl", "tex/a.png", "tex/n.png"]


# ---------------------------------------------------------------------------------------------------- folders


def make_folder(fs, root):
    """Write a small asset tree through `fs` and return {relpath: bytes}."""
    doc, binary = triangle_gltf()
    files = {
        "a.glb": glb_bytes(doc, binary),
        "a.glb.license": b"CC-BY-4.0\nsome attribution text\n",
        "sub/b c.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n",
        "sub/LICENSES.json": json.dumps({"b c.obj": "CC0-1.0"}).encode(),
        "sub/deeper/c.ply": b"ply\nformat ascii 1.0\nend_header\n",
        "notes.txt": b"not a mesh",
        ".hidden/d.glb": glb_bytes(*triangle_gltf(5.0)),
    }
    for rel, data in files.items():
        fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        with fs.open(f"{root}/{rel}", "wb") as f:
            f.write(data)
    return files


def check_scan(records, files, source):
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in records}
    assert sorted(by_name) == ["a.glb", "b c.obj", "c.ply"]
    assert [r.uid for r in records] == sorted(r.uid for r in records)
    assert by_name["a.glb"].uid == "a"
    assert by_name["b c.obj"].uid.startswith("sub-b_c--")
    assert by_name["c.ply"].uid.startswith("sub-deeper-c--")
    assert by_name["a.glb"].license == "CC-BY-4.0"
    assert by_name["b c.obj"].license == "CC0-1.0"
    assert by_name["c.ply"].license == "unknown"
    for name, rel in [("a.glb", "a.glb"), ("b c.obj", "sub/b c.obj"), ("c.ply", "sub/deeper/c.ply")]:
        r = by_name[name]
        assert r.sha256 == sha(files[rel]) and r.size == len(files[rel]) and r.format == name.rsplit(".", 1)[1]
        assert r.source == source


def test_scan_folder_local(tmp_path):
    files = make_folder(fsspec.filesystem("file"), str(tmp_path))
    records = A.scan_folder(str(tmp_path))
    check_scan(records, files, str(tmp_path))
    assert all(os.path.isabs(r.path) and os.path.isfile(r.path) for r in records)
    assert [r.format for r in A.scan_folder(str(tmp_path), formats=["glb"])] == ["glb"]
    with pytest.raises(ValueError, match="usd"):
        A.scan_folder(str(tmp_path), formats=["usd"])
    with pytest.raises(FileNotFoundError, match="nope"):
        A.scan_folder(str(tmp_path / "nope"))


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/loom-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_scan_folder_memory(memfs):
    fs, root = memfs
    files = make_folder(fs, root)
    url = f"memory://{root}"
    records = A.scan_folder(url)
    check_scan(records, files, url)
    assert all(r.path.startswith("memory://") for r in records)


def test_scan_folder_gives_near_collisions_distinct_ids(tmp_path):
    for name in ["a b.glb", "a_b.glb", "a-b.glb", "a/b.glb", "a.obj", "a.glb"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(glb_bytes(*triangle_gltf()))
    uids = [r.uid for r in A.scan_folder(str(tmp_path))]
    assert len(uids) == len(set(uids)) == 6


# ---------------------------------------------------------------------------------------------------- bundled


def test_bundled_assets_have_matching_hashes_and_known_licenses():
    records = A.bundled_assets()
    assert len(records) >= 3
    index = json.loads(open(os.path.join(_bundled_dir(), "bundled.json")).read())
    total = 0
    for r in records:
        data = open(r.path, "rb").read()
        assert r.sha256 == sha(data) and r.size == len(data)
        assert r.license not in ("unknown", "") and r.source == "bundled"
        assert r.size < 3 * 2**20
        entry = next(e for e in index["assets"] if e["uid"] == r.uid)
        total += r.size
        for side in entry["side_files"]:
            side_data = open(os.path.join(_bundled_dir(), side["file"]), "rb").read()
            assert sha(side_data) == side["sha256"]
            total += len(side_data)
        assert A.fetch_local(r, "/nonexistent-dest-not-used") == r.path  # references checked, side files present
    assert total <= 10 * 2**20
    assert {r.format for r in records} >= {"glb", "obj"}
    assert sum(e["textured"] is True for e in index["assets"]) >= 2


@pytest.mark.integration
def test_bundled_assets_import_in_blender():
    """Each bundled asset imports in bpy (in a child process, as the render worker does) with its recorded faces."""
    pytest.importorskip("bpy")
    script = r"""
import json, sys, bpy
out = {}
for uid, path, fmt in json.loads(sys.argv[1]):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    {"glb": bpy.ops.import_scene.gltf, "gltf": bpy.ops.import_scene.gltf, "obj": bpy.ops.wm.obj_import,
     "ply": bpy.ops.wm.ply_import, "stl": bpy.ops.wm.stl_import, "fbx": bpy.ops.import_scene.fbx}[fmt](filepath=path)
    faces = sum(len(o.data.polygons) for o in bpy.data.objects if o.type == "MESH")
    images = [list(i.size) for i in bpy.data.images if i.size[0] > 0]
    out[uid] = {"faces": faces, "images": images}
print("RESULT" + json.dumps(out))
"""
    records = A.bundled_assets()
    arg = json.dumps([[r.uid, r.path, r.format] for r in records])
    proc = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    for r in records:
        assert result[r.uid]["faces"] == r.annotations["faces"] > 0, r.uid
        if r.annotations["textured"] is True:
            assert result[r.uid]["images"], f"{r.uid}: no texture loaded"


# --------------------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_local_and_memory(tmp_path, memfs):
    records = A.bundled_assets()
    for url in [str(tmp_path / "m" / "assets.jsonl"), f"memory://{memfs[1]}/assets.jsonl"]:
        A.write_manifest(records, url)
        assert A.read_manifest(url) == records
        assert A.resolve_source(url) == records
    assert not [p for p in os.listdir(tmp_path / "m") if ".tmp" in p]


def test_read_manifest_refuses_bad_uid_and_duplicates_naming_the_line(tmp_path):
    good = A.bundled_assets()[0].to_dict()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "uid": "../../etc/cron.d/x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2.*\.\./\.\./etc/cron\.d/x"):
        A.read_manifest(str(path))
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"line 3.*already used at line 1"):
        A.read_manifest(str(path))
    path.write_text(json.dumps({**good, "colour": "red"}) + "\n")
    with pytest.raises(ValueError, match="colour"):
        A.read_manifest(str(path))


def test_manifest_relative_paths_resolve_against_its_folder(tmp_path):
    data = glb_bytes(*triangle_gltf())
    (tmp_path / "meshes").mkdir()
    (tmp_path / "meshes" / "t.glb").write_bytes(data)
    record = {"uid": "t", "source": "hand", "path": "meshes/t.glb", "sha256": sha(data), "license": "CC0-1.0",
              "size": len(data), "format": "glb"}
    (tmp_path / "m.json").write_text(json.dumps([record]))
    [r] = A.read_manifest(str(tmp_path / "m.json"))
    assert r.path == str(tmp_path / "meshes" / "t.glb") and r.annotations == {}


# ------------------------------------------------------------------------------------------------------- fetch


def test_fetch_local_copies_remote_gltf_with_side_files(memfs, tmp_path):
    fs, root = memfs
    doc, binary = triangle_gltf(buffer_uri="bin/tri%20angle.bin", images=["tex/a.png"])
    files = {"m/scene.gltf": json.dumps(doc).encode(), "m/bin/tri angle.bin": binary, "m/tex/a.png": b"png"}
    for rel, data in files.items():
        fs.pipe(f"{root}/{rel}", data)
    [record] = A.scan_folder(f"memory://{root}/m")
    local = A.fetch_local(record, tmp_path / "dest")
    assert local == str(tmp_path / "dest" / record.uid / f"{record.uid}.gltf")
    folder = os.path.dirname(local)
    assert open(os.path.join(folder, "bin", "tri angle.bin"), "rb").read() == binary
    assert open(os.path.join(folder, "tex", "a.png"), "rb").read() == b"png"
    assert A.fetch_local(record, tmp_path / "dest") == local  # second call reuses the copy
    assert not [p for p in os.listdir(folder) if ".part" in p]


def test_fetch_local_copies_remote_obj_with_mtl_and_texture(memfs, tmp_path):
    fs, root = memfs
    bundled = os.path.join(_bundled_dir())
    for name in ["suzi_checker.obj", "suzi_checker.mtl", "suzi_checker.png"]:
        fs.pipe(f"{root}/{name}", open(os.path.join(bundled, name), "rb").read())
    [record] = A.scan_folder(f"memory://{root}")
    local = A.fetch_local(record, tmp_path)
    assert sorted(os.listdir(os.path.dirname(local))) == sorted([f"{record.uid}.obj", "suzi_checker.mtl",
                                                                  "suzi_checker.png"])


def test_fetch_local_refuses_sha_mismatch_missing_file_and_unsafe(memfs, tmp_path):
    fs, root = memfs
    data = glb_bytes(*triangle_gltf())
    fs.pipe(f"{root}/a.glb", data)
    [record] = A.scan_folder(f"memory://{root}")
    fs.pipe(f"{root}/a.glb", data + b"changed")
    with pytest.raises(TaskError, match="sha256"):
        A.fetch_local(record, tmp_path)
    (tmp_path / "local.glb").write_bytes(data)
    local_record = A.AssetRecord(uid="loc", source="t", path=str(tmp_path / "local.glb"), sha256=sha(b"other"),
                                 license="x", size=1, format="glb")
    with pytest.raises(TaskError, match="sha256"):
        A.fetch_local(local_record, tmp_path)
    with pytest.raises(TaskError, match="does not exist"):
        A.fetch_local(A.AssetRecord(**{**local_record.to_dict(), "path": str(tmp_path / "gone.glb")}), tmp_path)
    # A missing side file is left to the renderer (a missing texture renders with a warning; a missing buffer
    # fails in Blender's importer): the main file still arrives, and nothing is invented for the missing one.
    doc, _ = triangle_gltf(buffer_uri="missing.bin")
    fs.pipe(f"{root}/g/x.gltf", json.dumps(doc).encode())
    [g] = A.scan_folder(f"memory://{root}/g")
    local = A.fetch_local(g, tmp_path / "d")
    assert os.path.isfile(local) and not os.path.exists(os.path.join(os.path.dirname(local), "missing.bin"))
    # An escaping URI is refused before anything is fetched for it.
    doc, _ = triangle_gltf(buffer_uri="../../a.glb")
    fs.pipe(f"{root}/h/x.gltf", json.dumps(doc).encode())
    [h] = A.scan_folder(f"memory://{root}/h")
    with pytest.raises(TaskError, match="refused"):
        A.fetch_local(h, tmp_path / "e")
    assert not (tmp_path / "a.glb").exists()


# ------------------------------------------------------------------------------------------------------- sources


def test_resolve_source_forms(tmp_path):
    assert [r.uid for r in A.resolve_source("bundled")] == [r.uid for r in A.bundled_assets()]
    files = make_folder(fsspec.filesystem("file"), str(tmp_path))
    assert len(A.resolve_source(str(tmp_path))) == 3
    [single] = A.resolve_source(str(tmp_path / "a.glb"))
    assert single.uid == "a" and single.license == "CC-BY-4.0" and single.sha256 == sha(files["a.glb"])
    assert A.resolve_source("file://" + str(tmp_path / "a.glb"))[0].sha256 == single.sha256


@pytest.mark.parametrize("spec, error, words", [
    ("", ValueError, "empty"),
    ("objaverse:colour=red", ValueError, "colour"),
    ("objaverse:limit=0", ValueError, "limit"),
    ("objaverse:limit=5,6", ValueError, "one value"),
    ("objaverse:animated=maybe", ValueError, "true or false"),
    ("objaverse:uids=../etc", ValueError, "../etc"),
    ("objaverse:by", ValueError, "no key"),
    ("objaverse:license=by,,category=x", ValueError, "empty item"),
    ("objaverse:license=by,license=cc0", ValueError, "twice"),
    ("/definitely/not/here/meshes", FileNotFoundError, "/definitely/not/here/meshes"),
    ("notaprotocol123://x", ValueError, "notaprotocol123://x"),
])
def test_resolve_source_refuses_bad_specs(spec, error, words):
    with pytest.raises(error) as e:
        A.resolve_source(spec)
    assert words in str(e.value)


def test_resolve_source_refuses_non_mesh_file_and_empty_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="accepted"):
        A.resolve_source(str(tmp_path / "x.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no mesh files"):
        A.resolve_source(str(tmp_path / "empty"))


def test_files_of_formats_loom_does_not_import_are_records_that_fail_saying_how_to_convert(tmp_path):
    """A .dae, .3ds, .blend or .usd in an asset folder is never skipped silently: it is listed (after the assets
    that render, so their order and shard plan stay), and fetching it is a TaskError (a failure row) that names
    the format, the file and the fix."""
    folder = tmp_path / "meshes"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.glb").write_bytes(glb_bytes(*triangle_gltf()))
    (folder / "chair.dae").write_text("<COLLADA/>")
    (folder / "sub" / "car.3ds").write_bytes(b"MM\0\0")
    (folder / "a.blend").write_bytes(b"BLENDER-v500")
    (folder / "notes.txt").write_text("not a mesh of any kind: not listed")
    records = A.resolve_source(str(folder))
    assert [(os.path.basename(r.path), r.supported) for r in records] == [
        ("b.glb", True), ("a.blend", False), ("chair.dae", False), ("car.3ds", False)]
    assert [r.uid for r in records] == [r.uid for r in A.resolve_source(str(folder))]  # stable: same plan on reruns
    for r in records[1:]:
        with pytest.raises(TaskError) as err:
            A.fetch_local(r, tmp_path / "cache")
        reason = str(err.value)
        assert f"unsupported format .{r.format}" in reason and r.path in reason and ".glb" in reason
    # they survive a manifest round trip, and stay failures when read back
    A.write_manifest(records, str(tmp_path / "m.jsonl"))
    back = A.resolve_source(str(tmp_path / "m.jsonl"))
    assert back == records and [r.supported for r in back] == [True, False, False, False]
    # the listing without them is what callers that ask for it get
    assert [r.format for r in A.scan_folder(str(folder), unsupported=False)] == ["glb"]


def test_a_folder_of_only_unsupported_meshes_or_such_a_file_is_refused_naming_them(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "chair.dae").write_text("<COLLADA/>")
    with pytest.raises(ValueError, match=r"no mesh files.*chair\.dae.*convert"):
        A.resolve_source(str(tmp_path / "only"))
    with pytest.raises(ValueError, match=r"\.dae is a mesh format Loom does not import.*glTF"):
        A.resolve_source(str(tmp_path / "only" / "chair.dae"))
    with pytest.raises(ValueError, match="format 'xyz'"):
        A.AssetRecord(uid="x", source="s", path="/x.xyz", sha256="0" * 64, license="unknown", size=1, format="xyz")


# --------------------------------------------------------------------------------------------------- objaverse


ANNOTATIONS = {
    HEX_UIDS[0]: {"uid": HEX_UIDS[0], "name": "Office chair", "license": "by", "animationCount": 0,
                  "categories": [{"name": "furniture-home", "uri": "https://example.invalid/c/furniture-home"}],
                  "tags": [{"name": "chair", "slug": "chair"}], "faceCount": 1, "vertexCount": 3,
                  "viewCount": 12, "user": {"username": "someone"}},
    HEX_UIDS[1]: {"uid": HEX_UIDS[1], "name": "Running fox", "license": "cc0", "animationCount": 2,
                  "categories": [{"name": "animals-pets"}], "tags": [], "faceCount": 1, "vertexCount": 3},
    HEX_UIDS[2]: {"uid": HEX_UIDS[2], "name": "Lamp", "license": "by-nc", "animationCount": 0,
                  "categories": [{"name": "furniture-home"}], "tags": [], "faceCount": 1, "vertexCount": 3},
}


@pytest.fixture
def objaverse_mirror(tmp_path):
    """An Objaverse 1.0 tree (object paths, one metadata folder, three GLBs) as the HF repo lays it out."""
    mirror = tmp_path / "mirror"
    (mirror / "metadata").mkdir(parents=True)
    paths = {uid: f"glbs/000-000/{uid}.glb" for uid in HEX_UIDS}
    (mirror / "object-paths.json.gz").write_bytes(gzip.compress(json.dumps(paths).encode()))
    (mirror / "metadata" / "000-000.json.gz").write_bytes(gzip.compress(json.dumps(ANNOTATIONS).encode()))
    glbs = {}
    for i, uid in enumerate(HEX_UIDS):
        glbs[uid] = glb_bytes(*triangle_gltf(float(i)))
        (mirror / paths[uid]).parent.mkdir(parents=True, exist_ok=True)
        (mirror / paths[uid]).write_bytes(glbs[uid])
    return mirror, glbs


@pytest.fixture
def loopback_hf(objaverse_mirror, monkeypatch, no_internet):
    """Serve the mirror on 127.0.0.1 and point the package's hard-coded Hugging Face URLs at it."""
    mirror, glbs = objaverse_mirror
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    requested = []
    real_urlretrieve = urllib.request.urlretrieve

    def urlretrieve(url, filename=None, *args, **kwargs):
        assert url.startswith(HF_PREFIX), url
        requested.append(url[len(HF_PREFIX):])
        return real_urlretrieve(f"http://127.0.0.1:{server.server_port}/" + url[len(HF_PREFIX):], filename,
                                *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    yield glbs, requested
    server.shutdown()
    server.server_close()


def test_no_internet_guard_refuses_real_hosts(no_internet):
    with pytest.raises(OSError):
        urllib.request.urlretrieve(HF_PREFIX + "object-paths.json.gz", os.devnull)


def test_objaverse_downloads_from_loopback_mirror_into_cache(loopback_hf, tmp_path):
    import objaverse

    glbs, requested = loopback_hf
    saved = objaverse._VERSIONED_PATH, objaverse.BASE_PATH
    cache = tmp_path / "cache" / "hf-objaverse-v1"
    records = A.objaverse_assets(license="by", cache_dir=str(cache))
    assert (objaverse._VERSIONED_PATH, objaverse.BASE_PATH) == saved  # the package's globals are restored
    assert [r.uid for r in records] == [HEX_UIDS[0]]
    [r] = records
    assert r.source == "objaverse" and r.license == "CC-BY-4.0" and r.format == "glb"
    assert r.path == str(cache / "glbs" / "000-000" / f"{HEX_UIDS[0]}.glb")
    assert r.sha256 == sha(glbs[HEX_UIDS[0]]) == sha(open(r.path, "rb").read()) and r.size == len(glbs[HEX_UIDS[0]])
    assert r.annotations["name"] == "Office chair" and r.annotations["categories"] == ["furniture-home"]
    assert "user" not in r.annotations
    assert requested == ["object-paths.json.gz", "metadata/000-000.json.gz", f"glbs/000-000/{HEX_UIDS[0]}.glb"]
    # Only the selected object was downloaded.
    assert sorted(os.listdir(cache / "glbs" / "000-000")) == [f"{HEX_UIDS[0]}.glb"]

    # Second selection: metadata and the first object come from the cache, two more objects download in threads.
    requested.clear()
    records = A.objaverse_assets(animated=False, cache_dir=str(cache), download_processes=2)
    assert [r.uid for r in records] == sorted([HEX_UIDS[0], HEX_UIDS[2]])
    assert requested == [f"glbs/000-000/{HEX_UIDS[2]}.glb"]
    assert all(r.sha256 == sha(glbs[r.uid]) for r in records)


def test_objaverse_filters_on_prepopulated_cache_without_any_download(objaverse_mirror, monkeypatch, no_internet):
    mirror, glbs = objaverse_mirror

    def refuse(url, *a, **k):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    select = functools.partial(A.objaverse_assets, cache_dir=str(mirror))
    assert [r.uid for r in select(animated=True)] == [HEX_UIDS[1]]
    assert select(animated=True)[0].license == "CC0-1.0"
    assert [r.uid for r in select(license=["CC0-1.0", "by-nc"])] == [HEX_UIDS[1], HEX_UIDS[2]]
    assert [r.uid for r in select(categories="Furniture-Home")] == [HEX_UIDS[0], HEX_UIDS[2]]
    assert [r.uid for r in select(uids=[HEX_UIDS[2], HEX_UIDS[1]])] == [HEX_UIDS[1], HEX_UIDS[2]]
    assert [r.uid for r in select(uids=[HEX_UIDS[2]], license="by")] == []
    assert [r.uid for r in select(limit=2)] == sorted(HEX_UIDS)[:2]
    assert all(r.sha256 == sha(glbs[r.uid]) for r in select())
    with pytest.raises(ValueError, match="0000000000000000000000000000dead"):
        select(uids=["0000000000000000000000000000dead"])
    spec = f"objaverse:license=by,cc0,category=furniture-home,animated=false,cache={mirror}"
    assert [r.uid for r in A.resolve_source(spec)] == [HEX_UIDS[0]]
    spec = f"objaverse:uids={HEX_UIDS[1]},{HEX_UIDS[0]},cache={mirror}"
    assert [r.uid for r in A.resolve_source(spec)] == sorted(HEX_UIDS[:2])


def test_objaverse_refuses_object_paths_outside_glbs(objaverse_mirror, monkeypatch, no_internet, tmp_path):
    mirror, _ = objaverse_mirror
    paths = {HEX_UIDS[0]: "../../../outside.glb"}
    (mirror / "object-paths.json.gz").write_bytes(gzip.compress(json.dumps(paths).encode()))
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(ValueError, match="outside.glb"):
        A.objaverse_assets(cache_dir=str(mirror))
