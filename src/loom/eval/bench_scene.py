"""``loom eval scene``: VideoFrom3D Tab. 2 (section 4.2), scene videos generated from coarse geometry.

Inputs (what ``loom generate scene OUT`` writes): ``pred`` is one such OUT folder or a folder of them (every
sub-folder, at any depth, that holds a ``scene.json`` is one generated video; its path under ``pred`` is the item's
``key``). Per video:

- ``scene.json``: ``frames`` (T, the video's), ``keyframes`` (the anchors' scene frames), ``first_frame`` (the
  scene frame of video frame 0; default the first keyframe: `loom generate scene` makes the video over the anchors'
  range), ``scene`` (the `loom render scene` shards; a relative path is taken from the OUT folder), ``key`` (the
  sample in them), ``reference`` (the style image; relative to the OUT folder), ...; ``"complete": false`` (a
  generation that stopped) is refused;
- ``video.mkv``: the T generated frames, FFV1 (lossless). ``video.mp4`` (H.264, for people) is never scored;
- ``anchors/<frame:04d>.png``: the anchor images at the keyframes (scene frame numbers).

``gt`` (optional) replaces every video's ``scene`` (shards moved since generation). The scene sample gives depth,
mask, K and c2w per frame; it must have the video's frame size and hold its frames (a mismatch is refused).

Columns, in the paper's order (Table 2):

- **PSNR, SSIM, LPIPS** (visual fidelity) against a **pseudo ground truth**, as the paper builds it: for a frame i
  strictly between consecutive keyframes a < b, anchor a and anchor b are warped into frame i with the scene's
  depth and cameras (:func:`loom.inference.scene.warp_anchor`: geometric flow with a depth test, so each warp also
  says which pixels it knows). The two are composited: a pixel known to one warp takes it; a pixel known to both
  takes the anchor NEARER IN TIME to i (a on a tie); a pixel known to neither is unknown. The metrics see only the
  known pixels: PSNR from the mean squared error over the known pixels (x 3 channels), capped at ``psnr_cap`` dB
  per frame; SSIM's map (Gaussian 11x11, sigma 1.5, the valid region, as :func:`loom.eval.metrics.ssim`) averaged
  over the positions whose window centre is known; LPIPS's spatial map (the ``lpips`` package's ``spatial=True``:
  each tap's distance map upsampled bilinearly to the image, summed over taps) averaged over the known pixels.
  Before SSIM and LPIPS the unknown pixels of the pseudo ground truth are filled with the prediction's own pixels,
  so that windows and receptive fields that straddle the border of the known region see no made-up content (they
  are not scored; the known pixels are unchanged). The anchor frames themselves are skipped (they are the
  anchors), and so are frames before the first or after the last keyframe (no segment) and frames with no known
  pixel (``unknown_frames``). Per video: the mean over its scored frames.
- **PSNR-D** (structural fidelity): per frame, over the scene's geometry pixels (``mask`` and depth > 0), the ground
  truth's inverse depth ``1 / depth`` and the depth model's estimate of the generated frame (a relative inverse
  depth, as Depth Anything and DPT output; the estimate is resized to the frame bicubically; metric-depth models,
  ``zoedepth``, ``depth_pro``, ``glpn``, are inverted first) are each **histogram-equalised** over those pixels:
  every value is replaced by its average rank among them (0-based; ties share their mean rank) divided by n - 1,
  i.e. by its empirical CDF, so both become uniform on [0, 1]. This is the continuous form of histogram
  equalisation, with no binning; it makes PSNR-D blind to any increasing transform of the estimate (scale, shift,
  gamma: the "nonlinear errors and scene-dependent scale variations" the paper compensates for). Then
  ``PSNR = 10 log10(1 / MSE)`` over those pixels, capped at ``psnr_cap``; mean over every frame.
- **CLIP-A** (visual quality): the LAION aesthetic predictor (LAION-AI/aesthetic-predictor, the paper's citation):
  the L2-normalised CLIP ViT-L/14 image embedding of each frame through the linear head ``sa_0_4_vit_l_14_linear``
  (a ``torch.nn.Linear(768, 1)`` state dict: ``weight``, ``bias``), on its 1-10 scale; mean over every frame.
- **MUSIQ**: not computed. The maintained implementation (``pyiqa``) needs torchvision, which Loom's environment
  does not have, and no other registry package ships MUSIQ with local weights; the run's notes say so.
- **CLIP-I** (style consistency): per frame, the cosine similarity of the CLIP image embeddings (Loom's CLIP,
  ViT-L/14) of the frame and of the video's style reference, clamped at 0; mean over every frame.
- **SC** and **BC**: VBench's Subject and Background Consistency (Huang et al. 2024) exactly as its code computes
  them: per frame i >= 1, ``(max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))) / 2`` of L2-normalised features;
  the benchmark value is the sum over all videos' frames divided by the number of such frames (VBench's
  ``sim / cnt``; the per-video mean is in the item table). SC: DINO ViT-B/16's CLS token (``facebook/dino-vitb16``
  through transformers; a Dinov2Model folder also works) on frames whose shorter side is resized to 224 (bilinear,
  no antialiasing, rounded to 8 bits as torchvision does on uint8 frames; no crop), ImageNet normalisation. BC:
  CLIP ViT-B/32 (``openai/clip-vit-base-patch32``, VBench's) image features on frames resized to 224 (bicubic, no
  antialiasing, 8 bits) and centre-cropped; ``bc_clip=clip`` uses Loom's CLIP ViT-L/14 instead (logged in the
  config, not VBench's network).

Feature networks. LPIPS and CLIP (CLIP-I, CLIP-A) are Loom's registered networks (:mod:`loom.eval.weights`): when
one is missing the job refuses to start, as every benchmark does. DINO, the depth model, the aesthetic head and
the ViT-B/32 of BC are looked for locally only: a folder or file path, else ``<weights dir>/dino/dino-vitb16``,
``<weights dir>/depth/<name>``, ``<weights dir>/clip/clip-vit-base-patch32`` (transformers folders; or the repo's
snapshot in the Hugging Face cache) and ``<weights dir>/aesthetic/sa_0_4_vit_l_14_linear.pth`` (``.safetensors``
also read; a ``.pth`` is loaded with ``weights_only=True``). When one is missing its column is LEFT OUT, and the
console and the run's notes say which file was looked for where. ``features.networks=tiny-random`` (``--recipe
tiny``) uses small random stand-ins of all of them (:func:`save_tiny_dino`, :func:`save_tiny_depth`, ...): smoke
tests, not comparable.

The leaderboard (``loom leaderboard scene``) has the paper's columns in its order; rows are evaluations (a method
or an ablation each), named by ``model`` (default: the ``pred`` folder's name).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loom.eval.benchmarks import (EvalTracking, FeatureSettings, Features, check_eval_ray, eval_ray, read_video,
                                  run_parts, to_unit, warn_if_tiny, where, write_media)
from loom.platform.config import config, field, recipe, require
from loom.platform.ray import RaySettings

METRICS = ("psnr", "ssim", "lpips", "psnr_d", "clip_a", "musiq", "clip_i", "sc", "bc")
FIDELITY = ("psnr", "ssim", "lpips")
METRIC_DEPTH_MODELS = ("zoedepth", "depth_pro", "glpn")  # output metric depth: inverted before equalisation
MUSIQ_NOTE = ("MUSIQ not computed: its maintained implementation (pyiqa) needs torchvision, which this environment "
              "does not have, and no registry package ships MUSIQ with local weights")
# the normalisations of ImageNet (DINO, DPT) and OpenAI CLIP (transformers: IMAGENET_DEFAULT_*, OPENAI_CLIP_*)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@config
class SceneTracking(EvalTracking):
    experiment: str = field("bench/scene", help="MLflow experiment (`loom leaderboard scene` reads it)")


@config
class EvalSceneJob:
    pred: str = field("", help="a `loom generate scene` output folder (scene.json, video.mkv, anchors/) or a "
                      "folder of them (each sub-folder with a scene.json is one video)")
    gt: str = field("", help="scene shards (`loom render scene` output) to use instead of each scene.json's 'scene'")
    out: str = field("out/eval-scene", help="output folder: config.yaml, metrics.json, items.csv, media/")
    model: str = field("", help="model name in the leaderboard (default: the pred folder's name)")
    metrics: tuple[str, ...] = field(METRICS, help=f"columns to compute, of {', '.join(METRICS)}")
    limit: int = field(0, help="evaluate the first N videos in path order (0 = all)")
    psnr_cap: float = field(100.0, help="per-frame cap of PSNR and PSNR-D in dB (identical frames: infinite)")
    media: int = field(4, help="side-by-side pred | pseudo ground truth videos logged (the first N videos)")
    dino: str = field("facebook/dino-vitb16", help="SC's DINO: a transformers folder, or a repo name looked for as "
                      "<weights>/dino/<name> and in the Hugging Face cache")
    depth: str = field("depth-anything/Depth-Anything-V2-Large-hf", help="PSNR-D's monocular depth model: a "
                       "transformers folder (AutoModelForDepthEstimation), or a repo name looked for as "
                       "<weights>/depth/<name> and in the Hugging Face cache")
    aesthetic: str = field("aesthetic/sa_0_4_vit_l_14_linear.pth", help="CLIP-A's LAION head (Linear(768, 1) state "
                           "dict, .pth or .safetensors): a path, or relative to the weights directory")
    bc_clip: str = field("openai/clip-vit-base-patch32", help="BC's CLIP (VBench: ViT-B/32): a transformers folder, "
                         "a repo name looked for as <weights>/clip/<name> and in the HF cache, or 'clip' for Loom's "
                         "CLIP ViT-L/14")
    features: FeatureSettings = field(default_factory=FeatureSettings, help="feature networks (LPIPS, CLIP)")
    ray: RaySettings = field(default_factory=eval_ray, help="Ray: workers sharing the videos (1 = in this process)")
    tracking: SceneTracking = field(default_factory=SceneTracking, help="MLflow")

    def __post_init__(self):
        check_eval_ray(self.ray)
        unknown = sorted(set(self.metrics) - set(METRICS))
        require(not unknown and len(self.metrics) > 0, "metrics", list(self.metrics), f"choose from {list(METRICS)}")
        for name in ("limit", "media"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.psnr_cap > 0, "psnr_cap", self.psnr_cap, "must be positive")
        for name in ("dino", "depth", "aesthetic", "bc_clip"):
            require(bool(getattr(self, name)), name, getattr(self, name), "name a folder, file or repo")


@recipe(EvalSceneJob, "default", help="VideoFrom3D Tab. 2 with the real networks (those without local weights are "
        "left out, with a note)")
def _default() -> EvalSceneJob:
    return EvalSceneJob()


@recipe(EvalSceneJob, "tiny", help="tiny random LPIPS, CLIP, DINO, depth model and aesthetic head on CPU: runs "
        "without weights, NOT comparable (tests)")
def _tiny() -> EvalSceneJob:
    return EvalSceneJob(features=FeatureSettings(networks="tiny-random", device="cpu"))


# ------------------------------------------------------------------------------------------------ masked metrics


def masked_psnr(pred, target, known, cap: float) -> float | None:
    """PSNR in dB of (3,H,W) [0,1] tensors over the pixels where ``known`` (H,W) bool holds (x 3 channels), capped
    at ``cap``; None when no pixel is known."""
    import torch

    k = torch.as_tensor(known, dtype=torch.bool)
    n = int(k.sum())
    if n == 0:
        return None
    mse = float(((pred.double() - target.double()) ** 2).sum(0)[k].sum()) / (3 * n)
    return cap if mse <= 0 else min(cap, 10.0 * float(np.log10(1.0 / mse)))


def ssim_map(x, y):
    """SSIM map of image batches (N,3,H,W) in [0,1]: (N,H-10,W-10), the channel mean of the Gaussian-window SSIM at
    each valid position (:mod:`loom.eval.metrics.ssim`'s definition; its mean is that function's value). Position
    (r, c) is the window centred on pixel (r + 5, c + 5)."""
    import torch
    import torch.nn.functional as F

    win, sigma = 11, 1.5
    c1, c2 = 0.01**2, 0.03**2
    t = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.dtype)
    n, c = x.shape[:2]
    k = 5 * c
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)  # (N,5C,H,W)
    f = F.conv2d(stack, g.view(1, 1, 1, win).expand(k, 1, 1, win).contiguous(), groups=k)
    f = F.conv2d(f, g.view(1, 1, win, 1).expand(k, 1, win, 1).contiguous(), groups=k)
    f = f.reshape(n, 5, c, *f.shape[-2:]).transpose(0, 1)
    mx, my, sxx, syy, sxy = f[0], f[1], f[2] - f[0] ** 2, f[3] - f[1] ** 2, f[4] - f[0] * f[1]
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return smap.mean(1)  # (N,H-10,W-10)


def masked_ssim(pred, target, known) -> float | None:
    """SSIM of (3,H,W) tensors averaged over the window positions whose centre pixel is known; None if none is."""
    import torch

    if min(pred.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11, got {tuple(pred.shape[-2:])}")
    k = torch.as_tensor(known, dtype=torch.bool)[5:-5, 5:-5]
    if not bool(k.any()):
        return None
    return float(ssim_map(pred[None].float(), target[None].float())[0].double()[k].mean())


def lpips_map(network, x0, x1):
    """The LPIPS spatial map of image batches (N,3,H,W) in [0,1]: (N,H,W), each tap's head-weighted squared
    difference of unit-normalised features upsampled bilinearly (align_corners=False) to H x W and summed over taps,
    as ``lpips.LPIPS(spatial=True)``; ``network`` is a :class:`loom.eval.networks.lpips.LPIPSNetwork`."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        dev = network.shift.device
        n, (h, w) = x0.shape[0], x0.shape[-2:]
        x = torch.cat([x0, x1]).float().to(dev)
        x = ((2 * x - 1) - network.shift) / network.scale
        total = torch.zeros((n, 1, h, w), device=dev)
        for lin, f in zip(network.lins, network.taps(x), strict=True):  # f (2N,C,h',w')
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)
            d = (f[:n] - f[n:]) ** 2
            m = F.conv2d(d, lin.weight)  # (N,1,h',w')
            total += F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        return total[:, 0].cpu()


