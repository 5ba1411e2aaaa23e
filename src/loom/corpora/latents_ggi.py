"""``loom cache ggi``: run the frozen encoders of VideoFrom3D's GGI module (the CogVideoX VAE and, when set, T5) over
a finished clips or scene corpus once and write latent shards with the same sample keys, so ``loom train ggi`` reads
latents instead of encoding 49 frames of 720x480 twice (video and edges) and the anchors at every step.

Data flow (Loom's one job mechanism, as ``loom cache latents`` and ``loom cache 4d``)::

    source manifest (a complete clips or scene corpus) ──> one task per source shard ──> plan.json
        ──> Ray Data ──map──> worker (a Sandbox process that loads the VAE [and T5] once and keeps them)
              per shard: read the source tar, check its sha256, per sample: the GGI view (`loom.models.ggi.GGIView`:
              frames, padding to 1 + 4k, noise at the latent frame rate) -> VAE posterior mode x scaling factor:
              video -> video_latent; edges -> edge_latent; first and last frame, each alone -> anchor_latent;
              caption (or the prompt) -> T5 -> text_embed
              -> shards/latents-ggi-<i>.tar (source shard i, same keys) + sidecar
        ──> manifest.json (kind "latents-ggi") + failures.jsonl

Sample schema (read by the generic decoder: ``<name>.npy`` -> arrays; F' latent frames, C channels, h x w = H/8 x W/8):

==================  ============  =======  =================================================================
key                 shape         dtype    meaning
==================  ============  =======  =================================================================
``video_latent``    (F',C,h,w)    float    x0: the clip (padded), VAE mode x scaling factor
``edge_latent``     (F',C,h,w)    float    H_e: the edge video, likewise
``anchor_latent``   (2,C,h,w)     float    the first and last frame, each encoded alone (V is rebuilt from it:
                                           `loom.models.ggi.anchor_layout`)
``noise``           (F',C,h,w)    float    the warped noise at the latent frame rate
``text_embed``      (L,D)         float    T5 of the caption or prompt, all ``text_len`` rows (with a text encoder)
``meta``            dict                   the source meta plus ``meta["latents_ggi"]``: the source shard, the VAE's
                                           and T5's content digests, frames, the prompt used, dtypes, config hash
==================  ============  =======  =================================================================

Training checks ``meta["latents_ggi"]["vae"]`` against its own ``model.vae`` (and the text encoder's digest) and
refuses a cache made with other networks (`check_cache`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Literal

import loom
from loom.corpora.latents import _cached, _local_shard, cache_spec, dir_digest, source_shards
from loom.platform import shards
from loom.platform.config import config, config_hash, field, recipe, require
from loom.platform.hub import resolve_model_path
from loom.platform.jobs import JobSpec
from loom.platform.ray import RaySettings

KIND = "latents-ggi"
ENTRY = "loom.corpora.latents_ggi:encode_entry"
TINY = "tiny"


@config
class CacheGGIJob:
    source: str = field("out/clips", help="Loom output folder (or fsspec URL) of a finished `loom prep videos` or "
                        "`loom render scene` job")
    out: str = field("out/ggi-latents", help="output folder or fsspec URL for the latent shards")
    vae: str = field("", help="the CogVideoX VAE (<CogVideoX-5B-I2V>/vae or the checkpoint folder), or 'tiny'")
    text_encoder: str = field("", help="CogVideoX's T5 (the checkpoint folder or a T5 encoder folder): adds "
                              "text_embed; empty: none")
    tokenizer: str = field("", help="its tokenizer folder (default: <root>/tokenizer, else the encoder folder)")
    prompt: str = field("", help="the text of a sample without a caption (scenes)")
    text_len: int = field(226, help="T5 tokens (CogVideoX: 226)")
    frames: int = field(0, help="frames per clip from its start (0 = all); padded to 1 + 4k (the run's data.frames)")
    seed: int = field(0, help="seed of the 'tiny' VAE (the training run's trainer.seed)")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype the encoders compute in (bfloat16 on GPUs)")
    store_dtype: Literal["float16", "float32"] = field("float16", help="dtype of the stored arrays")
    device: Literal["cpu", "cuda"] = field("cpu", help="where the encoders run; cuda needs ray.gpus_per_worker > 0")
    timeout_s: float = field(3600.0, help="seconds allowed per source shard")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")

    def __post_init__(self):
        require(self.frames == 0 or self.frames >= 5, "frames", self.frames, "must be 0 (all) or >= 5")
        require(self.text_len >= 1, "text_len", self.text_len, "must be >= 1")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        require(self.device == "cpu" or self.ray.gpus_per_worker > 0, "device", self.device,
                "cuda needs ray.gpus_per_worker > 0 so Ray gives each worker a GPU")


NON_SAMPLE_FIELDS = ("source", "out", "vae", "text_encoder", "tokenizer", "timeout_s", "ray")


@recipe(CacheGGIJob, "default", help="CPU, float32 compute, float16 storage")
def _default() -> CacheGGIJob:
    return CacheGGIJob()


@recipe(CacheGGIJob, "gpu", help="one GPU per worker, bfloat16 compute")
def _gpu() -> CacheGGIJob:
    return CacheGGIJob(device="cuda", dtype="bfloat16", ray=RaySettings(gpus_per_worker=1.0, cpus_per_worker=2))


@recipe(CacheGGIJob, "tiny", help="the random tiny VAE of `loom train ggi --recipe tiny` (tests, demo)")
def _tiny() -> CacheGGIJob:
    return CacheGGIJob(vae=TINY, store_dtype="float32", text_len=8)


def digests(vae: str, text_encoder: str, seed: int) -> dict:
    """Content digests of the encoders (what the cache is keyed by and training checks): 'tiny' by its seed."""
    out = {"vae": {"tiny_seed": seed} if vae == TINY else dir_digest(resolve_model_path(vae, "vae"))}
    if text_encoder:
        out["text_encoder"] = dir_digest(resolve_model_path(text_encoder, "text_encoder"))
    return out


def job_spec(cfg: CacheGGIJob) -> JobSpec:
    """The job: one task per source shard. Checks the encoders and the source before anything runs."""
    if not cfg.vae:
        raise FileNotFoundError("vae is not set: pass --vae DIR (<CogVideoX-5B-I2V>/vae) or use --recipe tiny")
    d = digests(cfg.vae, cfg.text_encoder, cfg.seed)
    doc = {"config": config_hash(cfg, exclude=NON_SAMPLE_FIELDS), "encoders": d}
    chash = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    params = {"vae": cfg.vae, "text_encoder": cfg.text_encoder, "tokenizer": cfg.tokenizer, "prompt": cfg.prompt,
              "text_len": cfg.text_len, "frames": cfg.frames, "seed": cfg.seed, "digests": d, "dtype": cfg.dtype,
              "store_dtype": cfg.store_dtype, "device": cfg.device, "threads": cfg.ray.cpus_per_worker,
              "config_hash": chash}
    sources = source_shards(cfg.source, ("clips", "scene"), "`loom cache ggi` encodes clips (`loom prep videos`) "
                            "and scenes (`loom render scene`)")
    return cache_spec(cfg, KIND, ENTRY, params, chash, sources)


def _encoders(p: dict):
    """(VAE, T5 or None), built once per sandbox process with the builders training uses."""
    from loom.models import ggi

    def build():
        m = ggi.GGIModelSettings(vae=p["vae"], dtype=p["dtype"], text_len=p["text_len"])
        vae = ggi.build_vae(m, p["seed"]).to(p["device"])
        text = ggi.T5Prompts(p["text_encoder"], p["tokenizer"], p["text_len"]) if p["text_encoder"] else None
        return vae, text

    key = (p["vae"], p["text_encoder"], json.dumps(p["digests"], sort_keys=True), p["dtype"], p["device"],
           p["seed"])
    return _cached("ggi", key, build)


def encode_entry(params: dict) -> dict:
    """Runs inside the sandbox: encode every sample of one source shard."""
    import numpy as np
    import torch

    from loom.datasets.io import resolve_decoder
    from loom.datasets.latents import npy
    from loom.models import ggi

    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(params.get("threads", 1))))
    vae, text = _encoders(params)
    t_load = time.monotonic() - t0
    local = _local_shard(params["shard"], params["shard_sha256"], params["workdir"])
    store = np.dtype(params["store_dtype"])
    view = ggi.GGIView(params["frames"])
    samples, failures, seen, frames = [], [], [], 0
    for key, files in shards.iter_tar(local):
        seen.append(key)
        try:
            kind = json.loads(files["meta.json"]).get("kind")
            s = view({**resolve_decoder(kind)(files, ("rgb", "edges", "noise")), "__key__": key})
            c = ggi.encode_clip(vae, s["video"][None], s["edges"][None])  # training's own encoding
            x0, h_e, anchors = c["x0"][0], c["edges"][0], c["anchor_pair"][0]  # (F',C,h,w), (F',C,h,w), (2,C,h,w)
            prompt = ggi.prompts_of([s["meta"]], params["prompt"])[0]
            embed = text.encode([prompt])[0] if text is not None else None
        except (ValueError, KeyError, RuntimeError) as e:
            failures.append({"key": key, "reason": f"{type(e).__name__}: {e}"})
            continue
        meta = dict(s["meta"])
        meta["latents_ggi"] = {
            "source": {"shard": params["shard"], "shard_sha256": params["shard_sha256"], "key": key},
            "encoders": params["digests"], "posterior": "mode x scaling_factor", "frames": int(len(s["video"])),
            "prompt": prompt if text is not None else None, "dtype": params["dtype"],
            "store_dtype": params["store_dtype"], "config_hash": params["config_hash"],
            "loom_version": loom.__version__,
        }
        out = {"video_latent.npy": npy(x0.numpy().astype(store)), "edge_latent.npy": npy(h_e.numpy().astype(store)),
               "anchor_latent.npy": npy(anchors.numpy().astype(store)),
               "noise.npy": npy(np.asarray(s["noise"], np.float32).astype(store)),
               "meta.json": json.dumps(meta, sort_keys=True).encode()}
        if embed is not None:
            out["text_embed.npy"] = npy(embed.numpy().astype(store))
        samples.append((key, out))
        frames += int(len(s["video"]))
    missing = [k for k in params["keys"] if k not in seen]
    failures += [{"key": k, "reason": "not in the source shard (its manifest lists it)"} for k in missing]
    return {"samples": samples, "failures": failures, "warnings": [], "frames": frames,
            "timings": {"load": t_load, "task": time.monotonic() - t0}}


def check_cache(metas: list, expected: dict, where: str) -> None:
    """Refuse cached samples whose encoders are not the run's (``expected``: `digests` of its model.vae and
    model.text_encoder): their latents would come from other networks than the ones it samples with."""
    for m in metas:
        got = (m or {}).get("latents_ggi", {}).get("encoders")
        if got is None:
            raise ValueError(f"{where}: sample {m.get('uid')} has no meta['latents_ggi']: not `loom cache ggi` output")
        if got != expected:
            raise ValueError(f"{where}: the cache was made with other encoders ({json.dumps(got, sort_keys=True)}) "
                             f"than this run's model.vae / model.text_encoder ({json.dumps(expected, sort_keys=True)})"
                             ": recache with the run's networks, or point the run at the ones the cache used")
