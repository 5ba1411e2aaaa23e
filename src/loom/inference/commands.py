"""``loom generate ...``: sample from a trained run; ``loom texture``: a textured asset from a mesh and turntable
frames; ``loom export ...``: a trained run as a model folder with a model
card, logged to MLflow as the run's model (no Lightning needed for either)."""

from __future__ import annotations

import argparse
import os


def _cmd_generate(args: argparse.Namespace) -> int:
    from loom.inference.ttv import generate_ttv

    path = generate_ttv(args.run, args.data, args.out, key=args.key, reference=args.reference, prompt=args.prompt,
                        steps=args.steps, seed=args.seed)
    print(f"video:    {path}")
    return 0


def _cmd_generate_inbetween(args: argparse.Namespace) -> int:
    from loom.inference.inbetween import generate_inbetween

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 720x480") from None
    path = generate_inbetween(args.run, args.anchors, args.out, data=args.data, key=args.key, scene=args.scene,
                              trajectory=args.trajectory, size=(w, h), seed=args.seed, steps=args.steps,
                              degradation=args.degradation, prompt=args.prompt, guidance=args.guidance,
                              checkpoint=(args.transformer, args.base) if args.transformer or args.base else None)
    print(f"video:    {path}  (settings in {path.rsplit('.', 1)[0]}.json)")
    return 0


def _cmd_generate_scene(args: argparse.Namespace) -> int:
    from loom.inference.scene import run_generate_scene
    from loom.platform.tracking import TrackingSettings

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 720x480") from None
    try:
        keys = [int(k) for k in args.keyframes.split(",")] if args.keyframes else None
    except ValueError:
        raise ValueError(f"--keyframes {args.keyframes!r}: give frame indices, e.g. 0,45,90") from None
    sampling = {k: v for k, v in (("steps", args.steps), ("replace_steps", args.replace_steps),
                                  ("guidance", args.guidance), ("true_cfg", args.true_cfg),
                                  ("control_weight", args.control_weight)) if v is not None}
    tracking = None if args.no_mlflow else TrackingSettings(uri=args.tracking_uri or "", experiment=args.experiment)
    done = run_generate_scene(
        args.out, style=args.style, reference=args.reference, style_recipe=args.style_recipe,
        style_sets=args.style_set or [], identifier=args.identifier, prompt=args.prompt or "",
        ggi=args.ggi, checkpoint=(args.transformer, args.base) if args.transformer or args.base else None,
        data=args.data, key=args.key, scene=args.scene, trajectory=args.trajectory, frames=args.frames, size=(w, h),
        keyframes=keys, every=args.every, seed=args.seed, guided=not args.unguided, sampling=sampling,
        ggi_steps=args.ggi_steps, degradation=args.degradation, tracking=tracking)
    print(f"video:    {args.out}/video.mp4  ({done['frames']} frames; lossless video.mkv beside it)")
    print(f"anchors:  {args.out}/anchors/  (frames {', '.join(str(k) for k in done['keyframes'])})")
    if done.get("mlflow"):
        from loom.platform.tracking import ui_hint

        print(f"mlflow:   run {done['mlflow'][2]} ({done['mlflow'][0]})")
        print(f"UI:       {ui_hint(*done['mlflow'])}")
    return 0


def _cmd_generate_4d(args: argparse.Namespace) -> int:
    if bool(args.data) == bool(args.video):
        raise SystemExit("loom generate 4d: give --video (an in-the-wild clip: registered, textured 4D mesh) or --data "
                         "(a conditioning video as the corpus renders it: one mesh per frame), not both")
    if args.video:
        return _cmd_generate_4d_video(args)
    if not args.run:
        raise SystemExit("loom generate 4d --data needs --run (a finished `loom train shape4d` run)")
    from loom.inference.shape4d import generate_4d

    paths = generate_4d(args.run, args.data, args.out, key=args.key, frames=args.frames, steps=args.steps,
                        shift=args.shift, seed=args.seed, resolution=args.resolution, latents=args.latents,
                        guidance_scale=args.guidance, baseline=args.baseline)
    print(f"meshes:   {len(paths)} frames in {args.out}")
    return 0


