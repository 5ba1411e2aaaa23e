"""``loom cache latents``: run the frozen video VAE over a turntable corpus once and write latent shards with the
same sample keys, so Video DiT training (TAPESTRY 3.1, 4.1) reads latents instead of decoding and encoding pixels
every epoch.

Data flow (Loom's one job mechanism, `loom.pipelines.job`)::

    source manifest (complete) ──> one task per source shard (its url, sha256 and keys) ──> plan.json
        ──> Ray Data ──map──> worker (owns a Sandbox whose process loads the VAE once and keeps it)
              per shard: read the source tar, check its sha256, per sample: decode -> frames 1+4k -> [-1, 1]
              -> VAE posterior mean -> Wan normalisation; mask -> coverage per latent cell
              -> write shards/latents-<i>.tar (source shard i, same keys) + sidecar
        ──> manifest.json + failures.jsonl

Sample schema and input mappings: `loom.datasets.latents`. One source shard is one task (the unit of retry,
resume and timeout); a bad sample is a failure row, a missing or changed source shard makes each of its samples
a row. Encoders load from local directories only.

Follow-up (not yet implemented, refused by the config): the umT5 text encoder (turntable samples carry no
captions yet) and the CLIP image encoder of the first frame.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Literal

import loom
from loom.pipelines.job import ClusterSettings, JobSpec, Summary, Task, run_job
from loom.platform import shards, storage
from loom.platform.config import config, config_hash, field, recipe, require, to_dict

KIND = "latents"
ENTRY = "loom.pipelines.latents:encode_entry"
PASSES = ("rgb", "normal", "position")


@config
class CacheLatentsJob:
    source: str = field("out/ttv", help="Loom output folder (or fsspec URL) of a finished turntable job")
    out: str = field("out/ttv-latents", help="output folder or fsspec URL for the latent shards")
    vae: str = field("", help="local directory of a diffusers AutoencoderKLWan (the Wan2.1 VAE: <checkpoint>/vae)")
    passes: tuple[str, ...] = field(PASSES, help="video passes to encode, of rgb, normal, position")
    position_radius: float = field(1.0, help="positions are divided by this before encoding (world coordinates "
                                   "lie in the unit sphere, so 1 maps them into [-1, 1]); the result is clipped")
    frames: Literal["trim", "pad", "exact"] = field(
        "trim", help="the VAE takes 1+4k frames: trim = drop the last frames, pad = repeat the last frame, "
        "exact = fail samples of other lengths")
    normalize: bool = field(True, help="store Wan-normalised latents (mu - latents_mean) / latents_std")
    store_dtype: Literal["float16", "float32"] = field("float16", help="dtype of the stored latents")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype the VAE computes in (bfloat16 on GPUs)")
    device: Literal["cpu", "cuda"] = field("cpu", help="where the VAE runs; cuda needs cluster.gpus_per_worker > 0")
    batch: int = field(3, help="videos per VAE forward pass (a sample's passes are stacked into batches)")
    tiling: bool = field(False, help="encode in spatial tiles (less memory for large frames)")
    text_encoder: str | None = field(None, help="local dir of a umT5 encoder: NOT YET SUPPORTED (follow-up)")
    image_encoder: str | None = field(None, help="local dir of a CLIP vision encoder: NOT YET SUPPORTED (follow-up)")
    timeout_s: float = field(3600.0, help="seconds allowed per source shard")
    cluster: ClusterSettings = field(default_factory=ClusterSettings, help="Ray cluster")

    def __post_init__(self):
        require(len(self.passes) >= 1 and set(self.passes) <= set(PASSES) and len(set(self.passes)) == len(
            self.passes), "passes", self.passes, f"must be distinct names of {list(PASSES)}")
        require(self.position_radius > 0, "position_radius", self.position_radius, "must be > 0")
        require(self.batch >= 1, "batch", self.batch, "must be >= 1")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        require(self.device == "cpu" or self.cluster.gpus_per_worker > 0, "device", self.device,
                "cuda needs cluster.gpus_per_worker > 0 so Ray gives each worker a GPU")
        require(self.text_encoder is None, "text_encoder", self.text_encoder,
                "text latents are not implemented yet (turntable samples carry no captions); leave it unset")
        require(self.image_encoder is None, "image_encoder", self.image_encoder,
                "image-encoder features are not implemented yet; leave it unset")


# Fields that do not change what a sample holds; the encoders enter the hash by content, not by path.
NON_SAMPLE_FIELDS = ("source", "out", "vae", "timeout_s", "cluster")


@recipe(CacheLatentsJob, "default", help="CPU, float32 compute, float16 storage: rgb, normal and position")
def _default() -> CacheLatentsJob:
    return CacheLatentsJob()


@recipe(CacheLatentsJob, "gpu", help="one GPU per worker, bfloat16 compute")
def _gpu() -> CacheLatentsJob:
    return CacheLatentsJob(device="cuda", dtype="bfloat16",
                           cluster=ClusterSettings(gpus_per_worker=1.0, cpus_per_worker=2))


# --------------------------------------------------------------------------------------------------------- driver


def dir_digest(path: str) -> dict:
    """Content hashes of a local model folder: config.json, and every other file (path + sha256, sorted)."""
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    cfg_sha, h = "", hashlib.sha256()
    for rel in files:
        with open(os.path.join(path, rel), "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if rel == "config.json":
            cfg_sha = digest
        else:
            h.update(f"{rel}\0{digest}\n".encode())
    return {"config_sha256": cfg_sha, "weights_sha256": h.hexdigest()}


def check_vae_dir(path: str) -> None:
    if not path:
        raise FileNotFoundError("vae is not set: pass --vae DIR (a local diffusers AutoencoderKLWan folder, e.g. "
                                "<Wan2.1 checkpoint>/vae)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"video VAE directory vae={path!r} does not exist: point it at a local diffusers "
                                "AutoencoderKLWan folder (config.json + weights), e.g. <Wan2.1 checkpoint>/vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"video VAE directory vae={path!r} has no config.json: is it a diffusers "
                                "AutoencoderKLWan folder? (for a full Wan checkpoint, use its 'vae' subfolder)")


def source_shards(source: str) -> list[dict]:
    """The source's manifest shards (name, sha256, keys), refusing an unfinished or non-turntable corpus."""
    m = shards.read_manifest(source)
    if m.get("kind") not in (None, "ttv"):
        raise ValueError(f"source={source!r} holds a {m.get('kind')!r} corpus; latents are cached from turntable "
                         "('ttv') corpora")
    if not m.get("complete", False):
        raise ValueError(f"source={source!r} is unfinished ({len(m.get('missing_shards', []))} shard(s) missing): "
                         "rerun its render job to completion first, so the latent plan does not change later")
    return [{"name": s["name"], "sha256": s["sha256"], "keys": list(s["keys"])} for s in m["shards"]]


