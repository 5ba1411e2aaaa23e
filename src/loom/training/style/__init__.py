"""``loom train style``: VideoFrom3D's distribution alignment (section 3.2): LoRAs on the FLUX DiT and on the HED
ControlNet, trained on one or more reference images (each with its identifier prompt, "[v1]") and the edge map of
each, so that Sparse Anchor-view Generation (`loom.models.sag`) draws anchor views in that style.

Where things are: the config, recipes and the paper/code differences in :mod:`.config`; the references and their
batches in :mod:`.data`; the Lightning module in :mod:`.module`; the networks, objective and sampler, which
generation shares, in :mod:`loom.models.sag`. Here: the LoRA targets and the run's files.

Data flow of one step::

    StyleBatches (seeded by (seed, step), exact on resume): image (B,3,H,W), edges (B,3,H,W), prompt [B]
      -> frozen FLUX VAE: x0 = E(image) (B,16,H/8,W/8); frozen CLIP + T5: prompt -> pooled, tokens
      -> t = one of FLUX's shifted training values, noise ~ N(0, 1), both from (seed, step, sample)
      -> ControlNet(+LoRA)(x_t, edges) residuals -> DiT(+LoRA)(x_t, t, prompt, residuals) -> v;
         loss = |v - (noise - x0)|^2                                                 (`loom.models.sag.loss`)

The run folder (``out``): ``config.yaml``; ``lora/pytorch_lora_weights.safetensors`` (the DiT's LoRA in diffusers'
FLUX LoRA format: ``FluxPipeline.load_lora_weights(RUN/lora)``) and ``lora/controlnet_lora.safetensors`` (the
ControlNet's, peft keys without prefix: ``controlnet.load_lora_adapter(RUN/lora, weight_name=...,
prefix=None)``), both with their peft config in the safetensors metadata as diffusers writes it;
``references/`` (each reference as given, its training crops and edge maps, ``references.json``); ``samples/``
(one anchor per identifier, drawn from its reference's edges); Lightning checkpoints.

Loading a finished run without Lightning (generation): `loom.inference.style.load_style_run`.
"""

from __future__ import annotations

import os

from loom.models.sag import CONTROLNET_LORA, INDEX, LORA_DIR, REFERENCES, TRANSFORMER_LORA  # noqa: F401 (re-exported)
from loom.training.style.config import TrainStyleJob, absolute_paths
from loom.training.style.lora import (ADAPTER, add_lora, add_style_lora, build_parts, lora_groups,  # noqa: F401
                                      save_style_lora)

__all__ = ["TrainStyleJob", "absolute_paths", "make", "train", "train_on_references"]

def make(cfg: TrainStyleJob):
    """(module, None): the module brings its own batches. Module-level so Ray can pickle it."""
    import torch

    from loom.training.style.module import StyleModule

    torch.manual_seed(cfg.trainer.seed)
    return StyleModule(cfg), None


def train(cfg: TrainStyleJob, *, resume: bool = False) -> None:
    """Check the references (each named if missing or unreadable), write the resolved config beside the run, then
    train here or on Ray Train (``ray.address``)."""
    from loom.training import launch
    from loom.training.style.data import prompts, read_image, reference_paths

    cfg = absolute_paths(cfg)
    paths = reference_paths(cfg.data)
    prompts(cfg.data, len(paths))
    for p in paths:
        read_image(p)
    launch.train_run(cfg, make, resume=resume)


def train_on_references(out: str, references: list[str], identifiers: list[str], *, recipe: str = "default",
                        sets: list[str] | tuple[str, ...] = ()) -> str:
    """``loom train style --recipe RECIPE --reference ... --identifier ... --out OUT --set ...`` from code (e.g.
    generation training the style of its reference first): continues OUT's run when it has a checkpoint. Returns
    OUT."""
    from loom.platform import config as cfgmod
    from loom.training.launch import last_checkpoint

    overrides = [("out", out), ("data.references", list(references)), ("data.identifiers", list(identifiers)),
                 *cfgmod.parse_set(sets)]
    cfg = cfgmod.resolve(TrainStyleJob, recipe, overrides)
    out = cfg.out if "://" in cfg.out else os.path.abspath(cfg.out)
    train(cfg, resume=last_checkpoint(out) is not None)
    return cfg.out