def _cmd_generate_4d_video(args: argparse.Namespace) -> int:
    from loom.inference.shape4d_video import Video4DSettings, generate_4d_video
    from loom.platform.tracking import TrackingSettings, ui_hint

    st = Video4DSettings(frames=args.frames or 0, size=args.size, fill=args.fill, register=not args.no_register,
                         similarity=args.similarity, decimate=args.decimate,
                         texture_resolution=args.texture_resolution, turntable=args.turntable, fast=args.fast)
    tracking = None if args.no_mlflow else TrackingSettings(uri=args.tracking_uri or "", experiment=args.experiment)
    done = generate_4d_video(args.run, args.video, args.out, mask=args.mask, matting=args.matting,
                             meshes=args.meshes, texture_run=args.texture_run, seed=args.seed, steps=args.steps,
                             settings=st, tracking=tracking)
    print(f"4D mesh:  {done.frames} frames sharing {done.faces} faces: {os.path.join(args.out, 'animated.glb')}, "
          f"{os.path.join(args.out, 'frames')}/frame_000.obj ...")
    print(f"media:    {os.path.join(args.out, 'side_by_side.mp4')}, {os.path.join(args.out, 'turntable.mp4')}")
    if done.mlflow:
        print(f"mlflow:   run {done.mlflow[2]} ({done.mlflow[0]})")
        print(f"UI:       {ui_hint(*done.mlflow)}")
    return 0


