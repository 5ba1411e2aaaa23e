"""Tiny 4D corpora for training tests: the fake swinging arm (`loom.render.fake.arm_sequence`, the contract of
the Blender extraction) through the 4D job's own mesh processing (`loom.corpora.shape4d.process_sequence`),
written as real Loom shards with a manifest and the job's config.yaml, without Ray (seconds, not minutes)."""

from __future__ import annotations

import math
import os

import yaml

from loom.datasets import shape4d as schema
from loom.corpora import fake
from loom.corpora.shape4d import process_sequence
from loom.platform import shards


def make_4d_corpus(out: str, samples: int = 2, frames: int = 4, size: int = 32, surface: int = 512,
                   queries: int = 32, sdf_near: int = 384, sdf_volume: int = 128, truncation: float = 0.05,
                   per_shard: int = 2) -> list[str]:
    """``samples`` arm sequences seen from different azimuths, in shards of ``per_shard``; the points settings
    (and ``sdf_truncation``) go into ``out/config.yaml`` as the 4D job writes them."""
    points = {"surface": surface, "queries": queries, "query_candidates": 4 * surface, "inner_threshold": 0.05,
              "watertight_resolution": 3000, "sdf_near": sdf_near, "sdf_volume": sdf_volume,
              "sdf_truncation": truncation}
    names, keys = [], []
    for s in range(0, samples, per_shard):
        items = []
        for i in range(s, min(samples, s + per_shard)):
            params = {"asset_path": __file__, "frames": frames, "width": size, "height": size,
                      "azimuth": 0.3 + 2 * math.pi * i / max(samples, 1), "elevation": 0.3, "fill": 0.85}
            seq = fake.arm_sequence(params)
            info = seq.pop("info")
            arrays = process_sequence({**seq, "half_extent": 0.5}, points, seed=i, timings={})
            arrays.update(video=seq["video"], K=seq["K"], c2w=seq["c2w"])
            meta = {"kind": "4d", "uid": f"arm{i}", "seed": i, "half_extent": 0.5,
                    "frame_times": [float(x) for x in seq["frame_times"]], "normalization": info["normalization"]}
            items.append((f"arm{i:03d}", schema.encode_sample(arrays, meta)))
        name = shards.shard_name("4d", len(names))
        sz, sha, k = shards.write_tar(shards.shard_url(out, name), items)
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(k), size=sz, sha256=sha, keys=k))
        names.append(name)
        keys += k
    shards.write_manifest(out, names, extra={"kind": "4d"})
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump({"points": points, "sequence": {"frames": frames, "half_extent": 0.5}}, f)
    return keys
