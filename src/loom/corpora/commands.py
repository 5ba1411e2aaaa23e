"""``loom render ...``, ``loom cache ...``, ``loom prep ...`` and ``loom assets ...``."""

from __future__ import annotations

import argparse
import sys

from loom.corpora.base import job_spec
from loom.corpora.scene import RenderSceneJob
from loom.corpora.shape4d import Render4DJob
from loom.corpora.ttv import RenderTTVJob
from loom.platform.command import add_job_args, run_job_command


# kind -> (its root config class, a loom.corpora.base.RenderJob; help; extra options {flag: (config field, help)})
_ASSETS_HELP = "asset source: bundled | FOLDER/URL | MANIFEST.jsonl | objaverse:... (default from the recipe)"
JOBS = {
    "ttv": (RenderTTVJob, "turntable videos with normal/position/depth/mask passes (TAPESTRY)",
            {"--assets": ("assets", _ASSETS_HELP)}),
    "4d": (Render4DJob,
           "animated 4D sequences: watertight surfaces, SDF, aligned query points, conditioning video (ShapeGen4D)",
           {"--assets": ("assets", _ASSETS_HELP.replace("bundled", "bundled-animated"))}),
    "scene": (RenderSceneJob,
              "scene videos along a camera trajectory: edges, geometric flow, warped noise (VideoFrom3D)",
              {"--scene": ("scene", "scene file (.glb/.gltf/.obj/.blend) or 'bundled-scene'"),
               "--trajectory": ("trajectory", "camera keyframes (.yaml/.json) or the preset 'orbit'")}),
}


def print_summary(summary, out: str) -> None:
    """The end of a render or cache job: counts, the first failures and where the rest are."""
    print(summary.line())
    for f in summary.failures[:20]:
        print(f"  failed {f['key']}: {f['reason'].splitlines()[0]}")
    if summary.failed > 20:
        print(f"  ... {summary.failed - 20} more in {out}/failures.jsonl")


def cmd_render(args: argparse.Namespace) -> int:
    _, _, extra = JOBS[args.kind]
    direct = {fld: getattr(args, flag.lstrip("-")) for flag, (fld, _) in extra.items()}
    return run_job_command(args, lambda cfg: render_corpus(cfg, args), out=args.out, **direct)


def render_corpus(cfg, args: argparse.Namespace) -> None:
    from loom.corpora.assets import resolve_source
    from loom.platform.jobs import estimate, run_job

    source = getattr(cfg, cfg.SOURCE)
    records = resolve_source(source)
    if getattr(cfg, "limit", None):
        records = records[: cfg.limit]
    if not records:
        raise ValueError(f"asset source {source!r} has no assets")
    spec = job_spec(cfg, records)
    if args.assets_total is not None and not args.dry_run:
        raise ValueError("--assets-total prices a corpus: use it with --dry-run")
    if args.dry_run:
        print(f"plan for {len(records)} asset(s) -> {len(spec.tasks)} task(s) -> {cfg.out}")
        print(estimate(spec, calibrate=not args.no_calibrate, assets_total=args.assets_total,
                       assets_here=len(records), price=cfg.price).report())
        return
    print(f"rendering {len(spec.tasks)} {args.kind} sample(s) of {len(records)} asset(s) into {cfg.out}",
          file=sys.stderr)
    summary = run_job(spec, progress=not args.no_progress, retry_failed=args.retry_failed)
    print_summary(summary, cfg.out)
    unsupported = [r.path for r in records if not r.supported]  # named on every run, reruns included
    if unsupported:
        print(f"  not rendered: {len(unsupported)} file(s) of mesh formats Loom does not import, convert them to "
              f".glb (failure rows in {cfg.out}/failures.jsonl): {', '.join(unsupported[:10])}"
              + (" ..." if len(unsupported) > 10 else ""))
    for w in summary.warnings[:10]:
        print(f"  warning {w['key']}: {'; '.join(w['warnings'])}")
    print(f"shards:   {cfg.out}/shards  (manifest {cfg.out}/manifest.json)")
    print(f"look:     loom shards inspect {cfg.out}    verify: loom shards verify {cfg.out}")


