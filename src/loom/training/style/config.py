"""The root config of ``loom train style`` (`TrainStyleJob`), its sections and its named recipes. The ``model`` section
is `loom.models.sag.SAGModelSettings` (the networks generation builds too); the LoRA targets are ``lora``.

Recipes, and where the paper and the authors' code differ (``sag_distribution_alignment.py`` +
``configs/distribution_alignment.yaml``):

==========================  ==================================  ===================================================
                            ``default`` (the authors' code)     ``paper`` (section 4, "Implementation Details")
==========================  ==================================  ===================================================
DiT LoRA blocks             all 19 double blocks (their         "the first 23 transformer blocks": Loom reads the
                            ``double_blocks: null`` = all) and  19 double blocks + single blocks 0-3
                            single blocks 1, 2, 3, 4 (23 blocks)
ControlNet LoRA             its 2 double blocks (the same       the same ("LoRA layers to both the image diffusion
                            processors; it has no single ones)  model and ControlNet")
steps, optimizer            400 (their YAML runs 600 with a     400 iterations, Adam (no weight decay); lr not
                            checkpoint every 100; their         given: 1e-4
                            generation loads ``--epoch 400``,
                            the LoRA of step 400: Loom stops
                            there), AdamW (0.9, 0.999), wd
                            0.01, eps 1e-8, lr 1e-4
learning-rate schedule      constant; the YAML's 10 warm-up     the same
                            steps are ignored by diffusers'
                            ``get_scheduler("constant")``, so
                            none (``optim.warmup_steps=0``)
==========================  ==================================  ===================================================

Both: rank 16 and scale 1 (x-flux's LoRA has no alpha: ``lora.alpha`` = rank), batch 1, gradient clip 1.0, bf16,
FLUX's shifted t (fixed from the 1024x1024 sequence length, as theirs), guidance embedding 1, x-flux's LoRA
initialisation (down ~ N(0, 1/rank), up = 0: peft's ``gaussian``) and one down matrix shared by q, k and v
(``lora.tie_qkv``: x-flux's fused ``qkv_lora``, so the trained adapter is exactly an x-flux one). Their data
augmentation (a random crop of 16:9, the image's own ratio, 1:1 or 4:3 per sample; longest side 1024) is
``data.aspect_ratios``; HED is controlnet_aux's at its default 512 detection resolution (``data.hed_resolution``).
Known differences from their script, kept on purpose: the clip covers the ControlNet's LoRA too (theirs clips the
DiT's only), x0 is the VAE posterior's mean (theirs a sample of it), and t = 0 (their schedule's last value, a
step that trains nothing) is never drawn.
"""

from __future__ import annotations

import dataclasses
import os
import re

from loom.models.sag import TINY, SAGModelSettings
from loom.platform.config import config, field, recipe, require
from loom.platform.hub import absolute_model_name
from loom.platform.ray import RaySettings
from loom.platform.tracking import TrackingSettings
from loom.training.launch import TrainerSettings, ray_field

RATIOS = {"16:9": (16, 9), "4:3": (4, 3), "1:1": (1, 1)}  # the authors' crops (width:height); "native" = no crop
EDGES = ("hed", "canny")