def masked_lpips(network, pred, target, known) -> float | None:
    """LPIPS of (3,H,W) tensors: the spatial map averaged over the known pixels; None if none is."""
    import torch

    k = torch.as_tensor(known, dtype=torch.bool)
    if not bool(k.any()):
        return None
    return float(lpips_map(network, pred[None], target[None])[0].double()[k].mean())


def equalize(values: np.ndarray) -> np.ndarray:
    """Continuous histogram equalisation of a 1-D array: each value -> its average 0-based rank among all values
    (ties share their mean rank) / (n - 1), in [0, 1]. Any increasing transform of ``values`` gives the same
    result."""
    v = np.asarray(values).ravel()
    if v.size < 2:
        raise ValueError(f"histogram equalisation needs at least 2 values, got {v.size}")
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return ((first + (counts - 1) / 2.0) / (v.size - 1))[inv.ravel()]


def psnr_d(gt_depth: np.ndarray, estimate: np.ndarray, mask: np.ndarray, cap: float) -> float | None:
    """PSNR-D of one frame: ground-truth camera depth (H,W) and an inverse-depth estimate (H,W), both
    histogram-equalised (:func:`equalize`) over ``mask`` & depth > 0, PSNR with range 1 capped at ``cap``; None
    with fewer than 2 such pixels."""
    d = np.asarray(gt_depth, np.float64)
    m = np.asarray(mask, bool) & np.isfinite(d) & (d > 0)
    if int(m.sum()) < 2:
        return None
    g, e = equalize(1.0 / d[m]), equalize(np.asarray(estimate, np.float64)[m])
    mse = float(np.mean((g - e) ** 2))
    return cap if mse <= 0 else min(cap, 10.0 * float(np.log10(1.0 / mse)))