def cmd_assets_list(args: argparse.Namespace) -> int:
    from loom.corpora.assets import resolve_source, write_manifest

    records = resolve_source(args.source)
    for r in records:
        print(f"{r.uid:40s} {r.format:5s} {r.size:>10d}  {r.license:14s} {r.sha256[:12]}  {r.path}")
    print(f"{len(records)} asset(s)", file=sys.stderr)
    if args.manifest:
        write_manifest(records, args.manifest)
        print(f"wrote {args.manifest}", file=sys.stderr)
    return 0


# --set examples shown in each render command's help (tests resolve each against its job)
RENDER_EXAMPLES = {"ttv": "orbit.frames=61", "4d": "sequence.frames=16", "scene": "render.samples=64"}
RENDER_INTERRUPTED = "finished shards in {out}/shards are kept: the same command renders only the rest"


def register(sub) -> None:
    render = sub.add_parser("render", help="render a corpus into WebDataset shards").add_subparsers(
        dest="kind", metavar="KIND")
    for kind, (job_cls, text, extra) in JOBS.items():
        p = render.add_parser(kind, help=text)
        for flag, (_, help_text) in extra.items():
            p.add_argument(flag, help=help_text)
        p.add_argument("--out", help="output folder or fsspec URL (default from the recipe)")
        add_job_args(p, job_cls, example=RENDER_EXAMPLES[kind], interrupted=RENDER_INTERRUPTED)
        p.add_argument("--dry-run", action="store_true", help="print tasks, frames, size and cost; render "
                       "nothing but one short calibration")
        p.add_argument("--no-calibrate", action="store_true", help="with --dry-run: skip the calibration render")
        add_assets_total(p)
        p.add_argument("--retry-failed", action="store_true", help="redo shards that recorded failures")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_render)

    register_cache(sub)
    register_prep(sub)

    assets = sub.add_parser("assets", help="asset sources and manifests").add_subparsers(dest="acmd", metavar="CMD")
    a = assets.add_parser("list", help="list the assets of a source; optionally write its manifest")
    a.add_argument("source", help="bundled | FOLDER/URL | MANIFEST.jsonl | objaverse:...")
    a.add_argument("--manifest", help="write the asset manifest (JSON lines) here")
    a.set_defaults(func=cmd_assets_list)


# ------------------------------------------------------------------------------------------------------ CLI


def cmd_cache_latents(args) -> int:
    return run_job_command(args, lambda cfg: cache_latents(cfg, args), source=args.source, out=args.out,
                           vae=args.vae, text_encoder=args.text_encoder, image_encoder=args.image_encoder,
                           captions=args.captions)


def cache_latents(cfg, args) -> None:
    from loom.corpora.latents import job_spec

    extra = "".join(f", the {what} encoder in {d}" for what, d in (("text", cfg.text_encoder),
                                                                    ("image", cfg.image_encoder)) if d)
    run_cache_job(cfg, args, job_spec(cfg), "sample(s)", f"with the VAE in {cfg.vae}{extra}")


def run_cache_job(cfg, args, spec, unit: str, encoders: str, then: str = "") -> None:
    """A cache job's command (`loom cache latents`, `loom cache 4d`): --dry-run prints the plan, else run it and
    print the summary, the shards and ``then``."""
    from loom.platform.jobs import run_job

    n = sum(len(t.asset["keys"]) for t in spec.tasks)
    if args.assets_total is not None and not args.dry_run:
        raise ValueError("--assets-total prices a corpus: use it with --dry-run")
    if args.dry_run:
        print(f"plan: {n} {unit} in {len(spec.tasks)} source shard(s) of {cfg.source} -> {cfg.out}")
        if not args.no_calibrate:
            from loom.platform.jobs import estimate

            # a corpus's assets: its sample keys are <uid>_v<variant> (render jobs' build_tasks)
            here = len({k.rsplit("_v", 1)[0] for t in spec.tasks for k in t.asset["keys"]})
            print(estimate(spec, assets_total=args.assets_total, assets_here=here, price=getattr(cfg, "price", None),
                           unit="sample", units_of=lambda t: len(t.asset["keys"])).report())
        return
    print(f"encoding {n} {unit} of {cfg.source} {encoders} into {cfg.out}", file=sys.stderr)
    summary = run_job(spec, progress=not args.no_progress, retry_failed=args.retry_failed)
    print_summary(summary, cfg.out)
    print(f"shards:   {cfg.out}/shards  (manifest {cfg.out}/manifest.json)")
    if then:
        print(then)


