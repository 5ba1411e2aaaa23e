"""``loom eval ttv``: TAPESTRY Tab. 1, generated turntable videos against the ground-truth renders.

Protocol. For every sample of the ground-truth turntable shards (``gt``, manifest order, the first ``limit``), the
prediction is ``pred/<key>.mp4`` (or ``.mkv``, ``.webm``, ...) or, with ``run``, the video that the trained run
generates from the sample's condition renders (normal, position, mask) and its first frame, as ``loom generate
ttv`` does, written losslessly to ``<out>/pred/<key>.mkv`` (FFV1) and read back (so ``--pred <out>/pred`` gives
the same numbers).
The prediction must have the ground truth's frame count and size: ``frames``/``size`` subsample and crop-resize the
ground truth as training does (with ``run``: the run's ``data.frames``/``data.size``); any other mismatch is
refused. Per item (video), over its frames:

- **PSNR**: the mean over frames of the per-frame PSNR (:func:`loom.eval.metrics.psnr`), each frame capped at
  ``psnr_cap`` dB (default 100). An identical frame has infinite PSNR by definition; the cap keeps the mean finite
  and loggable (an identical video scores exactly ``psnr_cap``). Real predictions are far below it.
- **SSIM** (:func:`loom.eval.metrics.ssim`, Gaussian window, valid region) and **LPIPS** (alex by default) are
  means over frames.

The benchmark values are means over items; **FVD** (:func:`loom.eval.metrics.fvd`) is computed from streaming I3D
statistics of all predicted and all ground-truth videos (it needs at least 2 videos of at least 9 frames; leave it
out with ``--set metrics=[psnr,ssim,lpips]`` otherwise).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from loom.eval.benchmarks import (check_eval_ray, eval_ray, EvalTracking, FeatureSettings, Features, Generated, find_video,
                                  merge_stats, read_video, run_parts, to_unit, warn_if_tiny, where, write_media)
from loom.platform.ray import RaySettings
from loom.platform.config import config, field, recipe, require

METRICS = ("psnr", "ssim", "lpips", "fvd")


@config
class TTVTracking(EvalTracking):
    experiment: str = field("bench/ttv", help="MLflow experiment (`loom leaderboard ttv` reads it)")


@config
class EvalTTVJob:
    gt: str = field("", help="ground truth: turntable shards (a `loom render ttv` output folder, a shard or a URL)")
    pred: str = field("", help="predictions: a folder of <key>.mp4 (or .mkv/.webm) videos, one per ground-truth key")
    run: str = field("", help="or a `loom train ttv` run folder: generate the predictions into <out>/pred")
    out: str = field("out/eval-ttv", help="output folder: config.yaml, metrics.json, items.csv, media/ (and pred/)")
    model: str = field("", help="model name in the leaderboard (default: the run's or the pred folder's name)")
    metrics: tuple[str, ...] = field(METRICS, help="metrics to compute, of psnr, ssim, lpips, fvd")
    limit: int = field(0, help="evaluate the first N ground-truth samples (0 = all)")
    frames: int = field(0, help="subsample the ground truth to N frames, evenly (0 = all; with run: the run's)")
    size: int = field(0, help="centre-crop and resize the ground truth to N x N (0 = as stored; with run: the run's)")
    psnr_cap: float = field(100.0, help="per-frame PSNR cap in dB (identical frames have infinite PSNR)")
    media: int = field(4, help="side-by-side pred | gt samples logged (the first N items)")
    steps: int = field(0, help="with run: sampler steps (0 = the run's flow.sample_steps)")
    seed: int = field(0, help="with run: noise seed of the generation")
    features: FeatureSettings = field(default_factory=FeatureSettings, help="feature networks (LPIPS, I3D)")
    ray: RaySettings = field(default_factory=eval_ray, help="Ray: workers sharing the samples (1 = in this process)")
    tracking: TTVTracking = field(default_factory=TTVTracking, help="MLflow")

    def __post_init__(self):
        check_eval_ray(self.ray)
        unknown = sorted(set(self.metrics) - set(METRICS))
        require(not unknown and len(self.metrics) > 0, "metrics", list(self.metrics), f"choose from {list(METRICS)}")
        require(not (self.pred and self.run), "pred", self.pred, "give predictions (pred) or a run, not both")
        for name in ("limit", "frames", "size", "media", "steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.psnr_cap > 0, "psnr_cap", self.psnr_cap, "must be positive")


@recipe(EvalTTVJob, "default", help="TAPESTRY Tab. 1 with the real feature networks (LPIPS alex, I3D Kinetics-400)")
def _default() -> EvalTTVJob:
    return EvalTTVJob()


@recipe(EvalTTVJob, "tiny", help="tiny random LPIPS and I3D on CPU: runs without weights, NOT comparable (tests)")
def _tiny() -> EvalTTVJob:
    return EvalTTVJob(features=FeatureSettings(networks="tiny-random", device="cpu"))


PRED_EXT = "mkv"  # a run's predictions: FFV1, lossless (see RunGenerator)


class RunGenerator:
    """The predictions of a trained run: the run is loaded once (:func:`loom.inference.ttv.load_run`); each video is
    made exactly as :func:`loom.inference.ttv.generate_ttv` makes it (condition batch, noise seed, decode) and written
    LOSSLESSLY (FFV1 ``.mkv``), so the metrics score the model's frames: ``generate_ttv``'s H.264 file is for people,
    and libx264's rate control is not bit-stable from one process state to another (the same frames came out as
    different files after other work had run), which would move the numbers between two evaluations."""

    def __init__(self, run: str, steps: int, seed: int):
        from loom.inference.ttv import load_run

        self.model = load_run(run, steps=steps or None)
        self.transform = self.model.transform()
        self.seed = seed

    def __call__(self, sample: dict[str, Any], path: str) -> str:
        from loom.datasets.codecs import encode_video
        from loom.inference.ttv import condition_batch

        _, data = encode_video(self.model.video(condition_batch(sample, self.transform), self.seed), "ffv1")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path


def evaluate_part(cfg: EvalTTVJob, rank: int, parts: int) -> dict[str, Any]:
    """The samples ``rank``, ``rank + parts``, ... of the benchmark (see :func:`loom.eval.benchmarks.run_parts`):
    their rows, their FVD statistics, media and the keys without a prediction."""
    from loom.datasets.transforms import frame_transform
    from loom.datasets.ttv import iter_samples
    from loom.eval.metrics import lpips, psnr, ssim
    from loom.eval.metrics.fvd import video_stats

    out = os.path.abspath(cfg.out)
    features = Features(cfg.features)
    frames, size, gen = cfg.frames, cfg.size, None
    pred_dir = cfg.pred
    done = None
    if cfg.run:
        gen = RunGenerator(cfg.run, cfg.steps, cfg.seed)
        frames = frames or gen.model.frames
        size = size or gen.model.size
        pred_dir = os.path.join(out, "pred")
        os.makedirs(pred_dir, exist_ok=True)
        done = Generated(pred_dir, cfg.run, bench="ttv", steps=cfg.steps, seed=cfg.seed)
    transform = frame_transform(frames, size)
    media_dir = os.path.join(out, "media")
    keys = ("rgb", "normal", "position", "mask") if gen else ("rgb",)
    items, media, missing = [], [], []
    stats_pred = stats_gt = None
    for s in iter_samples(cfg.gt, keys=keys, part=(rank, parts)):
        i, key = s["__index__"], s["__key__"]
        if cfg.limit and i >= cfg.limit:
            break
        if gen is not None:
            path = os.path.join(pred_dir, f"{key}.{PRED_EXT}")
            if not (done.has(key) and os.path.exists(path)):  # an earlier evaluation's, same run and settings
                done.forget(key)
                path = gen(s, path)
                done.mark(key)
                print(f"generated {path}", flush=True)
        else:
            path = find_video(pred_dir, key)
            if path is None:
                missing.append((i, key))
                continue
        gt_s = transform({"rgb": s["rgb"]}, np.random.default_rng(0)) if transform is not None else s
        gt_v, pred_v = gt_s["rgb"], read_video(path)
        if pred_v.shape != gt_v.shape:
            raise ValueError(f"{path}: prediction of (T,H,W,C)={pred_v.shape} but the ground truth {key} is "
                             f"{gt_v.shape}: evaluate at one size (--set frames=N / --set size=N subsample and "
                             "crop-resize the ground truth as training does)")  # fmt: skip
        p, g = to_unit(pred_v), to_unit(gt_v)  # (T,3,H,W)
        row: dict[str, Any] = {"key": key, "frames": int(gt_v.shape[0]), "height": int(gt_v.shape[1]),
                               "width": int(gt_v.shape[2])}
        if "psnr" in cfg.metrics:
            row["psnr"] = float(psnr(p, g, reduction="none").clamp(max=cfg.psnr_cap).mean())
        if "ssim" in cfg.metrics:
            row["ssim"] = ssim(p, g)
        if "lpips" in cfg.metrics:
            row["lpips"] = lpips(p, g, network=features.get("lpips"), batch_size=cfg.features.batch_size)
        if "fvd" in cfg.metrics:
            i3d = features.get("i3d")
            sp, sg = video_stats(p[None], i3d, 1), video_stats(g[None], i3d, 1)
            stats_pred = sp if stats_pred is None else stats_pred.merge(sp)
            stats_gt = sg if stats_gt is None else stats_gt.merge(sg)
        if i < cfg.media:
            media += write_media(media_dir, key, pred_v, gt_v)
        items.append((i, row))
    return {"items": items, "missing": missing, "media": media, "stats": (stats_pred, stats_gt), "frames": frames,
            "size": size, "reused": done.reused if done else 0}


def evaluate(cfg: EvalTTVJob) -> dict[str, Any]:
    """Run the benchmark, write ``cfg.out``, log the MLflow run; returns :func:`loom.eval.record.finish`'s dict."""
    from loom.eval.metrics.fvd import fvd_from_stats
    from loom.eval.record import Evaluation, finish

    if not cfg.gt:
        raise ValueError("no ground truth: pass --gt SHARDS (turntable shards from `loom render ttv`)")
    if not (cfg.pred or cfg.run):
        raise ValueError("no predictions: pass --pred FOLDER (<key>.mp4 per ground-truth key) or --run TRAIN_RUN")
    out = os.path.abspath(cfg.out)
    features = Features(cfg.features)
    nets = [net for metric, net in (("lpips", "lpips"), ("fvd", "i3d")) if metric in cfg.metrics]
    features.check(nets)  # missing weights stop the job before any generation
    warn_if_tiny(features)
    media_dir = os.path.join(out, "media")
    if os.path.isdir(media_dir):
        for name in os.listdir(media_dir):  # media of an earlier evaluation into the same folder
            os.remove(os.path.join(media_dir, name))
    pred_dir = os.path.join(out, "pred") if cfg.run else cfg.pred

    parts = run_parts(evaluate_part, cfg, cfg.ray)
    items = [row for _, row in sorted(i_row for p in parts for i_row in p["items"])]
    missing = [key for _, key in sorted(i_key for p in parts for i_key in p["missing"])]
    media = [m for p in parts for m in p["media"]]
    frames, size = parts[0]["frames"], parts[0]["size"]
    Generated.report(parts, pred_dir)
    if missing:
        raise FileNotFoundError(f"{pred_dir} has no video for {len(missing)} ground-truth key(s): "
                                f"{missing[:8]}{' ...' if len(missing) > 8 else ''} (expected <key>.mp4 or .mkv)")
    if not items:
        raise ValueError(f"no samples in {cfg.gt}")
    metrics = {m: float(np.mean([r[m] for r in items])) for m in ("psnr", "ssim", "lpips") if m in cfg.metrics}
    if "fvd" in cfg.metrics:
        if len(items) < 2:
            raise ValueError("FVD needs at least 2 videos (a covariance); evaluate more samples or drop it with "
                             "--set metrics=[psnr,ssim,lpips]")
        metrics["fvd"] = fvd_from_stats(merge_stats(*(p["stats"][0] for p in parts)),
                                        merge_stats(*(p["stats"][1] for p in parts)))
    metrics["items"] = float(len(items))
    model = cfg.model or os.path.basename(os.path.abspath(cfg.run or cfg.pred).rstrip("/"))
    notes = [f"PSNR: per-frame values capped at {cfg.psnr_cap:g} dB, then averaged"]
    if frames or size:
        notes.append(f"ground truth subsampled to {frames or 'all'} frames, size {size or 'as stored'}")
    if cfg.ray.workers > 1:
        notes.append(f"evaluated on {cfg.ray.workers} workers")
    ev = Evaluation(benchmark="ttv", model=model, config=cfg, out=out, metrics=metrics, items=items, media=media,
                    params={"checkpoint": where(cfg.run), "predictions": where(pred_dir), "data": where(cfg.gt)},
                    notes=notes)
    return finish(ev, cfg.tracking, features)