def consistency(features) -> tuple[float, int]:
    """VBench's Subject/Background Consistency of one video from its frame features (T,D): (the sum over frames
    i >= 1 of (max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))) / 2, the number of such frames)."""
    import torch

    f = torch.nn.functional.normalize(torch.as_tensor(features).double(), dim=-1)
    if f.shape[0] < 2:
        return 0.0, 0
    prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    first = (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return float(((prev + first) / 2).sum()), int(f.shape[0] - 1)


# ------------------------------------------------------------------------------------------------ networks


def _resize_short(x, size: int, mode: str, crop: bool):
    """VBench's torchvision transforms on uint8 frames, in torch: (N,3,H,W) in [0,1] -> the shorter side resized to
    ``size`` (the longer to int(size * long / short)), no antialiasing, rounded to 8 bits; centre crop when asked."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    if (nh, nw) != (h, w):
        x = F.interpolate(x * 255.0, size=(nh, nw), mode=mode, align_corners=False, antialias=False)
        x = x.round().clamp(0, 255) / 255.0
    if crop:
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x


class _Normalised:
    """A feature network with its input normalisation (mean, std per channel), moved to a device together."""

    def __init__(self, model, mean, std):
        import torch

        self.model = model.eval()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def to(self, device):
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self


class DinoFeatures(_Normalised):
    """SC's features: the CLS token of a ViT (DINO ViT-B/16) or Dinov2 folder, on VBench's ``dino_transform``."""

    def __init__(self, model, size: int = 224):
        super().__init__(model, _IMAGENET_MEAN, _IMAGENET_STD)
        self.size = size
        self.kind = model.config.model_type

    def __call__(self, frames):
        import torch

        with torch.no_grad():
            x = _resize_short(frames.to(self.mean.device).float(), self.size, "bilinear", crop=False)
            x = (x - self.mean) / self.std
            kw = {"interpolate_pos_encoding": True} if self.kind == "vit" else {}
            return self.model(pixel_values=x, **kw).last_hidden_state[:, 0].float().cpu()  # (N,D)


def load_dino(path: str | os.PathLike) -> DinoFeatures:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, local_files_only=True)
    if model.config.model_type not in ("vit", "dinov2"):
        raise ValueError(f"{path}: a {model.config.model_type!r} model, SC needs a ViT (DINO) or Dinov2 folder")
    return DinoFeatures(model)


class BackgroundCLIP(_Normalised):
    """BC's features: CLIP image features (``get_image_features``) on VBench's ``clip_transform``: shorter side to
    the model's input size (bicubic, no antialiasing, 8 bits), centre crop, CLIP normalisation."""

    def __init__(self, model, size: int):
        super().__init__(model, _CLIP_MEAN, _CLIP_STD)
        self.size = size

    def __call__(self, frames):
        import torch

        with torch.no_grad():
            x = _resize_short(frames.to(self.mean.device).float(), self.size, "bicubic", crop=True)
            out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: a ModelOutput
            return out.float().cpu()  # (N,D)


def load_bc_clip(path: str | os.PathLike) -> BackgroundCLIP:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True)
    return BackgroundCLIP(model, int(model.config.vision_config.image_size))


