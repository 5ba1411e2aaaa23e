"""``loom generate 4d --video``: ShapeGen4D from an in-the-wild video to a registered, textured 4D mesh (sections 4
and appendix A), on a finished ``loom train shape4d`` run.

Data flow (each stage writes its result into ``OUT`` and a rerun into the same folder keeps every finished stage)::

    clip.mp4 (+ mask video | alpha | rembg ONNX folder)
      -> prepare (loom.inference.video4d): N frames evenly spread, one square crop framing the object as the 4D corpus
         does (``fill`` of the frame), RGBA                                       OUT/input/frame_000.png ...
      -> generate (loom.inference.shape4d): DINOv2 -> 4D DiT (shared noise) -> VAE -> marching cubes
                                                                                 OUT/meshes/frame_000.obj ...
      -> A.1 global pose registration of frame 1 (loom.geometry.pose): candidate cameras ranked by similarity to the
         frame, particle swarm, silhouette descent; the camera's inverse applied to EVERY frame   OUT/registration.json
      -> A.2 topology-consistent 4D mesh (loom.geometry.deform): frame 1 (decimated) carried through the sequence,
         rigid then non-rigid (Chamfer + silhouette + ARAP, large-steps preconditioning)   OUT/tracked.npz
      -> texture of frame 1: Loom's own ``loom texture --run`` (TAPESTRY) on frame 1's UV-mapped mesh, or by default
         the video's first frame projected through the registered camera; its UVs and map reused for every frame
      -> OUT/animated.glb (morph targets) + OUT/frames/frame_000.obj ... (one UV set, one texture)
      -> OUT/side_by_side.mp4 (input | textured render from the registered camera), OUT/turntable.mp4 (frames 1, mid,
         last around an orbit), OUT/report.json, one MLflow run with the media

**The reference camera.** The video's camera is unknown. Registration poses the mesh so that a fixed reference
camera sees it as the video does: the 4D corpus's camera (``distance`` 2.5 from the origin, level, looking along +Y,
its field of view fitted so the unit sphere spans ``fill`` of the frame). The registered meshes live in that camera's
world (+Z up, OpenCV camera conventions of `loom.geometry.camera`), written in ``registration.json`` as ``K`` and
``c2w``; perspective cannot tell an object's scale from its distance, so the registered object's centre sits at the
reference distance (`loom.geometry.pose.registration_transform`).

**Similarity of a render to the frame** (stage 1 of A.1 and the particle swarm). The paper ranks by DreamSim. DreamSim's
package needs torchvision, which does not import beside Loom's CPU torch, and its weights are not in any registry
Loom can reach; Loom's documented fallback is ``similarity="dino"``: the silhouette IoU against the frame's mask plus
``dino_weight`` x the cosine of the DINOv2 CLS tokens (the run's own frozen image encoder, what the 4D model reads) of
the clay render and the frame; ``similarity="iou"`` uses the silhouette alone. VGGT's point-map estimate (A.1 stage
2) is not used: no maintained VGGT package installs here and its weights are not local; the particle swarm starts
from the best candidates alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import numpy as np

from loom.platform import storage

# The registered meshes are in the reference camera's world (+Z up); the files are +Y up: (x, y, z) -> (x, z, -y),
# the inverse of the (x, y, z) -> (x, -z, y) of Blender's glTF / OBJ importers.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
REFERENCE_DISTANCE = 2.5  # the 4D corpus's camera distance (loom.render.anim CAMERA_DEFAULTS)
STAGES = ("prepare", "generate", "register", "track", "texture", "write")


@dataclasses.dataclass
class Video4DSettings:
    """Everything ``loom generate 4d --video`` can change after the run's own settings."""

    frames: int = 0  # frames taken from the video (0 = the run's data.frames, 16 for the paper)
    size: int = 256  # the prepared frames' side in pixels (the model's DINOv2 resizes them again)
    fill: float = 0.85  # share of the frame the object spans (the 4D corpus's sequence.fill)
    register: bool = True  # A.1; False keeps the meshes in the model's frame (and the texture comes from the
    # reference camera as it stands)
    similarity: str = "dino"  # "dino" (IoU + DINOv2 CLS cosine) or "iou"
    dino_weight: float = 0.5
    decimate: int = 8000  # faces of frame 1 before tracking (0 = as generated)
    texture_resolution: int = 1024
    turntable: int = 24  # views per turntable panel (0 = none)
    fast: bool = False  # the small registration/tracking settings (tests, quick looks)

    def __post_init__(self):
        for name in ("frames", "decimate", "turntable"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0")
        if not 0 < self.fill <= 1:
            raise ValueError(f"--fill {self.fill} must be in (0, 1]")
        if self.similarity not in ("dino", "iou"):
            raise ValueError(f"--similarity {self.similarity!r}: use 'dino' or 'iou'")
        if self.size < 16 or self.texture_resolution < 16:
            raise ValueError("--size and --texture-resolution must be at least 16 pixels")


@dataclasses.dataclass
class Generated4DVideo:
    out: str
    frames: int
    faces: int
    files: list[str]
    registration: dict[str, Any]
    seconds: dict[str, float]
    mlflow: tuple[str, str, str] | None = None


def reference_camera(size: int, fill: float, distance: float = REFERENCE_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """(K (3,3), c2w (4,4)): the fixed camera registration poses the meshes for (module docstring)."""
    from loom.geometry import camera as cam

    c2w = cam.look_at((0.0, -distance, 0.0))
    pts = np.random.default_rng(0).standard_normal((4096, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)  # the unit sphere: Step1X-3D's [-1, 1]^3 frame
    fov = cam.fit_fov(pts, c2w[None], size, size, 1.0 / fill - 1.0)
    return cam.intrinsics(fov, size, size), c2w


def read_frame_mesh(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A frame's mesh (`loom.inference.shape4d.read_mesh`); a point cloud or an empty mesh is an error naming the
    file."""
    from loom.inference.shape4d import read_mesh

    v, f = read_mesh(path)
    if f is None:
        raise ValueError(f"{path} has no faces (a point cloud, or the model produced an empty surface): registration "
                         "and texturing need triangles; try another --seed or more --steps")
    return v, f


def decimate(vertices: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame 1 reduced to about ``target`` faces (point-cloud-utils' quadric decimation) before tracking and UV
    unwrapping: marching cubes at 256^3 gives ~10^5 faces, more than the per-frame optimisation needs."""
    if not target or len(faces) <= target:
        return vertices, faces
    import point_cloud_utils as pcu

    v, f, _, _ = pcu.decimate_triangle_mesh(np.ascontiguousarray(vertices, np.float64),
                                           np.ascontiguousarray(faces, np.int32), int(target))
    return np.asarray(v, np.float64), np.asarray(f, np.int64)


# ----------------------------------------------------------------------------------------------- rendering


def render_clay(vertices: np.ndarray, faces: np.ndarray, K: np.ndarray, c2w: np.ndarray, size: int,
                hw: tuple[int, int] | None = None):
    """(B,H,W,3) float clay renders and (B,H,W) bool masks of a mesh from ``c2w`` (4,4) or (B,4,4), ``size``^2
    pixels or ``hw``."""
    import torch

    from loom.geometry.raster import rasterize, shade

    v, f = torch.as_tensor(vertices, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.long)
    c = torch.as_tensor(np.asarray(c2w, np.float32).reshape(-1, 4, 4))
    r = rasterize(v, f, torch.as_tensor(K, dtype=torch.float32), c, tuple(hw) if hw else (size, size))
    return shade(r, v, f, c), r.mask


def render_textured(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray, K: np.ndarray,
                    c2w: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(B,H,W,4) straight-alpha uint8: the textured mesh (one UV per vertex, v up; unlit base colour, what the
    texture holds) from the OpenCV cameras ``c2w`` (4,4) or (B,4,4); ``size`` S or (H, W)."""
    import torch
    import torch.nn.functional as F

    from loom.geometry.raster import interpolate, rasterize

    v, f = torch.as_tensor(vertices, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.long)
    c = torch.as_tensor(np.asarray(c2w, np.float32).reshape(-1, 4, 4))
    hw = (size, size) if isinstance(size, int) else tuple(size)
    r = rasterize(v, f, torch.as_tensor(K, dtype=torch.float32), c, hw)
    st = interpolate(r, torch.as_tensor(uv, dtype=torch.float32))  # (B,H,W,2)
    grid = torch.stack([st[..., 0] * 2 - 1, (1 - st[..., 1]) * 2 - 1], -1)  # v up -> image rows down
    tex = torch.as_tensor(texture, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    col = F.grid_sample(tex.expand(len(grid), -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                        align_corners=False).permute(0, 2, 3, 1)
    img = torch.cat([torch.where(r.mask[..., None], col, 0.0), r.mask[..., None].float()], -1)
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------- A.1


def similarity_score(frame: np.ndarray, mask: np.ndarray, encoder=None, weight: float = 0.5) -> Callable:
    """The score of rendered candidates against one frame (higher is better): silhouette IoU with ``mask``, plus
    ``weight`` x the cosine of DINOv2 CLS tokens of the render and the frame when ``encoder`` (the run's
    `ImageFeatures`) is given. Module docstring: the paper's DreamSim is not available here."""
    import torch

    target = torch.as_tensor(mask, dtype=torch.bool)
    ref = None
    if encoder is not None:
        with torch.no_grad():
            ref = encoder.encode(frame[None])[:, 0]  # (1, D) CLS

    def score(renders, masks):
        masks = torch.as_tensor(masks, dtype=torch.bool)
        if masks.shape[-2:] != target.shape:
            t = torch.nn.functional.interpolate(target[None, None].float(), size=masks.shape[-2:], mode="nearest")
            tm = t[0, 0].bool()
        else:
            tm = target
        inter = (masks & tm).flatten(1).sum(1).float()
        union = (masks | tm).flatten(1).sum(1).float().clamp_min(1)
        s = inter / union
        if ref is not None:
            img = (torch.as_tensor(renders).clamp(0, 1) * 255).to(torch.uint8).numpy()
            with torch.no_grad():
                cls = encoder.encode(img)[:, 0]
            s = s + weight * torch.nn.functional.cosine_similarity(cls, ref.expand_as(cls), dim=-1)
        return s

    return score


def register_first_frame(vertices: np.ndarray, faces: np.ndarray, frame: np.ndarray, K: np.ndarray, c2w_ref: np.ndarray,
                         *, encoder=None, settings: Video4DSettings, seed: int = 0,
                         sequence: tuple[list, np.ndarray] | None = None) -> dict[str, Any]:
    """A.1 on frame 1: the camera under which the mesh looks like ``frame`` ((H,W,4) RGBA seen by ``K``), then the
    similarity that moves the mesh so the reference camera sees it that way. Returns a JSON-able dict with
    ``transform`` (4x4), the found pose and the scores per stage.

    ``sequence`` = (every frame's mesh, every frame's RGBA): a symmetric object fits frame 1's silhouette in several
    poses equally well (a box turned by 180 degrees); when the refined poses tie on frame 1 (hard IoU within
    ``TIE``), the one whose transform makes the WHOLE sequence cover the video's masks best is kept (Loom's addition
    to the paper's frame-1 registration; the choice is in ``ties``)."""
    import torch

    from loom.geometry.pose import PoseSettings, register_pose, registration_transform

    mask = frame[..., 3] >= 128
    if not mask.any():
        raise ValueError("the first frame's mask is empty: the object was not found (check --mask / --matting)")
    # "iou": register_pose's own silhouette IoU (it resamples the mask and K to its render size)
    score = (similarity_score(frame, mask, encoder, settings.dino_weight)
             if settings.similarity == "dino" and encoder is not None else None)
    ps = PoseSettings.fast() if settings.fast else PoseSettings()
    torch.manual_seed(seed)
    res = register_pose(vertices, faces, mask, np.asarray(K, np.float64), score=score, settings=ps)
    lookat = np.asarray(res.pose.lookat, np.float64)
    # the reference camera looks at the origin: the registered object's centre goes to that depth
    ref_distance = float(-(np.asarray(c2w_ref)[:3, 3] @ np.asarray(c2w_ref)[:3, 2]))
    m = registration_transform(res.c2w, c2w_ref, lookat, ref_distance)
    ties = [(p, iou) for p, iou in res.alternatives if iou >= res.iou - TIE]
    chosen = None
    if sequence is not None and len(ties) > 1:
        scored = []
        for p, iou in ties:
            mp = registration_transform(p.c2w(), c2w_ref, np.asarray(p.lookat, np.float64), ref_distance)
            scored.append((_sequence_iou(mp, sequence, K, c2w_ref), mp, p, iou))
        chosen = max(range(len(scored)), key=lambda i: scored[i][0])
        m, lookat = scored[chosen][1], np.asarray(scored[chosen][2].lookat, np.float64)
        res = dataclasses.replace(res, pose=scored[chosen][2], c2w=scored[chosen][2].c2w(), iou=scored[chosen][3])
    scale = float(np.cbrt(abs(np.linalg.det(m[:3, :3]))))
    return {"transform": np.asarray(m).tolist(), "scale": scale,
            "pose": dataclasses.asdict(res.pose) if dataclasses.is_dataclass(res.pose) else res.pose,
            "c2w_found": np.asarray(res.c2w).tolist(),
            "scores": {"candidates": float(res.candidate_score), "particle_swarm": float(res.pso_score),
                       "soft_iou": float(res.refine_iou)},
            "silhouette_iou": float(res.iou),
            "ties": [] if chosen is None else [{"pose": dataclasses.asdict(p), "frame1_iou": float(i),
                                                "sequence_iou": float(q), "chosen": k == chosen}
                                               for k, (q, _, p, i) in enumerate(scored)],
            "similarity": settings.similarity}


TIE = 0.02  # frame-1 silhouette IoUs this close are a tie (register_first_frame)


def _sequence_iou(m: np.ndarray, sequence: tuple[list, np.ndarray], K: np.ndarray, c2w: np.ndarray) -> float:
    """Mean silhouette IoU over the frames of the meshes moved by ``m`` against the frames' alpha."""
    meshes, frames = sequence
    ious = []
    for (v, f), fr in zip(meshes, frames, strict=True):
        _, mask = render_clay(apply(m, v), f, K, c2w, 0, hw=fr.shape[:2])
        a, b = mask[0].numpy(), fr[..., 3] >= 128
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    return float(np.mean(ious))


def apply(m: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    return vertices @ np.asarray(m)[:3, :3].T + np.asarray(m)[:3, 3]


# ----------------------------------------------------------------------------------------------- texture


def uv_unwrap(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame 1's atlas (`loom.inference.texture.atlas`, xatlas) in the split-vertex layout: (vmap
    (V',) the mesh vertex of each atlas vertex, faces (F,3) on the atlas vertices, uv (V',2) v up). Every frame's
    atlas vertices are ``vertices_t[vmap]``: the same UVs and faces for all."""
    from loom.inference.texture import atlas

    return atlas(vertices, faces, resolution, check=True)


def texture_from_frame(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, frame: np.ndarray, K: np.ndarray,
                       c2w: np.ndarray, resolution: int) -> tuple[np.ndarray, float]:
    """The default texture: the registered frame-1 mesh (atlas vertices) painted with the video's first frame seen
    from the reference camera (`loom.geometry.texture.back_project`, with the mesh's own depth from the reference
    camera for the visibility test); the unseen texels filled as ``loom texture`` does (seams dilated, then
    push-pull). Returns (texture (R,R,3) uint8, coverage)."""
    import torch

    from loom.geometry import texture as tx
    from loom.geometry.raster import rasterize
    from loom.inference.texture import fill_unseen

    surface = tx.rasterise_uv(vertices, faces, uv, resolution)
    r = rasterize(torch.as_tensor(vertices, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.long),
                  torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(c2w, dtype=torch.float32)[None],
                  tuple(frame.shape[:2]))
    depth = np.where(r.mask[0].numpy(), r.depth[0].numpy(), 0.0).astype(np.float64)
    mask = r.mask[0].numpy() & (frame[..., 3] >= 128)
    tex, conf = tx.back_project(surface, frame[None, ..., :3].astype(np.float64), depth[None], mask[None], K[None],
                                c2w[None])
    return fill_unseen(tex, conf > 0, surface.covered), tx.coverage(surface, conf)


def texture_with_run(out: str, vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, run: str, *, seed: int,
                     resolution: int, steps: int | None = None) -> tuple[np.ndarray, float]:
    """Loom's own texturing (``loom texture --run``, TAPESTRY) of frame 1: its UV-mapped mesh is written as a GLB
    (``OUT/texture/frame1.glb``), textured into ``OUT/texture/`` keeping those UVs, and the map read back."""
    import trimesh
    from PIL import Image

    from loom.inference.texture import texture_from_run

    folder = os.path.join(out, "texture")
    os.makedirs(folder, exist_ok=True)
    glb = os.path.join(folder, "frame1.glb")
    # +Y up in the file, as loom texture's renders import it (Blender turns it back to +Z up)
    trimesh.Trimesh(vertices=np.asarray(vertices) @ Z_UP_TO_Y_UP.T, faces=faces, process=False,
                    visual=trimesh.visual.TextureVisuals(uv=uv)).export(glb)
    done = texture_from_run(glb, run, folder, resolution=resolution, seed=seed, steps=steps, stages=1)
    with Image.open(os.path.join(folder, "texture.png")) as im:
        return np.asarray(im.convert("RGB")), float(done.coverage)


@dataclasses.dataclass
class Textured4D:
    """A registered, topology-consistent, textured sequence: ``vertices`` (T,V',3) in frame 1's atlas layout (the
    same ``faces``, ``uv`` and ``texture`` for every frame)."""

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    texture: np.ndarray
    registration: dict[str, Any]
    chamfer_to_generated: list[float]
    coverage_frame1: float


def register(meshes: list[tuple[np.ndarray, np.ndarray]], frames: np.ndarray, K: np.ndarray, c2w_ref: np.ndarray,
             settings: Video4DSettings, *, seed: int = 0, encoder=None) -> dict[str, Any]:
    """A.1 for a sequence (frame 1 already decimated): `register_first_frame`, with the whole video breaking ties;
    the identity with ``settings.register`` off."""
    if not settings.register:
        return {"transform": np.eye(4).tolist(), "scale": 1.0, "pose": None, "similarity": None}
    v0, f0 = meshes[0]
    return register_first_frame(v0, f0, frames[0], K, c2w_ref, settings=settings, seed=seed, encoder=encoder,
                                sequence=(meshes, frames))


def track(meshes: list[tuple[np.ndarray, np.ndarray]], m: np.ndarray, settings: Video4DSettings,
          progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[float]]:
    """A.2 step 1 on the sequence moved by ``m``: frame 1's mesh carried through every frame (`loom.geometry.deform
    .topology_consistent`) -> (vertices (T,V,3) float64 on frame 1's faces, Chamfer of each to its generated frame)."""
    from loom.geometry.deform import TrackSettings, topology_consistent

    seq = [(apply(m, v), f) for v, f in meshes]
    report = None if progress is None else lambda t, n, i: progress(
        f"tracked frame {t + 1}/{n}: Chamfer {i['rigid']:.4f} rigid, {i['nonrigid']:.4f} non-rigid")
    verts = topology_consistent(seq, TrackSettings.fast() if settings.fast else TrackSettings(), progress=report)
    verts = np.asarray(verts, np.float64)
    f0 = meshes[0][1]
    return verts, [_chamfer(verts[t], f0, *seq[t]) for t in range(len(seq))]


def texture_sequence(meshes: list[tuple[np.ndarray, np.ndarray]], frames: np.ndarray, K: np.ndarray,
                     c2w_ref: np.ndarray, settings: Video4DSettings, *, seed: int = 0, encoder=None) -> Textured4D:
    """Appendix A in one call, nothing written (``loom eval 4d`` with ``render.shading=textured``): frame 1 posed
    for the camera (``K``, ``c2w_ref``) that saw ``frames`` ((T,S,S,4) RGBA, frame 1 first), every frame moved
    the same way, the sequence made topology-consistent, frame 1 textured from ``frames[0]``."""
    st = settings
    meshes = [decimate(*meshes[0], st.decimate)] + list(meshes[1:])
    reg = register(meshes, frames, K, c2w_ref, st, seed=seed, encoder=encoder)
    verts, chamfers = track(meshes, np.asarray(reg["transform"]), st)
    vmap, afaces, uv = uv_unwrap(verts[0], meshes[0][1], st.texture_resolution)
    texture, cov = texture_from_frame(verts[0][vmap], afaces, uv, frames[0], K, c2w_ref, st.texture_resolution)
    return Textured4D(vertices=verts[:, vmap], faces=afaces, uv=uv, texture=texture, registration=reg,
                      chamfer_to_generated=chamfers, coverage_frame1=cov)


# ----------------------------------------------------------------------------------------------- the command


def _progress(line: str) -> None:
    print(f"[generate 4d] {line}", flush=True)


def _stage_done(out: str, name: str) -> dict | None:
    """What a finished stage recorded (``out/stages/NAME.json``), or None."""
    path = os.path.join(out, "stages", f"{name}.json")
    return storage.read_json(path) if os.path.isfile(path) else None


def _finish_stage(out: str, name: str, info: dict) -> dict:
    storage.write_json(os.path.join(out, "stages", f"{name}.json"), info)  # atomic: a stage is done or not
    return info


def generate_4d_video(run: str | None, video: str, out: str, *, mask: str | None = None, matting: str | None = None,
                      meshes: str | None = None, texture_run: str | None = None, seed: int = 0,
                      steps: int | None = None, settings: Video4DSettings | None = None, tracking=None,
                      progress: Callable[[str], None] = _progress) -> Generated4DVideo:
    """``loom generate 4d --video`` (module docstring). Stages already finished in ``out`` (``out/stages/*.json``)
    are kept when the same command runs again; the first stage records the inputs and refuses other ones.
    ``meshes``: a folder of per-frame meshes (``frame_000.obj`` ..., e.g. ``loom generate 4d --data`` or a
    baseline's output) registered and textured instead of generating with ``run``."""
    import torch
    from PIL import Image

    from loom.inference.shape4d import frame_files, load_run
    from loom.inference.video4d import prepare_video

    st = settings or Video4DSettings()
    t0, seconds = time.perf_counter(), {}

    def lap(name):
        nonlocal t0
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - t0
        t0 = now

    os.makedirs(out, exist_ok=True)
    if bool(run) == bool(meshes):
        raise ValueError("give a `loom train shape4d` run to generate the meshes (--run) or per-frame meshes "
                         "(--meshes), not both")
    inputs = {"run": run and os.path.abspath(run), "meshes": meshes and os.path.abspath(meshes),
              "video": os.path.abspath(video), "mask": mask and os.path.abspath(mask),
              "matting": matting and os.path.abspath(matting), "seed": seed, "steps": steps,
              "texture_run": texture_run and os.path.abspath(texture_run), "settings": dataclasses.asdict(st)}
    given = None
    if meshes:
        given = [os.path.basename(p) for p in frame_files(meshes)]
        if not given:
            raise ValueError(f"--meshes {meshes} holds no frame_000.obj, frame_001.obj, ... files")
    model, info = load_run(run) if run else (None, {})
    n = st.frames or (len(given) if given else model.frames) or 16
    if given and len(given) != n:
        raise ValueError(f"--meshes {meshes} holds {len(given)} frames but {n} are taken from the video: pass "
                         f"--frames {len(given)}")
    prep = _stage_done(out, "prepare")
    if prep is not None and prep.get("inputs") != inputs:
        raise ValueError(f"{out} holds the stages of another command ({os.path.join(out, 'stages', 'prepare.json')}"
                         "): use a new --out, or delete that folder to start again")
    input_dir = os.path.join(out, "input")
    if prep is None:
        p = prepare_video(video, n=n, size=st.size, fill=st.fill, mask=mask, matting=matting)
        os.makedirs(input_dir, exist_ok=True)
        for i, fr in enumerate(p.frames):
            Image.fromarray(fr).save(os.path.join(input_dir, f"frame_{i:03d}.png"))
        prep = _finish_stage(out, "prepare", {"inputs": inputs, "indices": [int(i) for i in p.indices],
                                              "alpha": getattr(p, "alpha_source", None),
                                              "crop": _jsonable(getattr(p, "crop", None))})
        progress(f"prepared {n} frames of {video} ({prep['alpha']}) into {input_dir}")
    frames = np.stack([np.asarray(Image.open(os.path.join(input_dir, f"frame_{i:03d}.png")).convert("RGBA"))
                       for i in range(len(prep["indices"]))])
    lap("prepare")

    mesh_dir = os.path.join(out, "meshes") if not given else os.path.abspath(meshes)
    if given and _stage_done(out, "generate") is None:
        _finish_stage(out, "generate", {"meshes": given, "given": True})
    if _stage_done(out, "generate") is None:
        if torch.cuda.is_available():
            model.to("cuda")
        with torch.no_grad():
            image = model.image.encode(frames[None])
        q = info.get("latents_per_frame") or model.dit.config.num_latents
        z = model.generate(image, q, seed=seed, steps=steps)
        paths = model.meshes(z[0].cpu(), mesh_dir)
        model.to("cpu")
        _finish_stage(out, "generate", {"meshes": [os.path.basename(p) for p in paths]})
        progress(f"generated {len(paths)} meshes into {mesh_dir}")
    names = _stage_done(out, "generate")["meshes"]
    meshes = [read_frame_mesh(os.path.join(mesh_dir, nm)) for nm in names]
    meshes[0] = decimate(*meshes[0], st.decimate)  # frame 1 carries the sequence: what registration and tracking use
    lap("generate")

    K, c2w_ref = reference_camera(st.size, st.fill)
    reg = _stage_done(out, "register")
    if reg is None:
        reg = register(meshes, frames, K, c2w_ref, st, seed=seed, encoder=model.image if model else None)
        reg.update({"K": K.tolist(), "c2w": c2w_ref.tolist(), "size": st.size})
        _finish_stage(out, "register", reg)
        progress(f"registered frame 1: scale {reg['scale']:.3f}, silhouette IoU "
                 f"{reg.get('silhouette_iou', float('nan')):.3f}")
    m = np.asarray(reg["transform"])
    lap("register")

    tracked_path = os.path.join(out, "tracked.npz")
    if _stage_done(out, "track") is None:
        verts, chamfers = track(meshes, m, st, progress)
        v0, f0 = meshes[0]
        np.savez(tracked_path, vertices=verts.astype(np.float32), faces=f0.astype(np.int64))
        _finish_stage(out, "track", {"faces": int(len(f0)), "vertices": int(len(v0)), "chamfer_to_generated": chamfers})
        progress(f"topology-consistent sequence: {len(f0)} faces on every frame, mean Chamfer to the generated "
                 f"meshes {np.mean(chamfers):.4f}")
    with np.load(tracked_path) as z:
        verts, faces = z["vertices"].astype(np.float64), z["faces"]
    lap("track")

    tex_info = _stage_done(out, "texture")
    tex_path = os.path.join(out, "texture.png")
    if tex_info is None:
        vmap, afaces, uv = uv_unwrap(verts[0], faces, st.texture_resolution)
        if texture_run:
            texture, cov = texture_with_run(out, verts[0][vmap], afaces, uv, texture_run, seed=seed,
                                            resolution=st.texture_resolution)
            source = f"loom texture --run {texture_run} (TAPESTRY) on frame 1"
        else:
            texture, cov = texture_from_frame(verts[0][vmap], afaces, uv, frames[0], K, c2w_ref,
                                              st.texture_resolution)
            source = "the video's first frame projected through the registered camera"
        Image.fromarray(texture).save(tex_path)
        np.savez(os.path.join(out, "atlas.npz"), vmap=vmap, faces=afaces, uv=uv)
        tex_info = _finish_stage(out, "texture", {"source": source, "coverage_frame1": cov})
        progress(f"texture: {source} (seen on {cov:.1%} of frame 1's surface)")
    with np.load(os.path.join(out, "atlas.npz")) as z:
        vmap, afaces, uv = z["vmap"], z["faces"], z["uv"]
    texture = np.asarray(Image.open(tex_path).convert("RGB"))
    lap("texture")

    from loom.inference.animated import write_animated_glb, write_obj_sequence

    atlas_verts = verts[:, vmap]  # (T, V', 3): frame t's vertices in frame 1's atlas layout
    y_up = atlas_verts @ Z_UP_TO_Y_UP.T  # files: glTF's and OBJ's +Y up (Blender's importers turn it back)
    files = [write_animated_glb(os.path.join(out, "animated.glb"), y_up, afaces, uv, texture=texture, fps=8)]
    files += write_obj_sequence(os.path.join(out, "frames"), y_up, afaces, uv, texture=texture)
    files += write_media(out, atlas_verts, afaces, uv, texture, frames, K, c2w_ref, st)
    lap("write")
    report = {"inputs": inputs, "frames": int(len(verts)), "faces": int(len(faces)), "registration": reg,
              "track": _stage_done(out, "track"), "texture": tex_info, "seconds": seconds,
              "reference_camera": "the 4D corpus's: distance 2.5, level, fov fitted so the unit sphere spans fill"}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    files.append(os.path.join(out, "report.json"))
    done = Generated4DVideo(out=out, frames=int(len(verts)), faces=int(len(faces)), files=files, registration=reg,
                            seconds=seconds)
    if tracking is not None and tracking.enabled:
        from loom.platform.tracking import flatten, log_output_run

        params = {k: str(v) for k, v in flatten({k: v for k, v in inputs.items() if k != "settings"}).items()}
        params.update({f"settings.{k}": str(v) for k, v in inputs["settings"].items()})
        metrics = [("registration/scale", reg["scale"], 0), ("texture/coverage_frame1", tex_info["coverage_frame1"], 0)]
        if reg.get("silhouette_iou") is not None:
            metrics.append(("registration/silhouette_iou", reg["silhouette_iou"], 0))
        for t, c in enumerate(report["track"]["chamfer_to_generated"]):
            metrics.append(("track/chamfer_to_generated", c, t))
        metrics += [(f"seconds/{k}", v, 0) for k, v in seconds.items()]
        done.mlflow = log_output_run(out, tracking, name=os.path.basename(os.path.normpath(out)),
                                     tags={"loom.kind": "generate-4d"}, params=params, metrics=metrics, files=files)
    return done


def _jsonable(x):
    if x is None:
        return None
    if dataclasses.is_dataclass(x):
        x = dataclasses.asdict(x)
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _chamfer(v: np.ndarray, f: np.ndarray, v2: np.ndarray, f2: np.ndarray, n: int = 4096) -> float:
    """Mean two-way nearest-neighbour distance of surface samples (seeded), in the registered frame's units."""
    from scipy.spatial import cKDTree

    from loom.geometry.mesh import sample_surface

    rng = np.random.default_rng(0)
    a, _ = sample_surface(v, f, n, rng)
    b, _ = sample_surface(v2, f2, n, rng)
    return float(0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()))


def write_media(out: str, verts: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray,
                frames: np.ndarray, K: np.ndarray, c2w_ref: np.ndarray, st: Video4DSettings) -> list[str]:
    """``side_by_side.mp4``: each input frame beside the textured registered mesh from the reference camera;
    ``turntable.mp4``: frames 1, middle and last side by side, the camera circling them (``st.turntable`` views,
    the reference camera's distance and height)."""
    from loom.datasets.codecs import write_video
    from loom.datasets.transforms import composite
    from loom.geometry import camera as cam

    size = st.size
    renders = np.stack([render_textured(verts[t], faces, uv, texture, K, c2w_ref, size)[0] for t in range(len(verts))])
    side = np.concatenate([composite(frames), composite(renders)], axis=2)  # input | render, over white
    files = [write_video(os.path.join(out, "side_by_side.mp4"), side, fps=8)]
    if st.turntable:
        centre = verts.reshape(-1, 3).mean(0)
        orbit = cam.orbit_c2w(st.turntable, REFERENCE_DISTANCE, 0.0, phase=-math.pi / 2)
        orbit[:, :3, 3] += centre
        picks = sorted({0, len(verts) // 2, len(verts) - 1})
        panels = [composite(render_textured(verts[t], faces, uv, texture, K, orbit, size)) for t in picks]
        files.append(write_video(os.path.join(out, "turntable.mp4"), np.concatenate(panels, axis=2), fps=12))
    return files
