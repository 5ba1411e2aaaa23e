"""``loom train ...`` and ``loom generate ...``: the training and sampling commands (found by module name from
``loom.platform.cli``)."""

from __future__ import annotations

import argparse

# model -> (module, root config class, help)
TRAIN = {
    "ttv": ("loom.training.ttv", "TrainTTVJob", "the geometry-conditioned video DiT (TAPESTRY) on turntable shards"),
}


def _cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from loom.pipelines.commands import _help_config, _resolve
    from loom.platform import config as cfgmod

    mod = importlib.import_module(TRAIN[args.model][0])
    job_cls = getattr(mod, TRAIN[args.model][1])
    if args.help_config:
        return _help_config(job_cls)
    cfg = _resolve(job_cls, args, out=args.out, **{"data.source": args.data})
    if args.print_config:
        print(cfgmod.dump_yaml(cfg), end="")
        return 0
    mod.train(cfg, resume=args.resume)
    return 0


def register(sub) -> None:
    import importlib

    from loom.pipelines.commands import _add_job_args

    train = sub.add_parser("train", help="train a model (Lightning + DeepSpeed; Ray Train for many nodes)")
    models = train.add_subparsers(dest="model", metavar="MODEL")
    for name, (module, cls_name, text) in TRAIN.items():
        p = models.add_parser(name, help=text)
        p.add_argument("--data", help="training shards: Loom output folder or fsspec URL (default from the recipe)")
        p.add_argument("--out", help="run folder (config, checkpoints, LoRA weights, samples)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                       "(same MLflow run, same data order)")
        _add_job_args(p, getattr(importlib.import_module(module), cls_name))
        p.set_defaults(func=_cmd_train)