class DepthEstimator(_Normalised):
    """A transformers depth model with its ``preprocessor_config.json`` (DPT / Depth Anything: resize to ``size``
    keeping the aspect ratio as little changed as possible, to multiples of ``ensure_multiple_of``, bicubic;
    normalise) done in torch; returns inverse depth (N,H,W) at the frames' size."""

    def __init__(self, model, pre: dict):
        super().__init__(model, pre.get("image_mean", _IMAGENET_MEAN), pre.get("image_std", _IMAGENET_STD))
        self.pre = pre
        self.metric = model.config.model_type in METRIC_DEPTH_MODELS

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The model's input size for an H x W frame (transformers' DPT ``get_resize_output_image_size``)."""
        size = self.pre.get("size", {"height": h, "width": w})
        oh, ow = (size["height"], size["width"]) if isinstance(size, dict) else (size, size)
        if not self.pre.get("do_resize", True):
            return h, w
        m = int(self.pre.get("ensure_multiple_of", 1) or 1)
        sh, sw = oh / h, ow / w
        if self.pre.get("keep_aspect_ratio", False):
            if abs(1 - sw) < abs(1 - sh):
                sh = sw
            else:
                sw = sh

        def multiple(v: float) -> int:  # transformers' constrain_to_multiple_of (Python's round), at least m
            return max(m, int(round(v / m) * m))

        return multiple(sh * h), multiple(sw * w)

    def __call__(self, frames):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            x = frames.to(self.mean.device).float()
            h, w = x.shape[-2:]
            ih, iw = self.input_size(h, w)
            if (ih, iw) != (h, w):
                mode = "bilinear" if self.pre.get("resample", 3) == 2 else "bicubic"
                x = F.interpolate(x, size=(ih, iw), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
            pred = self.model(pixel_values=(x - self.mean) / self.std).predicted_depth  # (N,h',w')
            pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)[:, 0]
            if self.metric:
                pred = 1.0 / pred.clamp(min=1e-6)
            return pred.cpu()  # (N,H,W)


def load_depth(path: str | os.PathLike) -> DepthEstimator:
    from transformers import AutoModelForDepthEstimation

    path = Path(path)
    model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True)
    pre = {}
    if (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
    return DepthEstimator(model, pre)


def load_aesthetic(path: str | os.PathLike):
    """The LAION aesthetic head: ``torch.nn.Linear(D, 1)`` from a state dict with ``weight`` (1,D) and ``bias``."""
    import torch

    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    ok = isinstance(sd, dict) and set(sd) == {"weight", "bias"}
    if not ok or sd["weight"].ndim != 2 or sd["weight"].shape[0] != 1:
        keys = sorted(sd)[:6] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path}: not a LAION aesthetic head (a Linear(D, 1) state dict with 'weight' (1,D) and "
                         f"'bias'); found {keys}. Use sa_0_4_vit_l_14_linear.pth of LAION-AI/aesthetic-predictor")
    head = torch.nn.Linear(sd["weight"].shape[1], 1)
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    return head.eval()


# tiny random stand-ins (the real loading path: written as folders/files, then loaded)


def save_tiny_dino(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random ViT folder (2 layers, width 32, 16-px patches at 224) with the layout of facebook/dino-vitb16."""
    import torch
    from transformers import ViTConfig, ViTModel

    path = Path(path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37))
    model.save_pretrained(path)
    return path


