"""VideoFrom3D's Sparse Anchor-view Generation (SAG, section 3.2): FLUX.1-dev + an HED ControlNet through diffusers,
with the style LoRA of distribution alignment and Sparse Appearance-guided Sampling.

Data flow of one anchor view::

    identifier prompt --CLIP (pooled) + T5 (tokens)--> prompt embeddings; "" -> the negative ones (true CFG)
    HED edges of the coarse geometry at the view (H,W) -> [-1,1] 3 channels -> ControlNet condition (pixels: the
        XLabs ControlNet embeds them itself; an InstantX-style one gets the VAE latent)
    noise x1 ~ N(0,1) (B,16,H/8,W/8), packed 2x2 -> (B, HW/256, 64); FlowMatchEuler sigmas 1 -> 0 with FLUX's shift
    for each step i (sigma_i):
        [SAG] i < replace_steps: z <- m * ((1 - sigma_i) z_known + sigma_i x1) + (1 - m) * z          (eq. 1)
              z_known = VAE latent of the previous anchor warped into this view, m = its known mask (latent size)
        ControlNet(z, condition) x control_weight -> residuals of the double (and single) blocks
        v = DiT(z, prompt, guidance embedding, residuals); i >= cfg_start: v = v_neg + true_cfg (v - v_neg)
        z <- z + (sigma_{i+1} - sigma_i) v
    z -> VAE decode -> the anchor image (H,W,3) uint8

Defaults are the authors' (sag_generate_anchor_view.py): 25 steps, replacement for the first 12, distilled guidance
4, true CFG 3.5 from step 5 against the empty prompt, ControlNet weight 0.8; the known mask is the warp's known
region shrunk by the authors' dilation of the unknown one (5x5 kernel, 12 iterations) and blurred (9x9, sigma 3), so
distorted borders of the warp are regenerated. Replacement noise uses the sampler's own initial noise x1, as theirs.

The noise of a step (eq. 1) is the flow-matching interpolation x_t = (1 - t) x_0 + t x_1 of FLUX (t = sigma); the
same interpolation trains the style LoRA (:func:`loss`: velocity target x1 - x0 at t drawn from FLUX's shifted
schedule, as the authors' training script).

``tiny`` builds random tiny parts (DiT, ControlNet, VAE, and CLIP/T5 text encoders on a byte-level tokenizer) for
tests; a real base is FLUX.1-dev's folder in diffusers' layout and the ControlNet either XLabs'
``flux-hed-controlnet-v3.safetensors`` (x-flux keys, converted by :mod:`loom.models.flux_xlabs`) or a diffusers
``FluxControlNetModel`` folder. Everything loads from local paths only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from loom.platform.config import config, field, require

TINY = "tiny"
# the authors' sampling defaults (sag_generate_anchor_view.py) and the paper's (25 steps, 12 replaced)
STEPS, REPLACE_STEPS, GUIDANCE, TRUE_CFG, CFG_START, CONTROL_WEIGHT = 25, 12, 4.0, 3.5, 5, 0.8


@config
class SAGModelSettings:
    base: str = field("", help="FLUX.1-dev in diffusers' layout (transformer/, vae/, text_encoder/, text_encoder_2/, "
                      "tokenizer/, tokenizer_2/, scheduler/), a local folder; 'tiny' = random tiny parts")
    controlnet: str = field("", help="HED ControlNet: XLabs' flux-hed-controlnet-v3.safetensors (x-flux keys) or a "
                            "diffusers FluxControlNetModel folder; 'tiny' = random tiny; empty = no ControlNet")
    dtype: str = field("float32", help="weights dtype of the DiT and ControlNet: float32 | bfloat16")
    text_len: int = field(512, help="T5 tokens per prompt (FLUX.1-dev: 512)")

    def __post_init__(self):
        require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
                "must be float32, bfloat16 or float16")
        require(self.text_len >= 1, "model.text_len", self.text_len, "must be >= 1")


@dataclasses.dataclass
class SAGParts:
    transformer: Any
    vae: Any
    scheduler: Any
    text: Any  # FluxText
    controlnet: Any = None

    @property
    def xlabs(self) -> bool:
        """An XLabs ControlNet embeds the pixel condition itself and its residuals repeat over the DiT's blocks."""
        return self.controlnet is not None and getattr(self.controlnet, "input_hint_block", None) is not None


# ------------------------------------------------------------------------------------------------------ building