@config
class StyleDataSettings:
    source: str = field("", help="a folder of reference images (`--data`; .png/.jpg/.jpeg/.webp, sorted by name), "
                        "added after data.references")
    references: tuple[str, ...] = field((), help="reference images (`--reference`, repeatable)")
    identifiers: tuple[str, ...] = field((), help="identifier prompt per reference (`--identifier`, repeatable): one "
                                         "for all, or one each; none = [v1], [v2], ... one each")
    captions: tuple[str, ...] = field((), help="optional caption per reference, appended to its identifier "
                                      "(\"[v1], a red house\"); none = the identifier alone")
    size: int = field(1024, help="longest side of a training image, pixels (a multiple of 16; the authors: 1024)")
    aspect_ratios: tuple[str, ...] = field(("1:1",), help="centre crops drawn per step from these (16:9, 4:3, 1:1 "
                                           "as width:height, or native = the image's own), then resized to "
                                           "data.size on the longest side, sides floored to multiples of 16")
    edge_detector: str = field("hed", help="edge maps of the references: hed (ControlNetHED, data.hed_weights) or "
                               "canny (cv2.Canny 100/200 of the grey image: a classical stand-in for tests and "
                               "machines without HED weights)")
    hed_weights: str = field("lllyasviel/Annotators/ControlNetHED.pth", help="ControlNetHED.pth: a local file or "
                             "ORG/NAME/PATH in the local Hugging Face cache")
    hed_resolution: int = field(512, help="HED detection resolution, short side (controlnet_aux's default, as the "
                                "authors call it); 0 = the image's own")
    batch_size: int = field(1, help="references per rank per step (the authors: 1)")

    def __post_init__(self):
        require(self.size >= 16 and self.size % 16 == 0, "size", self.size, "must be a multiple of 16 (FLUX)")
        require(bool(self.aspect_ratios), "aspect_ratios", self.aspect_ratios, "must name at least one")
        for r in self.aspect_ratios:
            require(r in RATIOS or r == "native", "aspect_ratios", r, f"must be one of {[*RATIOS, 'native']}")
        require(self.edge_detector in EDGES, "edge_detector", self.edge_detector, f"must be one of {list(EDGES)}")
        require(self.hed_resolution >= 0, "hed_resolution", self.hed_resolution, "must be >= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(all(i.strip() for i in self.identifiers), "identifiers", self.identifiers, "must not be empty")


@config
class StyleLoraSettings:
    rank: int = field(16, help="LoRA rank (the paper and the authors: 16)")
    alpha: float = field(0.0, help="peft lora_alpha; 0 = the rank, i.e. scale 1 (x-flux's LoRA has no alpha)")
    double_blocks: tuple[int, ...] = field(tuple(range(19)), help="DiT double blocks with LoRA on their attention "
                                           "(image: to_q/k/v, to_out.0; text: add_q/k/v_proj, to_add_out)")
    single_blocks: tuple[int, ...] = field((1, 2, 3, 4), help="DiT single blocks with LoRA on to_q/k/v and proj_out "
                                           "(x-flux's qkv_lora and proj_lora)")
    controlnet_double_blocks: tuple[int, ...] = field((0, 1), help="ControlNet double blocks with LoRA, as the DiT's "
                                                      "(needs model.controlnet)")
    tie_qkv: bool = field(True, help="one down matrix (lora_A) shared by q, k and v of a stream: x-flux's fused "
                          "qkv LoRA exactly; false = three independent ones")

    def __post_init__(self):
        require(self.rank >= 1, "rank", self.rank, "must be >= 1")
        require(self.alpha >= 0, "alpha", self.alpha, "must be >= 0 (0 = the rank)")
        for name in ("double_blocks", "single_blocks", "controlnet_double_blocks"):
            v = getattr(self, name)
            require(all(i >= 0 for i in v) and len(set(v)) == len(v), name, v, "must be distinct block indices >= 0")

    @property
    def scale_alpha(self) -> float:
        return self.alpha or float(self.rank)


@config
class StyleOptimSettings:
    name: str = field("adamw", help="adamw (the authors' code) or adam (the paper)")
    lr: float = field(1e-4, help="learning rate")
    betas: tuple[float, float] = field((0.9, 0.999), help="Adam betas")
    weight_decay: float = field(0.01, help="weight decay (AdamW's decoupled; Adam's L2 when name=adam)")
    eps: float = field(1e-8, help="Adam epsilon")
    warmup_steps: int = field(0, help="linear warm-up steps, then constant (the authors' YAML says 10, which their "
                              "'constant' scheduler ignores)")

    def __post_init__(self):
        require(self.name in ("adamw", "adam"), "name", self.name, "must be adamw or adam")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")


@config
class StyleSampleSettings:
    steps: int = field(25, help="sampler steps of the sample anchor per identifier, logged at the end")
    guidance: float = field(4.0, help="FLUX distilled guidance of the samples (the authors' inference: 4)")
    true_cfg: float = field(3.5, help="true classifier-free guidance against the empty prompt (1 = off)")
    control_weight: float = field(0.8, help="ControlNet weight of the samples")

    def __post_init__(self):
        require(self.steps >= 1, "steps", self.steps, "must be >= 1")


@config
class TrainStyleJob:
    out: str = field("out/style-train", help="run folder: config.yaml, checkpoints/, lora/, references/, samples/")
    data: StyleDataSettings = field(default_factory=StyleDataSettings, help="reference images")
    model: SAGModelSettings = field(default_factory=SAGModelSettings, help="FLUX + HED ControlNet")
    lora: StyleLoraSettings = field(default_factory=StyleLoraSettings, help="LoRA targets")
    optim: StyleOptimSettings = field(default_factory=StyleOptimSettings, help="optimizer")
    sample: StyleSampleSettings = field(default_factory=StyleSampleSettings, help="sample anchors")
    trainer: TrainerSettings = field(default_factory=TrainerSettings, help="Lightning / DeepSpeed")
    tracking: TrackingSettings = field(default_factory=TrackingSettings, help="MLflow")
    ray: RaySettings = ray_field()


FLUX_DEV = "black-forest-labs/FLUX.1-dev"
HED_CONTROLNET = "XLabs-AI/flux-controlnet-hed-v3/flux-hed-controlnet-v3.safetensors"
AUTHORS_CROPS = ("16:9", "native", "1:1", "4:3")


def _authors() -> TrainStyleJob:
    return TrainStyleJob(
        data=StyleDataSettings(size=1024, aspect_ratios=AUTHORS_CROPS),
        model=SAGModelSettings(base=FLUX_DEV, controlnet=HED_CONTROLNET, dtype="bfloat16"),
        trainer=TrainerSettings(max_steps=400, precision="bf16-mixed", grad_clip=1.0, devices=1,
                                checkpoint_every=100, log_every=1))


@recipe(TrainStyleJob, "default", help=f"the authors' code: {FLUX_DEV} + XLabs' HED ControlNet v3 (local Hugging "
        "Face cache, or set model.base / model.controlnet), LoRA rank 16 on all 19 double blocks + single blocks "
        "1-4 of the DiT and both double blocks of the ControlNet, 400 steps (their YAML trains 600, their generation "
        "loads the LoRA of step 400), AdamW lr 1e-4 (0.9, 0.999), wd 0.01, "
        "eps 1e-8, constant (their 10 warm-up steps are ignored by their scheduler), bf16, random 16:9 / native / "
        "1:1 / 4:3 crops at 1024")
def _default() -> TrainStyleJob:
    return _authors()


@recipe(TrainStyleJob, "paper", help="the paper's section 4: LoRA rank 16 on 'the first 23 transformer blocks' "
        "(Loom's reading: the 19 double blocks + single blocks 0-3; the authors' code takes single 1-4) and on the "
        "ControlNet, 400 iterations, Adam (no weight decay), lr 1e-4 (not given in the paper)")
def _paper() -> TrainStyleJob:
    c = _authors()
    return dataclasses.replace(
        c, lora=StyleLoraSettings(single_blocks=(0, 1, 2, 3)),
        optim=StyleOptimSettings(name="adam", weight_decay=0.0),
        trainer=dataclasses.replace(c.trainer, max_steps=400))


@recipe(TrainStyleJob, "tiny", help="random tiny FLUX DiT, ControlNet, VAE and text encoders on CPU, 64x64, Canny "
        "edges (no HED weights): a few steps (tests, demo)")
def _tiny() -> TrainStyleJob:
    return TrainStyleJob(
        data=StyleDataSettings(size=64, edge_detector="canny", hed_weights=""),
        model=SAGModelSettings(base=TINY, controlnet=TINY, text_len=8),
        lora=StyleLoraSettings(rank=4, double_blocks=(0, 1), single_blocks=(1,), controlnet_double_blocks=(0, 1)),
        optim=StyleOptimSettings(lr=1e-3),
        sample=StyleSampleSettings(steps=2, true_cfg=1.0),
        trainer=TrainerSettings(max_steps=4, accelerator="cpu", checkpoint_every=2, log_every=1))


def _abs(path: str) -> str:
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: TrainStyleJob) -> TrainStyleJob:
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    m, d = cfg.model, cfg.data

    def model(name: str) -> str:
        return name if not name or name == TINY else absolute_model_name(name)

    return dataclasses.replace(
        cfg, out=_abs(cfg.out),
        data=dataclasses.replace(d, source=_abs(d.source), references=tuple(_abs(r) for r in d.references),
                                 hed_weights=model(d.hed_weights)),
        model=dataclasses.replace(m, base=model(m.base), controlnet=model(m.controlnet)))


def slug(identifier: str) -> str:
    """A file name for an identifier prompt ("[v1] style" -> "v1-style")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", identifier).strip("-.") or "identifier"
