"""``loom cache latents``: run the frozen encoders of the Video DiT (TAPESTRY 3.1, 4.1) over a turntable corpus once
and write latent shards with the same sample keys, so training reads latents and embeddings instead of decoding and
encoding pixels and text every epoch: the video VAE always; the umT5 text encoder and the CLIP image encoder of the
first frame when configured (``text_encoder``, ``image_encoder``).

Data flow (Loom's one job mechanism, `loom.platform.jobs`)::

    source manifest (complete) ──> one task per source shard (its url, sha256 and keys) ──> plan.json
        ──> Ray Data ──map──> worker (owns a Sandbox whose process loads the encoders once and keeps them)
              per shard: read the source tar, check its sha256, per sample: decode -> frames 1+4k -> [-1, 1]
              -> VAE posterior mean -> Wan normalisation; mask -> coverage per latent cell;
              rgb frame 0 -> CLIP penultimate tokens; caption or prompt template -> text
              then the shard's distinct texts -> umT5 (batched), trimmed to their real tokens
              -> write shards/latents-<i>.tar (source shard i, same keys) + sidecar
        ──> manifest.json + failures.jsonl

Sample schema and input mappings: `loom.datasets.latents`. One source shard is one task (the unit of retry,
resume and timeout); a bad sample is a failure row, a missing or changed source shard makes each of its samples
a row. Encoders load from local directories only.

Text: turntable samples carry no captions. A sample's text is its uid's caption from ``captions`` when that file
has one, else ``prompt`` formatted with the sample's fields (`PROMPT_FIELDS`); a uid missing from the captions
file is a warning in the sample's meta, not a failure. The text is cleaned like Wan's pipeline does and stored as
encoded (``meta["latents"]["text"]["prompt"]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import time
from typing import Literal

import loom
from loom.platform.ray import RaySettings
from loom.platform.jobs import PriceSettings, JobSpec, Summary, Task, run_job
from loom.platform.hub import resolve_model_path
from loom.platform import shards, storage
from loom.platform.config import ConfigError, config, config_hash, field, recipe, require, to_dict
from loom.models.ttv import DEFAULT_PROMPT, PASSES

KIND = "latents"
ENTRY = "loom.corpora.latents:encode_entry"
# Fields a prompt template may name: the sample key and the turntable sample's meta (`loom.datasets.ttv`).
PROMPT_FIELDS = ("key", "uid", "variant", "seed", "source", "license", "asset_sha256", "lighting", "orbit", "render")
TEXT_BATCH = 16  # distinct prompts per umT5 forward pass


def template_fields(template: str) -> list[str]:
    """The root names of the replacement fields of a ``str.format`` template ("{lighting[hdri]}" -> "lighting")."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            names.append(name.split(".")[0].split("[")[0])
    return names


@config
class CacheLatentsJob:
    source: str = field("out/ttv", help="Loom output folder (or fsspec URL) of a finished turntable job")
    out: str = field("out/ttv-latents", help="output folder or fsspec URL for the latent shards")
    vae: str = field("", help="the Wan2.1 VAE: the Wan2.1-Fun release folder or its Wan2.1_VAE.pth, or a diffusers "
                     "AutoencoderKLWan folder (<checkpoint>/vae); a local path or a repo id in the Hugging Face cache")
    passes: tuple[str, ...] = field(PASSES, help="video passes to encode, of rgb, normal, position")
    position_radius: float = field(1.0, help="positions are divided by this before encoding (world coordinates "
                                   "lie in the unit sphere, so 1 maps them into [-1, 1]); the result is clipped")
    frames: Literal["trim", "pad", "exact"] = field(
        "trim", help="the VAE takes 1+4k frames: trim = drop the last frames, pad = repeat the last frame, "
        "exact = fail samples of other lengths")
    normalize: bool = field(True, help="store Wan-normalised latents (mu - latents_mean) / latents_std")
    store_dtype: Literal["float16", "float32"] = field("float16", help="dtype of the stored latents")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype the VAE computes in (bfloat16 on GPUs)")
    device: Literal["cpu", "cuda"] = field("cpu", help="where the VAE runs; cuda needs ray.gpus_per_worker > 0")
    batch: int = field(3, help="videos per VAE forward pass (a sample's passes are stacked into batches)")
    tiling: bool = field(False, help="encode in spatial tiles (less memory for large frames)")
    text_encoder: str | None = field(None, help="umT5: the Wan2.1(-Fun) release folder or its models_t5_umt5-xxl-"
                                     "enc-bf16.pth, or a transformers UMT5EncoderModel folder (<Wan2.1 diffusers "
                                     "checkpoint>/text_encoder, or its root); local or a Hugging Face repo id: adds "
                                     "text_embed")
    tokenizer: str | None = field(None, help="its tokenizer folder; unset: the encoder folder, <root>/tokenizer or "
                                  "the encoder's sibling tokenizer/")
    text_max_length: int = field(512, help="tokens kept per prompt (Wan: 512); longer prompts are truncated like "
                                 "Wan does, and the sample's meta says so")
    prompt: str = field(DEFAULT_PROMPT, help="text of a sample without a caption: a str.format template of "
                        f"{', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
    captions: str | None = field(None, help="captions file (path or fsspec URL): .jsonl rows {\"uid\", "
                                 "\"caption\"} or a .json object uid -> caption; a caption wins over prompt")
    image_encoder: str | None = field(None, help="CLIP vision: the Wan2.1(-Fun) release folder or its models_clip_"
                                      "open-clip-xlm-roberta-large-vit-huge-14.pth, or a transformers CLIPVisionModel "
                                      "folder; local or a Hugging Face repo id: adds image_embed of frame 0")
    image_processor: str | None = field(None, help="folder of its preprocessor_config.json; unset: the encoder "
                                        "folder, <root>/image_processor or the sibling image_processor/, else "
                                        "CLIP's standard preprocessing in torch")
    partial: bool = field(True, help="also encode one partial texture per sample (the known video and the "
                          "inpainting mask: known_latent, inpaint_latent), so TAPESTRY's inpainting trains from the "
                          "cache: the render's known pass (render ttv --set passes.partial=true) where the sample has "
                          "one, else a plane cut drawn from the sample key; needs rgb and position in passes")
    timeout_s: float = field(3600.0, help="seconds allowed per source shard")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")
    price: PriceSettings = field(default_factory=PriceSettings, help="prices a --dry-run costs the job at")

    def __post_init__(self):
        require(len(self.passes) >= 1 and set(self.passes) <= set(PASSES) and len(set(self.passes)) == len(
            self.passes), "passes", self.passes, f"must be distinct names of {list(PASSES)}")
        require(self.position_radius > 0, "position_radius", self.position_radius, "must be > 0")
        require(not self.partial or {"rgb", "position"} <= set(self.passes), "partial", self.partial,
                f"needs rgb and position in passes (has {list(self.passes)}): add them or set partial=false")
        require(self.batch >= 1, "batch", self.batch, "must be >= 1")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        require(self.device == "cpu" or self.ray.gpus_per_worker > 0, "device", self.device,
                "cuda needs ray.gpus_per_worker > 0 so Ray gives each worker a GPU")
        require(self.text_max_length >= 1, "text_max_length", self.text_max_length, "must be >= 1")
        try:
            names = template_fields(self.prompt)
        except ValueError as e:
            raise ConfigError(f"prompt={self.prompt!r} is invalid: not a str.format template ({e})") from None
        bad = [n for n in names if n not in PROMPT_FIELDS]
        require(not bad, "prompt", self.prompt, f"names {bad}; a template may name {list(PROMPT_FIELDS)} (positional "
                "fields {} are not allowed; write {{ and }} for literal braces)")
        require(bool(self.prompt.strip()), "prompt", self.prompt, "must not be empty")
        # Text and image settings without their encoder would be silently ignored.
        for name in ("tokenizer", "captions"):
            require(getattr(self, name) is None or bool(self.text_encoder), name, getattr(self, name),
                    "is only used with text_encoder: set text_encoder too, or leave it unset")
        require(self.prompt == DEFAULT_PROMPT or bool(self.text_encoder), "prompt", self.prompt,
                "is only used with text_encoder: set text_encoder too, or leave it at its default")
        require(self.image_processor is None or bool(self.image_encoder), "image_processor", self.image_processor,
                "is only used with image_encoder: set image_encoder too, or leave it unset")
        require(self.captions is None or self.captions.endswith((".jsonl", ".json")), "captions", self.captions,
                "must be a .jsonl file of {\"uid\", \"caption\"} rows or a .json object uid -> caption")


# Fields that do not change what a sample holds; the encoders enter the hash by content, not by path.
NON_SAMPLE_FIELDS = ("source", "out", "vae", "timeout_s", "ray", "price")
# Hashed only when their encoder is configured (by content: digests, the captions file's sha256), so a VAE-only
# job's hash does not depend on settings it ignores.
TEXT_FIELDS = ("text_encoder", "tokenizer", "text_max_length", "prompt", "captions")
IMAGE_FIELDS = ("image_encoder", "image_processor")


@recipe(CacheLatentsJob, "default", help="CPU, float32 compute, float16 storage: rgb, normal and position")
def _default() -> CacheLatentsJob:
    return CacheLatentsJob()


@recipe(CacheLatentsJob, "gpu", help="one GPU per worker, bfloat16 compute")
def _gpu() -> CacheLatentsJob:
    return CacheLatentsJob(device="cuda", dtype="bfloat16",
                           ray=RaySettings(gpus_per_worker=1.0, cpus_per_worker=2))


# --------------------------------------------------------------------------------------------------------- driver


def dir_digest(path: str) -> dict:
    """Content hashes of a local model folder: config.json, and every other file (path + sha256, sorted); of a
    lone weights file (a released Wan ``.pth``): that file's sha256."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"config_sha256": "", "weights_sha256": hashlib.file_digest(f, "sha256").hexdigest()}
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


def vae_path(name: str) -> str:
    """The local file or folder the job's ``vae`` names, checked before anything runs: the Wan2.1_VAE.pth of a
    release folder (or that file), else a diffusers AutoencoderKLWan folder. Its content keys the cache."""
    from loom.models.wan_fun import find_wan_vae_checkpoint

    if not name:
        raise FileNotFoundError("vae is not set: pass --vae PATH (the Wan2.1-Fun release folder, its Wan2.1_VAE.pth, "
                                "or a diffusers AutoencoderKLWan folder such as <Wan2.1 checkpoint>/vae)")
    path = resolve_model_path(name, "vae")
    pth = find_wan_vae_checkpoint(path)
    if pth is not None:
        return pth
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"video VAE vae={name!r} holds neither Wan2.1_VAE.pth nor a config.json: pass the "
                                "Wan2.1-Fun release folder, its .pth, or a diffusers AutoencoderKLWan folder (for a "
                                "full diffusers Wan checkpoint, its 'vae' subfolder)")
    return path


def parse_captions(data: bytes, name: str) -> dict[str, str]:
    """uid -> caption from a captions file's bytes: ``.jsonl`` rows ``{"uid": ..., "caption": ...}`` or a ``.json``
    object ``{uid: caption}``. Refuses malformed rows, empty captions and a uid given two different captions."""
    text = data.decode("utf-8")
    caps: dict[str, str] = {}
    if name.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"captions file {name} line {n} is not JSON: {e}") from None
            if not (isinstance(row, dict) and isinstance(row.get("uid"), str) and isinstance(row.get("caption"), str)):
                raise ValueError(f"captions file {name} line {n} is not a {{\"uid\": str, \"caption\": str}} row: "
                                 f"{line[:200]}")
            uid, cap = row["uid"], row["caption"]
            if uid in caps and caps[uid] != cap:
                raise ValueError(f"captions file {name} gives uid {uid!r} two different captions (line {n})")
            caps[uid] = cap
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"captions file {name} is not JSON: {e}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise ValueError(f"captions file {name} must be a JSON object uid -> caption string")
        caps = obj
    empty = [u for u, cap in caps.items() if not cap.strip()]
    if empty:
        raise ValueError(f"captions file {name} has empty captions for {len(empty)} uid(s), e.g. {empty[:3]}: "
                         "remove those rows (such samples then use the prompt template)")
    return caps


def read_captions(url: str) -> tuple[dict[str, str], str]:
    """(uid -> caption, sha256 of the file) of a captions file; a clear error when it is missing or malformed."""
    if not storage.exists(url):
        raise FileNotFoundError(f"captions file captions={url!r} does not exist: pass a .jsonl file of "
                                '{"uid", "caption"} rows or a .json object uid -> caption, or leave captions unset')
    data = storage.read_bytes(url)
    return parse_captions(data, url), hashlib.sha256(data).hexdigest()


def text_params(cfg: CacheLatentsJob) -> dict | None:
    """What the sandbox needs to encode text, with content digests; checks the folders and the captions file."""
    if not cfg.text_encoder:
        return None
    from loom.models.text_encoder import resolve_text_dirs

    enc, tok = resolve_text_dirs(resolve_model_path(cfg.text_encoder, "text_encoder"), cfg.tokenizer)
    caps_sha = read_captions(cfg.captions)[1] if cfg.captions else None
    return {"encoder": os.path.abspath(enc), "tokenizer": os.path.abspath(tok), "encoder_digest": dir_digest(enc),
            "tokenizer_digest": dir_digest(tok), "max_length": cfg.text_max_length, "prompt": cfg.prompt,
            "captions": cfg.captions, "captions_sha256": caps_sha}


def image_params(cfg: CacheLatentsJob) -> dict | None:
    if not cfg.image_encoder:
        return None
    from loom.models.image_encoder import resolve_image_dirs

    enc, proc = resolve_image_dirs(resolve_model_path(cfg.image_encoder, "image_encoder"), cfg.image_processor)
    return {"encoder": os.path.abspath(enc), "processor": os.path.abspath(proc) if proc else None,
            "encoder_digest": dir_digest(enc), "processor_digest": dir_digest(proc) if proc else None}


def sample_config_hash(cfg: CacheLatentsJob, vae_digest: dict, text: dict | None, image: dict | None) -> str:
    """The hash of everything that decides what a sample holds: settings, and the encoders and captions by content."""
    doc = {"config": config_hash(cfg, exclude=NON_SAMPLE_FIELDS + TEXT_FIELDS + IMAGE_FIELDS), "vae": vae_digest}
    if text is not None:
        doc["text"] = {k: v for k, v in text.items() if k not in ("encoder", "tokenizer", "captions")}
    if image is not None:
        doc["image"] = {k: v for k, v in image.items() if k not in ("encoder", "processor")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def source_shards(source: str, kinds: tuple = (None, "ttv"),
                  takes: str = "latents are cached from turntable ('ttv') corpora") -> list[dict]:
    """The source's manifest shards (name, sha256, keys), refusing an unfinished corpus or one of another kind
    (``takes`` says what the job reads)."""
    m = shards.read_manifest(source)
    if m.get("kind") not in kinds:
        raise ValueError(f"source={source!r} holds a {m.get('kind')!r} corpus; {takes}")
    if not m.get("complete", False):
        raise ValueError(f"source={source!r} is unfinished ({len(m.get('missing_shards', []))} shard(s) missing): "
                         "rerun its render job to completion first, so the latent plan does not change later")
    return [{"name": s["name"], "sha256": s["sha256"], "keys": list(s["keys"])} for s in m["shards"]]


def job_spec(cfg: CacheLatentsJob) -> JobSpec:
    """The job: one task per source shard (output shard i <- source shard i, in manifest order). Checks the encoder
    folders, the captions file and the source before anything runs."""
    vae = vae_path(cfg.vae)
    vae_digest = dir_digest(vae)
    text, image = text_params(cfg), image_params(cfg)
    chash = sample_config_hash(cfg, vae_digest, text, image)
    params = {
        "vae": os.path.abspath(vae), "vae_digest": vae_digest, "passes": list(cfg.passes),
        "position_radius": cfg.position_radius, "frames": cfg.frames, "normalize": cfg.normalize, "partial": cfg.partial,
        "store_dtype": cfg.store_dtype, "dtype": cfg.dtype, "device": cfg.device, "batch": cfg.batch,
        "tiling": cfg.tiling, "threads": cfg.ray.cpus_per_worker, "config_hash": chash,
        "text": text, "image": image,
    }
    return cache_spec(cfg, KIND, ENTRY, params, chash, source_shards(cfg.source))


def cache_spec(cfg, kind: str, entry: str, params: dict, chash: str, sources: list[dict]) -> JobSpec:
    """A cache job (this module's, `loom.corpora.latents4d`'s): one task per source shard, output shard i <- source
    shard i in manifest order, each task reading its own source shard (no asset fetch)."""
    tasks = []
    for s in sources:
        url = shards.shard_url(cfg.source, s["name"])
        tasks.append(Task(key=s["name"].removesuffix(".tar"),
                          asset={"uid": s["name"], "source": url, "sha256": s["sha256"], "keys": s["keys"]},
                          params={**params, "shard": url, "shard_sha256": s["sha256"], "keys": s["keys"]}))
    return JobSpec(kind=kind, entry=entry, tasks=tasks, out=cfg.out, config=to_dict(cfg), config_hash=chash,
                   timeout_s=cfg.timeout_s, ray=cfg.ray, samples_per_shard=1,
                   env={"OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker)}, fetch=None, verb="cache")


# -------------------------------------------------------------------------------------------- sandbox entry


def video_input(name: str, a, position_radius: float = 1.0):
    """One pass of a decoded turntable sample, (T, H, W, 3) -> the VAE's input (3, T, H, W) float32 in [-1, 1]
    (the mapping is the model line's, `loom.models.ttv.vae_input`, so training and generation see the same)."""
    import numpy as np

    from loom.models.ttv import vae_input

    return vae_input(name, np.ascontiguousarray(a), position_radius).permute(3, 0, 1, 2)  # (3, T, H, W)


def partial_texture(key: str, sample: dict, idx: list):
    """One sample's cached partial texture: (known video, inpainting-mask video) (3, T, H, W) in [-1, 1] on the
    frames ``idx``, and what meta records of it. The training draw (`loom.models.ttv.partial_known`, always partial
    here: training picks the cache's partial texture with its own probability), from a generator seeded by the
    sample key, so a rerun writes the same latents; the render's known pass where the sample has one."""
    import numpy as np
    import torch

    from loom.models.ttv import partial_known

    g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
    rgb = video_input("rgb", sample["rgb"][idx]).permute(1, 2, 3, 0)[None]  # (1, T, H, W, 3)
    pos = torch.from_numpy(np.ascontiguousarray(sample["position"][idx], np.float32))[None]  # world, as training
    mask = torch.from_numpy(np.ascontiguousarray(sample["mask"][idx]))[None]
    visible = (torch.from_numpy(np.ascontiguousarray(sample["known"][idx]))[None] if "known" in sample else None)
    known_v, gen = partial_known(rgb, pos, mask, 1.0, [g], visible, 1.0)
    given = float((gen[0, 0] < 0).sum() / max(int(mask.sum()), 1))
    return known_v[0], gen[0], {"source": "render known pass" if visible is not None else "plane cut",
                                "known_fraction": given}


_STATE: dict = {}  # per sandbox process: slot -> (key, loaded encoder or captions), kept across tasks


def _cached(slot: str, key, build):
    if slot not in _STATE or _STATE[slot][0] != key:
        _STATE.pop(slot, None)  # free the old model before loading its replacement
        _STATE[slot] = (key, build())
    return _STATE[slot][1]


def _vae(p: dict):
    from loom.models.video_vae import load_video_vae

    def build():
        vae = load_video_vae(p["vae"], p["dtype"], p["device"])
        if p["tiling"]:
            vae.vae.enable_tiling()
        return vae

    return _cached("vae", (p["vae"], p["vae_digest"]["weights_sha256"], p["dtype"], p["device"], p["tiling"]), build)


def _text_encoder(p: dict):
    from loom.models.text_encoder import load_text_encoder

    t = p["text"]
    key = (t["encoder"], t["encoder_digest"]["weights_sha256"], t["tokenizer_digest"]["weights_sha256"],
           t["max_length"], p["dtype"], p["device"])
    return _cached("text", key, lambda: load_text_encoder(t["encoder"], p["dtype"], p["device"], t["tokenizer"],
                                                          t["max_length"]))


def _image_encoder(p: dict):
    from loom.models.image_encoder import load_image_encoder

    i = p["image"]
    key = (i["encoder"], i["encoder_digest"]["weights_sha256"], i["processor"], p["dtype"], p["device"])
    return _cached("image", key, lambda: load_image_encoder(i["encoder"], p["dtype"], p["device"], i["processor"]))


def _captions(t: dict) -> dict[str, str] | None:
    """The job's captions (uid -> caption; None without a captions file), read once per process; a file changed
    since the plan is refused."""
    from loom.platform.errors import TaskError

    if not t["captions"]:
        return None

    def build():
        if not storage.exists(t["captions"]):
            raise TaskError(f"captions file {t['captions']} does not exist (it did when the job was planned)")
        data = storage.read_bytes(t["captions"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != t["captions_sha256"]:
            raise TaskError(f"captions file {t['captions']} has sha256 {digest}, the job was planned with "
                            f"{t['captions_sha256']}: it changed; rerun into a new output folder")
        return parse_captions(data, t["captions"])

    return _cached("captions", (t["captions"], t["captions_sha256"]), build)


def sample_text(key: str, meta: dict, template: str, captions: dict[str, str] | None) -> tuple[str, str, list[str]]:
    """(text, where it came from: "captions" or "template", warnings) of one turntable sample."""
    uid = meta.get("uid")
    if captions is not None and uid in captions:
        return captions[uid], "captions", []
    warnings = [] if captions is None else [f"uid {uid!r} has no caption in the captions file; used the prompt "
                                            "template"]
    try:
        text = template.format_map({**meta, "key": key})
    except (KeyError, IndexError) as e:
        raise ValueError(f"prompt template {template!r} names {e}, which this sample's meta lacks") from None
    return text, "template", warnings


def _local_shard(url: str, sha: str, workdir: str) -> str:
    from loom.platform.errors import TaskError

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
    "failures": [{key, reason}], "warnings": [{key, warnings}], "frames": n, "timings": {...}}``."""
    import numpy as np
    import torch

    from loom.datasets.latents import npy
    from loom.datasets.ttv import decode_sample
    from loom.models.ttv import vae_frame_indices

    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(params.get("threads", 1))))
    text_p, image_p = params.get("text"), params.get("image")
    vae = _vae(params)
    text_enc = _text_encoder(params) if text_p else None
    image_enc = _image_encoder(params) if image_p else None
    captions = _captions(text_p) if text_p else None
    t_load = time.monotonic() - t0
    local = _local_shard(params["shard"], params["shard_sha256"], params["workdir"])
    store = np.dtype(params["store_dtype"])
    passes = params["passes"]
    decode_keys = (*passes, "mask") + (("rgb",) if image_p and "rgb" not in passes else ()) + (
        ("known",) if params.get("partial") else ())
    pending, failures, frames = [], [], 0  # pending: (key, files, meta, text or None, warnings)
    seen = []
    for key, files in shards.iter_tar(local):
        seen.append(key)
        try:
            s = decode_sample(files, keys=tuple(k for k in decode_keys if k != "known" or "known.npz" in files))
            t = s["mask"].shape[0]
            idx = vae_frame_indices(t, params["frames"], vae.temporal_factor)
            videos = [video_input(p, s[p][idx], params["position_radius"]) for p in passes]
            latents = []
            for i in range(0, len(videos), params["batch"]):
                latents += list(vae.encode(torch.stack(videos[i: i + params["batch"]]), params["normalize"]))
            partial = None
            if params.get("partial"):
                known_v, gen, partial = partial_texture(key, s, idx)
                latents += list(vae.encode(torch.stack([known_v, gen]), params["normalize"]))
            mask = vae.pool_mask(torch.from_numpy(s["mask"][idx]))  # (T', H', W')
            # Frame 0 is the first frame under every frame policy, and the one Wan's I2V pipeline conditions on.
            image = image_enc.encode(s["rgb"][:1])[0] if image_enc is not None else None  # (L_img, D_img)
            text, text_from, warnings = (sample_text(key, s["meta"], text_p["prompt"], captions) if text_p
                                         else (None, None, []))
        except (ValueError, KeyError, RuntimeError) as e:
            failures.append({"key": key, "reason": f"{type(e).__name__}: {e}"})
            continue
        names = [*passes, *(("known", "inpaint") if partial else ())]
        out = {f"{p}_latent.npy": npy(z.cpu().numpy().astype(store)) for p, z in zip(names, latents, strict=True)}
        out["mask_latent.npy"] = npy(mask.numpy().astype(store))
        if image is not None:
            out["image_embed.npy"] = npy(image.numpy().astype(store))
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
            "warnings": warnings,
        }
        if partial:
            meta["latents"]["partial"] = partial
        if image_enc is not None:
            meta["latents"]["image_encoder"] = {
                "path": image_p["encoder"], "processor": image_p["processor"], "class": type(image_enc.model).__name__,
                **{f"encoder_{k}": v for k, v in image_p["encoder_digest"].items()},
                "processor_digest": image_p["processor_digest"], "dim": image_enc.dim, "tokens": image_enc.tokens,
                "image_size": image_enc.image_size, "features": "hidden_states[-2] (penultimate layer, all tokens)",
                "preprocessing": image_enc.preprocessing, "frame": 0,
            }
        pending.append((key, out, meta, text, text_from))
        frames += len(idx)
    t_text = time.monotonic()
    if text_enc is not None and pending:
        _add_text(pending, text_enc, text_p, store)
    samples = []
    for key, out, meta, _, _ in pending:
        out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append((key, out))
    missing = [k for k in params["keys"] if k not in seen]
    failures += [{"key": k, "reason": "not in the source shard (its manifest lists it)"} for k in missing]
    warnings = [{"key": k, "warnings": m["latents"]["warnings"]} for k, _, m, _, _ in pending
                if m["latents"]["warnings"]]
    return {"samples": samples, "failures": failures, "warnings": warnings, "frames": frames,
            "timings": {"load": t_load, "text": time.monotonic() - t_text, "task": time.monotonic() - t0}}


def _add_text(pending: list, text_enc, text_p: dict, store) -> None:
    """Encode the distinct texts of a shard's samples in batches and add ``text_embed.npy`` and the text meta to
    each: one umT5 pass per distinct text (a template without per-sample fields is encoded once per shard)."""
    from loom.datasets.latents import npy
    from loom.models.text_encoder import cleaning, prompt_clean

    texts = list(dict.fromkeys(text for _, _, _, text, _ in pending))
    embeds, counts = {}, {}
    for i in range(0, len(texts), TEXT_BATCH):
        chunk = texts[i: i + TEXT_BATCH]
        embeds.update(zip(chunk, text_enc.encode(chunk), strict=True))  # each (L, D), real tokens only
        counts.update(zip(chunk, text_enc.count_tokens(chunk), strict=True))
    info = {"path": text_p["encoder"], "tokenizer": text_p["tokenizer"], "class": "UMT5EncoderModel",
            **{f"encoder_{k}": v for k, v in text_p["encoder_digest"].items()},
            **{f"tokenizer_{k}": v for k, v in text_p["tokenizer_digest"].items()},
            "dim": text_enc.dim, "max_length": text_enc.max_length, "features": "last_hidden_state",
            "cleaning": cleaning(), "template": text_p["prompt"], "captions": text_p["captions"],
            "captions_sha256": text_p["captions_sha256"],
            "padding": f"none: the real tokens only; pad with zero rows to max_length ({text_enc.max_length}) as "
                       "Wan does"}
    for _, out, meta, text, text_from in pending:
        z = embeds[text]
        out["text_embed.npy"] = npy(z.numpy().astype(store))
        truncated = counts[text] > text_enc.max_length
        if truncated:
            meta["latents"]["warnings"].append(f"text has {counts[text]} tokens; truncated to {text_enc.max_length}")
        meta["latents"]["text_encoder"] = info
        meta["latents"]["text"] = {"prompt": prompt_clean(text), "from": text_from, "tokens": int(z.shape[0]),
                                   "truncated": truncated}


def run_cache(spec: JobSpec, *, progress: bool = True, retry_failed: bool = False) -> Summary:
    """Encode every unfinished shard of the plan: Loom's one job mechanism (``loom.platform.jobs.run_job``) with
    no asset fetch (each task reads its source shard) and multi-sample task results."""
    return run_job(spec, progress=progress, retry_failed=retry_failed)
