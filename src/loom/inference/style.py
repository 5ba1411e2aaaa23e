"""A finished ``loom train style`` run (VideoFrom3D's distribution alignment, section 3.2) loaded for generation,
without the training code: its config.yaml read as data (the ``model`` section, `loom.models.sag.SAGModelSettings`),
the SAG parts built from it, and both LoRAs (the FLUX DiT's and the HED ControlNet's) loaded through plain diffusers
(``load_lora_adapter``) and active. The run's files are named in `loom.models.sag` (LORA_DIR, ...)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass
class StyleRun:
    path: str
    parts: Any  # loom.models.sag.SAGParts, the style LoRAs loaded and active (adapter "style")
    identifiers: dict[str, str]  # identifier prompt -> its reference (the copy in RUN/references; the first one
    #                               when several references share an identifier)
    config: dict  # the run's config.yaml


def load_style_run(run: str, device=None) -> StyleRun:
    """A finished ``loom train style`` run: the SAG parts of its config with both LoRAs loaded and active, on
    ``device``. FileNotFoundError names what is missing when ``run`` is not a finished style run."""
    import yaml

    from loom.models import sag
    from loom.platform.config import ConfigError, from_dict

    from loom.inference.run import local_run

    run = local_run(run)  # an s3:// run: its local copy (config.yaml, lora/, references/)
    lora = os.path.join(run, sag.LORA_DIR)
    index = os.path.join(run, sag.REFERENCES, sag.INDEX)
    for p in (os.path.join(run, "config.yaml"), os.path.join(lora, sag.TRANSFORMER_LORA), index):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist: is {run!r} a finished `loom train style` run folder "
                                    "(config.yaml, lora/, references/)?")
    with open(os.path.join(run, "config.yaml")) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw.get("model"), dict) or "controlnet" not in raw["model"]:
        raise ValueError(f"{run}/config.yaml has no SAG model section: not a `loom train style` run")
    try:
        m = from_dict(sag.SAGModelSettings, raw["model"], "model.")
    except ConfigError as e:
        raise ValueError(f"{run}/config.yaml: {e}") from None
    parts = sag.build_local(m, int((raw.get("trainer") or {}).get("seed", 0)))
    parts.transformer.load_lora_adapter(lora, weight_name=sag.TRANSFORMER_LORA, prefix="transformer",
                                        adapter_name="style")
    cn_file = os.path.join(lora, sag.CONTROLNET_LORA)
    if os.path.isfile(cn_file):
        if parts.controlnet is None:
            raise ValueError(f"{cn_file}: the run trained a ControlNet LoRA but its model.controlnet is empty")
        parts.controlnet.load_lora_adapter(lora, weight_name=sag.CONTROLNET_LORA, prefix=None, adapter_name="style")
    if device is not None:
        for net in (parts.transformer, parts.controlnet, parts.vae):
            if net is not None:
                net.to(device)
    with open(index) as f:
        entries = json.load(f)
    identifiers: dict[str, str] = {}
    for e in entries:
        identifiers.setdefault(e["identifier"], os.path.join(run, sag.REFERENCES, e["file"]))
    return StyleRun(os.path.abspath(run), parts, identifiers, raw)
