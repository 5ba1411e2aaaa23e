"""VideoFrom3D's Geometry-guided Generative Inbetweening (GGI, sections 3.3 and 3.4): the networks, the input
layout, the objective and the sampler that ``loom train ggi`` and ``loom generate inbetween`` share.

Base: CogVideoX-5B-I2V through diffusers' ``CogVideoXTransformer3DModel`` and ``AutoencoderKLCogVideoX`` (a
diffusers-layout checkpoint from a local folder; ``tiny`` builds random tiny ones for tests). Data flow of one
segment (F = 1 + 4k frames, F' = 1 + k latent frames, C = 16 latent channels, h x w = H/8 x W/8)::

    anchors v_0, v_N (B,3,H,W) in [-1,1] --VAE, each alone, mode x scaling_factor--> (B,C,1,h,w) each
        -> V = [z(v_0), 0, ..., 0, z(v_N)]                    (B,F',C,h,w)   anchors at the first and last latent
    edge video (B,3,F,H,W) in [-1,1] --VAE mode x scaling_factor--> H_e     (B,F',C,h,w)   structure (eq. 2)
    warped noise eps_w (B,F',C,h,w) (Go-with-the-Flow, at latent resolution and latent frame rate)
    transformer input = Z_t (+) V (+) H_e  along channels       (B,F',3C,h,w)   48 channels for CogVideoX-5B
    CogVideoXTransformer3DModel(input, T5 text tokens, t, 3D rotary embeddings) -> (B,F',C,h,w)

Design choices (why):

- **Widened input, zero-initialised** (the authors' code does the same): the base I2V model takes 2C channels
  (noisy latent + image latents); its patch-embedding convolution is replaced by one over 3C channels whose first 2C
  input channels copy the base weights and whose new C are zero, bias copied. At step 0 the model is exactly the
  base model, whatever the edge latents are (tested). A released GGI transformer (48 channels, the flow LoRA
  merged in) loads as it is.
- **Flow-aware LoRA** (Go-with-the-Flow, rank 2048 on the attention's to_q, to_k, to_v and to_out.0): loaded from
  its diffusers-format safetensors by diffusers' ``load_lora_adapter`` and frozen; everything else of the
  transformer trains, as the authors' training does.
- **Objective.** The paper writes eq. (3) as epsilon prediction against the warped noise; the authors' code trains
  CogVideoX's own v-prediction on its DDPM schedule (zero-terminal-SNR scaled-linear betas). ``v`` is the default:
  the base model was trained to predict v, and re-reading its output as epsilon would start training away from
  it. ``epsilon`` is eq. (3) as written, for the ablation: the network's output is epsilon, compared with eps_w,
  and the sampler reads it as epsilon; on the plain scaled-linear schedule, since epsilon says nothing about x0 at
  zero terminal SNR.
- **Latents are the posterior mode** (the authors sample it): deterministic, so a cached edge latent is the same on
  every epoch and generation is a function of the seed alone.
- **Sampler**: diffusers' ``CogVideoXDDIMScheduler``, deterministic (eta 0): CogVideoX-5B-I2V's own scheduler,
  which the authors' inference keeps (their line switching to the DPM scheduler is commented out). Deterministic
  matters here: the initial latents are the warped noise (mixed with fresh noise at ``degradation``,
  variance-preserving, the authors' 0.5), and a stochastic sampler would re-inject fresh noise at every step. Checked:
  a tiny model overfit to one clip gives the clip back from its warped noise (tests/models/test_ggi.py); the DPM
  SDE sampler did not.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from loom.platform.config import config, field, require
from loom.platform.hub import resolve_model_path

if TYPE_CHECKING:
    import torch

TINY = "tiny"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# CogVideoX-5B-I2V's scheduler_config.json (the released values), used when a folder has no scheduler/.
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
             "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing", "clip_sample": False}


@config
class GGIModelSettings:
    transformer: str = field("", help="CogVideoX-5B-I2V in the diffusers layout (the checkpoint folder, its "
                             "transformer/, or a repo id in the local Hugging Face cache), or the released GGI "
                             "transformer (48 input channels, flow LoRA merged); 'tiny' = random tiny")
    vae: str = field("", help="AutoencoderKLCogVideoX: <CogVideoX-5B-I2V>/vae or the checkpoint folder; 'tiny'")
    flow_lora: str = field("", help="Go-with-the-Flow's flow-aware LoRA (diffusers-format .safetensors), loaded "
                           "and frozen; empty: none (the released GGI checkpoint has it merged)")
    text_encoder: str = field("", help="CogVideoX's T5 encoder: the checkpoint folder (its text_encoder/ and "
                              "tokenizer/) or a T5EncoderModel folder; empty: zero text embeddings (unconditional)")
    tokenizer: str = field("", help="its tokenizer folder; empty: <root>/tokenizer, else the encoder folder")
    prompt: str = field("", help="the prompt of a sample without a caption (scenes; clips carry BLIP captions)")
    text_len: int = field(226, help="T5 tokens of the prompt (CogVideoX: 226); zeros when no text embeddings")
    objective: Literal["v", "epsilon"] = field("v", help="v: CogVideoX's v-prediction (the authors' code); "
                                               "epsilon: eq. (3), the output read as epsilon against the warped noise")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype of the frozen VAE (bfloat16 on GPUs)")

    def __post_init__(self):
        require(self.text_len >= 1, "model.text_len", self.text_len, "must be >= 1")


def tiny_transformer(in_channels: int = 8, latent: int = 4, seed: int = 0):
    """A random CogVideoX-I2V-shaped transformer (rotary position embeddings, I2V input of two latents of
    ``latent`` channels), small enough for CPU tests. No learned position embeddings (5B-I2V has them, and they fix
    its frame size: `forward` says so), so tests run at any size."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=latent,
        time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9,
        patch_size=2, max_text_seq_length=8, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False)


