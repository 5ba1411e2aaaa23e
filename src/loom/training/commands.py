"""``loom train ...``: the training commands."""

from __future__ import annotations

import argparse

# model -> (module, root config class, help)
TRAIN = {
    "ttv": ("loom.training.ttv", "TrainTTVJob", "the geometry-conditioned video DiT (TAPESTRY) on turntable shards"),
    "vae": ("loom.training.shape4d", "TrainVAEJob", "the VecSet shape VAE (ShapeGen4D 3.1) on 4D or static shards"),
    "shape4d": ("loom.training.shape4d", "TrainShape4DJob",
                "the spatiotemporal layers of the 4D shape DiT (ShapeGen4D 3.2) on 4D shards, base frozen"),
}


def _cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from loom.platform.command import help_config, print_config, resolve_config

    mod = importlib.import_module(TRAIN[args.model][0])
    job_cls = getattr(mod, TRAIN[args.model][1])
    if args.help_config:
        return help_config(job_cls)
    cfg = resolve_config(job_cls, args, out=args.out, **{"data.source": args.data})
    if args.print_config:
        return print_config(cfg)
    mod.train(cfg, resume=args.resume)
    return 0


def register(sub) -> None:
    import importlib

    from loom.platform.command import add_job_args

    train = sub.add_parser("train", help="train a model (Lightning + DeepSpeed; Ray Train for many nodes)")
    models = train.add_subparsers(dest="model", metavar="MODEL")
    for name, (module, cls_name, text) in TRAIN.items():
        p = models.add_parser(name, help=text)
        p.add_argument("--data", help="training shards: Loom output folder or fsspec URL (default from the recipe)")
        p.add_argument("--out", help="run folder (config, checkpoints, LoRA weights, samples)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                       "(same MLflow run, same data order)")
        add_job_args(p, getattr(importlib.import_module(module), cls_name))
        p.set_defaults(func=_cmd_train)
