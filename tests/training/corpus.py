"""Tiny turntable corpora for training tests: the fake sphere renderer (exact keys, shapes and dtypes of the real
one) written as real Loom shards with a manifest."""

from __future__ import annotations

from loom.datasets import ttv
from loom.render import fake
from loom.platform import shards


def make_ttv_corpus(out: str, samples: int = 2, frames: int = 5, size: int = 32, per_shard: int = 1,
                    partial: bool = False) -> list[str]:
    """``samples`` sphere turntables (different camera heights and backgrounds) in shards of ``per_shard``; with
    ``partial``, each with the partial-texture pass (``known``)."""
    names, keys = [], []
    for s in range(0, samples, per_shard):
        items = []
        for i in range(s, min(samples, s + per_shard)):
            r = fake.render_sphere({"asset_path": __file__, "frames": frames, "width": size, "height": size,
                                    "orbit": {"radius": 2.5, "height": 0.3 + 0.2 * i, "fov_margin": 1.1},
                                    "background": (0.2 * (i % 5), 0.5, 1.0),
                                    **({"partial": {"tilt": "x+90", "views": 4}} if partial else {})})
            meta = {"kind": "ttv", "uid": f"sphere{i}", "seed": i}
            arrays = {k: r[k] for k in ("rgb", "normal", "position", "depth", "mask", "known", "K", "c2w") if k in r}
            items.append((f"sphere{i:03d}", ttv.encode_sample(arrays, meta)))
        name = shards.shard_name("ttv", len(names))
        sz, sha, k = shards.write_tar(shards.shard_url(out, name), items)
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(k), size=sz, sha256=sha, keys=k))
        names.append(name)
        keys += k
    shards.write_manifest(out, names, extra={"kind": "ttv"})
    return keys

