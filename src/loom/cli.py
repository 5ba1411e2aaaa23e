"""The ``loom`` command. ``main()`` parses, builds, runs, closes; the work is in importable functions.

Command groups live beside the code they drive (``loom.corpora.commands``, ``loom.datasets.commands``, ...); this
root imports each of them directly. Each group keeps its heavy imports (torch, bpy, ray) inside its functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from loom import __version__
from loom.platform.config import ConfigError

from loom.corpora import commands as corpora_commands
from loom.datasets import commands as datasets_commands
from loom.eval import commands as eval_commands
from loom.inference import commands as inference_commands
from loom.platform import tracking
from loom.training import commands as training_commands

# Each module exposes ``register(subparsers)`` adding its commands; each command sets ``func(args) -> int``.
COMMAND_GROUPS = (corpora_commands, datasets_commands, training_commands, inference_commands, tracking,
                  eval_commands)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loom", description="Loom: render corpora, train and evaluate "
                                "geometry-conditioned generative models of 3D and 4D content.")
    p.add_argument("--version", action="version", version=f"loom {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, PermissionError, ConnectionError, ValueError, RuntimeError) as e:
        # Expected user-facing errors: one clear line, no traceback (set LOOM_DEBUG=1 for it).
        if os.environ.get("LOOM_DEBUG"):
            raise
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loom: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