def _cmd_generate_3d(args: argparse.Namespace) -> int:
    from loom.inference.shape4d import generate_3d

    done = generate_3d(args.image, args.base, args.out, vae=args.vae, image_encoder=args.image_encoder,
                       steps=args.steps, seed=args.seed, resolution=args.resolution, latents=args.latents,
                       guidance_scale=args.guidance, foreground_ratio=args.foreground_ratio)
    print(f"mesh:     {done.path} ({done.vertices} vertices, {done.faces} faces)")
    print(f"models:   base {done.base}, vae {done.vae}, image encoder {done.image_encoder}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from loom.inference.export import export_ttv

    done = export_ttv(args.run, args.out, step=args.step, overwrite=args.overwrite, uri=args.uri,
                      mlflow=not args.no_mlflow)
    print(f"exported: {'the final weights' if done.step is None else f'step {done.step}'} of {args.run} -> {done.out}")
    for f in done.files:
        print(f"          {f}")
    if done.model_id:
        from loom.platform.tracking import ui_hint

        print(f"mlflow:   logged model {done.model_id} of run {done.run_id} ({done.tracking_uri})")
        print(f"UI:       {ui_hint(done.tracking_uri, done.experiment_id, done.run_id)}")
    else:
        print("mlflow:   not logged (" + ("--no-mlflow" if args.no_mlflow else "the run has no mlflow_run.json: "
                                           "trained with tracking off") + ")")
    return 0


def _cmd_texture(args: argparse.Namespace) -> int:
    from loom.inference.texture import texture_from_frames
    from loom.platform.tracking import TrackingSettings

    tracking = None if args.no_mlflow else TrackingSettings(uri=args.tracking_uri or "", experiment=args.experiment)
    if args.turntable < 0 or args.turntable_size < 16:
        raise ValueError(f"--turntable {args.turntable} must be >= 0 (0: no render) and --turntable-size "
                         f"{args.turntable_size} >= 16")
    turntable = (args.turntable, args.turntable_size)
    if args.run:
        from loom.inference.texture import texture_from_run

        if args.frames_pass != "rgb":
            raise ValueError("--frames-pass picks a pass of given frames; with --run the generated video is projected")
        done = texture_from_run(args.mesh, args.run, args.out, frames=args.frames, key=args.key,
                                resolution=args.resolution, seed=args.seed, steps=args.steps,
                                render_frames=args.render_frames, render_size=args.render_size, stages=args.stages,
                                coverage_target=args.coverage_target, naive_fusion=args.naive_fusion,
                                reference=args.reference, prompt=args.prompt, tracking=tracking, turntable=turntable)
    elif args.reference or args.prompt is not None:
        raise ValueError("--reference and --prompt steer the generation: they need --run")
    elif args.frames:
        done = texture_from_frames(args.mesh, args.frames, args.out, key=args.key, frames_pass=args.frames_pass,
                                   resolution=args.resolution, tracking=tracking, turntable=turntable)
    else:
        raise ValueError("pass --run RUN (generate the turntable with a trained `loom train ttv` run) or --frames "
                         "SHARDS (project given turntable frames of the mesh)")
    print(f"texture:  {done.out}/texture.png  coverage {done.coverage:.1%} of the surface's texels seen "
          f"(the rest filled in UV space)")
    print(f"mesh:     {done.out}/mesh.glb  (and mesh.obj + mesh.mtl)")
    if args.turntable:
        print(f"render:   {done.out}/turntable.mp4  (the textured mesh along the orbit, {args.turntable} frames)")
    if done.own_texture_psnr_db is not None:
        print(f"check:    {done.own_texture_psnr_db:.1f} dB PSNR against the mesh's own texture over the seen texels")
    print(f"report:   {done.out}/report.json  ({', '.join(f'{k} {v:.1f} s' for k, v in done.seconds.items())})")
    if done.run is not None:
        from loom.platform.tracking import ui_hint

        print(f"mlflow:   run {done.run[2]} ({done.run[0]})")
        print(f"UI:       {ui_hint(*done.run)}")
    return 0


def _tracking_args(p: argparse.ArgumentParser, experiment: str, prefix: str = "") -> None:
    """The MLflow flags of a command that logs one run for what it wrote (`TrackingSettings`)."""
    p.add_argument("--experiment", default=experiment, help=f"{prefix}MLflow experiment of the run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db or "
                   "$LOOM_HOME/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")


def register(sub) -> None:
    p = sub.add_parser("texture", help="a textured asset from a mesh: a generated (--run) or given "
                       "(--frames) turntable back-projected into its UV layout (TAPESTRY 3.2)")
    p.add_argument("--mesh", required=True, help="the mesh (.glb/.gltf/.obj): its own UV map when it is one UV-mapped "
                   "mesh, else unwrapped with xatlas")
    p.add_argument("--run", help="a finished `loom train ttv` run: generate the turntable video with it from the "
                   "mesh's condition renders, project it, then 3D-aware inpainting stages (TAPESTRY 3.2)")
    p.add_argument("--frames", help="turntable shards of THIS mesh (`loom render ttv` output folder, a shard or a "
                   "URL): without --run, the frames to project; with --run, the condition renders (default: rendered "
                   "into OUT/conditions)")
    p.add_argument("--frames-pass", default="rgb", choices=["rgb", "albedo"], help="which pass to project (albedo: "
                   "shards rendered with --set passes.albedo=true; the exact check of back-projection)")
    p.add_argument("--key", help="sample key in --frames (default: the first sample of the mesh file's sha256)")
    p.add_argument("--resolution", type=int, default=1024, help="texture size in texels (paper setting: 2048)")
    p.add_argument("--seed", type=int, default=0, help="with --run: noise seed of the generation")
    p.add_argument("--steps", type=int, help="with --run: sampler steps (default: the run's flow.sample_steps)")
    p.add_argument("--stages", type=int, default=3, help="with --run: stages at most (1 = the orbit alone; 2..: "
                   "3D-aware inpainting from the rotation that shows the most unseen texels)")
    p.add_argument("--coverage-target", type=float, default=0.99, help="with --run: stop once this fraction of the "
                   "surface's texels is seen")
    p.add_argument("--naive-fusion", action="store_true", help="with --run: the Fig. 6 baseline, every stage "
                   "generated independently (nothing known) and blended")
    p.add_argument("--reference", help="with --run: a reference image of the look wanted (as `loom generate ttv`: "
                   "the reference latent and CLIP tokens of every stage come from it; default: the condition "
                   "render's first frame)")
    p.add_argument("--prompt", help="with --run: the text prompt of every stage (the run needs model.text_encoder; "
                   "default: the run's prompt template)")
    p.add_argument("--turntable", type=int, default=24, help="frames of the turntable render of the result "
                   "(OUT/turntable.mp4, by `loom render ttv`; 0: none)")
    p.add_argument("--turntable-size", type=int, default=256, help="its size in pixels")
    p.add_argument("--render-frames", type=int, default=61, help="with --run and no --frames: orbit frames rendered")
    p.add_argument("--render-size", type=int, default=0, help="with --run and no --frames: render size in pixels "
                   "(default: the run's data.size, else 512)")
    p.add_argument("--out", default="out/texture", help="output folder")
    _tracking_args(p, "texture")
    p.set_defaults(func=_cmd_texture)

    gen = sub.add_parser("generate", help="sample from a trained model").add_subparsers(dest="model", metavar="MODEL")
    p = gen.add_parser("ttv", help="a turntable video from a mesh's condition renders, a reference image and a prompt")
    p.add_argument("--run", required=True, help="a finished `loom train ttv` run folder (config.yaml + lora/)")
    p.add_argument("--data", required=True, help="condition renders: a turntable shard/folder (`loom render ttv`)")
    p.add_argument("--key", help="sample key in --data (default: the first)")
    p.add_argument("--reference", help="reference image for the first frame (default: the sample's first frame)")
    p.add_argument("--prompt", help="text prompt (needs the run's model.text_encoder)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's flow.sample_steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="out/generated.mp4", help="output video (H.264 mp4)")
    p.set_defaults(func=_cmd_generate)

    p = gen.add_parser("inbetween", help="a scene video between anchor views along a camera trajectory "
                       "(VideoFrom3D's GGI): structure and warped noise from the coarse geometry")
    p.add_argument("--run", help="a finished `loom train ggi` run folder (config.yaml + transformer/)")
    p.add_argument("--transformer", help="instead of --run: a released GGI transformer folder (the authors' "
                   "checkpoint-N/transformer), with --base")
    p.add_argument("--base", help="with --transformer: CogVideoX-5B-I2V's diffusers folder (its vae/, scheduler/, "
                   "text_encoder/, tokenizer/)")
    p.add_argument("--anchors", required=True, help="folder of anchor images named by their frame index on the "
                   "trajectory (0000.png, 0045.png, ...): at least two, 4 or more frames apart")
    p.add_argument("--scene", help="coarse geometry (.glb/.gltf/.obj/.blend): rendered along --trajectory by the "
                   "scene job (edges, flow, warped noise)")
    p.add_argument("--trajectory", help="camera keyframes (.yaml/.json) or the preset 'orbit'")
    p.add_argument("--data", help="instead of --scene/--trajectory: scene shards already rendered along it "
                   "(`loom render scene`, noise.channels = the VAE's latent channels)")
    p.add_argument("--key", help="sample key in --data (default: the first)")
    p.add_argument("--size", default="720x480", help="with --scene: frame size WIDTHxHEIGHT (multiples of 16)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--degradation", type=float, help="fresh noise blended into the warped noise (default: the "
                   "run's sample.degradation, 0.5)")
    p.add_argument("--prompt", help="text prompt (needs the run's model.text_encoder; default: its model.prompt)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance on the prompt (default: the run's "
                   "sample.guidance; the authors use 6.0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="out/inbetween.mp4", help="output video (H.264 mp4)")
    p.set_defaults(func=_cmd_generate_inbetween)

    p = gen.add_parser("scene", help="a scene video from coarse geometry, a camera trajectory and a style reference "
                       "(VideoFrom3D: SAG anchor views, GGI between them)")
    p.add_argument("--scene", help="coarse geometry (.glb/.gltf/.obj/.blend), rendered along --trajectory by the "
                   "scene job")
    p.add_argument("--trajectory", help="camera keyframes (.yaml/.json) or the preset 'orbit'")
    p.add_argument("--frames", type=int, default=46, help="with --scene: frames along the trajectory (46: one "
                   "segment, as the paper)")
    p.add_argument("--size", default="720x480", help="with --scene: frame size WIDTHxHEIGHT (multiples of 16)")
    p.add_argument("--data", help="instead of --scene/--trajectory: scene shards rendered along it")
    p.add_argument("--key", help="sample key in --data (default: the first)")
    p.add_argument("--reference", help="style reference image: a style LoRA is trained on it first (`loom train "
                   "style`, into OUT/style; a rerun reuses it)")
    p.add_argument("--style", help="instead of --reference: a finished `loom train style` run")
    p.add_argument("--style-recipe", default="default", help="with --reference: the `loom train style` recipe")
    p.add_argument("--style-set", action="append", metavar="KEY=VALUE", help="with --reference: a `loom train "
                   "style` config override, e.g. model.base=/models/FLUX.1-dev (repeatable)")
    p.add_argument("--identifier", help="the style's identifier prompt (default: the style run's first; with "
                   "--reference: '[v]')")
    p.add_argument("--prompt", help="text after the identifier (post-prompting: 'winter', 'at dusk')")
    p.add_argument("--ggi", help="a finished `loom train ggi` run")
    p.add_argument("--transformer", help="instead of --ggi: a released GGI transformer folder, with --base")
    p.add_argument("--base", help="with --transformer: CogVideoX-5B-I2V's diffusers folder")
    p.add_argument("--keyframes", help="anchor frames, e.g. 0,45,90 (default: every --every frames and the last)")
    p.add_argument("--every", type=int, default=45, help="frames between anchors (the paper: 45; the anchor-count "
                   "sweep of the evaluation varies it)")
    p.add_argument("--unguided", action="store_true", help="sample every anchor from its structure alone, without "
                   "the previous anchor's warp (Sparse Appearance-guided Sampling off: VideoFrom3D Fig. 11's "
                   "ablation, and its style transitions)")
    p.add_argument("--steps", type=int, help="SAG sampler steps (default 25)")
    p.add_argument("--replace-steps", type=int, help="SAG steps with the warp's latents replaced (default 12)")
    p.add_argument("--guidance", type=float, help="FLUX guidance embedding (default 4)")
    p.add_argument("--true-cfg", type=float, help="true classifier-free guidance from step 5 (default 3.5; 1 = off)")
    p.add_argument("--control-weight", type=float, help="HED ControlNet weight (default 0.8)")
    p.add_argument("--ggi-steps", type=int, help="GGI sampler steps (default: the run's sample.steps)")
    p.add_argument("--degradation", type=float, help="GGI: fresh noise blended into the warped noise (default: "
                   "the run's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (anchor i: seed + i; segment i: seed + i)")
    p.add_argument("--out", default="out/scene", help="output folder: video.mp4, video.mkv, anchors/, structure/, "
                   "warps/, segments/, scene.json (a rerun goes on where a run stopped)")
    _tracking_args(p, "scene")
    p.set_defaults(func=_cmd_generate_scene)

    p = gen.add_parser("4d", help="a mesh sequence from a conditioning video (ShapeGen4D): one mesh per frame")
    p.add_argument("--run", help="a finished `loom train shape4d` run folder (config.yaml + spatiotemporal/)")
    p.add_argument("--meshes", help="with --video, instead of --run: per-frame meshes to register and texture "
                   "(frame_000.obj ...: a `loom generate 4d --data` output or a baseline's)")
    p.add_argument("--data", help="conditioning video as the 4D corpus renders it: 4D shards (a sample's video), a "
                   "video file, or a folder of frame images -> one mesh per frame")
    p.add_argument("--video", help="instead of --data: an in-the-wild clip (or a folder of frames) -> frames sampled "
                   "and framed as the corpus, meshes generated, registered to the video (appendix A.1), made "
                   "topology-consistent and textured (A.2): OUT/animated.glb, OUT/frames/, OUT/side_by_side.mp4")
    p.add_argument("--mask", help="with --video: the foreground as a mask video or folder (white = object), one "
                   "frame per video frame (default: the video's alpha, else --matting)")
    p.add_argument("--matting", help="with --video: a folder with a background-removal ONNX model (rembg's u2net "
                   "family, e.g. u2net.onnx or isnet-general-use.onnx), used through rembg")
    p.add_argument("--texture-run", help="with --video: a finished `loom train ttv` run: texture frame 1 with "
                   "`loom texture --run` (TAPESTRY; default: the video's first frame projected onto it)")
    p.add_argument("--size", type=int, default=256, help="with --video: prepared frame size in pixels")
    p.add_argument("--fill", type=float, default=0.85, help="with --video: share of the frame the object spans (the "
                   "4D corpus's sequence.fill)")
    p.add_argument("--similarity", default="dino", choices=["dino", "iou"], help="with --video: how registration "
                   "compares renders with the frame (dino: silhouette IoU + DINOv2 cosine, DreamSim's stand-in)")
    p.add_argument("--no-register", action="store_true", help="with --video: keep the model's pose (no A.1)")
    p.add_argument("--decimate", type=int, default=8000, help="with --video: faces of frame 1 before tracking "
                   "(0 = as generated)")
    p.add_argument("--texture-resolution", type=int, default=1024, help="with --video: texture size in texels")
    p.add_argument("--turntable", type=int, default=24, help="with --video: views of OUT/turntable.mp4 (0 = none)")
    p.add_argument("--fast", action="store_true", help="with --video: small registration and tracking settings "
                   "(a quick look; tests)")
    _tracking_args(p, "generate-4d", "with --video: ")
    p.add_argument("--key", help="sample key in 4D shards (default: the first)")
    p.add_argument("--baseline", choices=["step1x3d", "step1x3d-shared"], help="with --data: a Tab. 1 baseline "
                   "from the run's base without its spatiotemporal layers, per frame on independent (step1x3d) or "
                   "shared (step1x3d-shared) noise; evaluate its folder with `loom eval 4d --pred`")
    p.add_argument("--frames", type=int, help="evenly spread frames of the video (default: the run's data.frames; "
                   "0 = all)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's flow.sample_steps)")
    p.add_argument("--shift", type=float, help="sampling time shift (default: the run's flow.shift; 0 = "
                   "sqrt(frames), 1 = none)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--latents", type=int, help="latents per frame (default: as in training)")
    p.add_argument("--resolution", type=int, help="marching-cubes grid (default: the run's flow.mesh_resolution)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="out/generated-4d", help="output folder (--data: frame_000.obj, ...; --video: "
                   "the stages, kept for a rerun)")
    p.set_defaults(func=_cmd_generate_4d)

    p = gen.add_parser("3d", help="a mesh from one image with the base shape model alone (Step1X-3D as released, "
                       "no spatiotemporal layers): the check that its weights loaded right")
    p.add_argument("--image", required=True, help="image of the object: RGBA with a transparent background (framed "
                   "as Step1X-3D does), or RGB already on white")
    p.add_argument("--base", required=True, help="the base: the released Step1X-3D-Geometry-1300m folder (local, or "
                   "a cached Hugging Face id such as stepfun-ai/Step1X-3D/Step1X-3D-Geometry-1300m), a Shape4DDiT "
                   "base folder, or 'tiny' (random, tests)")
    p.add_argument("--vae", help="shape VAE folder or cached Hugging Face id (default: BASE/vae; tiny with --base "
                   "tiny)")
    p.add_argument("--image-encoder", help="DINOv2 folder or cached Hugging Face id (default: the one BASE/"
                   "visual_encoder names; tiny with --base tiny)")
    p.add_argument("--steps", type=int, help="sampler steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance against zero image tokens "
                   "(default: 7.5, Step1X-3D's; 1 = off)")
    p.add_argument("--latents", type=int, help="shape latents to draw (default: the VAE's num_latents, 2,048 for "
                   "the release)")
    p.add_argument("--foreground-ratio", type=float, default=0.9, help="scale an RGBA image's object to this "
                   "fraction of the frame, as Step1X-3D does (0 = leave the image as it is)")
    p.add_argument("--resolution", type=int, help="marching-cubes grid (default: 128; Step1X-3D uses 384)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="out/generated-3d.glb", help="output mesh: .glb, .obj or .ply")
    p.set_defaults(func=_cmd_generate_3d)

    exp = sub.add_parser("export", help="a trained run as a model folder (LoRA, fusion, model card), logged to MLflow "
                         "as the run's model").add_subparsers(dest="model", metavar="MODEL")
    p = exp.add_parser("ttv", help="a `loom train ttv` run: the LoRA (diffusers format), fusion/ and README.md (model "
                       "card: base, data, config, metrics from MLflow)")
    p.add_argument("--run", required=True, help="a `loom train ttv` run folder (config.yaml, lora/, checkpoints/)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--step", type=int, help="export the checkpoint saved at this step (default: the final weights "
                   "in RUN/lora); loads the base transformer once")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--uri", help="MLflow tracking URI of the run (default: the one in RUN/mlflow_run.json)")
    p.add_argument("--no-mlflow", action="store_true", help="neither read metrics from MLflow nor log the export")
    p.set_defaults(func=_cmd_export)
