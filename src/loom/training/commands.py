"""``loom train ...``: the training commands, and the check that ``--resume`` keeps the run's config."""

from __future__ import annotations

import argparse
import os
from typing import Any

# model -> help; its package (loom.training.<model>) has the root config class and train(cfg, resume=...)
TRAIN = {
    "ttv": "the geometry-conditioned video DiT (TAPESTRY) on turntable shards",
    "vae": "the VecSet shape VAE (ShapeGen4D 3.1) on 4D or static shards",
    "shape4d": "the spatiotemporal layers of the 4D shape DiT (ShapeGen4D 3.2) on 4D shards, base frozen",
    "ggi": "VideoFrom3D's inbetweening model (GGI, 3.3-3.4) on video clips or rendered scenes",
    "style": "VideoFrom3D's style LoRAs (distribution alignment, 3.2) on FLUX + HED ControlNet, from reference images",
}

# model -> its own repeatable flags: (flag, config field it fills as a list, help)
FLAGS = {"style": (("--reference", "data.references", "a reference image (repeatable: one LoRA for several styles)"),
                   ("--identifier", "data.identifiers", "the identifier prompt of each --reference, in order, e.g. "
                    "\"[v1]\" (one for all, or one each; default [v1], [v2], ...)"))}
DATA_HELP = {"style": "a folder of reference images (optional; added after --reference)"}


def jobs() -> dict[str, tuple[Any, type]]:
    """model -> (its package, with ``train(cfg, resume=...)``; its root config class), imported when the parser is
    built rather than when ``loom.cli`` is imported."""
    from loom.training import ggi, shape4d, style, ttv, vae

    return {"ttv": (ttv, ttv.TrainTTVJob), "vae": (vae, vae.TrainVAEJob),
            "shape4d": (shape4d, shape4d.TrainShape4DJob), "ggi": (ggi, ggi.TrainGGIJob),
            "style": (style, style.TrainStyleJob)}


def direct(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command's own flags set (None = not given): --data, and the model's FLAGS."""
    out: dict[str, Any] = {"data.source": args.data}
    for flag, key, _ in FLAGS.get(args.model, ()):
        out[key] = getattr(args, key.replace(".", "_"), None)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, counting a relative and an absolute local path to one place as equal (``train`` writes absolute
    paths into config.yaml; the command line that resumes may give them relative)."""
    if a == b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # a list of paths (train style --reference)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str) and a and b and "://" not in a + b:
        return os.path.abspath(a) == os.path.abspath(b)
    return False


def resume_changes(saved: Any, wanted: Any) -> list[tuple[str, Any, Any]]:
    """The fields where ``wanted`` differs from the run's ``saved`` config and which may not change on resume
    (``loom.training.launch.RESUMABLE``)."""
    from loom.platform.config import diff
    from loom.training.launch import resumable

    return [(k, a, b) for k, a, b in diff(saved, wanted) if not resumable(k) and not _same(a, b)]


def resume_config(job_cls: type, args: argparse.Namespace, wanted: Any) -> Any:
    """The config ``--resume`` continues with: the run's own ``<out>/config.yaml`` with this command's flags and
    ``--set`` on top (or, with ``--recipe``/``--config``, that config, which must then match the run's). Refuses a
    change to a field outside ``loom.training.launch.RESUMABLE``, naming each."""
    from loom.platform import config as cfgmod
    from loom.platform.command import apply_overrides
    from loom.training.launch import RESUMABLE

    from loom.platform import storage

    remote = storage.is_remote(wanted.out)
    path = storage.join(wanted.out, "config.yaml") if remote else os.path.join(wanted.out, "config.yaml")
    if not (storage.exists(path) if remote else os.path.isfile(path)):
        return wanted  # nothing to compare with; training then says whether there is a checkpoint to resume
    saved = cfgmod.load_yaml(job_cls, path)
    if not (args.recipe or args.config_file):
        wanted = apply_overrides(saved, args, out=args.out, **direct(args))
    changed = resume_changes(saved, wanted)
    if changed:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
        raise cfgmod.ConfigError(
            f"--resume: the config differs from the run's own ({path}) in {lines}. A resumed run keeps these fields "
            f"(only {', '.join(RESUMABLE)} may change): drop those --set/flags, or train a new run with another --out",
            field=changed[0][0])
    return wanted


def _cmd_train(args: argparse.Namespace) -> int:
    from loom.platform.command import run_job_command

    mod, job_cls = jobs()[args.model]
    return run_job_command(args, lambda cfg: mod.train(cfg, resume=args.resume),
                           adjust=(lambda cfg: resume_config(job_cls, args, cfg)) if args.resume else None,
                           out=args.out, **direct(args))


# --set examples shown in each command's help (tests resolve each against its job)
EXAMPLES = {"ttv": "trainer.max_steps=2000", "vae": "trainer.max_steps=2000", "shape4d": "trainer.max_steps=2000",
            "ggi": "trainer.max_steps=1300", "style": "trainer.max_steps=600"}

INTERRUPTED = ("the last checkpoint in {out}/checkpoints is kept (one every trainer.checkpoint_every steps): the same "
               "command with --resume continues from it")


def register(sub) -> None:
    from loom.platform.command import add_job_args
    from loom.training.launch import RESUMABLE

    train = sub.add_parser("train", help="train a model (Lightning + DeepSpeed; Ray Train for many nodes)")
    models = train.add_subparsers(dest="model", metavar="MODEL")
    for name, (_, job_cls) in jobs().items():
        p = models.add_parser(name, help=TRAIN[name])
        p.add_argument("--data", help=DATA_HELP.get(name, "training shards: Loom output folder or fsspec URL "
                                                     "(default from the recipe)"))
        for flag, key, text in FLAGS.get(name, ()):
            p.add_argument(flag, dest=key.replace(".", "_"), action="append", metavar=flag[2:].upper(), help=text)
        p.add_argument("--out", help="run folder (config, checkpoints, LoRA weights, samples)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                       "(same MLflow run, same data order), with the run's own config (--out/config.yaml); --set "
                       f"may change only {', '.join(RESUMABLE)}")
        add_job_args(p, job_cls, example=EXAMPLES[name], interrupted=INTERRUPTED)
        p.set_defaults(func=_cmd_train)
