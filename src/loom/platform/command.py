"""The one job command: every ``loom <group> <kind>`` that runs a job takes the same arguments and resolves its
config the same way::

    --recipe NAME | --config FILE  ->  the flags the command names (--out, --data, ...)  ->  --set key=value ...
        -> --help-config (every field) | --print-config (the resolved YAML) | run

``--config`` accepts the ``config.yaml`` a job writes beside its outputs, so a run can be replayed; ``--set`` goes
on top of it. Each command also names a valid ``--set`` example for its help, and what Ctrl-C keeps for its job kind
(``loom.cli`` prints it); the parser's defaults ``job_class`` and ``set_example`` let tests check every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from loom.platform import config as cfgmod


def add_job_args(p: argparse.ArgumentParser, job_cls: type, example: str, interrupted: str | None = None) -> None:
    """The arguments every job command takes. ``example``: a valid ``--set`` for this command's help text (tests
    resolve every command's example).
    ``interrupted``: what Ctrl-C leaves behind for this job kind and how to go on, ``{out}`` being the job's output
    folder (printed by ``loom`` on KeyboardInterrupt)."""
    names = sorted(cfgmod.recipes(job_cls))
    p.set_defaults(job_class=job_cls, set_example=example)
    if interrupted:
        p.set_defaults(interrupted=interrupted)
    p.add_argument("--recipe", default=None, help=f"named recipe: {', '.join(names)} (default: default)")
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help="start from this YAML config instead of a recipe (e.g. the config.yaml a job wrote)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {example} (repeatable; see --help-config)")
    p.add_argument("--help-config", action="store_true", help="list every config field with default and help")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def base_config(job_cls: type, args: argparse.Namespace) -> Any:
    """The recipe (``--recipe``, default 'default') or the file (``--config``): not both."""
    recipe = getattr(args, "recipe", None)
    path = getattr(args, "config_file", None)
    if path:
        if recipe:
            raise cfgmod.ConfigError(f"--recipe {recipe} and --config {path}: give one of them, not both")
        return cfgmod.load_yaml(job_cls, path)
    return cfgmod.resolve(job_cls, recipe or "default")


def resolve_config(job_cls: type, args: argparse.Namespace, **direct: Any) -> Any:
    """The config a command runs with: the base (recipe or file), then the command's own flags (``direct``:
    dotted field -> value, None = not given), then each ``--set`` in order."""
    cfg = apply_overrides(base_config(job_cls, args), args, **direct)
    # main() names this folder if the job is interrupted ("finished shards are kept in <out>")
    args.job_out = getattr(cfg, "out", None)
    return cfg


def apply_overrides(cfg: Any, args: argparse.Namespace, **direct: Any) -> Any:
    """``cfg`` with the command's own flags (``direct``: dotted field -> value, None = not given), then each
    ``--set`` in order."""
    overrides = [(k, v) for k, v in direct.items() if v is not None]
    overrides += cfgmod.parse_set(getattr(args, "overrides", []) or [])
    for key, value in overrides:
        cfg = cfgmod.override(cfg, key, value)
    return cfg


def run_job_command(args: argparse.Namespace, job: Callable[[Any], Any], /, *,
                    adjust: Callable[[Any], Any] | None = None, **direct: Any) -> int:
    """The one job command, after parsing: ``--help-config``; or resolve the config (:func:`resolve_config` with the
    command's own flags ``direct``, then ``adjust``, e.g. ``--resume``'s check against the run's config) and
    ``--print-config`` it, or run ``job`` on it. ``args.job_class`` is set by :func:`add_job_args`; ``job`` is
    positional-only because ``direct`` may name a config field ``run`` (eval's --run)."""
    if args.help_config:
        return help_config(args.job_class)
    cfg = resolve_config(args.job_class, args, **direct)
    if adjust is not None:
        cfg = adjust(cfg)
    if args.print_config:
        return print_config(cfg)
    job(cfg)
    return 0


def help_config(job_cls: type) -> int:
    for name, default, text in cfgmod.describe(job_cls):
        print(f"{name:32s} {default:28s} {text}")
    return 0


def print_config(cfg: Any) -> int:
    print(cfgmod.dump_yaml(cfg), end="")
    return 0
