"""Tiny benchmark inputs written as a user would have them: turntable shards with prediction folders (identical and
perturbed videos), folders of renders, and 4D shards of box sequences with predicted mesh folders."""

from __future__ import annotations

import os

import numpy as np

from loom.datasets import shape4d as schema4d
from loom.datasets.codecs import encode_video
from loom.datasets.ttv import iter_samples
from loom.platform import shards
from tests.training.corpus import make_ttv_corpus


def perturb(v: np.ndarray, amount: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(v.astype(np.int16) + rng.integers(-amount, amount + 1, v.shape), 0, 255).astype(np.uint8)


def make_ttv_case(root: str, samples: int = 3, frames: int = 9, size: int = 32) -> dict[str, str]:
    """``gt`` shards and prediction folders: ``same`` (lossless copies, FFV1 .mkv) and ``noisy`` (uniform noise of
    +-40 levels). Returns the folders by name."""
    paths = {name: os.path.join(root, name) for name in ("gt", "same", "noisy")}
    make_ttv_corpus(paths["gt"], samples=samples, frames=frames, size=size)
    for name in ("same", "noisy"):
        os.makedirs(paths[name], exist_ok=True)
    for i, s in enumerate(iter_samples(paths["gt"], keys=("rgb",))):
        for name, v in (("same", s["rgb"]), ("noisy", perturb(s["rgb"], 40, i))):
            _, data = encode_video(v, "ffv1")
            with open(os.path.join(paths[name], f"{s['__key__']}.mkv"), "wb") as f:
                f.write(data)
    return paths


def make_texture_case(root: str, ttv_gt: str) -> dict[str, str]:
    """Multi-view renders as image folders <key>/<view>.png: ``gt`` (the turntable frames), ``same``, ``noisy``."""
    from PIL import Image

    paths = {name: os.path.join(root, name) for name in ("gt", "same", "noisy")}
    for i, s in enumerate(iter_samples(ttv_gt, keys=("rgb",))):
        for name, v in (("gt", s["rgb"]), ("same", s["rgb"]), ("noisy", perturb(s["rgb"], 60, i))):
            os.makedirs(os.path.join(paths[name], s["__key__"]), exist_ok=True)
            for j, frame in enumerate(v):
                Image.fromarray(frame).save(os.path.join(paths[name], s["__key__"], f"{j:03d}.png"))
    return paths


def box_sequence(frames: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """A 0.6 x 0.4 x 0.3 box (asymmetric in x and y, so the azimuth matters) drifting along +x, inside [-0.5,0.5]^3."""
    import trimesh

    m = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    return [(np.asarray(m.vertices) + [0.05 * k, 0.02 * k, 0.0], np.asarray(m.faces)) for k in range(frames)]


def rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def write_4d_gt(out: str, sequences: dict[str, list], surface: int = 8192, video_size: int = 32,
                views: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> None:
    """4D shards whose ``surface`` is sampled (with normals) on the given meshes; the other arrays are placeholders
    of the schema's shapes; the conditioning video is transparent (white over the default background), or, for the
    keys of ``views``, the given ``(video (T,H,W,4) uint8, K (T,3,3), c2w (T,4,4))``."""
    from loom.geometry.mesh import sample_surface

    items = []
    for key, seq in sequences.items():
        t, rng = len(seq), np.random.default_rng(0)
        surf = [np.concatenate(sample_surface(v, f, surface, rng), 1) for v, f in seq]
        a = {"surface": np.stack(surf).astype(np.float32), "queries": np.zeros((t, 4, 3), np.float32),
             "query_faces": np.zeros(4, np.int64), "query_bary": np.full((4, 3), 1 / 3, np.float32),
             "sdf_points": np.zeros((t, 8, 3), np.float32), "sdf": np.zeros((t, 8), np.float32),
             "video": np.zeros((t, video_size, video_size, 4), np.uint8),
             "K": np.tile(np.eye(3, dtype=np.float32), (t, 1, 1)), "c2w": np.tile(np.eye(4, dtype=np.float32),
                                                                                   (t, 1, 1))}  # fmt: skip
        if views and key in views:
            a["video"], a["K"], a["c2w"] = (np.asarray(x) for x in views[key])
            a["K"], a["c2w"] = a["K"].astype(np.float32), a["c2w"].astype(np.float32)
        items.append((key, schema4d.encode_sample(a, {"kind": "4d", "uid": key, "half_extent": 0.5})))
    name = shards.shard_name("4d", 0)
    size, sha, keys = shards.write_tar(shards.shard_url(out, name), items)
    shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=size, sha256=sha, keys=keys))
    shards.write_manifest(out, [name], extra={"kind": "4d"})


def write_mesh_sequence(folder: str, seq, ext: str = "obj") -> None:
    import trimesh

    os.makedirs(folder, exist_ok=True)
    for i, (v, f) in enumerate(seq):
        path = os.path.join(folder, f"frame_{i:03d}.{ext}")
        if f is None:
            trimesh.PointCloud(v).export(path)
        else:
            trimesh.Trimesh(vertices=v, faces=f, process=False).export(path)
