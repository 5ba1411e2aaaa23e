"""A finished run folder as every model line's inference reads it: ``config.yaml`` read as data (``yaml.safe_load``:
nothing in a run folder on a shared volume can run code) and the weights folder beside it."""

from __future__ import annotations

import os
from typing import Any


def read_run_config(run: str, weights: str, command: str) -> tuple[dict[str, Any], str]:
    """(the run's config.yaml as a mapping, its path); ``weights``: the folder a finished ``command`` run has
    beside it (e.g. ``lora``), checked so that an unfinished or wrong folder is named at once."""
    import yaml

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