def save_tiny_depth(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random Depth Anything folder (Dinov2 backbone of 4 layers, width 32) with a DPT preprocessor config
    at 56 x 56 (keep aspect ratio, multiples of 14), the layout of depth-anything/Depth-Anything-V2-*-hf."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    path = Path(path)
    backbone = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=37, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, apply_layernorm=True)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 16, 16],
                              fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(cfg)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": 56, "width": 56},
        "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3, "do_rescale": True,
        "do_normalize": True, "image_mean": list(_IMAGENET_MEAN), "image_std": list(_IMAGENET_STD),
        "do_pad": False}, indent=1))  # fmt: skip
    return path


def save_tiny_aesthetic(path: str | os.PathLike, dim: int, seed: int = 0) -> Path:
    """A random LAION-style head Linear(dim, 1) as a state dict (.pth or .safetensors by the suffix)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {"weight": torch.randn((1, dim), generator=g), "bias": torch.randn((1,), generator=g)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _tiny(save, load, seed: int, **kw):
    """A tiny random stand-in, written by ``save`` and read back by ``load`` (the real loading path)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load(save(Path(tmp) / "net.pth", seed=seed, **kw))


# ------------------------------------------------------------------------------------------------ finding them


def _folder_ok(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(
        (p / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))


def find_folder(spec: str, sub: str, root: str | None) -> tuple[Path | None, list[str]]:
    """A transformers folder named by ``spec``: the path itself, else ``<weights>/<sub>/<name>`` for a repo name
    ``org/name``, else that repo's snapshot in the Hugging Face cache. Returns (the folder or None, where looked)."""
    from loom.eval.weights import weights_dir

    looked = []
    p = Path(spec).expanduser()
    if p.is_absolute() or spec.startswith(".") or p.exists():
        return (p if _folder_ok(p) else None), [str(p)]
    cand = weights_dir(root) / sub / spec.split("/")[-1]
    looked.append(f"{cand} (weights dir)")
    if _folder_ok(cand):
        return cand, looked
    if spec.count("/") == 1:
        from loom.platform.hub import cached_snapshot, hub_cache_dir

        looked.append(f"{spec} in the Hugging Face cache {hub_cache_dir()[0]}")
        try:
            snap = cached_snapshot(spec)
        except (ImportError, OSError, ValueError):
            snap = None
        if snap is not None and _folder_ok(snap):
            return snap, looked
    return None, looked


def find_file(spec: str, root: str | None) -> tuple[Path | None, list[str]]:
    from loom.eval.weights import weights_dir

    p = Path(spec).expanduser()
    cands = [p] if p.is_absolute() else [weights_dir(root) / p, p]
    for c in cands:
        if c.is_file():
            return c, [str(c)]
        if c.suffix == ".pth" and c.with_suffix(".safetensors").is_file():
            return c.with_suffix(".safetensors"), [str(c)]
    return None, [str(c) for c in cands]


class SceneNetworks:
    """The networks of one evaluation: Loom's registered LPIPS and CLIP through :class:`Features` (missing ->
    refused), and the optional DINO, depth model, aesthetic head and BC CLIP (missing -> ``None`` and a note).
    Provenance of every network lands in ``features.provenance`` (the run's ``features.<net>`` params)."""

    OPTIONAL = {"sc": "dino", "psnr_d": "depth", "clip_a": "aesthetic", "bc": "bc_clip"}

    def __init__(self, cfg: EvalSceneJob):
        self.cfg = cfg
        self.features = Features(cfg.features)
        self.paths: dict[str, Path | None] = {}
        self.missing: dict[str, str] = {}  # metric -> why it is left out
        self._nets: dict[str, Any] = {}

    def required(self) -> list[str]:
        m = set(self.cfg.metrics)
        return ((["lpips"] if "lpips" in m else []) + (["clip"] if m & {"clip_i", "clip_a"} or (
            "bc" in m and self.cfg.bc_clip == "clip") else []))  # fmt: skip

    def check(self) -> None:
        """Resolve everything before any work: registered networks (raise when missing), optional ones (noted)."""
        from loom.eval.benchmarks import folder_digest
        from loom.eval.weights import sha256_file

        self.features.check(self.required())
        tiny, root = self.features.tiny, self.cfg.features.weights or None
        for metric, net in self.OPTIONAL.items():
            if metric not in self.cfg.metrics or (net == "bc_clip" and self.cfg.bc_clip == "clip"):
                continue
            if tiny:
                self.paths[net] = None
                self.features.provenance[net] = f"tiny-random(seed={self.cfg.features.seed})"
                continue
            spec = getattr(self.cfg, net)
            if net == "aesthetic":
                path, looked = find_file(spec, root)
            else:
                path, looked = find_folder(spec, {"dino": "dino", "depth": "depth", "bc_clip": "clip"}[net], root)
            if path is None:
                label = {"sc": "SC", "psnr_d": "PSNR-D", "clip_a": "CLIP-A", "bc": "BC"}[metric]
                self.missing[metric] = (f"{label} not computed: no local weights of {net} {spec!r} (looked in "
                                        f"{'; '.join(looked)}); place them there (see `loom eval scene "
                                        f"--help-config`) to add the column")  # fmt: skip
                continue
            self.paths[net] = path
            digest = folder_digest(path) if path.is_dir() else sha256_file(path)
            self.features.provenance[net] = f"{spec}: {path.name} sha256={digest}"

    def get(self, net: str):
        """lpips, clip (Loom's), dino, depth, aesthetic or bc_clip, on the device."""
        if net in ("lpips", "clip"):
            return self.features.get(net)
        if net == "bc_clip" and self.cfg.bc_clip == "clip":
            return self.features.get("clip")
        if net not in self._nets:
            dev, seed = self.features.device, self.cfg.features.seed
            if self.features.tiny:
                from loom.eval.networks import clip

                m = {"dino": lambda: _tiny(save_tiny_dino, load_dino, seed),
                     "depth": lambda: _tiny(save_tiny_depth, load_depth, seed),
                     "aesthetic": lambda: _tiny(save_tiny_aesthetic, load_aesthetic, seed, dim=int(
                         self.features.get("clip").model.config.projection_dim)),
                     "bc_clip": lambda: BackgroundCLIP(clip.tiny_random(seed=seed + 1).model, 224)}[net]()  # fmt: skip
            else:
                m = {"dino": load_dino, "depth": load_depth, "aesthetic": load_aesthetic,
                     "bc_clip": load_bc_clip}[net](self.paths[net])  # fmt: skip
            self._nets[net] = m.to(dev)
        return self._nets[net]


# ------------------------------------------------------------------------------------------------ inputs


def find_videos(pred: str) -> list[tuple[str, str]]:
    """(key, folder) of every generated video under ``pred``: ``pred`` itself when it holds a scene.json (key: its
    name), else every sub-folder that does (key: its path under ``pred``), sorted."""
    root = os.path.abspath(pred)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{pred} is not a folder: pass a `loom generate scene` output folder or a folder "
                                "of them")
    if os.path.isfile(os.path.join(root, "scene.json")):
        return [(os.path.basename(root.rstrip("/")), root)]
    found = []
    for base, dirs, files in os.walk(root):
        dirs.sort()
        if "scene.json" in files:
            found.append((os.path.relpath(base, root), base))
            dirs[:] = []  # an OUT folder holds no further videos
    if not found:
        raise FileNotFoundError(f"{pred} holds no scene.json: expected `loom generate scene` output folders "
                                "(scene.json, video.mkv, anchors/)")
    return sorted(found)


