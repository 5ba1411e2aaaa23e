"""``loom eval texture``: TAPESTRY Tab. 2, FID, KID, CLIP-S and LPIPS on multi-view renders of generated textures.

Inputs are two folders of images (``.png``, ``.jpg``, ...; any depth, e.g. ``<asset>/<view>.png``): the renders of
the generated textures (``pred``) and of the ground-truth textures (``gt``) from the same cameras. Every predicted
image is paired with the ground-truth image at the same relative path (the stem decides, so ``a/000.png`` pairs
with ``a/000.jpg``); an unpaired image on either side is refused. The ground truth may also be turntable shards
(``loom render ttv``): their frames, subsampled and resized by ``frames``/``size`` as training does, are written
as ``<out>/gt/<key>/<frame>.png`` (``000.png``, ``001.png``, ...) and paired the same way. Images are read as
RGB (an alpha channel is dropped: render both sides over one background).

- **FID** (:func:`loom.eval.metrics.fid`): Frechet distance of the Inception pool3 statistics of all predicted
  against all ground-truth images, streamed.
- **KID** (:func:`loom.eval.metrics.kid`): the mean over ``kid_subsets`` subsets of ``kid_subset_size`` images
  (0: min(1000, images), logged) and its standard deviation as ``kid_std``. The leaderboard shows KID x 10^3 as
  TAPESTRY Tab. 2 does.
- **CLIP-S**: per pair, the cosine similarity of the CLIP image embeddings of the prediction and its ground truth,
  clamped at 0 (:func:`loom.eval.metrics.clip_score` with ``reference=``, divided by its scale of 100), averaged.
  This is the image-to-image form, on the papers' [0, 1] scale (TAPESTRY reports 0.89-0.95).
- **LPIPS** (:func:`loom.eval.metrics.lpips`, the network of ``features.lpips_net``): per pair, averaged.

From a checkpoint (``run``, a ``loom train ttv`` run folder; ``gt`` is then turntable shards): each ground-truth
turntable is generated as ``loom eval ttv --run`` generates it (the same condition, seed and sampler; the ground
truth gets the run's frame subsampling and size), and the frames of the generated and of the ground-truth video
are the multi-view renders, written as ``<out>/pred/<key>/<frame>.png`` and ``<out>/gt/<key>/<frame>.png`` and
then evaluated as above: the views as the video model made them.

The textured asset (``run`` and ``assets``, TAPESTRY Tab. 2 as the paper scores it): each asset of ``assets`` is
rendered on a held-out orbit (``views`` frames at ``view_height``, above the texturing orbit; its own materials),
textured from its geometry by ``loom texture --run`` (``stages``, ``texture_resolution``; timed: the ``seconds``
column and the ``time_s`` metric, with ``coverage``), and the textured mesh is rendered on the same held-out orbit,
with the same light: ``<out>/gt/<uid>/`` and ``<out>/pred/<uid>/``, scored as above; the textured assets stay in
``<out>/textured/<uid>/``.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from typing import Any

import numpy as np

from loom.eval.benchmarks import (check_eval_ray, eval_ray, IMAGE_EXTS, EvalTracking, Features, FeatureSettings, merge_stats,
                                  run_parts, to_unit, warn_if_tiny, where, write_media)
from loom.platform.ray import RaySettings
from loom.platform.shards import is_shards
from loom.platform.config import config, field, recipe, require

METRICS = ("fid", "kid", "clip_s", "lpips")


@config
class TextureTracking(EvalTracking):
    experiment: str = field("bench/texture", help="MLflow experiment (`loom leaderboard texture` reads it)")


@config
class EvalTextureJob:
    pred: str = field("", help="folder of predicted renders (images at any depth, e.g. <asset>/<view>.png)")
    gt: str = field("", help="folder of ground-truth renders with the same relative paths, or turntable shards "
                    "(their frames become <out>/gt/<key>/<frame>.png)")
    frames: int = field(0, help="with turntable shards as gt: subsample each to N frames, evenly (0 = all; with "
                        "run: the run's)")
    size: int = field(0, help="with turntable shards as gt: centre-crop and resize to N x N (0 = as stored; with "
                      "run: the run's)")
    run: str = field("", help="or a `loom train ttv` run folder: its generated turntable frames are the predicted "
                     "views, the shards' frames the ground-truth ones (into <out>/pred and <out>/gt)")
    assets: str = field("", help="with run: textured assets (a folder or asset source of .glb/.gltf/.obj): each is "
                        "textured by `loom texture --run` from its geometry, and renders of the TEXTURED ASSET from "
                        "held-out views are scored against renders of the original (TAPESTRY Tab. 2)")
    views: int = field(8, help="with assets: held-out views per asset (an orbit above the texturing one)")
    view_size: int = field(256, help="with assets: held-out render size in pixels")
    view_height: float = field(1.6, help="with assets: camera height of the held-out orbit (texturing's default "
                               "conditions are rendered at heights drawn from [-0.3, 1.2])")
    stages: int = field(3, help="with assets: `loom texture` stages per asset (1 = its orbit alone)")
    texture_resolution: int = field(1024, help="with assets: texture size in texels")
    steps: int = field(0, help="with run: sampler steps (0 = the run's flow.sample_steps)")
    out: str = field("out/eval-texture", help="output folder: config.yaml, metrics.json, items.csv, media/")
    model: str = field("", help="model name in the leaderboard (default: the pred folder's name)")
    metrics: tuple[str, ...] = field(METRICS, help="metrics to compute, of fid, kid, clip_s, lpips")
    kid_subsets: int = field(100, help="KID: number of random subsets")
    kid_subset_size: int = field(0, help="KID: images per subset (0 = min(1000, number of images))")
    limit: int = field(0, help="evaluate the first N image pairs in path order (with assets: the first N assets; "
                       "0 = all)")
    media: int = field(4, help="side-by-side pred | gt images logged (the first N pairs)")
    seed: int = field(0, help="seed of the KID subsets (and, with run, the generation's noise seed)")
    features: FeatureSettings = field(default_factory=FeatureSettings, help="feature networks (Inception, CLIP)")
    ray: RaySettings = field(default_factory=eval_ray, help="Ray: workers sharing the samples (1 = in this process)")
    tracking: TextureTracking = field(default_factory=TextureTracking, help="MLflow")

    def __post_init__(self):
        check_eval_ray(self.ray)
        unknown = sorted(set(self.metrics) - set(METRICS))
        require(not unknown and len(self.metrics) > 0, "metrics", list(self.metrics), f"choose from {list(METRICS)}")
        require(self.kid_subsets >= 1, "kid_subsets", self.kid_subsets, "must be at least 1")
        require(self.kid_subset_size == 0 or self.kid_subset_size >= 2, "kid_subset_size", self.kid_subset_size,
                "must be 0 (automatic) or at least 2")
        require(not (self.pred and self.run), "pred", self.pred, "give predictions (pred) or a run, not both")
        require(not self.assets or bool(self.run), "assets", self.assets, "needs run: the assets are textured by it")
        require(not (self.assets and self.gt), "gt", self.gt, "with assets the ground truth is rendered from them; "
                "leave gt unset")
        for name in ("views", "view_size", "stages", "texture_resolution"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("limit", "media", "steps", "frames", "size"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@recipe(EvalTextureJob, "default", help="TAPESTRY Tab. 2 with the real Inception and CLIP ViT-L/14")
def _default() -> EvalTextureJob:
    return EvalTextureJob()


@recipe(EvalTextureJob, "tiny", help="tiny random Inception and CLIP on CPU, 10 KID subsets: NOT comparable (tests)")
def _tiny() -> EvalTextureJob:
    return EvalTextureJob(kid_subsets=10, features=FeatureSettings(networks="tiny-random", device="cpu"))


def list_images(folder: str) -> dict[str, str]:
    """``{relative path without extension: url}`` of the images under ``folder`` (recursively)."""
    from loom.platform import storage

    fs, root = storage.filesystem(folder)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{folder} is not a folder of images")
    out: dict[str, str] = {}
    for p in sorted(fs.find(root)):
        if p.lower().endswith(IMAGE_EXTS):
            rel = posixpath.relpath(p, root.rstrip("/"))
            stem = posixpath.splitext(rel)[0]
            if stem in out:
                raise ValueError(f"{folder}: two images for {stem!r} ({out[stem]} and {p})")
            out[stem] = folder.rstrip("/") + "/" + rel
    if not out:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return out


def read_image(url: str) -> np.ndarray:
    """An image file -> (H,W,3) uint8 (alpha dropped)."""
    import io

    from PIL import Image

    from loom.platform import storage

    try:
        return np.array(Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB"))
    except OSError as e:
        raise ValueError(f"{url}: not a readable image ({e})") from e


_MARK = ".loom-views"  # marks a views folder that `--run` wrote (and may replace)


def _write_views(folder: str, video: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for t, frame in enumerate(video):
        Image.fromarray(np.ascontiguousarray(frame)).save(os.path.join(folder, f"{t:03d}.png"))


def gt_views_part(cfg: EvalTextureJob, rank: int, parts: int) -> int:
    """The frames of the ground-truth turntables ``rank``, ``rank + parts``, ... as ``<out>/gt/<key>/<t>.png``
    (subsampled and resized by ``frames``/``size``); returns the views written."""
    from loom.datasets.transforms import frame_transform
    from loom.datasets.ttv import iter_samples

    transform = frame_transform(cfg.frames, cfg.size)
    root, views = os.path.join(os.path.abspath(cfg.out), "gt"), 0
    for s in iter_samples(cfg.gt, keys=("rgb",), part=(rank, parts)):
        video = (transform({"rgb": s["rgb"]}, np.random.default_rng(0)) if transform is not None else s)["rgb"]
        _write_views(os.path.join(root, s["__key__"]), video)
        views += len(video)
    return views


def _views_dirs(out: str, sides: tuple[str, ...] = ("pred", "gt")) -> dict[str, str]:
    """``{side: folder}`` under ``out``, emptied: views of an earlier evaluation into the same folder must not join
    this one. A folder that Loom did not write is refused, never deleted."""
    dirs = {side: os.path.join(out, side) for side in sides}
    for folder in dirs.values():
        if os.path.isdir(folder) and os.listdir(folder):
            if not os.path.exists(os.path.join(folder, _MARK)):
                raise ValueError(f"{folder} exists and was not written by `loom eval texture`: choose another "
                                 "--out (it would be replaced)")
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, _MARK), "w").close()
    return dirs


def views_part(cfg: EvalTextureJob, rank: int, parts: int) -> int:
    """Generate the turntables ``rank``, ``rank + parts``, ... of ``cfg.gt`` with ``cfg.run`` and write both sides'
    frames as views into ``<out>/pred/<key>/`` and ``<out>/gt/<key>/``; returns the views written. With ``limit``,
    only the samples that the first ``limit`` views can come from are generated."""
    from loom.datasets.transforms import frame_transform
    from loom.datasets.ttv import iter_samples
    from loom.eval.bench_ttv import PRED_EXT, RunGenerator
    from loom.eval.benchmarks import read_video

    gen = RunGenerator(cfg.run, cfg.steps, cfg.seed)
    per_sample = gen.model.frames  # 0: every frame (unknown until decoded)
    transform = frame_transform(per_sample, gen.model.size)
    dirs = {side: os.path.join(os.path.abspath(cfg.out), side) for side in ("pred", "gt")}
    views = 0
    for s in iter_samples(cfg.gt, keys=("rgb", "normal", "position", "mask"), part=(rank, parts)):
        if cfg.limit and per_sample and s["__index__"] * per_sample >= cfg.limit:
            break
        key = s["__key__"]
        pred_v = read_video(gen(s, os.path.join(dirs["pred"], f"{key}.{PRED_EXT}")))
        gt_v = (transform({"rgb": s["rgb"]}, np.random.default_rng(0)) if transform is not None else s)["rgb"]
        for side, video in (("pred", pred_v), ("gt", gt_v)):
            _write_views(os.path.join(dirs[side], key), video)
        os.remove(os.path.join(dirs["pred"], f"{key}.{PRED_EXT}"))
        views += len(pred_v)
        print(f"generated {key}: {len(pred_v)} views", flush=True)
    return views


def held_out_views(mesh: str, out: str, cfg: EvalTextureJob) -> np.ndarray:
    """(views, H, W, 3) renders of ``mesh`` by `loom render ttv` on the held-out orbit: ``views`` frames at
    ``view_height``, radius 2.5, the asset in its own pose, one fixed environment (the same cameras and light for
    the original and the textured asset: both are normalised from the same vertices)."""
    from loom.datasets.ttv import iter_samples
    from loom.inference.texture import render_conditions

    sets = [("orbit.radius", [2.5, 2.5]), ("orbit.height", [cfg.view_height, cfg.view_height]),
            ("lighting.hdris", ["studio"]), ("lighting.strength", [1.0, 1.0]), ("lighting.random_rotation", False)]
    folder = render_conditions(mesh, out, cfg.views, cfg.view_size, extra=sets)
    return next(iter_samples(folder, keys=("rgb",)))["rgb"]


def asset_views_part(cfg: EvalTextureJob, rank: int, parts: int) -> list[dict]:
    """The assets ``rank``, ``rank + parts``, ...: each rendered on the held-out orbit (``<out>/gt/<uid>/``),
    textured by ``loom texture --run`` from its geometry (``<out>/textured/<uid>/``, timed), the textured asset
    rendered on the same orbit (``<out>/pred/<uid>/``). Returns one row per asset (uid, seconds, coverage)."""
    import time

    from loom.corpora.assets import resolve_source
    from loom.inference.texture import texture_from_run

    out = os.path.abspath(cfg.out)
    rows = []
    for i, rec in enumerate(resolve_source(cfg.assets)):
        if i % parts != rank or (cfg.limit and i >= cfg.limit):
            continue
        work = os.path.join(out, "work", rec.uid)
        gt = held_out_views(rec.path, os.path.join(work, "gt-render"), cfg)
        t0 = time.monotonic()
        done = texture_from_run(rec.path, cfg.run, os.path.join(out, "textured", rec.uid),
                                resolution=cfg.texture_resolution, seed=cfg.seed, steps=cfg.steps or None,
                                stages=cfg.stages)
        seconds = time.monotonic() - t0
        pred = held_out_views(os.path.join(done.out, "mesh.glb"), os.path.join(work, "pred-render"), cfg)
        for side, video in (("pred", pred), ("gt", gt)):
            _write_views(os.path.join(out, side, rec.uid), video)
        shutil.rmtree(work, ignore_errors=True)
        rows.append({"key": rec.uid, "seconds": seconds, "coverage": done.coverage})
        print(f"textured {rec.uid}: coverage {done.coverage:.1%} in {seconds:.1f} s, {len(pred)} held-out views",
              flush=True)
    return rows


def score_part(cfg: EvalTextureJob, rank: int, parts: int, pred_dir: str, gt_dir: str,
               names: list[str]) -> dict[str, Any]:  # fmt: skip
    """Rows, Inception features and statistics, and media of the image pairs ``names[rank::parts]``."""
    from loom.eval.metrics.fid import FeatureStats

    features = Features(cfg.features)
    pred, gt = list_images(pred_dir), list_images(gt_dir)
    nets = _nets(cfg)
    media_dir = os.path.join(os.path.abspath(cfg.out), "media")
    items, media, feats_pred, feats_gt = [], [], [], []
    stats_pred = stats_gt = None
    for i in range(rank, len(names), parts):
        name = names[i]
        p_img, g_img = read_image(pred[name]), read_image(gt[name])
        p, g = to_unit(p_img[None]), to_unit(g_img[None])  # (1,3,H,W)
        row: dict[str, Any] = {"image": name, "key": name.split("/")[0]}
        if "inception" in nets:
            fp, fg = features.get("inception")(p.to(features.device)).cpu(), features.get("inception")(
                g.to(features.device)).cpu()  # fmt: skip
            feats_pred.append((i, fp))
            feats_gt.append((i, fg))
            stats_pred = FeatureStats.of(fp) if stats_pred is None else stats_pred.update(fp)
            stats_gt = FeatureStats.of(fg) if stats_gt is None else stats_gt.update(fg)
        if "clip_s" in cfg.metrics:
            net = features.get("clip")
            cos = float((net.image_embeds(p.to(features.device)) * net.image_embeds(g.to(features.device))).sum())
            row["clip_s"] = max(cos, 0.0)
        if "lpips" in cfg.metrics:
            from loom.eval.metrics import lpips

            row["lpips"] = lpips(p, g, network=features.get("lpips"), batch_size=1)
        if i < cfg.media:
            media += write_media(media_dir, name.replace("/", "__"), p_img[None], g_img[None])
        items.append((i, row))
    return {"items": items, "media": media, "feats": (feats_pred, feats_gt), "stats": (stats_pred, stats_gt)}


def _nets(cfg: EvalTextureJob) -> list[str]:
    return ((["inception"] if {"fid", "kid"} & set(cfg.metrics) else [])
            + (["clip"] if "clip_s" in cfg.metrics else []) + (["lpips"] if "lpips" in cfg.metrics else []))


def evaluate(cfg: EvalTextureJob) -> dict[str, Any]:
    """Run the benchmark, write ``cfg.out``, log the MLflow run; returns :func:`loom.eval.record.finish`'s dict."""
    import functools

    import torch

    from loom.eval.metrics.fid import frechet_distance_from_stats
    from loom.eval.metrics.kid import kid_from_features
    from loom.eval.record import Evaluation, finish

    if not ((cfg.pred or cfg.run) and (cfg.gt or cfg.assets)):
        raise ValueError("pass --pred FOLDER and --gt FOLDER (renders of predicted and ground-truth textures; the "
                         "ground truth may be turntable shards), --run TRAIN_RUN and --gt SHARDS, or --run TRAIN_RUN "
                         "and --assets MESHES (texture each asset and score renders of the result)")
    out = os.path.abspath(cfg.out)
    features = Features(cfg.features)
    features.check(_nets(cfg))  # missing weights stop the job before any generation
    warn_if_tiny(features)
    asset_rows: dict[str, dict] = {}
    if cfg.assets:
        dirs = _views_dirs(out)
        asset_rows = {r["key"]: r for part in run_parts(asset_views_part, cfg, cfg.ray) for r in part}
        if not asset_rows:
            raise ValueError(f"no assets in {cfg.assets}")
        pred_dir, gt_dir = dirs["pred"], dirs["gt"]
    elif cfg.run:
        dirs = _views_dirs(out)
        if not sum(run_parts(views_part, cfg, cfg.ray)):
            raise ValueError(f"no samples in {cfg.gt}")
        pred_dir, gt_dir = dirs["pred"], dirs["gt"]
    elif is_shards(cfg.gt):
        gt_dir = _views_dirs(out, ("gt",))["gt"]
        if not sum(run_parts(gt_views_part, cfg, cfg.ray)):
            raise ValueError(f"no samples in {cfg.gt}")
        pred_dir = cfg.pred
    else:
        pred_dir, gt_dir = cfg.pred, cfg.gt
    pred, gt = list_images(pred_dir), list_images(gt_dir)
    only_pred, only_gt = sorted(set(pred) - set(gt)), sorted(set(gt) - set(pred))
    if only_pred or only_gt:
        raise ValueError(f"unpaired renders: {len(only_pred)} only in {pred_dir} {only_pred[:5]}, {len(only_gt)} "
                         f"only in {gt_dir} {only_gt[:5]}; both folders need the same relative paths")
    names = sorted(pred)[: (cfg.limit if not cfg.assets else 0) or None]
    media_dir = os.path.join(out, "media")
    if os.path.isdir(media_dir):
        for name in os.listdir(media_dir):
            os.remove(os.path.join(media_dir, name))

    parts = run_parts(functools.partial(score_part, pred_dir=pred_dir, gt_dir=gt_dir, names=names), cfg, cfg.ray)
    items = [row for _, row in sorted(i_row for p in parts for i_row in p["items"])]
    media = [m for p in parts for m in p["media"]]
    feats_pred = [f for _, f in sorted((x for p in parts for x in p["feats"][0]), key=lambda x: x[0])]
    feats_gt = [f for _, f in sorted((x for p in parts for x in p["feats"][1]), key=lambda x: x[0])]
    stats_pred = merge_stats(*(p["stats"][0] for p in parts))
    stats_gt = merge_stats(*(p["stats"][1] for p in parts))
    metrics: dict[str, float] = {}
    notes = []
    if "fid" in cfg.metrics:
        if len(items) < 2:
            raise ValueError("FID needs at least 2 images per side (a covariance)")
        metrics["fid"] = frechet_distance_from_stats(stats_pred, stats_gt)
    if "kid" in cfg.metrics:
        size = cfg.kid_subset_size or min(1000, len(items))
        if size > len(items) or size < 2:
            raise ValueError(f"KID subsets of {size} images need at least that many pairs, have {len(items)}: "
                             "lower --set kid_subset_size (or 0 for min(1000, images))")
        metrics["kid"], metrics["kid_std"] = kid_from_features(torch.cat(feats_pred), torch.cat(feats_gt),
                                                               subsets=cfg.kid_subsets, subset_size=size,
                                                               seed=cfg.seed)  # fmt: skip
        notes.append(f"KID: {cfg.kid_subsets} subsets of {size} images")
    if "clip_s" in cfg.metrics:
        metrics["clip_s"] = float(np.mean([r["clip_s"] for r in items]))
    if "lpips" in cfg.metrics:
        metrics["lpips"] = float(np.mean([r["lpips"] for r in items]))
    metrics["items"] = float(len(items))
    if asset_rows:  # the Time column: seconds per asset of `loom texture`, and the surface it saw
        for r in items:
            r.update({k: asset_rows[r["key"]][k] for k in ("seconds", "coverage")})
        metrics["time_s"] = float(np.mean([r["seconds"] for r in asset_rows.values()]))
        metrics["coverage"] = float(np.mean([r["coverage"] for r in asset_rows.values()]))
        notes.append(f"views: renders of the textured assets ({cfg.views} held-out views at height "
                     f"{cfg.view_height}, {cfg.stages} texturing stage(s)) against renders of the originals")
    if cfg.ray.workers > 1:
        notes.append(f"evaluated on {cfg.ray.workers} workers")
    if cfg.run and not cfg.assets:
        notes.append("views: the frames of the run's generated turntables against the shards' frames (no texture "
                     "baking)")
    model = cfg.model or os.path.basename(os.path.abspath(cfg.run or cfg.pred).rstrip("/"))
    ev = Evaluation(benchmark="texture", model=model, config=cfg, out=out, metrics=metrics, items=items, media=media,
                    params={"checkpoint": where(cfg.run), "predictions": where(pred_dir),
                            "data": where(cfg.gt or cfg.assets)},
                    notes=notes)  # fmt: skip
    return finish(ev, cfg.tracking, features)
