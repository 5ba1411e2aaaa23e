"""VideoFrom3D's anchor views along a trajectory (section 3.2; the first half of ``loom generate scene``): keyframes
picked along the rendered scene, then the SAG module (`loom.models.sag`) for each, each after the first guided by
the previous anchor warped into its view (Sparse Appearance-guided Sampling).

Data flow::

    scene sample (`loom render scene` along the trajectory): edges (T,H,W,4), depth, mask, K, c2w
    keyframes = pick_keyframes(T, every)                        0, every, 2 every, ..., T-1 (documented below)
    anchor k0: SAG(prompt, structure(edges[k0]))
    anchor k (after k'): flow k -> k' from depth and cameras (loom.geometry.flow.flow_between, with its depth test)
        warped = previous anchor sampled along it; known = pixels of k whose point k' sees
        SAG(prompt, structure(edges[k]), known latent = VAE(warped), mask = known shrunk and blurred) -> anchor k

Each anchor is warped from the one before it (the authors' chain: ``Warp(result, corres_end[i])``), so content
carries along the whole trajectory. GGI then fills the frames between consecutive anchors
(`loom.inference.inbetween.inbetween`).
"""

from __future__ import annotations

import numpy as np

SEGMENT = 45  # the paper's N: anchors 45 frames apart, 46-frame GGI segments


def pick_keyframes(frames: int, every: int = SEGMENT, min_gap: int = 4) -> list[int]:
    """Anchor frames along a trajectory of ``frames`` frames: 0, every, 2*every, ... and the last frame; when the
    last would come fewer than ``min_gap`` frames after the one before (GGI needs two latent frames per segment),
    that one is dropped instead, so the final segment is a little longer than ``every``."""
    if frames < 2:
        raise ValueError(f"a trajectory of {frames} frame(s) has no segment: render at least 2 frames")
    if every < min_gap:
        raise ValueError(f"anchors every {every} frames: at least {min_gap} (one latent frame per anchor)")
    keys = list(range(0, frames - 1, every)) + [frames - 1]
    if len(keys) > 2 and keys[-1] - keys[-2] < min_gap:
        del keys[-2]
    if keys[-1] - keys[0] < min_gap:
        raise ValueError(f"a trajectory of {frames} frames is shorter than one segment ({min_gap + 1} frames)")
    return keys


def structure_image(edges: np.ndarray) -> np.ndarray:
    """The scene's geometric edges (H,W,K) bool (any kinds) -> (H,W,3) uint8, white lines on black: the HED-style
    map the ControlNet takes (the authors feed the geometry's edge renders to the HED ControlNet as they are)."""
    e = np.asarray(edges)
    line = e.any(-1) if e.ndim == 3 else e.astype(bool)
    return np.repeat((line * 255).astype(np.uint8)[..., None], 3, -1)


def warp_anchor(image: np.ndarray, sample: dict, src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """The anchor of frame ``src`` seen from frame ``dst``: (warped (H,W,3) uint8, known (H,W) bool), from the
    scene's depth and cameras (geometric flow dst -> src with its occlusion test); unknown pixels are 0."""
    from loom.geometry.flow import flow_between, warp_backward

    flow, occluded = flow_between(sample["depth"][dst], sample["K"][dst], sample["c2w"][dst], sample["depth"][src],
                                  sample["K"][src], sample["c2w"][src],
                                  mask_a=sample["mask"][dst] if "mask" in sample else None)
    known = ~occluded
    warped = warp_backward(image, flow)
    warped = np.where(known[..., None], np.clip(warped + 0.5, 0, 255), 0).astype(np.uint8)
    return warped, known


def anchor_views(parts, sample: dict, keyframes: list[int], prompt: str, *, seed: int = 0, guided: bool = True,
                 progress=print, **sampling) -> tuple[dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """SAG along the keyframes (module docstring): ({frame: anchor (H,W,3) uint8}, {frame: (warped, known)} for
    every anchor after the first). ``guided=False`` samples each anchor from its structure alone (the ablation of
    Fig. 11; the paper's style transitions of Fig. 8 also drop the replacement). ``sampling``: keyword arguments of
    `loom.models.sag.sample` (steps, replace_steps, guidance, true_cfg, cfg_start, control_weight, negative)."""
    import torch

    from loom.models import sag

    t, h, w = sample["edges"].shape[:3]
    if keyframes[-1] >= t:
        raise ValueError(f"keyframe {keyframes[-1]} is beyond the trajectory's {t} frames")
    anchors: dict[int, np.ndarray] = {}
    warps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    prev = None
    for i, k in enumerate(keyframes):
        edges = sag.image_input(structure_image(sample["edges"][k]))
        kw = dict(sampling)
        if prev is not None:
            warped, known = warp_anchor(anchors[prev], sample, prev, k)
            warps[k] = (warped, known)
            if guided:
                kw["known"] = sag.encode(parts.vae, sag.image_input(warped))
                kw["mask"] = sag.known_mask(known, (h // 8, w // 8))
        z = sag.sample(parts, prompt, (h, w), edges=edges, generator=torch.Generator().manual_seed(seed + i), **kw)
        anchors[k] = sag.decode(parts.vae, z)[0]
        progress(f"anchor {i + 1}/{len(keyframes)}: frame {k}" + (f" (guided by frame {prev})"
                                                                   if prev is not None and guided else ""))
        prev = k
    return anchors, warps