def read_spec(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "scene.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable scene.json ({e})") from e
    for k in ("frames", "keyframes", "scene", "key"):
        if k not in spec:
            raise ValueError(f"{path}: no {k!r} (a `loom generate scene` scene.json has frames, keyframes, scene, "
                             "key, reference)")
    if spec.get("complete") is False:
        raise ValueError(f"{path}: the video is not complete (`loom generate scene` stopped): run it again into "
                         "the same folder, or leave the folder out")
    kf, t = spec["keyframes"], int(spec["frames"])
    first = int(spec.get("first_frame", kf[0])) if isinstance(kf, list) and kf else 0
    if not isinstance(kf, list) or len(kf) < 2 or sorted(set(kf)) != kf or kf[0] < first or kf[-1] >= first + t:
        raise ValueError(f"{path}: keyframes {kf} must be at least 2 increasing scene frames within the video's "
                         f"frames {first}..{first + t - 1} (first_frame, frames)")
    return spec


def _local(folder: str, p: str) -> str:
    """A path of scene.json: URLs and absolute paths as given, relative ones from the OUT folder."""
    return p if ("://" in p or os.path.isabs(p)) else os.path.join(folder, p)


def load_scene(url: str, key: str) -> dict[str, Any]:
    """The scene sample ``key`` of the shards at ``url``: depth, mask, K, c2w (only that sample is decoded)."""
    from loom.datasets.scene import decode_sample
    from loom.platform.shards import iter_tar, shard_urls

    try:
        urls = shard_urls(url)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FileNotFoundError(f"scene shards {url}: not found ({e}); pass --gt SHARDS if they moved") from None
    for shard in urls:
        for k, files in iter_tar(shard):
            if k == key:
                return decode_sample(files, ("depth", "mask", "K", "c2w"))
    raise KeyError(f"scene shards {url} have no sample {key!r}")


