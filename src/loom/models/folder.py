"""Loom's own model folders (the 4D models; the video DiT uses diffusers' format): ``config.json`` with the class
name, and ``model.safetensors`` with every weight. One writer and one reader, so every such model refuses a missing
or foreign folder the same way. Nothing is downloaded: paths are local directories."""

from __future__ import annotations

import json
import os

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_folder(model: torch.nn.Module, config: dict, path: str) -> None:
    """``path/config.json`` (``config`` plus ``_class_name``) and ``path/model.safetensors`` (the state dict)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({"_class_name": type(model).__name__, **config}, f, indent=2, sort_keys=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(path, WEIGHTS_NAME))


def read_folder(path: str, cls_name: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict without ``_class_name``, state dict) of a folder ``save_folder`` wrote for a ``cls_name``;
    ``what`` names the model in errors (e.g. "shape VAE")."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory {path!r} does not exist: pass a local folder written by "
                                f"{cls_name}.save_pretrained (config.json + model.safetensors); nothing is downloaded")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{what} directory {path!r} has no {name}: is it a folder written by "
                                    f"{cls_name}.save_pretrained?")
    with open(os.path.join(path, CONFIG_NAME)) as f:
        raw = json.load(f)
    name = raw.pop("_class_name", cls_name)
    if name != cls_name:
        raise ValueError(f"{path!r} holds a {name}, not a {cls_name}")
    return raw, load_file(os.path.join(path, WEIGHTS_NAME))


def checkpoint_component(path: str, sub: str, field: str, example: str, model: str) -> tuple[str | None, str]:
    """(checkpoint root or None, component folder) for a user's ``path``: the component folder itself (it has a
    ``config.json``) or a checkpoint root holding ``<sub>/config.json`` (e.g. a Wan checkpoint's ``text_encoder/``).
    ``field``, ``example`` and ``model`` word the error that names a missing or foreign folder."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{field.replace('_', ' ')} directory {field}={path!r} does not exist: point it at "
                                f"a local {example}")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return None, path
    if os.path.isfile(os.path.join(path, sub, CONFIG_NAME)):
        return path, os.path.join(path, sub)
    raise FileNotFoundError(f"{field.replace('_', ' ')} directory {field}={path!r} has no config.json (nor "
                            f"{sub}/config.json): is it a transformers {model} folder?")


def companion_candidates(component: str, root: str | None, name: str) -> list[str]:
    """Where a component's companion folder (a tokenizer, an image processor) may be: the component folder
    itself, ``<root>/<name>``, then the component folder's sibling ``../<name>``."""
    return [component] + ([os.path.join(root, name)] if root else []) + [
        os.path.join(os.path.dirname(os.path.abspath(component)), name)]
