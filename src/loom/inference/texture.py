"""``loom texture``: a textured asset from a mesh and turntable frames (TAPESTRY 3.2). This module holds the
model-free path, ``--frames``: GIVEN turntable frames (the shards of ``loom render ttv`` for the same mesh, with their
depth, mask and cameras) are back-projected into the mesh's own UV layout (`loom.geometry.texture`; a mesh without one, or a file of several meshes, is
unwrapped into one atlas with xatlas first), the seams are
dilated and the texels no frame saw are filled from their nearest seen texel (UV-space fill), and the result is
written as a textured GLB and OBJ + MTL + PNG with the texture, confidence and coverage maps. The generative path
(``--run``: generate the turntable video with a trained run, then 3D-aware inpainting stages) builds on this one and
is not written yet (issue 18).

Data flow::

    mesh file (.glb/.gltf/.obj) --trimesh--> vertices (file frame), faces, UVs (or xatlas's), own texture (if any)
        -> Blender's import frame (glTF and OBJ are Y-up: (x, y, z) -> (x, -z, y), as Blender's importers do)
        -> the turntable sample's meta["normalization"] (the render's similarity and rotation)  = the frames' world
    turntable sample (the one whose asset_sha256 is the mesh file's, or --key): rgb or albedo, depth, mask, K, c2w
        -> alignment check: the position pass lies on the transformed mesh (median distance)
        -> rasterise_uv -> back_project -> confidence, coverage -> dilate seams -> fill the rest (nearest seen texel)
        -> OUT/texture.png, confidence.png (16-bit, scaled to its maximum) + confidence.npy, coverage.png,
           mesh.glb (texture attached, the file's own coordinates), mesh.obj + mesh.mtl, report.json

The texture is sRGB (as the frames are); texel row 0 is the top of the image (v = 1), the layout trimesh and glTF
write. With ``--frames-pass albedo`` (shards rendered with ``passes.albedo=true``) the unlit base colour is
projected: the check that back-projection is exact (``report.json["own_texture_psnr_db"]`` compares with the
mesh's own base-colour texture where it has one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

# Blender's glTF and OBJ importers turn the files' +Y up into +Z up: (x, y, z) -> (x, -z, y).
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
UV_FORMATS = (".glb", ".gltf", ".obj")
ALIGN_TOLERANCE = 0.01  # median distance (unit-sphere units) of the position pass to the mesh
PASSES = ("rgb", "albedo")


@dataclasses.dataclass
class UVMesh:
    """A mesh with one UV per vertex (trimesh's layout: vertices on UV seams are split) and its own texture."""

    path: str
    vertices: np.ndarray  # (V,3) the file's coordinates
    faces: np.ndarray  # (F,3)
    uv: np.ndarray  # (V,2) v up
    image: np.ndarray | None  # (H,W,3) uint8 sRGB base-colour texture, when the file has one
    sha256: str
    unwrapped: bool = False  # the UVs are xatlas's (the file had none, or several meshes)

    def import_frame(self) -> np.ndarray:
        """(V,3) the vertices where Blender's importer puts them (before Loom's normalisation)."""
        return self.vertices @ Y_UP_TO_Z_UP.T


def load_uv_mesh(path: str, resolution: int = 1024) -> UVMesh:
    """The mesh of a .glb/.gltf/.obj file with a UV atlas: its own UV map when the file is one UV-mapped mesh, else
    (no UV map, or several meshes) every mesh joined in the file's world frame and unwrapped with xatlas into one
    atlas packed for ``resolution`` texels (`unwrap`). A clear error for other formats and unreadable files."""
    import trimesh

    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--mesh {path}: no such file")
    if ext not in UV_FORMATS:
        raise ValueError(f"--mesh {path}: texturing reads {', '.join(UV_FORMATS)} (the formats that carry UVs); "
                         "convert it to .glb")
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        scene = trimesh.load(path, force="scene", process=False)
    except Exception as e:  # trimesh raises many types on malformed files
        raise ValueError(f"--mesh {path}: cannot be read ({type(e).__name__}: {e})") from None
    parts = []  # (vertices in the file's world frame, faces, the geometry)
    for node in scene.graph.nodes_geometry:
        m, name = scene.graph.get(node)
        g = scene.geometry.get(name)
        if isinstance(g, trimesh.Trimesh) and len(g.faces):
            parts.append((np.asarray(g.vertices, np.float64) @ m[:3, :3].T + m[:3, 3], np.asarray(g.faces), g))
    if not parts:
        raise ValueError(f"--mesh {path} holds no triangle mesh")
    if len(parts) == 1:
        verts, faces, g = parts[0]
        uv = getattr(g.visual, "uv", None)
        if uv is not None and len(uv) == len(verts):
            mat = getattr(g.visual, "material", None)
            img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
            image = np.asarray(img.convert("RGB"), np.uint8) if img is not None else None
            return UVMesh(path=path, vertices=verts, faces=np.asarray(faces, np.int64),
                          uv=np.asarray(uv, np.float64), image=image, sha256=sha)
    offsets = np.cumsum([0] + [len(v) for v, _, _ in parts])
    verts = np.concatenate([v for v, _, _ in parts])
    faces = np.concatenate([f + o for (_, f, _), o in zip(parts, offsets[:-1], strict=True)])
    v, f, uv = unwrap(verts, faces, resolution)
    return UVMesh(path=path, vertices=v, faces=f, uv=uv, image=None, sha256=sha, unwrapped=True)


def unwrap(vertices: np.ndarray, faces: np.ndarray, resolution: int, padding: int = 4):
    """(vertices (V',3), faces (F,3), uv (V',2)): a UV atlas by xatlas (vertices on chart seams duplicated), its
    charts packed for a ``resolution``^2 texture with ``padding`` texels between them, so seam dilation has room."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding = int(resolution), int(padding)
    atlas.generate(pack_options=pack)
    vmap, idx, uv = atlas[0]
    return vertices[vmap], np.asarray(idx, np.int64), np.asarray(uv, np.float64)


def find_sample(frames: str, mesh: UVMesh, key: str | None, frames_pass: str) -> dict[str, Any]:
    """The turntable sample to project: ``key``, else the first whose ``asset_sha256`` is the mesh file's."""
    from loom.datasets.ttv import iter_samples

    keys = (frames_pass, "depth", "mask", "K", "c2w", "position", "meta")
    seen = []
    for s in iter_samples(frames, keys=("meta",)):
        seen.append(s["__key__"])
        if (key is not None and s["__key__"] == key) or (key is None and s["meta"].get("asset_sha256") == mesh.sha256):
            return next(_one(s, keys))
    if key is not None:
        raise ValueError(f"--frames {frames} has no sample {key!r} (it has {seen[:5]}{' ...' if len(seen) > 5 else ''})")
    raise ValueError(f"--frames {frames} has no turntable of {mesh.path} (no sample's asset_sha256 is the file's "
                     f"{mesh.sha256[:12]}...): render it with `loom render ttv --assets {mesh.path}`, or pass --key")


def _one(s: dict, keys: tuple[str, ...]):
    """The full decode of the sample ``s`` was found as (its shard, its key)."""
    from loom.datasets.ttv import decode_sample
    from loom.platform import shards

    for k, files in shards.iter_tar(s["__shard__"]):
        if k == s["__key__"]:
            if keys[0] == "albedo" and "albedo.mkv" not in files:
                raise ValueError(f"sample {k!r} of {s['__shard__']} has no albedo pass: render it with "
                                 "--set passes.albedo=true, or project --frames-pass rgb")
            out = decode_sample(files, keys=keys)
            out["__key__"] = k
            yield out
            return


def world_vertices(mesh: UVMesh, meta: dict) -> np.ndarray:
    """(V,3) the mesh in the frames' world: Blender's import frame, then the sample's normalisation."""
    n = np.asarray(meta["normalization"], np.float64)
    if n.shape != (4, 4):
        raise ValueError(f"meta['normalization'] is {n.shape}, expected a 4x4 matrix")
    return mesh.import_frame() @ n[:3, :3].T + n[:3, 3]


def check_alignment(vertices: np.ndarray, faces: np.ndarray, position: np.ndarray, mask: np.ndarray,
                    n: int = 4000) -> float:
    """Median distance from the position pass (mask pixels of the first frame) to the mesh; refuses a mesh that
    does not lie where the frames' geometry is."""
    import point_cloud_utils as pcu

    pts = position[0][mask[0]].astype(np.float64)
    if len(pts) == 0:
        raise ValueError("the first frame's mask is empty: nothing to align the mesh with")
    pts = pts[np.linspace(0, len(pts) - 1, min(n, len(pts))).astype(np.int64)]
    d, _, _ = pcu.closest_points_on_mesh(pts.astype(np.float32), vertices.astype(np.float32),
                                         faces.astype(np.int32))
    med = float(np.median(d))
    if med > ALIGN_TOLERANCE:
        raise ValueError(f"the mesh does not lie where the frames' geometry is (median distance {med:.3g} of the "
                         f"position pass to the mesh, over {ALIGN_TOLERANCE}): are the frames a turntable of THIS "
                         "file, rendered by Loom?")
    return med


def fill_unseen(texture: np.ndarray, seen: np.ndarray, surface: np.ndarray, dilate_iterations: int = 8) -> np.ndarray:
    """Seams dilated (`loom.geometry.texture.dilate`), then every surface texel no frame saw takes the colour of its
    nearest seen texel in the atlas (a UV-space fill: the placeholder for generated views), as uint8."""
    from scipy.ndimage import distance_transform_edt

    from loom.geometry.texture import dilate

    tex = dilate(texture, seen, dilate_iterations)
    if seen.any():
        _, (iy, ix) = distance_transform_edt(~seen, return_indices=True)
        hole = surface & ~seen
        tex[hole] = texture[iy[hole], ix[hole]]
    return np.clip(np.round(tex), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Textured:
    out: str
    coverage: float
    alignment: float
    own_texture_psnr_db: float | None
    files: list[str]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    run: tuple[str, str, str] | None = None  # MLflow (uri, experiment id, run id)


def texture_from_frames(mesh_path: str, frames: str, out: str, key: str | None = None, frames_pass: str = "rgb",
                        resolution: int = 1024, tracking=None) -> Textured:
    """The model-free path of ``loom texture`` (module docstring); ``tracking`` (a `TrackingSettings`) logs one
    MLflow run (`log_run`), None logs nothing."""
    from PIL import Image

    from loom.geometry import texture as tx

    if frames_pass not in PASSES:
        raise ValueError(f"--frames-pass {frames_pass!r}: use one of {list(PASSES)}")
    if resolution < 16:
        raise ValueError(f"--resolution {resolution} must be >= 16")
    clock = Clock()
    mesh = load_uv_mesh(mesh_path, resolution)
    clock.lap("mesh")  # read, and unwrap with xatlas where needed
    s = find_sample(frames, mesh, key, frames_pass)
    clock.lap("read_frames")
    verts = world_vertices(mesh, s["meta"])
    align = check_alignment(verts, mesh.faces, s["position"], s["mask"])
    surface = tx.rasterise_uv(verts, mesh.faces, mesh.uv, resolution)
    clock.lap("rasterise")
    tex, conf = tx.back_project(surface, s[frames_pass], s["depth"], s["mask"], s["K"], s["c2w"])
    seen = conf > 0
    cov = tx.coverage(surface, conf)
    clock.lap("back_project")
    final = fill_unseen(tex, seen, surface.covered)
    clock.lap("fill")
    os.makedirs(out, exist_ok=True)
    files = []

    def save(name: str, img) -> None:
        path = os.path.join(out, name)
        img.save(path)
        files.append(path)

    save("texture.png", Image.fromarray(final))
    scaled = np.round(conf / conf.max() * 65535).astype(np.uint16) if conf.max() > 0 else conf.astype(np.uint16)
    save("confidence.png", Image.fromarray(scaled))
    np.save(os.path.join(out, "confidence.npy"), conf.astype(np.float32))
    files.append(os.path.join(out, "confidence.npy"))
    cov_map = np.where(seen, 255, np.where(surface.covered, 128, 0)).astype(np.uint8)
    save("coverage.png", Image.fromarray(cov_map))
    files += write_textured_mesh(mesh, final, out)
    psnr = None
    if mesh.image is not None:
        own = np.asarray(Image.fromarray(mesh.image).resize((resolution, resolution), Image.BILINEAR), np.float64)
        err = ((tex[seen] - own[seen]) ** 2).mean() if seen.any() else None
        psnr = float(10 * np.log10(255.0 ** 2 / max(err, 1e-12))) if err is not None else None
    clock.lap("write")
    report = {"mesh": os.path.abspath(mesh_path), "mesh_sha256": mesh.sha256, "frames": frames, "key": s["__key__"],
              "pass": frames_pass, "frames_used": int(len(s["K"])), "resolution": resolution, "coverage": cov,
              "alignment_median_distance": align, "own_texture_psnr_db": psnr,
              "uv": "xatlas" if mesh.unwrapped else "the file's own",
              "fill": "seams dilated 8 texels, other unseen texels from their nearest seen texel",
              "stages": [{"stage": 0, "source": "given frames", "coverage": cov}], "seconds": clock.laps}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    files.append(os.path.join(out, "report.json"))
    run = log_run(out, report, files, tracking) if tracking is not None and tracking.enabled else None
    return Textured(out=out, coverage=cov, alignment=align, own_texture_psnr_db=psnr, files=files,
                    seconds=clock.laps, run=run)


class Clock:
    """Seconds per stage, for report.json, MLflow and benchmarks/texture.py."""

    def __init__(self):
        import time

        self._time = time.monotonic
        self._last = self._time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def log_run(out: str, report: dict, files: list[str], tracking) -> tuple[str, str, str]:
    """One MLflow run in ``tracking.experiment`` (default "texture" for this command): params (mesh, its sha256,
    frames, pass, resolution, UV source), metrics (coverage per stage, alignment, PSNR against the own texture,
    seconds per stage) and the outputs as artifacts; ``OUT/mlflow_run.json`` names it. (uri, experiment id, run id)."""
    import mlflow
    from mlflow.entities import Metric, Param

    from loom.platform.tracking import ensure_experiment, resolve_uri, write_run_record

    uri = resolve_uri(tracking)
    exp_id = ensure_experiment(uri, tracking.experiment)
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = tracking.run_name or os.path.splitext(os.path.basename(report["mesh"]))[0]
    run = client.create_run(exp_id, run_name=name, tags={"loom.kind": "texture", "loom.mesh_sha256":
                                                         report["mesh_sha256"]})
    rid = run.info.run_id
    try:
        now = run.info.start_time
        params = {k: report[k] for k in ("mesh", "mesh_sha256", "frames", "key", "pass", "resolution", "uv",
                                         "frames_used")}
        metrics = [Metric("coverage", report["coverage"], now, st["stage"]) for st in report["stages"]]
        metrics += [Metric("alignment_median_distance", report["alignment_median_distance"], now, 0)]
        if report["own_texture_psnr_db"] is not None:
            metrics.append(Metric("own_texture_psnr_db", report["own_texture_psnr_db"], now, 0))
        metrics += [Metric(f"seconds/{k}", v, now, 0) for k, v in report["seconds"].items()]
        client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        for f in files:
            client.log_artifact(rid, f)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    write_run_record(out, uri, tracking.experiment, exp_id, rid)
    return uri, exp_id, rid


def write_textured_mesh(mesh: UVMesh, texture: np.ndarray, out: str) -> list[str]:
    """OUT/mesh.glb (PBR base-colour texture) and OUT/mesh.obj + mesh.mtl + the texture, in the file's coordinates."""
    import trimesh
    from PIL import Image

    img = Image.fromarray(texture)
    glb = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False,
                          visual=trimesh.visual.TextureVisuals(
                              uv=mesh.uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=img)))
    paths = [os.path.join(out, "mesh.glb")]
    glb.export(paths[0])
    obj = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False,
                          visual=trimesh.visual.TextureVisuals(
                              uv=mesh.uv, material=trimesh.visual.material.SimpleMaterial(image=img)))
    files = trimesh.exchange.obj.export_obj(obj, include_texture=True, mtl_name="mesh.mtl", return_texture=True)
    text, extra = files if isinstance(files, tuple) else (files, {})
    with open(os.path.join(out, "mesh.obj"), "w") as f:
        f.write(text)
    paths.append(os.path.join(out, "mesh.obj"))
    for name, data in extra.items():
        p = os.path.join(out, name)
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    return paths