def tiny_vae(seed: int = 0):
    """A random AutoencoderKLCogVideoX with the real one's factors (8x space, 4x time) and 4 latent channels."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                  norm_num_groups=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                  up_block_types=("CogVideoXUpBlock3D",) * 4, sample_height=32, sample_width=32)


def _folder(name: str, sub: str, what: str) -> str:
    import os

    path = resolve_model_path(name, what)
    return os.path.join(path, sub) if os.path.isfile(os.path.join(path, sub, "config.json")) else path


def transformer_folder(name: str) -> str:
    """The folder holding the transformer's config.json: ``name`` itself or its transformer/."""
    return _folder(name, "transformer", "model.transformer")


def widen_patch_embed(transformer, in_channels: int) -> None:
    """Replace the patch embedding's convolution by one over ``in_channels`` inputs: the old input channels keep
    their weights, the new ones start at zero (so the output does not change), the bias is kept."""
    import torch

    old = transformer.patch_embed.proj
    have = old.weight.shape[1]
    if in_channels < have:
        raise ValueError(f"the transformer already takes {have} input channels; cannot narrow it to {in_channels}")
    new = torch.nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                          bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :have] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    transformer.patch_embed.proj = new
    transformer.register_to_config(in_channels=in_channels)


def build_transformer(m: GGIModelSettings, seed: int = 0):
    """The GGI transformer: the base widened to 3 latents of input (or a released GGI transformer as it is), the
    flow LoRA loaded and frozen, everything else trainable."""
    from diffusers import CogVideoXTransformer3DModel

    if m.transformer == TINY:
        tr = tiny_transformer(seed=seed)
    elif not m.transformer:
        raise FileNotFoundError("model.transformer is not set: give CogVideoX-5B-I2V's diffusers folder (or the "
                                "released GGI transformer), or 'tiny'")
    else:
        tr = CogVideoXTransformer3DModel.from_pretrained(transformer_folder(m.transformer), local_files_only=True)
    c = tr.config.out_channels
    if tr.config.in_channels == 2 * c:
        widen_patch_embed(tr, 3 * c)
    elif tr.config.in_channels != 3 * c:
        raise ValueError(f"model.transformer takes {tr.config.in_channels} input channels: GGI needs an I2V base "
                         f"({2 * c}: noisy + image latents) or a GGI transformer ({3 * c}: + edge latents)")
    tr.requires_grad_(True)
    if m.flow_lora:
        load_flow_lora(tr, m.flow_lora)
    return tr


