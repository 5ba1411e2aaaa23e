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

import os

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
                 progress=print, kept: str | None = None,
                 **sampling) -> tuple[dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """SAG along the keyframes (module docstring): ({frame: anchor (H,W,3) uint8}, {frame: (warped, known)} for
    every anchor after the first). ``guided=False`` samples each anchor from its structure alone (the ablation of
    Fig. 11; the paper's style transitions of Fig. 8 also drop the replacement). ``sampling``: keyword arguments of
    `loom.models.sag.sample` (steps, replace_steps, guidance, true_cfg, cfg_start, control_weight, negative).
    Anchor i draws its noise from seed + i; with ``kept`` (a folder), each anchor is written there as
    ``<frame:04d>.png`` (lossless) when made, and one already there is taken instead of sampled again."""
    import torch
    from PIL import Image

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
        path = os.path.join(kept, f"{k:04d}.png") if kept else None
        if path and os.path.isfile(path):
            anchors[k] = np.asarray(Image.open(path).convert("RGB"))
            if anchors[k].shape[:2] != (h, w):
                raise ValueError(f"{path} is {anchors[k].shape[1]}x{anchors[k].shape[0]}, the scene {w}x{h}: "
                                 "a kept anchor of other settings; use a new output folder")
            progress(f"anchor {i + 1}/{len(keyframes)}: frame {k} kept from {path}")
        else:
            z = sag.sample(parts, prompt, (h, w), edges=edges, generator=torch.Generator().manual_seed(seed + i),
                           **kw)
            anchors[k] = sag.decode(parts.vae, z)[0]
            if path:
                os.makedirs(kept, exist_ok=True)
                Image.fromarray(anchors[k]).save(path + ".part.png")
                os.replace(path + ".part.png", path)
            progress(f"anchor {i + 1}/{len(keyframes)}: frame {k}" + (f" (guided by frame {prev})"
                                                                       if prev is not None and guided else ""))
        prev = k
    return anchors, warps


# ------------------------------------------------------------------------------------------------------ the video


def read_scene_sample(data: str, key: str | None) -> dict:
    """The whole scene sample (edges, noise, depth, mask, cameras) of ``key`` (default: the first) in scene shards."""
    from loom.inference.inbetween import read_scene

    return read_scene(data, key, keys=None)


def _check_settings(out: str, settings: dict) -> None:
    """A rerun into ``out`` must ask for the same video: its kept anchors and segments are of these settings."""
    import json

    path = os.path.join(out, "scene.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f).get("settings", {})
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        raise ValueError(f"{out} holds a scene video made with other settings ({', '.join(changed)} differ): its "
                         "kept anchors and segments do not belong to this one; use a new --out or remove the folder")


def generate_scene(out: str, sample: dict, style, ggi_model, *, prompt: str, keyframes: list[int] | None = None,
                   every: int = SEGMENT, seed: int = 0, guided: bool = True, structure: str | None = None,
                   sampling: dict | None = None, settings: dict | None = None, progress=print,
                   tracking=None) -> dict:
    """VideoFrom3D end to end on a rendered scene sample: anchor views by SAG (``style``: a
    `loom.inference.style.StyleRun`, its LoRAs active), the frames between them by GGI (``ggi_model``: a
    `loom.inference.inbetween.GGIRun`), in ``out``:

    - ``anchors/<frame>.png``, ``structure/<frame>.png`` (the ControlNet's edge maps), ``warps/<frame>.png`` and
      ``warps/<frame>.known.png`` (the previous anchor seen from this view, and where it is seen),
    - ``segments/<a>-<b>.npy`` (GGI's frames of each segment), ``video.mkv`` (FFV1, lossless: what `loom eval
      scene` scores) and ``video.mp4`` (H.264, to watch), ``scene.json`` (keyframes, settings, paths).

    A rerun with the same settings takes the anchors and segments already made (a killed run goes on where it
    stopped); other settings into the same folder are refused. Returns the scene.json content."""
    import json
    import time

    from PIL import Image

    from loom.datasets.codecs import encode_video, write_video
    from loom.inference.inbetween import inbetween

    t = len(sample["edges"])
    keys = sorted(keyframes) if keyframes else pick_keyframes(t, every)
    if keys[-1] >= t or keys[0] < 0:
        raise ValueError(f"keyframes {keys}: the trajectory has frames 0..{t - 1}")
    sampling = dict(sampling or {})
    structure = structure or getattr(ggi_model, "structure", "edges")
    info = {"settings": {"prompt": prompt, "keyframes": keys, "seed": seed, "guided": guided, "structure": structure,
                         "sag": sampling, **(settings or {})}}
    os.makedirs(out, exist_ok=True)
    _check_settings(out, info["settings"])
    with open(os.path.join(out, "scene.json"), "w") as f:
        json.dump({**info, "complete": False}, f, indent=2)
    clock = {}
    t0 = time.monotonic()
    anchors, warps = anchor_views(style.parts, sample, keys, prompt, seed=seed, guided=guided, progress=progress,
                                  kept=os.path.join(out, "anchors"), **sampling)
    clock["anchors"] = time.monotonic() - t0
    for name, images in (("structure", {k: structure_image(sample["edges"][k]) for k in keys}),
                         ("warps", {k: w for k, (w, _) in warps.items()})):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for k, img in images.items():
            Image.fromarray(img).save(os.path.join(out, name, f"{k:04d}.png"))
    for k, (_, known) in warps.items():
        Image.fromarray((known * 255).astype(np.uint8)).save(os.path.join(out, "warps", f"{k:04d}.known.png"))
    t0 = time.monotonic()
    video = inbetween(ggi_model, sample, anchors, seed, progress=progress, segments=os.path.join(out, "segments"),
                      structure=structure)
    clock["inbetween"] = time.monotonic() - t0
    ext, data = encode_video(video, "ffv1")
    with open(os.path.join(out, "video.mkv"), "wb") as f:
        f.write(data)
    write_video(os.path.join(out, "video.mp4"), video)
    done = {**info, "complete": True, "frames": int(len(video)), "keyframes": keys, "seconds": clock,
            "first_frame": keys[0]}
    done.update({k: v for k, v in (settings or {}).items() if k in ("scene", "key", "reference")})
    with open(os.path.join(out, "scene.json"), "w") as f:
        json.dump(done, f, indent=2)
    if tracking is not None and tracking.enabled:
        done["mlflow"] = log_scene_run(out, done, tracking)
    progress(f"video: {os.path.join(out, 'video.mp4')} ({len(video)} frames, anchors at {keys})")
    return done


def log_scene_run(out: str, done: dict, tracking) -> tuple[str, str, str]:
    """One MLflow run (experiment ``tracking.experiment``): every setting as a param, seconds per stage as
    metrics, and the video, anchors, structure maps and scene.json as artifacts; OUT/mlflow_run.json names it."""
    from loom.platform.tracking import flatten, log_output_run

    metrics = [(f"seconds/{k}", v, 0) for k, v in done["seconds"].items()] + [("frames", done["frames"], 0)]
    return log_output_run(out, tracking, name=os.path.basename(os.path.normpath(out)), tags={"loom.kind": "scene"},
                          params=flatten(done["settings"]), metrics=metrics,
                          files=[os.path.join(out, "video.mp4"), os.path.join(out, "scene.json")],
                          folders={os.path.join(out, d): d for d in ("anchors", "structure", "warps")})


def train_style(out: str, reference: str, identifier: str, recipe: str, sets: list[str]) -> None:
    """``loom train style`` on the reference into ``out``, as a user runs it (its own process: generation does not
    import the training code); a stopped one is resumed."""
    import subprocess
    import sys

    if not os.path.isfile(reference):
        raise FileNotFoundError(f"--reference {reference}: no such image")
    cmd = [sys.executable, "-m", "loom.cli", "train", "style", "--recipe", recipe, "--reference", reference,
           "--identifier", identifier, "--out", out, "--set", "trainer.progress=false"]
    for item in sets:
        cmd += ["--set", item]
    if os.path.isdir(os.path.join(out, "checkpoints")):
        cmd.append("--resume")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"training the style on {reference} failed ({' '.join(cmd[2:])}):\n{p.stderr[-3000:]}")


def run_generate_scene(out: str, *, style: str | None = None, reference: str | None = None,
                       style_recipe: str = "default", style_sets: list[str] | None = None,
                       identifier: str | None = None, prompt: str = "", ggi: str | None = None,
                       checkpoint: tuple[str, str] | None = None, data: str | None = None, key: str | None = None,
                       scene: str | None = None, trajectory: str | None = None, frames: int = 46,
                       size: tuple[int, int] = (720, 480), keyframes: list[int] | None = None, every: int = SEGMENT,
                       seed: int = 0, guided: bool = True, sampling: dict | None = None,
                       ggi_steps: int | None = None, degradation: float | None = None, tracking=None,
                       progress=print) -> dict:
    """``loom generate scene``: the scene rendered along the trajectory (or given shards), a style run (given, or
    trained here on ``reference`` into ``out/style`` by `loom train style`), the GGI model, then
    :func:`generate_scene`."""
    from loom.inference.inbetween import load_ggi_checkpoint, load_ggi_run, render_scene

    if (ggi is None) == (checkpoint is None):
        raise ValueError("give --ggi RUN (a `loom train ggi` run) or --transformer DIR --base DIR (a released GGI "
                         "transformer and its CogVideoX-5B-I2V base)")
    if (style is None) == (reference is None):
        raise ValueError("give --reference IMAGE (a style LoRA is trained on it first, into OUT/style) or --style "
                         "RUN (a finished `loom train style` run)")
    progress("stage 1/4: GGI model")
    model = load_ggi_run(ggi, ggi_steps, degradation) if ggi else load_ggi_checkpoint(*checkpoint, ggi_steps,
                                                                                        degradation)
    progress("stage 2/4: scene structure")
    if data is None:
        if not scene or not trajectory:
            raise ValueError("give --scene and --trajectory (rendered here by the scene job), or --data (scene shards "
                             "rendered along the trajectory)")
        data = render_scene(scene, trajectory, frames, size, model.vae.config.latent_channels,
                            os.path.join(out, "scene-data"))
    sample = read_scene_sample(data, key)
    progress("stage 3/4: style")
    if style is None:
        style = os.path.join(out, "style")
        if not os.path.isfile(os.path.join(style, "lora", "pytorch_lora_weights.safetensors")):
            train_style(style, reference, identifier or "[v]", style_recipe, style_sets or [])
    from loom.inference.style import load_style_run

    run = load_style_run(style)
    ident = identifier or next(iter(run.identifiers))
    if ident not in run.identifiers:
        raise ValueError(f"--identifier {ident!r}: the style run {style} knows {sorted(run.identifiers)}")
    text = f"{ident} {prompt}".strip()
    progress("stage 4/4: anchors (SAG) and inbetweening (GGI)")
    settings = {"scene": data, "key": sample["__key__"], "reference": run.identifiers[ident], "style": style,
                "ggi": ggi or checkpoint[0], "ggi_steps": model.steps, "degradation": model.degradation}
    return generate_scene(out, sample, run, model, prompt=text, keyframes=keyframes, every=every, seed=seed,
                          guided=guided, sampling=sampling, settings=settings, progress=progress, tracking=tracking)