def read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        return np.array(Image.open(path).convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def pseudo_gt(anchors: dict[int, np.ndarray], sample: dict, keyframes: list[int], i: int):
    """Frame ``i``'s pseudo ground truth from the anchors of its segment a < i < b: ((H,W,3) uint8, known (H,W)
    bool); a pixel known to both warps takes the anchor nearer in time (a on a tie)."""
    from loom.inference.scene import warp_anchor

    b_idx = int(np.searchsorted(keyframes, i, side="right"))
    a, b = keyframes[b_idx - 1], keyframes[b_idx]
    wa, ka = warp_anchor(anchors[a], sample, a, i)
    wb, kb = warp_anchor(anchors[b], sample, b, i)
    near_a = (i - a) <= (b - i)
    first, k_first, second, k_second = (wa, ka, wb, kb) if near_a else (wb, kb, wa, ka)
    img = np.where(k_first[..., None], first, np.where(k_second[..., None], second, 0)).astype(np.uint8)
    return img, ka | kb


# ------------------------------------------------------------------------------------------------ scoring


def score_video(cfg: EvalSceneJob, nets: SceneNetworks, key: str, folder: str) -> tuple[dict[str, Any], np.ndarray,
                                                                                           np.ndarray]:
    """One video's row, its frames and its pseudo ground truth (anchors at the keyframes, black where unknown)."""
    import torch

    spec = read_spec(folder)
    t, kf = int(spec["frames"]), [int(k) for k in spec["keyframes"]]
    first = int(spec.get("first_frame", kf[0]))  # video frame j is scene frame first + j
    vpath = os.path.join(folder, "video.mkv")
    if not os.path.isfile(vpath):
        raise FileNotFoundError(f"{vpath} is missing: the benchmark scores the lossless FFV1 video.mkv (video.mp4 "
                                "is H.264, for people)")
    video = read_video(vpath)
    if len(video) != t:
        raise ValueError(f"{vpath}: {len(video)} frames but scene.json says frames={t}")
    url = cfg.gt or _local(folder, spec["scene"])
    scene = load_scene(url, spec["key"])
    if scene["depth"].shape[1:] != video.shape[1:3] or first + t > len(scene["depth"]):
        raise ValueError(f"{vpath}: frames {first}..{first + t - 1} of {video.shape[1]}x{video.shape[2]} but the "
                         f"scene {spec['key']} in {url} has {len(scene['depth'])} frames of "
                         f"{scene['depth'].shape[1]}x{scene['depth'].shape[2]}: evaluate against the render the "
                         "video was generated from")  # fmt: skip
    sample = {k: scene[k][first : first + t] for k in ("depth", "mask", "K", "c2w")}  # in video frames
    anchors = {}
    for k in kf:
        p = os.path.join(folder, "anchors", f"{k:04d}.png")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} is missing: the pseudo ground truth warps the anchor of every keyframe")
        anchors[k - first] = read_image(p)
        if anchors[k - first].shape != video.shape[1:]:
            raise ValueError(f"{p}: anchor of {anchors[k - first].shape}, the video's frames are {video.shape[1:]}")
    kf = [k - first for k in kf]
    m = set(cfg.metrics)
    row: dict[str, Any] = {"key": key, "scene": spec["key"], "first_frame": first, "frames": t,
                           "height": int(video.shape[1]), "width": int(video.shape[2])}
    frames = to_unit(video)  # (T,3,H,W)
    gt_video = np.zeros_like(video)
    for k in kf:
        gt_video[k] = anchors[k]
    if m & set(FIDELITY):
        vals: dict[str, list[float]] = {x: [] for x in FIDELITY if x in m}
        known_frac, unknown = [], 0
        for i in range(kf[0] + 1, kf[-1]):
            if i in anchors:
                continue
            img, known = pseudo_gt(anchors, sample, kf, i)
            gt_video[i] = img
            if not known.any():
                unknown += 1
                continue
            known_frac.append(float(known.mean()))
            p = frames[i]
            g = to_unit(img[None])[0]
            filled = torch.where(torch.from_numpy(known)[None], g, p)  # unknown pixels: the prediction's own
            if "psnr" in vals:
                vals["psnr"].append(masked_psnr(p, g, known, cfg.psnr_cap))
            if "ssim" in vals:
                s = masked_ssim(p, filled, known)
                if s is not None:
                    vals["ssim"].append(s)
            if "lpips" in vals:
                vals["lpips"].append(masked_lpips(nets.get("lpips"), p, filled, known))
        row["scored_frames"], row["unknown_frames"] = len(known_frac), unknown
        row["known"] = float(np.mean(known_frac)) if known_frac else 0.0
        for x, v in vals.items():
            if v:
                row[x] = float(np.mean(v))
    bs = cfg.features.batch_size
    batches = [frames[j : j + bs] for j in range(0, t, bs)]
    if "psnr_d" in m and "psnr_d" not in nets.missing:
        est = torch.cat([nets.get("depth")(b) for b in batches]).numpy()
        v = [psnr_d(sample["depth"][i], est[i], sample["mask"][i], cfg.psnr_cap) for i in range(t)]
        v = [x for x in v if x is not None]
        if v:
            row["psnr_d"] = float(np.mean(v))
    if m & {"clip_a", "clip_i"}:
        clip = nets.get("clip")
        emb = torch.cat([clip.image_embeds(b.to(nets.features.device)).cpu() for b in batches]).double()  # (T,D)
        if "clip_a" in m and "clip_a" not in nets.missing:
            head = nets.get("aesthetic")
            with torch.no_grad():
                row["clip_a"] = float(head(emb.float().to(head.weight.device)).double().mean())
        ref = spec.get("reference")
        if "clip_i" in m and ref:
            rpath = _local(folder, ref)
            if not os.path.isfile(rpath):
                raise FileNotFoundError(f"{rpath}: the style reference named in {folder}/scene.json is missing")
            r = clip.image_embeds(to_unit(read_image(rpath)[None]).to(nets.features.device)).cpu().double()  # (1,D)
            row["clip_i"] = float((emb * r).sum(-1).clamp(min=0).mean())
    for metric, net in (("sc", "dino"), ("bc", "bc_clip")):
        if metric in m and metric not in nets.missing:
            fn = nets.get(net)
            if net == "bc_clip" and cfg.bc_clip == "clip":
                fn = functools.partial(_loom_clip_features, nets)
            total, pairs = consistency(torch.cat([fn(b) for b in batches]))
            if pairs:
                row[metric], row[f"{metric}_pairs"] = total / pairs, pairs
    return row, video, gt_video