def load_flow_lora(transformer, path: str) -> None:
    """Go-with-the-Flow's LoRA (a diffusers-format safetensors of ``transformer.*.lora_A/B`` weights) as a frozen
    adapter named ``flow``; its rank and alpha come from the file (diffusers reads them off the weights)."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.flow_lora={path!r} does not exist: give the flow-aware LoRA's .safetensors "
                                "(Go-with-the-Flow's release), or leave it empty")
    from safetensors.torch import load_file

    state = load_file(path)
    prefix = "transformer" if any(k.startswith("transformer.") for k in state) else None
    transformer.load_lora_adapter(state, adapter_name="flow", prefix=prefix)
    n = 0
    for name, p in transformer.named_parameters():  # peft froze the base: the base trains, the flow LoRA does not
        p.requires_grad_("lora_" not in name)
        n += "lora_" in name
    if n == 0:
        raise ValueError(f"model.flow_lora={path}: no LoRA weights matched the transformer's attention layers "
                         f"({', '.join(LORA_TARGETS)}): is it a CogVideoX LoRA?")


def build_vae(m: GGIModelSettings, seed: int = 0):
    """The frozen CogVideoX VAE, in eval mode."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    if m.vae == TINY:
        vae = tiny_vae(seed)
    elif not m.vae:
        raise FileNotFoundError("model.vae is not set: give <CogVideoX-5B-I2V>/vae (AutoencoderKLCogVideoX), or "
                                "'tiny'")
    else:
        vae = AutoencoderKLCogVideoX.from_pretrained(_folder(m.vae, "vae", "model.vae"), local_files_only=True)
    vae.requires_grad_(False)
    return vae.eval().to(torch.bfloat16 if m.dtype == "bfloat16" else torch.float32)


def make_scheduler(transformer_name: str = "", objective: str = "v"):
    """CogVideoX's DDIM scheduler (trailing timesteps): the checkpoint's scheduler/ config when the folder has one,
    else the released 5B-I2V values (``SCHEDULER``); ``objective`` sets how it reads the network (v or epsilon)."""
    import os

    from diffusers import CogVideoXDDIMScheduler

    pred = {"v": "v_prediction", "epsilon": "epsilon"}[objective]
    # epsilon cannot be read at zero terminal SNR (x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) with a = 0 at t = 999):
    # the epsilon objective trains and samples on the plain scaled-linear schedule.
    extra = {"prediction_type": pred, **({"rescale_betas_zero_snr": False} if objective == "epsilon" else {})}
    if transformer_name and transformer_name != TINY:
        root = resolve_model_path(transformer_name, "model.transformer")
        for folder in (os.path.join(root, "scheduler"), os.path.join(os.path.dirname(root), "scheduler")):
            if os.path.isfile(os.path.join(folder, "scheduler_config.json")):
                return CogVideoXDDIMScheduler.from_config(CogVideoXDDIMScheduler.load_config(folder), **extra)
    return CogVideoXDDIMScheduler(**{**SCHEDULER, **extra})


# --------------------------------------------------------------------------------------------- inputs


def padded_frames(n: int) -> int:
    """Frames after padding ``n`` to CogVideoX's 1 + 4k by repeating the last frame (46 -> 49, as the authors)."""
    if n < 1:
        raise ValueError(f"a segment needs frames, got {n}")
    return 1 + 4 * math.ceil((n - 1) / 4)


