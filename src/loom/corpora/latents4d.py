"""``loom cache 4d``: run the frozen encoders of ShapeGen4D's 4D DiT (sections 3.1, 3.2, 5.1) over a finished 4D
corpus once and write latent shards with the same sample keys, so ``loom train shape4d`` reads latents and image
tokens instead of running the shape VAE on 32k-point clouds and DINOv2 on 518-px frames at every step: the shape
VAE's posterior mean of every frame (the aligned queries are the latents; the sharp-edge points feed the sharp
branch of a Step1X-3D VAE) and DINOv2's tokens of every conditioning frame.

Data flow (Loom's one job mechanism, `loom.platform.jobs`, as ``loom cache latents`` for turntables)::

    source manifest (a complete 4d corpus) ──> one task per source shard (its url, sha256 and keys) ──> plan.json
        ──> Ray Data ──map──> worker (a Sandbox process that loads the VAE and DINOv2 once and keeps them)
              per shard: read the source tar, check its sha256, per sample:
                surface [, sharp_surface] (optional fixed subsets: points settings, drawn from the sample key)
                + queries -> [-1, 1] box check -> shape VAE posterior mean (T, Q, C)   (model.shape_inputs)
                video (T, H, W, 4) -> DINOv2 (Step1X-3D's preprocessing, registers dropped) -> (T, L, D)
              -> shards/latents4d-<i>.tar (source shard i, same keys) + sidecar
        ──> manifest.json (kind "latents4d") + failures.jsonl

Sample schema (read by the generic decoder, ``shape_latent.npy`` / ``image_tokens.npy`` -> arrays):

==================  ===========  =======  ===================================================================
key                 shape        dtype    meaning
==================  ===========  =======  ===================================================================
``shape_latent``    (T,Q,C)      float    the frozen shape VAE's posterior mean of each frame (NOT multiplied by
                                          ``model.latent_scale``: training does that)
``image_tokens``    (T,L,D)      float    DINOv2 ``last_hidden_state`` of each frame, CLS + patch tokens
``queries``         (T,Q,3)      float32  the source's aligned queries (``queries.npz`` copied byte for byte:
                                          also ``faces`` and ``bary``)
``K``, ``c2w``                   float32  the source's cameras (``camera.npz`` copied byte for byte)
``meta``            dict                  the source meta plus ``meta["latents4d"]``: the source shard and its
                                          sha256, the encoders (:func:`loom.models.shape4d.encoder_record`: a
                                          bfloat16 digest of each one's weights, widths, DINOv2's preprocessing),
                                          the point counts used, dtypes, the config hash
==================  ===========  =======  ===================================================================

Training checks ``meta["latents4d"]["encoders"]`` against its own ``model.vae`` and ``model.image_encoder`` and
refuses a cache made with others (`check_cache`). Point subsets: 0 (the default) encodes every point of the
shards, as training without a cache does by default; a positive count draws a fixed subset per frame from the
sample key (a cache cannot redraw per step).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from typing import Literal

import loom
from loom.platform import shards
from loom.platform.config import config, config_hash, field, recipe, require
from loom.platform.hub import resolve_model_path
from loom.platform.jobs import PriceSettings, JobSpec
from loom.platform.ray import RaySettings
from loom.corpora.latents import _cached, _local_shard, cache_spec, dir_digest, source_shards

KIND = "latents4d"
ENTRY = "loom.corpora.latents4d:encode_entry"
TINY = "tiny"


@config
class Cache4DJob:
    source: str = field("out/4d", help="Loom output folder (or fsspec URL) of a finished `loom render 4d` job")
    out: str = field("out/4d-latents", help="output folder or fsspec URL for the latent shards")
    vae: str = field("", help="the frozen shape VAE: the released Step1X-3D-Geometry-1300m folder (or its vae/), a "
                     "`loom train vae` OUT/vae folder, a repo id in the Hugging Face cache, or 'tiny' (tests)")
    image_encoder: str = field("", help="DINOv2: facebook/dinov2-with-registers-large (Step1X-3D's) as a local "
                               "folder or in the Hugging Face cache, or 'tiny' (tests)")
    image_size: int = field(0, help="DINOv2 input size (0 = the encoder's config: 518, 1,370 tokens)")
    seed: int = field(0, help="seed of the 'tiny' encoders (the training run's trainer.seed) and of point subsets")
    surface_points: int = field(0, help="surface points per frame fed to the VAE (0 = all of the shard's)")
    sharp_points: int = field(0, help="sharp-edge points per frame fed to a Step1X-3D VAE's sharp branch (0 = all)")
    chunk: int = field(16, help="frames per VAE and DINOv2 call")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype the encoders compute in (bfloat16 on GPUs)")
    store_dtype: Literal["float16", "float32"] = field(
        "float16", help="dtype of the stored arrays (float16: relative error <= 2**-11; image tokens of 16 frames "
        "at 518 px are 45 MB per sequence in float16)")
    device: Literal["cpu", "cuda"] = field("cpu", help="where the encoders run; cuda needs ray.gpus_per_worker > 0")
    timeout_s: float = field(3600.0, help="seconds allowed per source shard")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")
    price: PriceSettings = field(default_factory=PriceSettings, help="prices a --dry-run costs the job at")

    def __post_init__(self):
        require(self.image_size >= 0, "image_size", self.image_size, "must be >= 0 (0 = the encoder's)")
        require(self.surface_points >= 0, "surface_points", self.surface_points, "must be >= 0 (0 = all)")
        require(self.sharp_points >= 0, "sharp_points", self.sharp_points, "must be >= 0 (0 = all)")
        require(self.chunk >= 1, "chunk", self.chunk, "must be >= 1")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        require(self.device == "cpu" or self.ray.gpus_per_worker > 0, "device", self.device,
                "cuda needs ray.gpus_per_worker > 0 so Ray gives each worker a GPU")


# Fields that do not change what a sample holds; the encoders enter the hash by content, not by path.
NON_SAMPLE_FIELDS = ("source", "out", "vae", "image_encoder", "chunk", "timeout_s", "ray", "price")


@recipe(Cache4DJob, "default", help="CPU, float32 compute, float16 storage, every point of the shards")
def _default() -> Cache4DJob:
    return Cache4DJob()


@recipe(Cache4DJob, "gpu", help="one GPU per worker, bfloat16 compute")
def _gpu() -> Cache4DJob:
    return Cache4DJob(device="cuda", dtype="bfloat16", ray=RaySettings(gpus_per_worker=1.0, cpus_per_worker=2))


@recipe(Cache4DJob, "tiny", help="the random tiny VAE and DINOv2 of `loom train shape4d --recipe tiny` (tests, demo)")
def _tiny() -> Cache4DJob:
    return Cache4DJob(vae=TINY, image_encoder=TINY, store_dtype="float32")


# --------------------------------------------------------------------------------------------------------- driver


def encoder_path(name: str, what: str, example: str) -> str:
    """'tiny', or the local folder ``name`` resolves to (a clear error when it is unset or missing)."""
    if name == TINY:
        return TINY
    if not name:
        raise FileNotFoundError(f"{what} is not set: pass --{what.replace('_', '-')} DIR ({example}) or use "
                                "--recipe tiny")
    return os.path.abspath(resolve_model_path(name, what))


def job_spec(cfg: Cache4DJob) -> JobSpec:
    """The job: one task per source shard (output shard i <- source shard i, in manifest order). Checks the encoder
    folders and the source before anything runs."""
    vae = encoder_path(cfg.vae, "vae", "the released Step1X-3D-Geometry-1300m folder or a `loom train vae` OUT/vae")
    image = encoder_path(cfg.image_encoder, "image_encoder", "a local facebook/dinov2-with-registers-large")
    digests = {name: ({"tiny_seed": cfg.seed} if path == TINY else dir_digest(path))
               for name, path in (("vae", vae), ("image_encoder", image))}
    doc = {"config": config_hash(cfg, exclude=NON_SAMPLE_FIELDS), "encoders": digests}
    chash = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    params = {"vae": vae, "image_encoder": image, "digests": digests, "image_size": cfg.image_size,
              "seed": cfg.seed, "surface_points": cfg.surface_points, "sharp_points": cfg.sharp_points,
              "chunk": cfg.chunk, "dtype": cfg.dtype, "store_dtype": cfg.store_dtype, "device": cfg.device,
              "threads": cfg.ray.cpus_per_worker, "config_hash": chash}
    sources = source_shards(cfg.source, ("4d",), "`loom cache 4d` encodes 4D corpora (`loom render 4d` output); "
                            "turntables are cached with `loom cache latents`")
    return cache_spec(cfg, KIND, ENTRY, params, chash, sources)


# -------------------------------------------------------------------------------------------- sandbox entry


def _encoders(p: dict):
    """(VAE, DINOv2, their encoder_record) of the task, built once per sandbox process by the builders training
    uses (`loom.models.shape4d`), so 'tiny' with a seed is the tiny model of a run with that trainer.seed."""
    from loom.models.shape4d import Shape4DModelSettings, build_frozen_vae, build_image_encoder, encoder_record

    def build():
        m = Shape4DModelSettings(vae=p["vae"], image_encoder=p["image_encoder"], image_size=p["image_size"],
                                 dtype=p["dtype"])
        vae = build_frozen_vae(m, p["seed"]).to(p["device"])
        image = build_image_encoder(m, p["seed"]).to(p["device"])
        return vae, image, encoder_record(vae, image)

    key = (p["vae"], p["image_encoder"], json.dumps(p["digests"], sort_keys=True), p["image_size"], p["seed"],
           p["dtype"], p["device"])
    return _cached("shape4d", key, build)


def point_rng(seed: int, key: str):
    """The generator of a sample's fixed point subsets: the same for the same (seed, key) on any worker."""
    import numpy as np

    return np.random.default_rng([seed, zlib.crc32(key.encode()), 0x4D])