def tiny_configs() -> dict:
    """Random tiny FLUX parts: 2 double + 2 single blocks of width 32, 16 latent channels (the VAE scaled so its
    latents have about unit variance, as FLUX's do), ControlNet with XLabs'
    pixel hint block."""
    tr = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
              axes_dims_rope=[4, 6, 6])
    cn = {**tr, "num_layers": 2, "num_single_layers": 0, "patch_size": 2, "conditioning_embedding_channels": 16}
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], latent_channels=16,
               layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=4.0, shift_factor=0.0,
               use_quant_conv=False, use_post_quant_conv=False)
    return {"transformer": tr, "controlnet": cn, "vae": vae}


class FluxText:
    """FLUX's two text encoders: CLIP's pooled output (``pooled_projections``) and T5's tokens
    (``encoder_hidden_states``), as FluxPipeline.encode_prompt computes them (CLIP at 77 tokens, T5 at text_len,
    both padded to length and truncated)."""

    def __init__(self, clip_tok, clip, t5_tok, t5, text_len: int):
        self.clip_tok, self.clip, self.t5_tok, self.t5, self.text_len = clip_tok, clip, t5_tok, t5, text_len
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (tokens (B, text_len, D), pooled (B, P)); cached per prompt (the style prompts repeat)."""
        out = []
        for p in prompts:
            if p not in self._cache:
                ids = self.clip_tok([p], padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
                pooled = self.clip(ids.to(self.clip.device), output_hidden_states=False).pooler_output
                ids2 = self.t5_tok([p], padding="max_length", max_length=self.text_len, truncation=True,
                                   return_tensors="pt").input_ids
                tokens = self.t5(ids2.to(self.t5.device), output_hidden_states=False)[0]
                self._cache[p] = (tokens.float().cpu(), pooled.float().cpu())
            out.append(self._cache[p])
        return torch.cat([t for t, _ in out]), torch.cat([p for _, p in out])


def _tiny_text(text_len: int, seed: int) -> FluxText:
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed + 3)
    tok = ByT5Tokenizer()  # byte-level: needs no vocabulary file, so prompts really differ in the tiny model
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=tok.pad_token_id)).eval()
    return FluxText(tok, clip, tok, t5, text_len)


def build(m: SAGModelSettings, seed: int = 0) -> SAGParts:
    """The SAG networks (frozen except what a LoRA adds later), in eval mode."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxTransformer2DModel

    dtype = getattr(torch, m.dtype)
    if m.base == TINY:
        cfgs = tiny_configs()
        torch.manual_seed(seed)
        tr = FluxTransformer2DModel(**cfgs["transformer"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**cfgs["vae"])
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        text = _tiny_text(m.text_len, seed)
    else:
        if not m.base or not os.path.isdir(m.base):
            raise FileNotFoundError(f"model.base={m.base!r} is not a local folder: point it at FLUX.1-dev in "
                                    "diffusers' layout (transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/), "
                                    "or use 'tiny'")
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = {"local_files_only": True}
        tr = FluxTransformer2DModel.from_pretrained(m.base, subfolder="transformer", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(m.base, subfolder="vae", **kw)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(m.base, subfolder="scheduler", **kw)
        text = FluxText(CLIPTokenizer.from_pretrained(m.base, subfolder="tokenizer", **kw),
                        CLIPTextModel.from_pretrained(m.base, subfolder="text_encoder", **kw).eval(),
                        T5TokenizerFast.from_pretrained(m.base, subfolder="tokenizer_2", **kw),
                        T5EncoderModel.from_pretrained(m.base, subfolder="text_encoder_2", torch_dtype=dtype,
                                                       **kw).eval(), m.text_len)
    cn = None
    if m.controlnet == TINY:
        torch.manual_seed(seed + 2)
        cn = FluxControlNetModel(**tiny_configs()["controlnet"])
        with torch.no_grad():  # diffusers zero-initialises the hint's last conv and the residual projections:
            for name, prm in cn.named_parameters():  # as if trained, they are not
                if name.endswith("weight") and not prm.any():
                    prm.normal_(0, 0.5)
    elif m.controlnet.endswith(".safetensors"):
        from loom.models.flux_xlabs import load_xlabs_controlnet

        cn = load_xlabs_controlnet(m.controlnet)
    elif m.controlnet:
        if not os.path.isdir(m.controlnet):
            raise FileNotFoundError(f"model.controlnet={m.controlnet!r}: give XLabs' flux-hed-controlnet-v3."
                                    "safetensors or a diffusers FluxControlNetModel folder")
        cn = FluxControlNetModel.from_pretrained(m.controlnet, local_files_only=True)
    for net in (tr, cn):
        if net is not None:
            net.to(dtype).eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return SAGParts(tr, vae, sched, text, cn)


def build_local(m: SAGModelSettings, seed: int = 0) -> SAGParts:
    """:func:`build` with Hugging Face repo names of model.base / model.controlnet resolved in the local cache
    (nothing is downloaded)."""
    from loom.platform.hub import resolve_model_path

    base = m.base if m.base == TINY else resolve_model_path(m.base, "model.base")
    cn = m.controlnet if m.controlnet in ("", TINY) else resolve_model_path(m.controlnet, "model.controlnet")
    return build(dataclasses.replace(m, base=base, controlnet=cn), seed)


# A `loom train style` run's files, which generation reads (loom.inference.style) without the training code.
LORA_DIR = "lora"
TRANSFORMER_LORA = "pytorch_lora_weights.safetensors"  # FluxPipeline.load_lora_weights(RUN/lora)
CONTROLNET_LORA = "controlnet_lora.safetensors"  # peft keys without prefix: controlnet.load_lora_adapter
REFERENCES = "references"
INDEX = "references.json"


# ------------------------------------------------------------------------------------------------------ latents


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> FLUX latents (B,16,H/8,W/8), shifted and scaled as FLUX's VAE is used (the mean)."""
    lat = vae.encode(images.to(vae.dtype)).latent_dist.mean
    return ((lat - vae.config.shift_factor) * vae.config.scaling_factor).float()


def decode(vae, z: torch.Tensor) -> np.ndarray:
    """FLUX latents -> (B,H,W,3) uint8."""
    x = vae.decode((z / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)).sample
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def image_input(images) -> torch.Tensor:
    """uint8 (B,H,W,3) or (H,W,3) (grey (H,W) repeated) -> (B,3,H,W) float in [-1, 1]."""
    a = np.asarray(images)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] != 3):
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(np.array(a, np.float32, copy=True)).permute(0, 3, 1, 2) / 127.5 - 1


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B,C,h,w) -> FLUX's 2x2 patches (B, h/2 * w/2, 4C) (diffusers' FluxPipeline._pack_latents)."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B,C,h,w) at latent size h x w."""
    b, n, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def ids(h: int, w: int, text_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids (h/2 * w/2, 3), txt_ids (text_len, 3)) of FLUX's rotary positions."""
    from diffusers import FluxPipeline

    img = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
    return img, torch.zeros(text_len, 3, device=device, dtype=dtype)