def encode(vae, video: torch.Tensor) -> torch.Tensor:
    """(B,3,F,H,W) in [-1,1] -> latents (B,F',C,h,w) float32 on the VAE's device: the posterior mode times the VAE's
    scaling factor (the transformer's layout: frames before channels)."""
    import torch

    with torch.no_grad():
        z = vae.encode(video.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return z.permute(0, 2, 1, 3, 4).float()


def frames_input(frames) -> torch.Tensor:
    """uint8 frames (B,F,H,W,3) (tensor or array) -> the VAE's input (B,3,F,H,W) in [-1,1]."""
    import torch

    return torch.from_numpy(np.array(frames, copy=True)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def edges_input(edges) -> torch.Tensor:
    """Edge maps (B,F,H,W) in [0,1] (tensor or array) -> the VAE's input (B,3,F,H,W) in [-1,1] (grey as RGB, as the
    authors feed their HED images)."""
    import torch

    return (torch.as_tensor(np.asarray(edges)).float() * 2 - 1)[:, None].expand(-1, 3, -1, -1, -1)


def anchor_pair(vae, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Anchors (B,3,H,W) in [-1,1] -> (B,2,C,h,w): each encoded alone as a one-frame video (what `loom cache ggi`
    stores; `anchor_layout` places them)."""
    import torch

    return torch.cat([encode(vae, first[:, :, None]), encode(vae, last[:, :, None])], 1)


def anchor_latents(vae, first: torch.Tensor, last: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """Anchors (B,3,H,W) in [-1,1] -> V (B,F',C,h,w): first at latent frame 0, last at latent frame F'-1, zeros
    between (the layout of the authors' pipeline)."""
    return anchor_layout(anchor_pair(vae, first, last), latent_frames)


def encode_clip(vae, frames, edges) -> dict[str, torch.Tensor]:
    """A training clip in the GGI view (uint8 frames (B,F,H,W,3), edges (B,F,H,W) in [0,1]) -> ``x0`` (B,F',C,h,w),
    ``anchor_pair`` (B,2,C,h,w: its first and last frame, each alone) and ``edges`` (B,F',C,h,w): what training
    computes from pixels and `loom cache ggi` stores."""
    video = frames_input(frames)
    return {"x0": encode(vae, video), "anchor_pair": anchor_pair(vae, video[:, :, 0], video[:, :, -1]),
            "edges": encode(vae, edges_input(edges))}


def anchor_layout(anchors: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """The two anchor latents (B,2,C,h,w) -> V (B,F',C,h,w): first at latent frame 0, last at F'-1, zeros between."""
    import torch

    if latent_frames < 2:
        raise ValueError(f"inbetweening needs at least 2 latent frames (5 frames), got {latent_frames}")
    zeros = torch.zeros(anchors.shape[0], latent_frames - 2, *anchors.shape[2:], dtype=anchors.dtype,
                        device=anchors.device)
    return torch.cat([anchors[:, :1], zeros, anchors[:, 1:2]], dim=1)


def model_input(noisy: torch.Tensor, anchors: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Z_t (+) V (+) H_e along channels: (B,F',3C,h,w)."""
    import torch

    if not noisy.shape == anchors.shape == edges.shape:
        raise ValueError(f"noisy {tuple(noisy.shape)}, anchor {tuple(anchors.shape)} and edge "
                         f"{tuple(edges.shape)} latents must have one shape (B,F',C,h,w)")
    return torch.cat([noisy, anchors.to(noisy), edges.to(noisy)], dim=2)


def rotary(transformer, latent_h: int, latent_w: int, latent_frames: int, device=None):
    """The 3D rotary position embeddings CogVideoX-5B's pipelines compute (CogVideoX 1.0 layout), or None."""
    cfg = transformer.config
    if not cfg.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = cfg.patch_size
    gh, gw = latent_h // p, latent_w // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                   temporal_size=latent_frames, device=device)


class T5Prompts:
    """CogVideoX's text conditioning, as its pipelines compute it (diffusers 0.42.1
    ``CogVideoXImageToVideoPipeline._get_t5_prompt_embeds``): the prompt tokenised with special tokens, padded to
    ``max_length`` (226) and truncated, the T5 encoder's ``last_hidden_state`` over ALL the rows, padding included (the
    pipeline passes no attention mask, and the transformer was trained on those rows). Frozen, local folders only."""

    def __init__(self, text_encoder: str, tokenizer: str = "", max_length: int = 226):
        import os

        from transformers import AutoTokenizer, T5EncoderModel

        root = resolve_model_path(text_encoder, "model.text_encoder")
        enc = os.path.join(root, "text_encoder") if os.path.isdir(os.path.join(root, "text_encoder")) else root
        if tokenizer:
            tok = resolve_model_path(tokenizer, "model.tokenizer")
        else:
            tok = os.path.join(root, "tokenizer") if os.path.isdir(os.path.join(root, "tokenizer")) else enc
        if not os.path.isfile(os.path.join(enc, "config.json")):
            raise FileNotFoundError(f"model.text_encoder={text_encoder!r}: no config.json in {enc}: give "
                                    "CogVideoX's checkpoint folder (text_encoder/, tokenizer/) or a T5 encoder folder")
        self.tokenizer = AutoTokenizer.from_pretrained(tok, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(enc, local_files_only=True).eval().requires_grad_(False)
        self.max_length = max_length

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, D) float32."""
        import torch

        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            return self.model(ids.to(self.model.device))[0].float()


def prompts_of(metas: list[dict], default: str) -> list[str]:
    """Each sample's caption (``meta["caption"]``, what ``loom prep videos`` writes), else ``default``."""
    return [str(m.get("caption") or default) for m in metas]


def text_tokens(embeds, b: int, transformer, length: int) -> torch.Tensor:
    """Per-sample T5 embeddings (list of (L,D) or a (B,L,D) tensor, or None) -> (B, length, D) zero-padded (the
    video DiT's `loom.models.ttv.pad_tokens`, at the transformer's text width)."""
    from loom.models.ttv import pad_tokens

    return pad_tokens(embeds, length, transformer.config.text_embed_dim, b)


def forward(transformer, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The transformer on a GGI input (B,F',3C,h,w) at integer timesteps t (B,) -> (B,F',C,h,w)."""
    cfg = transformer.config
    if cfg.use_learned_positional_embeddings and (x.shape[-2], x.shape[-1]) != (cfg.sample_height,
                                                                                 cfg.sample_width):
        s = 8  # the VAE's spatial factor: the config's sample size is in latents
        raise ValueError(f"this transformer's learned position embeddings fix its frames to "
                         f"{cfg.sample_width * s}x{cfg.sample_height * s} (CogVideoX-5B-I2V: 720x480), the data is "
                         f"{x.shape[-1] * s}x{x.shape[-2] * s}: make the clips or scenes at that size")
    rot = rotary(transformer, x.shape[-2], x.shape[-1], x.shape[1], x.device)
    dt = next(transformer.parameters()).dtype
    return transformer(hidden_states=x.to(dt), encoder_hidden_states=text.to(dt), timestep=t,
                       image_rotary_emb=rot, return_dict=False)[0]


# --------------------------------------------------------------------------------------------- objective


def blend_noise(base: torch.Tensor, fresh: torch.Tensor, alpha: float) -> torch.Tensor:
    """Variance-preserving blend: N(0,1) stays N(0,1); alpha = 0 keeps ``base``, 1 replaces it."""
    return (fresh * alpha + base * (1 - alpha)) / math.sqrt(alpha ** 2 + (1 - alpha) ** 2)


def loss(transformer, scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, anchors: torch.Tensor,
         edges: torch.Tensor, text: torch.Tensor, objective: str = "v") -> torch.Tensor:
    """Per-sample loss (B,) of one training step: x_t from x0 and the warped noise at t on CogVideoX's schedule,
    the model's output against v (``v``) or, read as epsilon, against the warped noise (``epsilon``, eq. 3)."""
    import torch

    x_t = scheduler.add_noise(x0, eps, t)
    out = forward(transformer, model_input(x_t, anchors, edges), t, text).float()
    a = scheduler.alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1, 1)
    if objective == "v":
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
        pred = out
    elif objective == "epsilon":  # eq. (3): the network's output is epsilon
        target, pred = eps, out
    else:
        raise ValueError(f"objective {objective!r}: use 'v' or 'epsilon'")
    return (pred - target).pow(2).flatten(1).mean(1).to(torch.float32)


def sample(transformer, scheduler, noise: torch.Tensor, anchors: torch.Tensor, edges: torch.Tensor,
           text: torch.Tensor, steps: int, generator: torch.Generator | None = None, guidance: float = 1.0,
           negative: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (B,F',C,h,w) from the initial ``noise`` by ``steps`` steps of the scheduler (`make_scheduler`: DDIM,
    whose ``prediction_type`` says how it reads the network). ``generator`` feeds a scheduler that draws noise (DDIM
    with eta > 0); the default DDIM is deterministic. ``guidance`` > 1: classifier-free guidance
    on the text as CogVideoX's pipeline does it (the anchors and edges in both branches, ``negative`` the text of
    the empty prompt, zeros when None): ``uncond + guidance (cond - uncond)``."""
    import torch

    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = t.expand(x.shape[0])
            if guidance > 1:
                neg = negative if negative is not None else torch.zeros_like(text)
                both = forward(transformer, model_input(torch.cat([x, x]), torch.cat([anchors, anchors]),
                                                        torch.cat([edges, edges])),
                               torch.cat([tt, tt]), torch.cat([neg.expand_as(text), text])).float()
                uncond, cond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
            else:
                out = forward(transformer, model_input(x, anchors, edges), tt, text).float()
            x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return x


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B,F',C,h,w) -> uint8 video (B,F,H,W,3)."""
    import torch

    with torch.no_grad():
        z = (latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).to(vae.dtype)
        video = vae.decode(z).sample.float()  # (B,3,F,H,W) in [-1,1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


# --------------------------------------------------------------------------------------------- data view

KINDS = ("clips", "scene")


def pad_last(a: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last entry of axis 0 up to ``n`` entries."""
    if len(a) >= n:
        return a[:n]
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])


class GGIView:
    """The loader transform (``t(sample, rng)``): a decoded clip or scene sample -> ``video``, ``edges``, ``noise``
    (above), plus ``meta``/keys untouched. Deterministic: ``rng`` is not used."""

    def __init__(self, frames: int = 0, structure: str = "edges"):
        if structure not in ("edges", "none"):
            raise ValueError(f"structure={structure!r}: 'edges' or 'none'")
        self.frames = frames
        self.structure = structure  # "none": a blank edge video (VideoFrom3D Tab. 3's model without structure)

    def __call__(self, sample: dict[str, Any], rng=None) -> dict[str, Any]:
        kind = sample["meta"].get("kind")
        if kind not in KINDS:
            raise ValueError(f"sample {sample.get('__key__')} is of kind {kind!r}: GGI trains on {list(KINDS)} "
                             "(loom prep videos, loom render scene)")
        rgb = sample["rgb"]
        t = len(rgb) if not self.frames else self.frames
        if t > len(rgb):
            raise ValueError(f"data.frames={self.frames} but sample {sample.get('__key__')} has {len(rgb)} frames")
        f = padded_frames(t)
        h, w = rgb.shape[1:3]
        if h % 16 or w % 16:
            raise ValueError(f"sample {sample.get('__key__')} is {w}x{h}: GGI needs sides that are multiples of 16 "
                             "(VAE 8x, patch 2x); prep or render the corpus at such a size")
        if kind == "clips":
            edges = sample["edges"][:t].astype(np.float32) / 255.0
            noise = sample["noise"]
            need = 1 + (f - 1) // 4
            if self.frames and len(noise) < need:
                raise ValueError(f"sample {sample.get('__key__')}: its noise has {len(noise)} latent frames, "
                                 f"{need} are needed")
            noise = noise[:need]
        else:
            import torch

            from loom.geometry.noise import compress_time

            edges = sample["edges"][:t].any(-1).astype(np.float32)
            noise = compress_time(torch.from_numpy(pad_last(sample["noise"][:t], f))).numpy()
        out = {k: v for k, v in sample.items() if k.startswith("__") or k == "meta"}
        if self.structure == "none":
            edges = np.zeros_like(edges)
        out.update(video=pad_last(rgb[:t], f), edges=pad_last(edges, f), noise=np.ascontiguousarray(noise,
                                                                                                      np.float32))
        return out