def job_spec(cfg: CacheLatentsJob) -> JobSpec:
    """The job: one task per source shard (output shard i <- source shard i, in manifest order). Checks the VAE folder and the source before anything runs."""
    check_vae_dir(cfg.vae)
    vae_digest = dir_digest(cfg.vae)
    chash = hashlib.sha256(json.dumps({"config": config_hash(cfg, exclude=NON_SAMPLE_FIELDS), "vae": vae_digest},
                                      sort_keys=True).encode()).hexdigest()
    params = {
        "vae": os.path.abspath(cfg.vae), "vae_digest": vae_digest, "passes": list(cfg.passes),
        "position_radius": cfg.position_radius, "frames": cfg.frames, "normalize": cfg.normalize,
        "store_dtype": cfg.store_dtype, "dtype": cfg.dtype, "device": cfg.device, "batch": cfg.batch,
        "tiling": cfg.tiling, "threads": cfg.cluster.cpus_per_worker, "config_hash": chash,
    }
    tasks = []
    for s in source_shards(cfg.source):
        url = shards.shard_url(cfg.source, s["name"])
        tasks.append(Task(key=s["name"].removesuffix(".tar"),
                          asset={"uid": s["name"], "source": url, "sha256": s["sha256"], "keys": s["keys"]},
                          params={**params, "shard": url, "shard_sha256": s["sha256"], "keys": s["keys"]}))
    return JobSpec(kind=KIND, entry=ENTRY, tasks=tasks, out=cfg.out, config=to_dict(cfg), config_hash=chash,
                   timeout_s=cfg.timeout_s, cluster=cfg.cluster, samples_per_shard=1,
                   env={"OMP_NUM_THREADS": str(cfg.cluster.cpus_per_worker)}, fetch=None, verb="cache")