def sigmas(scheduler, steps: int, seq_len: int) -> torch.Tensor:
    """FLUX's sampling sigmas (steps + 1, ending at 0): linspace(1, 1/steps) time-shifted by mu(seq_len), as
    FluxPipeline sets them (the x-flux get_schedule gives the same)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.float().cpu()


def known_mask(known: np.ndarray, latent_hw: tuple[int, int], shrink: tuple[int, int] = (5, 12),
               blur: tuple[int, float] = (9, 3.0)) -> torch.Tensor:
    """(H,W) bool known pixels of a warp -> (1,1,h,w) float mask at latent size: the unknown region dilated by
    ``shrink`` = (kernel, iterations) and blurred by ``blur`` = (size, sigma), as the authors' ``Warp``, then 1 -
    it, resized by nearest neighbour."""
    import cv2

    unknown = (~np.asarray(known, bool)).astype(np.uint8)
    if shrink[1] > 0:
        unknown = cv2.dilate(unknown, np.ones((shrink[0], shrink[0]), np.uint8), iterations=shrink[1])
    u = unknown.astype(np.float32)
    if blur[0] > 1:
        u = cv2.GaussianBlur(u, (blur[0], blur[0]), blur[1])
    u = cv2.resize(u, (latent_hw[1], latent_hw[0]), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(1.0 - u)[None, None]


# ------------------------------------------------------------------------------------------------------ the DiT


def _velocity(parts: SAGParts, z, t, guidance, tokens, pooled, control, control_weight, img_ids, txt_ids):
    dt = parts.transformer.dtype
    kw = dict(hidden_states=z.to(dt), timestep=t.to(dt), guidance=guidance, pooled_projections=pooled.to(dt),
              encoder_hidden_states=tokens.to(dt), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    if not parts.transformer.config.guidance_embeds:
        kw["guidance"] = None
    blocks = singles = None
    if parts.controlnet is not None and control is not None and control_weight != 0:
        cdt = parts.controlnet.dtype
        blocks, singles = parts.controlnet(
            hidden_states=z.to(cdt), controlnet_cond=control.to(cdt), conditioning_scale=control_weight,
            timestep=t.to(cdt), guidance=None if guidance is None else guidance.to(cdt),
            pooled_projections=pooled.to(cdt), encoder_hidden_states=tokens.to(cdt), img_ids=img_ids,
            txt_ids=txt_ids, return_dict=False)
    return parts.transformer(**kw, controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                             controlnet_blocks_repeat=parts.xlabs)[0].float()


def control_input(parts: SAGParts, edges: torch.Tensor) -> torch.Tensor | None:
    """HED edges (B,3,H,W) in [-1,1] -> the ControlNet's condition: the pixels for an XLabs ControlNet (its hint
    block embeds them), the packed VAE latent for an InstantX-style one (FluxControlNetPipeline does the same)."""
    if parts.controlnet is None:
        return None
    if parts.xlabs:
        return edges
    return pack(encode(parts.vae, edges))


@torch.no_grad()
def sample(parts: SAGParts, prompt: str, size: tuple[int, int], *, edges: torch.Tensor | None = None,
           known: torch.Tensor | None = None, mask: torch.Tensor | None = None, steps: int = STEPS,
           replace_steps: int = REPLACE_STEPS, guidance: float = GUIDANCE, true_cfg: float = TRUE_CFG,
           cfg_start: int = CFG_START, control_weight: float = CONTROL_WEIGHT, negative: str = "",
           generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """One anchor view's latent (1,16,H/8,W/8) (module docstring). ``size`` = (H, W), multiples of 16; ``edges``
    (1,3,H,W) in [-1,1]; ``known`` (1,16,h,w) the warped previous anchor's latent with ``mask`` (1,1,h,w) in [0,1]
    (1 = known): the Sparse Appearance-guided replacement for the first ``replace_steps`` steps."""
    H, W = size
    if H % 16 or W % 16:
        raise ValueError(f"size {W}x{H}: FLUX needs multiples of 16")
    device = device or parts.transformer.device
    h, w = H // 8, W // 8
    x1 = torch.randn((1, 16, h, w), generator=generator).to(device)
    img_ids, txt_ids = ids(h, w, parts.text.text_len, device, parts.transformer.dtype)
    tokens, pooled = (t.to(device) for t in parts.text.encode([prompt]))
    neg = tuple(t.to(device) for t in parts.text.encode([negative])) if true_cfg > 1 else None
    g = torch.full((1,), guidance, device=device)
    control = control_input(parts, edges.to(device)) if edges is not None else None
    sig = sigmas(parts.scheduler, steps, (h // 2) * (w // 2)).to(device)
    z = pack(x1)
    if known is not None:
        known, m = pack(known.to(device).float()), pack(mask.to(device).float().expand(-1, 16, -1, -1))
        x1p = z.clone()
    for i in range(steps):
        s = sig[i]
        if known is not None and i < replace_steps:
            z = m * ((1 - s) * known + s * x1p) + (1 - m) * z  # eq. (1)
        t = s.expand(1)
        v = _velocity(parts, z, t, g, tokens, pooled, control, control_weight, img_ids, txt_ids)
        if neg is not None and i >= cfg_start:
            vn = _velocity(parts, z, t, g, neg[0], neg[1], control, control_weight, img_ids, txt_ids)
            v = vn + true_cfg * (v - vn)
        z = z + (sig[i + 1] - s) * v
    return unpack(z, h, w)


def loss(parts: SAGParts, x0: torch.Tensor, edges: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor,
         t: torch.Tensor, noise: torch.Tensor, control_weight: float = 1.0) -> torch.Tensor:
    """Per-sample flow-matching loss of distribution alignment: x_t = (1 - t) x0 + t noise, the DiT (with the
    ControlNet's residuals) predicts noise - x0; guidance embedding 1 as the authors' training. x0, noise (B,16,h,w);
    t (B,) in (0, 1)."""
    b, _, h, w = x0.shape
    tt = t.view(b, 1, 1, 1)
    z = pack((1 - tt) * x0 + tt * noise)
    img_ids, txt_ids = ids(h, w, tokens.shape[1], x0.device, parts.transformer.dtype)
    g = torch.ones(b, device=x0.device)
    control = control_input(parts, edges)
    v = _velocity(parts, z, t, g, tokens, pooled, control, control_weight, img_ids, txt_ids)
    return ((v - pack(noise - x0)) ** 2).mean(dim=(1, 2))


def train_timesteps(scheduler, seq_len: int, n: int = 1000) -> torch.Tensor:
    """The authors' training t: one of FLUX's n shifted schedule values (get_schedule(999, seq_len)), uniformly."""
    return sigmas(scheduler, n - 1, seq_len)[:-1].clone()