def _loom_clip_features(nets: SceneNetworks, frames):
    return nets.get("clip").image_embeds(frames.to(nets.features.device)).cpu()


def evaluate_part(cfg: EvalSceneJob, rank: int, parts: int, videos: list[tuple[str, str]]) -> dict[str, Any]:
    """The videos ``rank``, ``rank + parts``, ... (see :func:`loom.eval.benchmarks.run_parts`): rows and media."""
    nets = SceneNetworks(cfg)
    nets.check()
    media_dir = os.path.join(os.path.abspath(cfg.out), "media")
    items, media = [], []
    for i in range(rank, len(videos), parts):
        key, folder = videos[i]
        row, video, gt_video = score_video(cfg, nets, key, folder)
        if i < cfg.media:
            media += write_media(media_dir, key.replace("/", "__"), video, gt_video)
        items.append((i, row))
        print(f"scored {key}", flush=True)
    return {"items": items, "media": media}


def evaluate(cfg: EvalSceneJob) -> dict[str, Any]:
    """Run the benchmark, write ``cfg.out``, log the MLflow run; returns :func:`loom.eval.record.finish`'s dict."""
    from loom.eval.record import Evaluation, finish

    if not cfg.pred:
        raise ValueError("no predictions: pass --pred FOLDER (a `loom generate scene` output folder, or a folder of "
                         "them)")
    out = os.path.abspath(cfg.out)
    videos = find_videos(cfg.pred)[: cfg.limit or None]
    nets = SceneNetworks(cfg)
    nets.check()  # missing registered weights stop the job before any work; missing optional ones are noted
    warn_if_tiny(nets.features)
    notes = list(nets.missing.values())
    if "musiq" in cfg.metrics:
        notes.append(MUSIQ_NOTE)
    for note in notes:
        print(f"WARNING: {note}", file=sys.stderr, flush=True)
    media_dir = os.path.join(out, "media")
    if os.path.isdir(media_dir):
        for name in os.listdir(media_dir):  # media of an earlier evaluation into the same folder
            os.remove(os.path.join(media_dir, name))

    parts = run_parts(functools.partial(evaluate_part, videos=videos), cfg, cfg.ray)
    items = [row for _, row in sorted((x for p in parts for x in p["items"]), key=lambda x: x[0])]
    media = [m for p in parts for m in p["media"]]
    metrics: dict[str, float] = {}
    for x in ("psnr", "ssim", "lpips", "psnr_d", "clip_a", "clip_i"):
        v = [r[x] for r in items if x in r]
        if v:
            metrics[x] = float(np.mean(v))
    for x in ("sc", "bc"):
        pairs = sum(r.get(f"{x}_pairs", 0) for r in items)
        if pairs:
            metrics[x] = float(sum(r[x] * r[f"{x}_pairs"] for r in items if x in r) / pairs)
    metrics["items"] = float(len(items))
    if set(FIDELITY) & set(cfg.metrics):
        metrics["scored_frames"] = float(sum(r.get("scored_frames", 0) for r in items))
        metrics["known"] = float(np.mean([r["known"] for r in items if r.get("scored_frames")] or [0.0]))
        no_ref = [r["key"] for r in items if "clip_i" in cfg.metrics and "clip_i" not in r]
        notes.insert(0, "PSNR/SSIM/LPIPS on the known pixels of a pseudo ground truth: the two anchors of each "
                     "segment warped into the frame with the scene's depth and cameras, composited (where both are "
                     f"known, the anchor nearer in time); anchor frames skipped; {metrics['known']:.1%} of the "
                     f"scored frames' pixels known on average; per-frame PSNR capped at {cfg.psnr_cap:g} dB")
        if no_ref:
            notes.append(f"CLIP-I not computed for {len(no_ref)} video(s) whose scene.json names no reference: "
                         f"{no_ref[:5]}")
    if "psnr_d" in cfg.metrics and "psnr_d" not in nets.missing:
        notes.append("PSNR-D: inverse depth of the scene and the depth model's estimate, each histogram-equalised "
                     "(average rank / (n - 1)) over the geometry mask, PSNR of range 1")
    if "bc" in cfg.metrics and cfg.bc_clip == "clip":
        notes.append("BC with Loom's CLIP ViT-L/14 (bc_clip=clip), not VBench's ViT-B/32")
    if cfg.ray.workers > 1:
        notes.append(f"evaluated on {cfg.ray.workers} workers")
    model = cfg.model or os.path.basename(os.path.abspath(cfg.pred).rstrip("/"))
    ev = Evaluation(benchmark="scene", model=model, config=cfg, out=out, metrics=metrics, items=items, media=media,
                    params={"checkpoint": "-", "predictions": where(cfg.pred), "data": where(cfg.gt) if cfg.gt else
                            "scene.json of each video"}, notes=notes)  # fmt: skip
    return finish(ev, cfg.tracking, nets.features)
