"""A finished run folder as every model line's inference reads it: ``config.yaml`` read as data (``yaml.safe_load``:
nothing in a run folder on a shared volume can run code) and the weights folder beside it.

A run folder on object storage (``s3://bucket/runs/x``, any fsspec URL) is read through a local copy,
:func:`local_run`: ``$LOOM_CACHE/runs/<name>-<hash of the URL>``, holding only what was asked for, and downloaded
again only where an object changed (its size, ETag or modification time), so a rerun downloads nothing."""

from __future__ import annotations

import os
from typing import Any

RUNS_CACHE = "runs"  # $LOOM_CACHE/runs/...: local copies of remote run folders
# what inference and evaluation read of a run: everything but the training state
NOT_FOR_INFERENCE = ("checkpoints", "ray", "samples")


def local_run(run: str, parts: list[str] | tuple[str, ...] | None = None) -> str:
    """A local folder with ``run``'s files: ``run`` itself when it is a local path; for a URL, its local copy with
    the files or folders ``parts`` (relative paths; default: everything but checkpoints, Ray's logs and samples).
    A missing run folder, or a missing part named in ``parts``, is an error naming the URL."""
    from loom.platform import storage

    if not storage.is_remote(run):
        return run
    everything = storage.files_under(run)
    if not everything:
        raise storage.missing_error(run, "run folder", "pass the --out of a finished `loom train` run")
    if parts is None:
        rels = [r for r in everything if r.split("/", 1)[0] not in NOT_FOR_INFERENCE]
    else:
        rels = []
        for part in parts:
            got = [r for r in everything if r == part or r.startswith(part.rstrip("/") + "/")]
            if not got:
                raise FileNotFoundError(f"{storage.join(run, part)} does not exist: is {run!r} a finished run "
                                        "folder (its final weights are written when training ends)?")
            rels += got
    local = storage.local_folder(run, RUNS_CACHE)
    got = storage.download_tree(run, local, rels)
    if got:
        import sys

        print(f"run:      {run}: {len(got)} file(s) downloaded to {local}", file=sys.stderr, flush=True)
    return local


def read_run_config(run: str, weights: str, command: str) -> tuple[dict[str, Any], str]:
    """(the run's config.yaml as a mapping, its path); ``weights``: the folder a finished ``command`` run has
    beside it (e.g. ``lora``), checked so that an unfinished or wrong folder is named at once."""
    import yaml

    run = local_run(run, ["config.yaml", weights])  # a URL: the local copy of the two
    path = os.path.join(run, "config.yaml")
    for p in (path, os.path.join(run, weights)):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist: is {run!r} a finished `{command}` run folder?")
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a job config (a mapping of sections): is {run!r} a `{command}` run folder?")
    return doc, path


def config_section(doc: dict[str, Any], name: str, cls: type, path: str, *, required: bool = False) -> Any:
    """The section ``name`` of a run's config as ``cls`` (checked field by field, errors name ``name.field``);
    a missing section takes ``cls``'s defaults unless ``required``."""
    from loom.platform import config as cfgmod

    section = doc.get(name)
    if section is None and required:
        raise ValueError(f"{path} has no {name} section: is it the config.yaml of a finished training run?")
    if not isinstance(section or {}, dict):
        raise ValueError(f"{path}: {name} should be a mapping of settings, got {section!r}")
    return cfgmod.from_dict(cls, section or {}, prefix=f"{name}.")
