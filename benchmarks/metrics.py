"""Metric throughput: each Loom metric against its reference implementation on the same inputs, in one run.
Prints items/s for both and the ratio (reference time / Loom time, > 1 when Loom is faster); never a bare absolute
time as a target. Each timing: one warm-up call, then the best of ``--repeats`` loops of >= 0.2 s, Loom's and the
references' interleaved (a busy machine slows all alike).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py            # all metrics (~2-3 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py --quick    # smaller inputs (~40 s)
    .venv/bin/python benchmarks/metrics.py --only chamfer iou --repeats 5 --json out/bench-metrics.json

References (same inputs, same values; each pair is also checked for agreement here):

- psnr, ssim: torchmetrics 1.9 (``dim=(1,2,3)``; SSIM's map cropped as Loom's) and scikit-image (per image loop);
- lpips: torchmetrics' ``_LPIPS`` with Loom's backbone and heads (AlexNet architecture, random weights);
- frechet (the FID/FVD distance of 2048-d statistics): pytorch-fid's ``scipy.linalg.sqrtm`` formula, and
  torchmetrics' ``eigvals`` formula;
- kid: torchmetrics' ``KernelInceptionDistance.compute`` on the same features;
- clip: torchmetrics' ``clip_score`` (transformers' PIL preprocessing) with the same tiny random CLIP;
- chamfer, fscore (two 100k-point clouds): point-cloud-utils' ``chamfer_distance`` (same definition), and
  3DShape2VecSet's ``eval.py`` (cKDTree, its Python-level F-score loop);
- iou (128^3, an 80k-face sphere and a box): the generalized winding number (pcu's fast winding number) on the same
  cell centres.

Targets (issue 9): no metric slower than its reference (ratio >= 1); Chamfer and F-score between two 100k-point
clouds and IoU on a 128^3 grid each well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch


def _loop(fn, loops: int) -> tuple[float, object]:
    t0 = time.perf_counter()
    for _ in range(loops):
        out = fn()
    return (time.perf_counter() - t0) / loops, out


def interleaved(fns: dict, repeats: int, min_s: float = 0.2) -> dict:
    """Seconds per call of each function: one warm-up call each, then ``repeats`` rounds in which every function
    runs a loop of >= ``min_s``, interleaved so that a busy machine slows all alike; the best round counts."""
    loops, best, outs = {}, {}, {}
    for k, fn in fns.items():
        t, outs[k] = _loop(fn, 1)
        loops[k], best[k] = max(1, int(min_s / max(t, 1e-6))), float("inf")
    for _ in range(repeats):
        for k, fn in fns.items():
            t, outs[k] = _loop(fn, loops[k])
            best[k] = min(best[k], t)
    return {k: (best[k], outs[k]) for k in fns}


def bench_images(args):
    import skimage.metrics as skm
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from loom.eval.metrics import psnr, ssim

    n, s = (16, 128) if args.quick else (32, 256)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, 3, s, s, generator=g)
    p = (t + 0.05 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    tn, pn = t.numpy(), p.numpy()
    rows = []
    rows.append(("psnr", n, lambda: psnr(p, t), {
        "torchmetrics": lambda: float(tm_psnr(p, t, data_range=1.0, dim=(1, 2, 3))),
        "scikit-image": lambda: float(np.mean([skm.peak_signal_noise_ratio(tn[i], pn[i], data_range=1.0)
                                               for i in range(n)])),
    }))  # fmt: skip

    def tm_ssim_cropped():
        _, m = tm_ssim(p, t, data_range=1.0, return_full_image=True)
        return float(m[..., 5:-5, 5:-5].mean())

    rows.append(("ssim", n, lambda: ssim(p, t), {
        "torchmetrics": tm_ssim_cropped,
        "scikit-image": lambda: float(np.mean([
            skm.structural_similarity(tn[i], pn[i], data_range=1.0, channel_axis=0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False) for i in range(n)])),
    }))  # fmt: skip
    return rows


def bench_lpips(args):
    from torchmetrics.functional.image import lpips as tm_lpips_mod

    from loom.eval.metrics import lpips
    from loom.eval.networks import lpips as lpips_net

    n, s = (8, 128) if args.quick else (16, 256)
    net = lpips_net.tiny_random("alex", seed=0)
    tm_lpips_mod._get_tv_model_features = lambda name, pretrained=False: net.features
    ref = tm_lpips_mod._LPIPS(pretrained=False, net="alex")
    for i, lin in enumerate(net.lins):
        ref.lins[i].model[-1].weight.data.copy_(lin.weight)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, 3, s, s, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)

    def reference():
        with torch.no_grad():
            return float(ref(a, b, normalize=True).mean())

    return [("lpips", n, lambda: lpips(a, b, network=net, batch_size=n), {"torchmetrics": reference})]


def bench_frechet(args):
    import scipy.linalg
    from torchmetrics.image.fid import _compute_fid

    from loom.eval.metrics.fid import FeatureStats, frechet_distance_from_stats

    d = 512 if args.quick else 2048
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x = np.maximum(rng.normal(size=(3 * d, d)) @ a, 0)
    y = np.maximum(rng.normal(size=(3 * d, d)) @ a + 0.05, 0)
    sx, sy = FeatureStats.of(x), FeatureStats.of(y)
    m1, s1, m2, s2 = sx.mean, sx.cov, sy.mean, sy.cov

    def pytorch_fid():
        covmean = scipy.linalg.sqrtm(s1.dot(s2))
        covmean = covmean.real if np.iscomplexobj(covmean) else covmean
        diff = m1 - m2
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    def torchmetrics_fid():
        return float(_compute_fid(*(torch.from_numpy(v) for v in (m1, s1, m2, s2))))

    return [(f"frechet {d}-d", 1, lambda: frechet_distance_from_stats(sx, sy),
             {"pytorch-fid (scipy sqrtm)": pytorch_fid, "torchmetrics (eigvals)": torchmetrics_fid})]  # fmt: skip


def bench_kid(args):
    from torchmetrics.image.kid import KernelInceptionDistance

    from loom.eval.metrics.kid import kid_from_features

    n, d, subsets, size = (600, 2048, 5, 300) if args.quick else (1500, 2048, 10, 1000)
    g = torch.Generator().manual_seed(0)
    real = torch.relu(torch.randn(n, d, generator=g))
    fake = torch.relu(torch.randn(n, d, generator=g) + 0.05)
    tm = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size)
    tm.update(real, real=True)
    tm.update(fake, real=False)

    def reference():
        tm._computed = None  # torchmetrics caches compute(); time the computation
        torch.manual_seed(0)
        return float(tm.compute()[0])

    return [("kid", subsets, lambda: kid_from_features(fake, real, subsets=subsets, subset_size=size, seed=0)[0],
             {"torchmetrics": reference})]  # fmt: skip


def bench_clip(args):
    import importlib
    import tempfile

    from transformers import CLIPModel, CLIPProcessor

    from loom.eval.metrics.clip_score import clip_similarity
    from loom.eval.networks import clip as clip_net

    tm_clip = importlib.import_module("torchmetrics.functional.multimodal.clip_score")
    n = 8 if args.quick else 32
    tmp = tempfile.TemporaryDirectory()
    path = clip_net.save_tiny_random(os.path.join(tmp.name, "clip"))
    net = clip_net.load_folder(path)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(path, local_files_only=True)

    class Projected(torch.nn.Module):  # torchmetrics 1.9 wants tensors from transformers 5's get_*_features
        def __init__(self):
            super().__init__()
            self.m, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return clip_net._embeds(self.m.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return clip_net._embeds(self.m.get_text_features(*a, **k))

    ref_model = Projected()
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 224, 224), generator=g).float() / 255
    u8 = (imgs * 255).round().to(torch.uint8)
    texts = [f"a photo of object number {i}" for i in range(n)]

    def reference():
        with torch.no_grad():
            return float(tm_clip._clip_score_update(u8, texts, ref_model, proc)[0].mean())

    rows = [("clip", n, lambda: float(clip_similarity(imgs, texts, network=net).mean()), {"torchmetrics": reference})]
    rows[0] = rows[0] + (tmp,)  # keep the folder alive
    return rows


def bench_geometry(args):
    import point_cloud_utils as pcu
    import trimesh
    from scipy.spatial import cKDTree

    from loom.eval.metrics import chamfer_distance, f_score, volume_iou

    n = 20_000 if args.quick else 100_000
    sphere = trimesh.creation.icosphere(subdivisions=6, radius=0.8)
    box = trimesh.creation.box(extents=(1.2, 0.9, 1.0))
    a = np.asarray(sphere.sample(n, seed=0), np.float64)
    b = np.asarray(sphere.sample(n, seed=1), np.float64) * 1.01

    def shape2vecset_fscore(th=0.02):
        # 3DShape2VecSet eval.py: cKDTree queries and a Python-level count
        d1, _ = cKDTree(a).query(b)
        d2, _ = cKDTree(b).query(a)
        recall = float(sum(d < th for d in d2)) / float(len(d2))
        precision = float(sum(d < th for d in d1)) / float(len(d1))
        return 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0

    def shape2vecset_chamfer():
        d1, _ = cKDTree(a).query(b)
        d2, _ = cKDTree(b).query(a)
        return float(np.mean(d1) + np.mean(d2))

    vs, fs = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    vb, fb = np.asarray(box.vertices), np.asarray(box.faces)
    r = 128
    c = -1 + (np.arange(r) + 0.5) * 2 / r
    centres = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)

    def fwn_iou():
        o1 = pcu.triangle_soup_fast_winding_number(vs, fs, centres) > 0.5
        o2 = pcu.triangle_soup_fast_winding_number(vb, fb, centres) > 0.5
        return np.count_nonzero(o1 & o2) / np.count_nonzero(o1 | o2)

    return [
        (f"chamfer {n // 1000}k", 1, lambda: chamfer_distance(a, b),
         {"point-cloud-utils": lambda: float(pcu.chamfer_distance(a, b)), "3DShape2VecSet eval.py":
          shape2vecset_chamfer}),
        (f"fscore {n // 1000}k", 1, lambda: f_score(b, a), {"3DShape2VecSet eval.py": shape2vecset_fscore}),
        (f"iou {r}^3", 1, lambda: volume_iou((vs, fs), (vb, fb), resolution=r),
         {"winding number (pcu)": fwn_iou}),
    ]  # fmt: skip


GROUPS = {"images": bench_images, "lpips": bench_lpips, "frechet": bench_frechet, "kid": bench_kid,
          "clip": bench_clip, "geometry": bench_geometry}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs")
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per implementation")
    ap.add_argument("--only", nargs="*", choices=sorted(GROUPS), help="groups to run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = []
    print(f"threads={torch.get_num_threads()} quick={args.quick} repeats={args.repeats}")
    print(f"{'metric':<16} {'items':>5} {'loom items/s':>13} {'reference':<28} {'ref items/s':>12} {'ratio':>7}"
          f" {'loom s':>8} {'agree':>6}")  # fmt: skip
    for name in args.only or list(GROUPS):
        for row in GROUPS[name](args):
            metric, items, ours, refs = row[:4]
            timed = interleaved({"loom": ours, **refs}, args.repeats)
            t_ours, v_ours = timed["loom"]
            for ref_name in refs:
                t_ref, v_ref = timed[ref_name]
                agree = bool(np.isclose(float(v_ours), float(v_ref), rtol=1e-4, atol=1e-6))
                ratio = t_ref / t_ours
                results.append(dict(metric=metric, items=items, loom_s=t_ours, reference=ref_name, reference_s=t_ref,
                                    ratio=ratio, loom_value=float(v_ours), reference_value=float(v_ref),
                                    agree=agree))  # fmt: skip
                print(f"{metric:<16} {items:>5} {items / t_ours:>13.2f} {ref_name:<28} {items / t_ref:>12.2f} "
                      f"{ratio:>6.2f}x {t_ours:>8.3f} {str(agree):>6}", flush=True)  # fmt: skip
    slow = [r for r in results if r["ratio"] < 1.0]
    print("\nall metrics >= reference speed" if not slow else
          "\nslower than reference: " + ", ".join(f"{r['metric']} vs {r['reference']}" for r in slow))  # fmt: skip
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