def add_assets_total(p) -> None:
    p.add_argument("--assets-total", type=positive_int, metavar="N",
                   help="with --dry-run: price a corpus of N assets (frames, TB per encoding, core-hours, GPU-hours, "
                   "cost at the config's price.*) from a calibration on the assets at hand")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return n


def add_cache_flags(p, checks: str = "the encoders and source") -> None:
    """The flags every cache command shares: --dry-run, --retry-failed, --no-progress."""
    p.add_argument("--dry-run", action="store_true", help=f"check {checks}, print the plan and its price from "
                   "one calibration shard (encoded in a temporary folder); write nothing")
    p.add_argument("--no-calibrate", action="store_true", help="with --dry-run: the plan only, no calibration")
    add_assets_total(p)
    p.add_argument("--retry-failed", action="store_true", help="redo shards that recorded failures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register_cache(sub) -> None:
    """``loom cache latents`` (turntables, the video VAE) and ``loom cache 4d`` (4D corpora, the shape VAE)."""
    from loom.corpora.latents import CacheLatentsJob

    cache = sub.add_parser("cache", help="precompute model inputs (latents) from a corpus").add_subparsers(
        dest="ccmd", metavar="WHAT")
    p = cache.add_parser("latents", help="encode a turntable corpus with the frozen video VAE (and text and image "
                         "encoders) into latent shards")
    p.add_argument("--source", help="Loom output folder of a finished turntable job (default from the recipe)")
    p.add_argument("--out", help="output folder or fsspec URL (default from the recipe)")
    p.add_argument("--vae", help="local diffusers AutoencoderKLWan folder (e.g. <Wan2.1 checkpoint>/vae)")
    add_job_args(p, CacheLatentsJob, example="ray.workers=2",
                 interrupted="finished latent shards in {out}/shards are kept: the same command encodes only the rest")
    p.add_argument("--text-encoder", help="local umT5 encoder folder (e.g. <Wan2.1 checkpoint>/text_encoder): adds "
                   "text embeddings")
    p.add_argument("--image-encoder", help="local CLIP vision folder (e.g. <Wan2.1 I2V checkpoint>/image_encoder): "
                   "adds first-frame image embeddings")
    p.add_argument("--captions", help="captions file: .jsonl rows {uid, caption} or a .json object uid -> caption")
    add_cache_flags(p, "the encoders, captions and source")
    p.set_defaults(func=cmd_cache_latents)

    from loom.corpora.latents4d import Cache4DJob

    p = cache.add_parser("4d", help="encode a 4D corpus with the frozen shape VAE and DINOv2 (ShapeGen4D's frozen "
                         "encoders) into latent shards that `loom train shape4d` reads")
    p.add_argument("--source", help="Loom output folder of a finished `loom render 4d` job (default from the recipe)")
    p.add_argument("--out", help="output folder or fsspec URL (default from the recipe)")
    p.add_argument("--vae", help="the shape VAE: the Step1X-3D-Geometry-1300m folder, a `loom train vae` OUT/vae, or "
                   "'tiny'")
    p.add_argument("--image-encoder", help="DINOv2 folder (facebook/dinov2-with-registers-large), or 'tiny'")
    add_job_args(p, Cache4DJob, example="ray.workers=2",
                 interrupted="finished latent shards in {out}/shards are kept: the same command encodes only the rest")
    add_cache_flags(p)
    p.set_defaults(func=cmd_cache_4d)

    from loom.corpora.latents_ggi import CacheGGIJob

    p = cache.add_parser("ggi", help="encode clips or scenes with the frozen CogVideoX VAE (and T5) into latent "
                         "shards that `loom train ggi` reads (VideoFrom3D's GGI)")
    p.add_argument("--source", help="Loom output folder of a finished `loom prep videos` or `loom render scene` job")
    p.add_argument("--out", help="output folder or fsspec URL (default from the recipe)")
    p.add_argument("--vae", help="the CogVideoX VAE folder (<CogVideoX-5B-I2V>/vae), or 'tiny'")
    p.add_argument("--text-encoder", help="CogVideoX's T5 (the checkpoint folder): adds text embeddings")
    add_job_args(p, CacheGGIJob, example="ray.workers=2",
                 interrupted="finished latent shards in {out}/shards are kept: the same command encodes only the rest")
    add_cache_flags(p)
    p.set_defaults(func=cmd_cache_ggi)


def cmd_cache_ggi(args) -> int:
    return run_job_command(args, lambda cfg: cache_ggi(cfg, args), source=args.source, out=args.out, vae=args.vae,
                           text_encoder=args.text_encoder)


def cache_ggi(cfg, args) -> None:
    from loom.corpora.latents_ggi import job_spec

    run_cache_job(cfg, args, job_spec(cfg), "clip(s)", f"with the VAE {cfg.vae}"
                  + (f" and T5 {cfg.text_encoder}" if cfg.text_encoder else ""),
                  f"train:    loom train ggi --set data.source={cfg.out} (model.vae and model.text_encoder as here)")


def cmd_cache_4d(args) -> int:
    return run_job_command(args, lambda cfg: cache_4d(cfg, args), source=args.source, out=args.out, vae=args.vae,
                           image_encoder=args.image_encoder)


def cache_4d(cfg, args) -> None:
    from loom.corpora.latents4d import job_spec

    run_cache_job(cfg, args, job_spec(cfg), "sequence(s)",
                  f"with the shape VAE {cfg.vae} and DINOv2 {cfg.image_encoder}",
                  f"train:    loom train shape4d --set data.source={cfg.out} (model.vae and model.image_encoder as "
                  "here)")


# ------------------------------------------------------------------------------------------------------ prep


def register_prep(sub) -> None:
    """``loom prep videos``: real videos -> GGI training clips (`loom.corpora.videos`)."""
    from loom.corpora.videos import PrepVideosJob

    prep = sub.add_parser("prep", help="turn real data into training samples").add_subparsers(
        dest="pcmd", metavar="WHAT")
    p = prep.add_parser("videos", help="videos or frame folders (DL3DV-10K) -> clips with optical flow, warped noise, "
                        "depth, edges of depth and a caption (VideoFrom3D's GGI training data)")
    p.add_argument("--videos", help="a video file, or a folder / fsspec URL of videos (mp4, mov, webm, ...) and frame "
                   "folders (<scene>/images*/frame_*.png)")
    p.add_argument("--out", help="output folder or fsspec URL (default from the recipe)")
    add_job_args(p, PrepVideosJob, example="clip.clips_per_video=4",
                 interrupted="finished shards in {out}/shards are kept: the same command prepares only the rest")
    p.add_argument("--dry-run", action="store_true", help="list the videos and print the plan; prepare nothing")
    p.add_argument("--retry-failed", action="store_true", help="redo shards that recorded failures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prep_videos)


def cmd_prep_videos(args) -> int:
    return run_job_command(args, lambda cfg: prep_videos(cfg, args), videos=args.videos, out=args.out)


def prep_videos(cfg, args) -> None:
    from loom.corpora.videos import find_sources, job_spec
    from loom.platform.jobs import run_job

    sources = find_sources(cfg.videos, frame_folder=cfg.clip.frame_folder, default_license=cfg.license)
    if cfg.limit:
        sources = sources[: cfg.limit]
    if not sources:
        raise ValueError(f"--videos {cfg.videos} holds no videos ({', '.join(('mp4', 'mov', 'webm', 'mkv', 'avi'))}) "
                         "and no frame folders (two or more .png/.jpg in one folder)")
    spec = job_spec(cfg, sources)
    kinds = {k: sum(s["kind"] == k for s in sources) for k in ("video", "frames")}
    what = f"{kinds['video']} video file(s) and {kinds['frames']} frame folder(s)"
    if args.dry_run:
        print(f"plan: {what} -> {len(spec.tasks)} clip(s) of {cfg.clip.frames} frames at {cfg.clip.width}x"
              f"{cfg.clip.height} -> {cfg.out}")
        return
    print(f"preparing {len(spec.tasks)} clip(s) of {what} into {cfg.out}", file=sys.stderr)
    if not cfg.depth.model:
        print("  depth.model is not set: depth is the classical stand-in (median-filtered luminance, not depth), "
              "for smoke runs only", file=sys.stderr)
    summary = run_job(spec, progress=not args.no_progress, retry_failed=args.retry_failed)
    print_summary(summary, cfg.out)
    print(f"shards:   {cfg.out}/shards  (manifest {cfg.out}/manifest.json)")
    print(f"look:     loom shards inspect {cfg.out}    verify: loom shards verify {cfg.out}")
