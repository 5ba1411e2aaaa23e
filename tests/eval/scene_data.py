"""A tiny scene benchmark case, made without Blender or a generator: a textured plane at depth 2 seen by a camera
sliding sideways (the picture moves ``STEP`` whole pixels left per frame, so geometric warps are exact), with a
strip of sky (no geometry) at the top, as `loom render scene` shards; and `loom generate scene` output folders
(scene.json, video.mkv, anchors/) whose "generated" video is the truth, or a perturbation of it."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from loom.datasets import scene
from loom.datasets.codecs import encode_video
from loom.platform import shards

T, H, W, STEP, Z, SKY = 9, 32, 48, 2, 2.0, 6
KEYFRAMES = [0, 4, 8]
KEY = "plane000"


def texture(seed: int = 0) -> np.ndarray:
    """(H, W + (T-1) STEP, 3) uint8: smooth random colour (8x8 blocks, blurred) plus fine noise."""
    rng = np.random.default_rng(seed)
    wide = W + (T - 1) * STEP
    coarse = rng.integers(0, 256, (H // 4 + 1, wide // 4 + 1, 3)).astype(np.float64)
    img = np.kron(coarse, np.ones((4, 4, 1)))[:H, :wide]
    img = 0.75 * img + 0.25 * rng.integers(0, 256, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def truth() -> np.ndarray:
    """(T,H,W,3) the plane as each camera sees it (frame t shows texture columns t*STEP ...); sky is grey."""
    tex = texture()
    v = np.stack([tex[:, t * STEP : t * STEP + W] for t in range(T)])
    v[:, :SKY] = 200
    return v


def scene_arrays() -> dict:
    k = np.array([[W, 0, W / 2], [0, W, H / 2], [0, 0, 1]], np.float32)  # fx = fy = W px
    c2w = np.repeat(np.eye(4, dtype=np.float32)[None], T, 0)
    c2w[:, 0, 3] = np.arange(T) * STEP * Z / W  # STEP px of parallax per frame at depth Z
    mask = np.ones((T, H, W), bool)
    mask[:, :SKY] = False
    depth = np.where(mask, Z, 0.0).astype(np.float32)
    depth[:, SKY:] += np.linspace(0, 1e-3, W, dtype=np.float32)  # a hair of variation (ranks for PSNR-D)
    z = np.zeros
    return {"rgb": truth(), "depth": depth, "mask": mask, "object_id": mask.astype(np.uint16),
            "edges": z((T, H, W, 4), bool), "flow_fwd": z((T - 1, H, W, 2), np.float32),
            "flow_bwd": z((T - 1, H, W, 2), np.float32), "flow_last_to_first": z((H, W, 2), np.float32),
            "occlusion_fwd": z((T - 1, H, W), bool), "occlusion_bwd": z((T - 1, H, W), bool),
            "noise": z((T, 4, H // 8, W // 8), np.float32), "K": np.repeat(k[None], T, 0), "c2w": c2w}


def write_scene(out: str) -> str:
    files = scene.encode_sample(scene_arrays(), {"kind": "scene", "uid": KEY, "seed": 0})
    name = shards.shard_name("scene", 0)
    size, sha, keys = shards.write_tar(shards.shard_url(out, name), [(KEY, files)])
    shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=size, sha256=sha, keys=keys))
    shards.write_manifest(out, [name], extra={"kind": "scene"})
    return out


def write_out(folder: str, video: np.ndarray, scene_url: str, reference: str | None = None,
              anchors: dict[int, np.ndarray] | None = None, **extra) -> str:  # fmt: skip
    """A `loom generate scene` output folder for ``video``; anchors default to the truth's keyframes."""
    os.makedirs(os.path.join(folder, "anchors"), exist_ok=True)
    gt = truth()
    for k in KEYFRAMES:
        img = anchors[k] if anchors and k in anchors else gt[k]
        Image.fromarray(img).save(os.path.join(folder, "anchors", f"{k:04d}.png"))
    _, data = encode_video(video, "ffv1")
    with open(os.path.join(folder, "video.mkv"), "wb") as f:
        f.write(data)
    spec = {"frames": len(video), "keyframes": KEYFRAMES, "scene": scene_url, "key": KEY, "prompt": "a wall",
            "complete": True, "first_frame": 0, **extra}
    if reference:
        spec["reference"] = reference
    with open(os.path.join(folder, "scene.json"), "w") as f:
        json.dump(spec, f)
    return folder


def make_scene_case(root: str) -> dict[str, str]:
    """Scene shards and prediction folders: ``exact`` (two videos, the truth; one refers to the shards by a
    relative path), ``noisy`` (shifted 1 px and +-30 levels of noise), ``static`` (every frame = the reference,
    the truth's frame 0), ``shuffled`` (frames in random order, +-60 noise)."""
    rng = np.random.default_rng(1)
    gt = truth()
    scenes = write_scene(os.path.join(root, "scenes"))
    ref = os.path.join(root, "reference.png")
    Image.fromarray(gt[0]).save(ref)
    noisy = np.roll(gt, 1, axis=2).astype(np.int16) + rng.integers(-30, 31, gt.shape)
    shuffled = gt[rng.permutation(T)].astype(np.int16) + rng.integers(-60, 61, gt.shape)
    videos = {"exact": gt, "noisy": noisy.clip(0, 255).astype(np.uint8), "static": np.repeat(gt[:1], T, 0),
              "shuffled": shuffled.clip(0, 255).astype(np.uint8)}
    paths = {"scenes": scenes, "reference": ref}
    for name, v in videos.items():
        paths[name] = os.path.join(root, name)
        write_out(os.path.join(paths[name], "style0"), v, scenes, ref)
    style1 = os.path.join(paths["exact"], "style1")  # scene and reference named relative to the OUT folder
    write_out(style1, gt, os.path.relpath(scenes, style1), "../../reference.png")
    return paths
