"""A tiny scene corpus (the `loom render scene` schema) for GGI training tests, made without Blender: a textured
pattern translating one pixel a frame, its geometric edges, the matching flow and the noise warped along it."""

from __future__ import annotations

import numpy as np
import torch

from loom.datasets import scene
from loom.geometry.noise import resize_flow, warp_noise
from loom.platform import shards


def scene_sample(i: int, frames: int = 9, size: int = 32, channels: int = 4) -> dict:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, (size, size + frames, 3), dtype=np.uint8)
    rgb = np.stack([base[:, t: t + size] for t in range(frames)])  # the view pans: content moves 1 px left
    edges = np.zeros((frames, size, size, 4), bool)
    for t in range(frames):
        edges[t, :, (size // 2 - t) % size, 0] = True  # a vertical silhouette moving with the content
    flow = np.zeros((frames - 1, size, size, 2), np.float32)
    flow[..., 0] = -1.0
    g = torch.Generator().manual_seed(i)
    small = resize_flow(torch.from_numpy(flow), (size // 8, size // 8))
    noise = warp_noise(torch.randn((channels, size // 8, size // 8), generator=g), small, generator=g).numpy()
    return {"rgb": rgb, "depth": np.ones((frames, size, size), np.float32), "mask": np.ones((frames, size, size), bool),
            "object_id": np.ones((frames, size, size), np.uint16), "edges": edges, "flow_fwd": flow,
            "flow_bwd": -flow, "flow_last_to_first": np.zeros((size, size, 2), np.float32) + (frames - 1),
            "occlusion_fwd": np.zeros((frames - 1, size, size), bool),
            "occlusion_bwd": np.zeros((frames - 1, size, size), bool), "noise": noise,
            "K": np.repeat(np.eye(3, dtype=np.float32)[None], frames, 0),
            "c2w": np.repeat(np.eye(4, dtype=np.float32)[None], frames, 0)}


def make_scene_corpus(out: str, samples: int = 2, frames: int = 9, size: int = 32, channels: int = 4) -> list[str]:
    names, keys = [], []
    for i in range(samples):
        files = scene.encode_sample(scene_sample(i, frames, size, channels), {"kind": "scene", "uid": f"pan{i}",
                                                                            "seed": i})
        name = shards.shard_name("scene", i)
        sz, sha, k = shards.write_tar(shards.shard_url(out, name), [(f"pan{i:03d}", files)])
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(k), size=sz, sha256=sha, keys=k))
        names.append(name)
        keys += k
    shards.write_manifest(out, names, extra={"kind": "scene"})
    return keys