def encode_entry(params: dict) -> dict:
    """Runs inside the sandbox: encode every sample of one source shard. Returns ``{"samples": [(key, files)],
    "failures": [{key, reason}], "warnings": [], "frames": n, "timings": {...}}``."""
    import numpy as np
    import torch

    from loom.datasets.latents import npy
    from loom.datasets.shape4d import decode_sample
    from loom.models.shape_inputs import PointSubset, encode_frames

    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(params.get("threads", 1))))
    vae, image, record = _encoders(params)
    t_load = time.monotonic() - t0
    local = _local_shard(params["shard"], params["shard_sha256"], params["workdir"])
    sharp = bool(vae.config.sharp_edges)
    subset = PointSubset(params["surface_points"], sharp=params["sharp_points"] if sharp else 0)
    store = np.dtype(params["store_dtype"])
    keys = ("surface", "queries", "video") + (("sharp_surface",) if sharp else ())
    samples, failures, frames, seen = [], [], 0, []
    for key, files in shards.iter_tar(local):
        seen.append(key)
        try:
            s = subset(decode_sample(files, keys=keys), point_rng(params["seed"], key))
            batch = {k: s[k][None] for k in keys if k != "video"} | {"meta": [s["meta"]]}
            z = encode_frames(vae, batch, params["chunk"], device="cpu")[0]  # (T, Q, C)
            video = s["video"]
            tokens = torch.cat([image.encode(video[i: i + params["chunk"]]).cpu()
                                for i in range(0, len(video), params["chunk"])])  # (T, L, D)
        except (ValueError, KeyError, RuntimeError) as e:
            failures.append({"key": key, "reason": f"{type(e).__name__}: {e}"})
            continue
        meta = dict(s["meta"])
        meta["latents4d"] = {
            "source": {"shard": params["shard"], "shard_sha256": params["shard_sha256"], "key": key},
            "encoders": record, "posterior": "mean", "latent_scale": "not applied",
            "points": {"surface": int(s["surface"].shape[1]), "queries": int(s["queries"].shape[1]),
                       "sharp_surface": int(s["sharp_surface"].shape[1]) if sharp else 0,
                       "subsets": {"surface": params["surface_points"], "sharp": params["sharp_points"] if sharp else 0,
                                   "drawn": "per frame from (seed, crc32(key))", "seed": params["seed"]}},
            "dtype": params["dtype"], "store_dtype": params["store_dtype"], "device": params["device"],
            "config_hash": params["config_hash"], "loom_version": loom.__version__,
        }
        out = {"shape_latent.npy": npy(z.numpy().astype(store)), "image_tokens.npy": npy(tokens.numpy().astype(store)),
               "queries.npz": files["queries.npz"], "camera.npz": files["camera.npz"],
               "meta.json": json.dumps(meta, sort_keys=True).encode()}
        samples.append((key, out))
        frames += int(z.shape[0])
    missing = [k for k in params["keys"] if k not in seen]
    failures += [{"key": k, "reason": "not in the source shard (its manifest lists it)"} for k in missing]
    return {"samples": samples, "failures": failures, "warnings": [], "frames": frames,
            "timings": {"load": t_load, "task": time.monotonic() - t0}}


# ------------------------------------------------------------------------------------------------ training side


def check_cache(meta: list | None, expected: dict, where: str) -> None:
    """Refuse cached 4D samples whose encoders are not the run's (``expected``: `encoder_record` of the run's
    frozen VAE and DINOv2): their latents and tokens would come from other networks than the ones it samples with."""
    for m in meta or []:
        got = (m.get("latents4d") or {}).get("encoders") if isinstance(m, dict) else None
        if got is None:
            raise ValueError(f"sample {m.get('uid', '?') if isinstance(m, dict) else '?'} of {where} has no "
                             "meta['latents4d']: not written by `loom cache 4d`")
        for name in ("vae", "image_encoder"):
            diff = sorted(k for k in set(got[name]) | set(expected[name]) if got[name].get(k) != expected[name].get(k))
            if diff:
                what = "model.vae" if name == "vae" else "model.image_encoder"
                raise ValueError(f"{where} was cached with another {name.replace('_', ' ')} than this run's {what} "
                                 f"(they differ in {diff}): re-run `loom cache 4d` with the run's encoders (same "
                                 "folders; for 'tiny', --set seed=<trainer.seed>), or train from the 4D corpus itself")