# -------------------------------------------------------------------------------------------- sandbox entry


def frame_indices(t: int, policy: str, r: int = 4) -> list[int]:
    """Source frame indices fed to a causal VAE that takes 1 + r*k frames (see `CacheLatentsJob.frames`)."""
    if t < 1:
        raise ValueError("sample has no frames")
    if (t - 1) % r == 0:
        return list(range(t))
    if policy == "trim":
        return list(range(1 + r * ((t - 1) // r)))
    if policy == "pad":
        n = 1 + r * math.ceil((t - 1) / r)
        return list(range(t)) + [t - 1] * (n - t)
    raise ValueError(f"sample has {t} frames; frames=exact needs 1 + {r}k (set frames=trim or frames=pad)")


def video_input(name: str, a, position_radius: float = 1.0):
    """One pass of a decoded turntable sample, (T, H, W, 3) -> the VAE's input (3, T, H, W) float32 in [-1, 1]."""
    import numpy as np
    import torch

    if name == "rgb":
        x = a.astype(np.float32) / 127.5 - 1.0
    elif name == "normal":
        x = np.clip(a.astype(np.float32), -1.0, 1.0)  # unit normals; float16 storage can round just past 1
    elif name == "position":
        x = np.clip(a.astype(np.float32) / position_radius, -1.0, 1.0)
    else:
        raise ValueError(f"unknown pass {name!r}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(3, 0, 1, 2)  # (3, T, H, W)


_STATE: dict = {}  # per sandbox process: the loaded VAE, kept across tasks


def _vae(p: dict):
    import torch

    from loom.training.models.video_vae import load_video_vae

    key = (p["vae"], p["vae_digest"]["weights_sha256"], p["dtype"], p["device"], p["tiling"])
    if _STATE.get("key") != key:
        _STATE.clear()
        torch.set_num_threads(max(1, int(p.get("threads", 1))))
        vae = load_video_vae(p["vae"], p["dtype"], p["device"])
        if p["tiling"]:
            vae.vae.enable_tiling()
        _STATE.update(key=key, vae=vae)
    return _STATE["vae"]


def _local_shard(url: str, sha: str, workdir: str) -> str:
    from loom.pipelines.errors import TaskError

    if not storage.exists(url):
        raise TaskError(f"source shard {url} does not exist")
    fs, path = storage.filesystem(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        local = path
    else:
        local = os.path.join(workdir, os.path.basename(path))
        fs.get(path, local)
    digest = storage.sha256_of(local)
    if digest != sha:
        raise TaskError(f"source shard {url} has sha256 {digest}, its manifest records {sha}: the source changed "
                        "since it was written; rerun its render job or verify it with `loom shards verify`")
    return local


def encode_entry(params: dict) -> dict:
    """Runs inside the sandbox: encode every sample of one source shard. Returns ``{"samples": [(key, files)],
    "failures": [{key, reason}], "frames": n, "timings": {...}}``."""
    import numpy as np
    import torch

    from loom.datasets.latents import npy
    from loom.datasets.ttv import decode_sample

    t0 = time.monotonic()
    vae = _vae(params)
    t_load = time.monotonic() - t0
    local = _local_shard(params["shard"], params["shard_sha256"], params["workdir"])
    store = np.dtype(params["store_dtype"])
    passes = params["passes"]
    samples, failures, frames = [], [], 0
    seen = []
    for key, files in shards.iter_tar(local):
        seen.append(key)
        try:
            s = decode_sample(files, keys=(*passes, "mask"))
            t = s["mask"].shape[0]
            idx = frame_indices(t, params["frames"], vae.temporal_factor)
            videos = [video_input(p, s[p][idx], params["position_radius"]) for p in passes]
            latents = []
            for i in range(0, len(videos), params["batch"]):
                latents += list(vae.encode(torch.stack(videos[i: i + params["batch"]]), params["normalize"]))
            mask = vae.pool_mask(torch.from_numpy(s["mask"][idx]))  # (T', H', W')
        except (ValueError, KeyError, RuntimeError) as e:
            failures.append({"key": key, "reason": f"{type(e).__name__}: {e}"})
            continue
        out = {f"{p}_latent.npy": npy(z.cpu().numpy().astype(store)) for p, z in zip(passes, latents, strict=True)}
        out["mask_latent.npy"] = npy(mask.numpy().astype(store))
        out["camera.npz"] = files["camera.npz"]
        meta = dict(s["meta"])
        meta["latents"] = {
            "source": {"shard": params["shard"], "shard_sha256": params["shard_sha256"], "key": key},
            "vae": {"path": params["vae"], "class": "AutoencoderKLWan", **params["vae_digest"], "z_dim": vae.z_dim,
                    "spatial_factor": vae.spatial_factor, "temporal_factor": vae.temporal_factor},
            "passes": passes,
            "inputs": {"rgb": "uint8 / 127.5 - 1", "normal": "clip(normal, -1, 1)",
                       "position": f"clip(position / {params['position_radius']}, -1, 1)"},
            "position_radius": params["position_radius"],
            "frames": {"source": t, "used": len(idx), "policy": params["frames"]},
            "posterior": "mode",
            "normalization": ({"kind": "mean_std", "mean": vae.latents_mean.tolist(), "std": vae.latents_std.tolist()}
                              if params["normalize"] else {"kind": "none"}),
            "mask": f"coverage fraction: mean over each latent cell's frames and {vae.spatial_factor}^2 pixels",
            "dtype": params["dtype"], "store_dtype": params["store_dtype"], "device": params["device"],
            "config_hash": params["config_hash"], "loom_version": loom.__version__,
        }
        out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append((key, out))
        frames += len(idx)
    missing = [k for k in params["keys"] if k not in seen]
    failures += [{"key": k, "reason": "not in the source shard (its manifest lists it)"} for k in missing]
    return {"samples": samples, "failures": failures, "frames": frames,
            "timings": {"load": t_load, "task": time.monotonic() - t0}}


def run_cache(spec: JobSpec, *, progress: bool = True, retry_failed: bool = False) -> Summary:
    """Encode every unfinished shard of the plan: Loom's one job mechanism (``loom.pipelines.job.run_job``) with
    no asset fetch (each task reads its source shard) and multi-sample task results."""
    return run_job(spec, progress=progress, retry_failed=retry_failed)


# ------------------------------------------------------------------------------------------------------ CLI


def cmd_cache_latents(args) -> int:
    from loom.pipelines.commands import _help_config, _resolve
    from loom.platform import config as cfgmod

    if args.help_config:
        return _help_config(CacheLatentsJob)
    cfg = _resolve(CacheLatentsJob, args, source=args.source, out=args.out, vae=args.vae)
    if args.print_config:
        print(cfgmod.dump_yaml(cfg), end="")
        return 0
    spec = job_spec(cfg)
    n = sum(len(t.asset["keys"]) for t in spec.tasks)
    if args.dry_run:
        print(f"plan: {n} sample(s) in {len(spec.tasks)} source shard(s) of {cfg.source} -> {cfg.out}")
        return 0
    print(f"encoding {n} sample(s) of {cfg.source} with the VAE in {cfg.vae} into {cfg.out}", file=sys.stderr)
    summary = run_cache(spec, progress=not args.no_progress, retry_failed=args.retry_failed)
    print(summary.line())
    for f in summary.failures[:20]:
        print(f"  failed {f['key']}: {f['reason'].splitlines()[0]}")
    if summary.failed > 20:
        print(f"  ... {summary.failed - 20} more in {cfg.out}/failures.jsonl")
    print(f"shards:   {cfg.out}/shards  (manifest {cfg.out}/manifest.json)")
    return 0


def register_cache(sub) -> None:
    """``loom cache latents``: to be called from ``loom.pipelines.commands.register``."""
    from loom.pipelines.commands import _add_job_args

    cache = sub.add_parser("cache", help="precompute model inputs (latents) from a corpus").add_subparsers(
        dest="ccmd", metavar="WHAT")
    p = cache.add_parser("latents", help="encode a turntable corpus with the frozen video VAE into latent shards")
    p.add_argument("--source", help="Loom output folder of a finished turntable job (default from the recipe)")
    p.add_argument("--out", help="output folder or fsspec URL (default from the recipe)")
    p.add_argument("--vae", help="local diffusers AutoencoderKLWan folder (e.g. <Wan2.1 checkpoint>/vae)")
    _add_job_args(p, CacheLatentsJob)
    p.add_argument("--dry-run", action="store_true", help="check the VAE and the source, print the plan, encode nothing")
    p.add_argument("--retry-failed", action="store_true", help="redo shards that recorded failures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache_latents)
