"""The ``loom`` command. ``main()`` parses, builds, runs, closes; the work is in importable functions.

Command groups live beside the code they drive (``loom.corpora.commands``, ``loom.datasets.commands``, ...); this
root imports each of them directly. Each group keeps its heavy imports (torch, bpy, ray) inside its functions.

What every command shares, set up here once: ``-v/--verbose/--debug`` anywhere on the line (debug logging and the
traceback of an error), a group given alone prints its own commands, an unknown command or flag gets a
did-you-mean, and Ctrl-C says what the interrupted job kept (each job command sets ``interrupted``).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import traceback

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

DEBUG_FLAGS = ("-v", "--verbose", "--debug")


class LoomParser(argparse.ArgumentParser):
    """argparse with a did-you-mean for a mistyped command (Python 3.11's argparse lists the choices only;
    ``suggest_on_error`` arrived in 3.14)."""

    def _check_value(self, action, value):
        choices = action.choices
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            listed = ", ".join(repr(str(c)) for c in choices)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {listed}){hint}")
        return super()._check_value(action, value)


def parsers(p: argparse.ArgumentParser):
    """``p`` and every parser below it (the groups and their commands), depth first."""
    yield p
    for action in p._actions:
        if isinstance(action.choices, dict):  # a subparsers action: command name -> its parser
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    p = LoomParser(prog="loom", description="Loom: render corpora, train and evaluate "
                   "geometry-conditioned generative models of 3D and 4D content.")
    p.add_argument("--version", action="version", version=f"loom {__version__}")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    for q in parsers(p):
        # Every parser remembers itself (the innermost one parsed wins), so a bare group prints its own help and
        # an unknown flag is reported by the command it was given to.
        q.set_defaults(loom_parser=q)
        # -v anywhere on the line: below the root SUPPRESS keeps a command's parser from resetting a -v given
        # before it.
        q.add_argument(*DEBUG_FLAGS, dest="verbose", action="store_true",
                       default=False if q is p else argparse.SUPPRESS,
                       help="debug logging, and the full traceback of an error")
    return p


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The message for arguments no parser took, with the closest flag of the command for each unknown one."""
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for arg in extras:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-"):
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + ("; " + "; ".join(hints) if hints else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    leaf = getattr(args, "loom_parser", parser)
    if extras:
        leaf.error(_unrecognized(leaf, extras))  # exits 2, with the command's own usage line
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        leaf.print_help()  # `loom train` alone: the models it trains
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ValueError,
            RuntimeError) as e:
        # Expected user-facing errors: one clear line; -v (or LOOM_DEBUG=1) adds the traceback above it.
        if args.verbose or os.environ.get("LOOM_DEBUG"):
            traceback.print_exc()
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        kept = getattr(args, "interrupted", None)
        out = getattr(args, "job_out", None) or "the output folder"
        print("loom: interrupted" + (f"; {kept.format(out=out)}" if kept else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
