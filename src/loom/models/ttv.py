"""The turntable-video model line (TAPESTRY, sections 3.1, 3.2 and 4.1): what training (`loom.training.ttv`) and
inference (`loom.inference.ttv`) share, so neither imports the other.

- ``ModelSettings`` (the ``model`` section of a ``loom train ttv`` config) and the builders of the networks it
  names: the LoRA'd video DiT (`build_dit`), the frozen video VAE (`build_vae`) and the optional frozen umT5 / CLIP
  encoders (`build_encoders`). Local folders only; ``tiny`` builds random test models.
- The video VAE's input conventions, defined once for the latent cache, training and generation: which frames a
  causal VAE of ``1 + 4k`` frames takes (`vae_frame_indices`), pixels and geometry passes -> [-1, 1]
  (`vae_input`) and back (`unit_to_uint8`, `latents_to_uint8`); the default prompt (`DEFAULT_PROMPT`).
- `Conditioner`: a batch (pixel or latent shards) -> the DiT's inputs; `sample_latents`: the few-step sampler.

Conditioning of one sample (shapes for the Wan VAE: T' = 1 + (T - 1) / 4, H' = H / 8, W' = W / 8)::

    rgb, normal, position (B,T,H,W,3), mask (B,T,H,W)  ->  frames 1 + 4k  ->  [-1, 1] (`vae_input`)
      known video, inpainting-mask video (B,3,T,H,W): given by the caller (training draws partial textures),
        else nothing known (zeros; mask +1 everywhere: generate every pixel)
      -> VAE: x0 = rgb latent (B,C,T',H',W'); geometry = [normal, position, known, mask] latents (B,4C,T',H',W')
      -> reference = x0's first latent frame, zeros after it (B,C,T',H',W')      (the start-image slot)
      -> ref_latent = zeros (B,C,1,H',W')                  (Wan2.1-Fun-V1.1's ref_conv slot; models that have it)
      -> text (B, text_len, D_text): cached embeddings, else umT5 of the prompt template, else zeros
      -> image (B, L_img, D_img): cached embeddings, else CLIP of the first rgb frame, else zeros

Training draws (`ConditionSettings`, given to the Conditioner with per-sample generators) follow VideoX-Fun's
Wan2.1-Fun-V1.1-Control recipe where TAPESTRY is silent (``scripts/wan2.1_fun/train_control.py`` at VideoX-Fun
804a4258, ``--train_mode=control_ref --control_ref_image=random``): the reference frame is frame 0 with probability
``ref_first`` (0.4), else a uniform other frame; frame 0 fills the start-image slot, any other frame is encoded alone
into ``ref_latent`` (the two slots never both hold it), and CLIP sees that same frame. Each slot is then zeroed with
probability 0.1, as are the geometry latents (VideoX-Fun's control dropout) and the CLIP tokens; the text is
dropped with probability 0.1 too. TAPESTRY (3.1) only says the reference is the first frame, which is what
generation feeds (``ref_latent`` zeros, as VideoX-Fun's pipeline without a reference image); ``ref_first=1`` trains
exactly that. Latent shards hold no single-frame latents but frame 0's (the causal VAE encodes it alone), so with
them the reference is always frame 0. A dropped text is zeros, not umT5 of "" as in VideoX-Fun: latent-cache
training has no text encoder at hand.

Latent shards (``loom cache latents``) carry x0 and the normal / position latents already; their known and mask
latents are those of the constant "nothing known" videos.

No Lightning, DeepSpeed, Ray or torch.distributed here; torch is imported inside functions, so the config classes
load with the core dependencies alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from loom.platform.config import config, field, require
from loom.platform.hub import resolve_model_path

if TYPE_CHECKING:
    import numpy as np
    import torch

TINY = "tiny"
DEFAULT_PROMPT = "a 360-degree turntable video of a 3D object"
PASSES = ("rgb", "normal", "position")


@config
class ModelSettings:
    transformer: str = field("", help="the Wan2.1-Fun(-V1.1)-Control transformer: the release folder as published "
                             "(alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control or -14B-Control: a local path, or that repo id "
                             "found in the local Hugging Face cache), a diffusers WanTransformer3DModel folder, or "
                             "'tiny' (random, tests)")
    vae: str = field("", help="the Wan2.1 VAE: the release folder or its Wan2.1_VAE.pth (path or ORG/NAME[/FILE] in "
                     "the Hugging Face cache), a diffusers AutoencoderKLWan folder, or 'tiny'")
    fusion: str = field("", help="local folder of a saved geometry fusion module (empty: fresh initialisation)")
    lora_rank: int = field(128, help="LoRA rank on every linear layer of the DiT blocks")
    lora_alpha: float = field(0.0, help="LoRA alpha (0 = the rank, i.e. scale 1)")
    text_encoder: str = field("", help="umT5, to encode prompts on the fly when the shards hold no text_embed: the "
                              "release folder (models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/), that .pth, or a "
                              "transformers folder; a local path or a repo id in the Hugging Face cache")
    image_encoder: str = field("", help="CLIP vision, to encode the reference frame on the fly when the shards hold no "
                               "image_embed: the release folder (models_clip_open-clip-xlm-roberta-large-vit-huge-"
                               "14.pth), that .pth, or a transformers folder; a local path or a Hugging Face repo id")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype of the frozen DiT base, VAE and encoders "
                                                  "(the LoRA and the fusion module train in float32)")
    compile: bool = field(False, help="torch.compile the repeated DiT blocks (diffusers compile_repeated_blocks; "
                          "GPUs: ~1.4x a step at the Wan 1.3B shape, after ~30 s of compiling)")

    def __post_init__(self):
        require(self.lora_rank >= 1, "lora_rank", self.lora_rank, "must be >= 1")


@config
class ConditionSettings:
    """Training-time draws of the conditions (see the module docstring: VideoX-Fun's V1.1 recipe)."""

    ref_first: float = field(0.4, help="probability that the reference frame is frame 0 (start-image slot); else a "
                             "uniform other frame goes to ref_conv (VideoX-Fun: 0.4; TAPESTRY's generation: 1)")
    drop_reference: float = field(0.1, help="probability of zeroing the start-image slot / ref_conv input")
    drop_geometry: float = field(0.1, help="probability of zeroing the geometry latents (VideoX-Fun's control "
                                 "dropout)")
    drop_image: float = field(0.1, help="probability of zeroing the CLIP tokens")
    drop_text: float = field(0.1, help="probability of zeroing the text embeddings (VideoX-Fun: the empty prompt)")

    def __post_init__(self):
        for name in ("ref_first", "drop_reference", "drop_geometry", "drop_image", "drop_text"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, name, v, "must be a probability in [0, 1]")


NO_DROPS = ConditionSettings(ref_first=1.0, drop_reference=0.0, drop_geometry=0.0, drop_image=0.0, drop_text=0.0)


# --------------------------------------------------------------------------------------------- builders


def build_dit(m: ModelSettings, seed: int):
    """The video DiT with a LoRA adapter of ``m.lora_rank`` on its blocks (trained weights: ``dit.load_lora``)."""
    from loom.models.ttv_dit import TTVDiT

    if m.transformer == TINY:
        dit = TTVDiT.tiny(seed=seed)
    else:
        if not m.transformer:
            raise FileNotFoundError("model.transformer is not set: pass --set model.transformer=DIR (a local "
                                    "Wan2.1-Fun-Control transformer folder) or use --recipe tiny")
        import torch

        from loom.models.video_vae import DTYPES

        # The frozen base in model.dtype (a bf16 release stays memory-mapped: the 14B would need 64 GB a rank in
        # float32); the trained fusion module in float32, as the LoRA adapters peft adds.
        dit = TTVDiT.from_pretrained(resolve_model_path(m.transformer, "model.transformer"), m.fusion or None,
                                     torch_dtype=DTYPES[m.dtype])
        dit.fusion.to(torch.float32)
    dit.add_lora(rank=m.lora_rank, alpha=m.lora_alpha or None)
    return dit


def build_vae(m: ModelSettings, seed: int):
    """The frozen video VAE (`loom.models.video_vae.VideoVAE`)."""
    from loom.models.video_vae import build_tiny_vae, load_video_vae

    if m.vae == TINY:
        return build_tiny_vae(seed)
    if not m.vae:
        raise FileNotFoundError("model.vae is not set: pass --set model.vae=DIR (a local AutoencoderKLWan folder, "
                                "<Wan2.1 checkpoint>/vae) or use --recipe tiny")
    return load_video_vae(resolve_model_path(m.vae, "model.vae"), m.dtype)


def build_encoders(m: ModelSettings) -> dict:
    """The optional frozen text (umT5) and image (CLIP) encoders, from local folders: ``{"text", "image"}``, each
    None when not configured."""
    enc: dict = {"text": None, "image": None}
    if m.text_encoder:
        from loom.models.text_encoder import load_text_encoder

        enc["text"] = load_text_encoder(resolve_model_path(m.text_encoder, "model.text_encoder"), m.dtype)
    if m.image_encoder:
        from loom.models.image_encoder import load_image_encoder

        enc["image"] = load_image_encoder(resolve_model_path(m.image_encoder, "model.image_encoder"), m.dtype)
    return enc


# --------------------------------------------------------------------------------- VAE input conventions


def vae_frame_indices(t: int, policy: str = "trim", r: int = 4) -> list[int]:
    """Indices of the frames of a ``t``-frame video fed to a causal video VAE that takes ``1 + r*k`` frames:
    ``trim`` drops the last frames, ``pad`` repeats the last one, ``exact`` refuses other lengths."""
    if t < 1:
        raise ValueError("sample has no frames")
    if (t - 1) % r == 0:
        return list(range(t))
    if policy == "trim":
        return list(range(1 + r * ((t - 1) // r)))
    if policy == "pad":
        n = 1 + r * math.ceil((t - 1) / r)
        return list(range(t)) + [t - 1] * (n - t)
    raise ValueError(f"sample has {t} frames; frames=exact needs 1 + {r}k (set frames=trim or frames=pad)")


def vae_input(name: str, x, position_radius: float = 1.0) -> torch.Tensor:
    """One decoded pass (..., 3), numpy or torch, -> the VAE's input values, float32 in [-1, 1], same layout:
    rgb ``uint8 / 127.5 - 1``; normals clipped to [-1, 1] (float16 storage can round just past 1); world positions
    divided by ``position_radius`` (the unit sphere -> [-1, 1]) and clipped."""
    import torch

    x = torch.as_tensor(x)
    if name == "rgb":
        return x.float() / 127.5 - 1
    if name == "normal":
        return x.float().clamp(-1, 1)
    if name == "position":
        return (x.float() / position_radius).clamp(-1, 1)
    raise ValueError(f"unknown pass {name!r}: use one of {list(PASSES)}")


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The inverse of the rgb mapping of `vae_input`: [-1, 1] -> uint8 [0, 255], rounded and clipped."""
    import torch

    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def latents_to_uint8(vae, z: torch.Tensor) -> np.ndarray:
    """Latents (B,C,T',H',W') -> decoded videos (B,T,H,W,3) uint8."""
    x = vae.decode(z)  # (B,3,T,H,W) in [-1, 1]
    return unit_to_uint8(x.permute(0, 2, 3, 4, 1)).numpy()


# ------------------------------------------------------------------------------------------ conditioning


def prompt_for(template: str, meta: dict) -> str:
    """The prompt of a sample: ``template`` formatted with the sample's meta (``{uid}``, ...)."""
    try:
        return template.format(**meta)
    except (KeyError, IndexError) as e:
        raise ValueError(f"data.prompt={template!r} names {e}, which the sample's meta lacks (it has "
                         f"{sorted(meta)})") from e


def pad_tokens(embeds: list[torch.Tensor] | torch.Tensor | None, length: int, dim: int, b: int) -> torch.Tensor:
    """Context tokens (B, length, dim): per-sample (L_i, dim) embeddings zero-padded / cut to ``length`` (Wan pads
    umT5 output with zeros to 512), or zeros when there are none."""
    import torch

    out = torch.zeros(b, length, dim)
    if embeds is None:
        return out
    for i, e in enumerate(embeds):
        e = torch.as_tensor(e, dtype=torch.float32)
        if e.shape[-1] != dim:
            raise ValueError(f"cached embeddings have width {e.shape[-1]} but the DiT expects {dim}: the latent "
                             "cache was made with another encoder than this model's")
        out[i, : min(length, e.shape[0])] = e[:length]
    return out


# (rgb (B,T,H,W,3) in [-1, 1], world positions (B,T,H,W,3), object mask (B,T,H,W) bool[, visible=the batch's
# ``known`` pass (B,T,H,W) bool, passed only when the batch has one]) -> (known video, inpainting-mask video), both
# (B,3,T,H,W) in [-1, 1]
KnownVideos = Callable[..., tuple["torch.Tensor", "torch.Tensor"]]


def partial_known(rgb: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, prob: float,
                  generators: list[torch.Generator], visible: torch.Tensor | None = None,
                  visibility_share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(known video, inpainting-mask video), both (B, 3, T, H, W) in [-1, 1], from rgb (B,T,H,W,3) in [-1, 1],
    world positions (B,T,H,W,3), the object mask (B,T,H,W) bool and, where the samples have the render's known
    pass, ``visible`` (B,T,H,W) bool; one draw per sample from its generator (one more with ``visible``)."""
    import torch

    b = rgb.shape[0]
    draws = [(torch.rand(1, generator=g), torch.randn(3, generator=g), torch.rand(1, generator=g)) for g in generators]
    use = torch.cat([d[0] for d in draws]) < prob
    n = torch.stack([d[1] for d in draws])
    n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-6)
    c = (torch.cat([d[2] for d in draws]) * 2 - 1) * 0.5  # the plane passes within half the radius of the centre
    side = (position * n.view(b, 1, 1, 1, 3)).sum(-1) > c.view(b, 1, 1, 1)
    if visible is not None:
        rendered = torch.cat([torch.rand(1, generator=g) for g in generators]) < visibility_share
        side = torch.where(rendered.view(b, 1, 1, 1), visible.bool(), side)
    keep = side & mask & use.view(b, 1, 1, 1)  # (B,T,H,W)
    known = torch.where(keep[..., None], rgb, torch.zeros_like(rgb))
    gen = (~keep).float() * 2 - 1
    return known.permute(0, 4, 1, 2, 3), gen[:, None].expand(-1, 3, -1, -1, -1)


@dataclasses.dataclass
class PartialTextures:
    """The training draws of partial textures (`loom.training.ttv.data`): called on a pixel batch it is a
    `KnownVideos` (:func:`partial_known`); ``chosen(b)`` draws which samples of a latent batch take their cached
    partial texture (``known_latent`` and ``inpaint_latent``). One draw per sample from its generator."""

    prob: float
    generators: list
    visibility_share: float = 1.0

    def __call__(self, rgb, position, mask, visible=None):
        return partial_known(rgb, position, mask, self.prob, self.generators, visible, self.visibility_share)

    def chosen(self) -> torch.Tensor:
        import torch

        return torch.cat([torch.rand(1, generator=g) for g in self.generators]) < self.prob


class Conditioner:
    """A batch -> the DiT's inputs ``{"x0", "geometry", "reference", "text"[, "image"]}`` (see the module
    docstring). Holds the frozen VAE and encoders, and caches the latents of the constant videos."""

    def __init__(self, vae, encoders: dict, *, position_radius: float, text_len: int, image_len: int, prompt: str):
        self.vae = vae
        self.encoders = encoders
        self.position_radius = position_radius
        self.text_len = text_len
        self.image_len = image_len
        self.prompt = prompt
        self._const: dict = {}

    def const_latent(self, kind: str, t: int, h: int, w: int) -> torch.Tensor:
        """Latent (1,C,t,h,w) of the all-zeros known video (``kind="known"``) or of the all-generate mask video."""
        import torch

        key = (kind, t, h, w)
        if key not in self._const:
            f, s = self.vae.temporal_factor, self.vae.spatial_factor
            x = torch.full((1, 3, 1 + f * (t - 1), h * s, w * s), 0.0 if kind == "known" else 1.0)
            self._const[key] = self.vae.encode(x)
        return self._const[key]

    def __call__(self, batch: dict, dit, device, known: KnownVideos | None = None,
                 draws: tuple[ConditionSettings, list[torch.Generator]] | None = None) -> dict[str, torch.Tensor]:
        """``known`` draws the known and mask videos of a pixel batch; None: nothing known (generation). ``draws``
        (settings, one generator per sample) makes the training draws of the module docstring; None: frame 0 is
        the reference and nothing is dropped (generation)."""
        import torch

        settings, gens = draws if draws is not None else (NO_DROPS, None)
        pixels = "rgb_latent" not in batch
        if not pixels:
            x0 = batch["rgb_latent"].float()
            b, _, t, h, w = x0.shape
            known_z = self.const_latent("known", t, h, w).expand(b, -1, -1, -1, -1)
            mask_z = self.const_latent("mask", t, h, w).expand(b, -1, -1, -1, -1)
            if isinstance(known, PartialTextures) and "known_latent" in batch:  # the cache's partial textures
                use = known.chosen().view(b, 1, 1, 1, 1)
                known_z = torch.where(use, batch["known_latent"].float(), known_z)
                mask_z = torch.where(use, batch["inpaint_latent"].float(), mask_z)
            geo = [batch["normal_latent"].float(), batch["position_latent"].float(), known_z, mask_z]
            idx = [0]  # latent shards: frame 0 is the only frame whose lone latent is at hand
        else:
            idx = vae_frame_indices(batch["rgb"].shape[1], "trim", self.vae.temporal_factor)
            rgb = vae_input("rgb", batch["rgb"][:, idx])
            normal = vae_input("normal", batch["normal"][:, idx])
            pos = batch["position"][:, idx].float()
            posn = vae_input("position", pos, self.position_radius)
            if known is not None:
                extra = {"visible": batch["known"][:, idx].bool()} if "known" in batch else {}
                known_v, gen = known(rgb, pos, batch["mask"][:, idx].bool(), **extra)
            else:
                known_v = torch.zeros_like(rgb).permute(0, 4, 1, 2, 3)
                gen = torch.ones_like(known_v)
            videos = torch.cat([rgb.permute(0, 4, 1, 2, 3), normal.permute(0, 4, 1, 2, 3),
                                posn.permute(0, 4, 1, 2, 3), known_v, gen])  # (5B, 3, T, H, W)
            z = self.vae.encode(videos)
            b = rgb.shape[0]
            x0, geo = z[:b], [z[b * i: b * (i + 1)] for i in range(1, 5)]
        # Per sample: the reference frame k (an index into idx) and which conditions survive.
        u = (torch.stack([torch.rand(6, generator=g) for g in gens]) if gens is not None
             else torch.ones(b, 6))  # (B, 6): ones draw frame 0 and keep everything
        n = len(idx)
        k = torch.where((u[:, 0] < settings.ref_first) | (n == 1) | (gens is None), 0,
                        1 + (u[:, 1] * (n - 1)).long().clamp(max=max(n - 2, 0)))  # (B,)
        keep_ref, keep_geo, keep_img, keep_text = (u[:, 2:] >= torch.tensor(
            [settings.drop_reference, settings.drop_geometry, settings.drop_image, settings.drop_text])).T.float()
        first = x0[:, :, :1] * ((k == 0).float() * keep_ref).view(b, 1, 1, 1, 1)
        geometry = torch.cat(geo, 1) * keep_geo.view(b, 1, 1, 1, 1)
        cond = {
            "x0": x0.to(device),
            "geometry": geometry.to(device),
            "reference": dit.reference_latent(first, x0.shape[2]).to(device),
            "text": (pad_tokens(self.text(batch, b), self.text_len, dit.text_dim, b)
                     * keep_text.view(b, 1, 1)).to(device),
        }
        if getattr(dit, "has_ref_conv", False):
            ref = torch.zeros_like(x0[:, :, :1])  # (B, C, 1, H', W')
            other = (k != 0).nonzero().flatten().tolist()
            if other:  # frames other than 0, each encoded alone (pixels only: n > 1)
                frames = torch.stack([rgb[i, idx_k] for i, idx_k in zip(other, k[other].tolist())])  # (n,H,W,3)
                ref[other] = self.vae.encode(frames.permute(0, 3, 1, 2)[:, :, None]).to(ref)
            cond["ref_latent"] = (ref * keep_ref.view(b, 1, 1, 1, 1)).to(device)
        if dit.image_dim is not None:
            img = batch.get("image_embed")
            if img is None and self.encoders["image"] is not None and pixels:
                chosen = torch.stack([batch["rgb"][i, idx[int(k[i])]] for i in range(b)])  # (B, H, W, 3) uint8
                img = self.encoders["image"].encode(chosen.numpy())
            img = (torch.as_tensor(img).float() if img is not None
                   else torch.zeros(b, self.image_len, dit.image_dim))
            cond["image"] = (img * keep_img.view(b, 1, 1)).to(device)
        return cond

    def text(self, batch: dict, b: int):
        """Per-sample text embeddings: the batch's ``text_embed``, else umT5 of the prompt template, else None."""
        if batch.get("text_embed") is not None:
            return batch["text_embed"]
        enc = self.encoders["text"]
        if enc is None:
            return None
        metas = batch.get("meta") or [{}] * b
        return enc.encode([prompt_for(self.prompt, m) for m in metas])


def sample_latents(dit, cond: dict[str, torch.Tensor], steps: int, shift: float, seed: int = 0,
                   device=None) -> torch.Tensor:
    """Conditions of one or more samples -> latents (B,C,T',H',W') with the few-step Euler sampler; the noise is
    drawn on the CPU from ``seed``, so a seed gives the same video on any device."""
    import torch

    from loom.models.flow import euler_sample

    ref = cond["reference"]
    device = ref.device if device is None else device
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(ref)
    kw = {k: v.to(device) for k, v in cond.items() if k not in ("x0", "rgb") and v is not None}
    with torch.no_grad():
        return euler_sample(lambda x, t: dit(x, t, **kw), noise.to(device), steps, shift)
