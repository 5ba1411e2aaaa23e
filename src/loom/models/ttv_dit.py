"""The geometry-conditioned video DiT of TAPESTRY (sections 3.1 and 4.1): Wan2.1-Fun-Control's transformer with the
geometry fusion module in front of its control channels, LoRA on the DiT blocks and LoRA+ parameter groups.

The network is ``f(x_t, t, cond) -> velocity``; the flow-matching objective, noise schedule and sampler live
beside it, not here.

Design choices:

- The transformer is `loom.models.wan_fun.WanFunTransformer3DModel`: diffusers' own ``WanTransformer3DModel`` plus
  Wan2.1-Fun-V1.1's ``ref_conv`` reference path. `from_pretrained` reads VideoX-Fun's release folder as published
  (``alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control`` or ``-14B-Control``: original Wan key names, converted by diffusers'
  own converter, strictly, ``ref_conv`` included) or a diffusers-layout folder (a plain ``WanTransformer3DModel``, or
  one `save_pretrained` wrote), so the release, a converted checkpoint and the tiny random test models load the same
  way. Nothing is downloaded.
- V1.1 reference frame (`forward`'s ``ref_latent``, (B, 16, 1, H', W'): ONE frame's latent): ``ref_conv`` turns it
  into tokens placed before the video tokens as latent frame 0 (RoPE over T' + 1 frames), removed after the head
  (see `loom.models.wan_fun`). None means zeros, as VideoX-Fun's pipeline feeds without a reference image. It is a
  different slot from ``reference`` (the start-image channels below): VideoX-Fun's V1.1 training
  (``scripts/wan2.1_fun/train_control.py``) puts a first-frame reference in the start-image slot and zeros in
  ``ref_latent``, and a reference drawn from another frame in ``ref_latent`` with zeros in the start-image slot.
  ``ref_conv`` lies outside the blocks: frozen with the rest of the transformer, never LoRA-adapted.
- Fun-Control layout: the patch embedding takes ``in_channels = 3 * out_channels`` (48 = 3 x 16) channels,
  concatenated in VideoX-Fun's order: noisy latent, control latent, start-image latent. TAPESTRY puts its
  geometry latent (`GeometryFusion` output) in the control slot and the reference-frame latent in the
  start-image slot. A transformer of any other width is refused rather than adapted.
- Reference latent (`reference_latent`): the first frame's latent in latent frame 0, zeros in the others. The
  paper says the first frame's latent is "padded across the frame dimension"; zeros are what VideoX-Fun's Wan
  Fun-Control pipeline feeds the pretrained model (``start_image_latentes_conv_in = zeros_like(latents)``, then
  frame 0 set), as in Wan I2V, where the conditioning frames beyond the given ones are empty. Repeating the
  frame instead would show the pretrained weights a layout they never saw. Zero is the Wan-normalised latent
  mean, not the latent of a black frame.
- Context: text (umT5) and first-frame image (CLIP) embeddings are joined along the sequence by diffusers itself:
  ``condition_embedder`` projects both and concatenates ``[image, text]``; each block's cross-attention gives
  the image tokens their own key/value projections (``add_k_proj``/``add_v_proj``, present when
  ``added_kv_proj_dim`` is set). diffusers' attention processor finds the split by assuming exactly 512 text
  tokens (umT5's padded length), so with an image branch `forward` refuses text of any other length and refuses
  a missing image, instead of letting the split go silently wrong. ``image_dim=None`` builds a text-only model.
- LoRA (4.1: rank 128 on all linear layers of the DiT blocks): peft LoRA through diffusers'
  ``add_adapter`` on every ``nn.Linear`` under ``blocks.`` (self-attention q/k/v/out, cross-attention q/k/v/out,
  the image k/v projections, both FFN layers), named one by one so nothing outside the blocks (patch embedding,
  condition embedder, ``proj_out``) is touched. B starts at zero, so the model equals the base at step 0. The
  whole transformer is frozen; the fusion module trains in full.
- LoRA+ (Hayou et al. 2024; 4.1: B matrices and the fusion module at 4x the learning rate):
  `lora_plus_param_groups`.
- LoRA files are diffusers' own Wan LoRA format, written by ``WanLoraLoaderMixin.save_lora_weights``:
  ``pytorch_lora_weights.safetensors`` with peft keys prefixed ``transformer.``
  (``transformer.blocks.0.attn1.to_q.lora_A.weight``) and the adapter's ``LoraConfig`` (rank, alpha, targets) in
  the safetensors metadata under ``lora_adapter_metadata``, so a Wan pipeline's ``load_lora_weights(dir)`` or
  ``WanTransformer3DModel.load_lora_adapter(dir, prefix="transformer",
  weight_name="pytorch_lora_weights.safetensors")`` restores the same scaling even when alpha != rank (without
  ``weight_name`` the model-level loader looks for the pickled ``.bin``). The fusion module sits beside it in
  ``fusion/``; plain diffusers has no slot for it, so it is loaded with `GeometryFusion.from_pretrained`.

Shapes (latent space; Wan VAE: T' = 1 + (T - 1) / 4, H' = H / 8, W' = W / 8)::

    x_t        (B, 16, T', H', W')       noisy latent
    timestep   (B,)                      t = 1000 * sigma (Wan convention), float
    geometry   (B, 64, T', H', W')       normal, position, known video, mask latents (GeometryFusion input)
    reference  (B, 16, T', H', W')       first frame's latent, then zeros (`reference_latent`)
    ref_latent (B, 16, 1, H', W') | None V1.1 reference-frame latent for ref_conv (models with ref_conv only)
    text       (B, 512, text_dim)        umT5 embeddings, padded to 512 tokens (any length without image branch)
    image      (B, L_img, image_dim)     CLIP embeddings of the first frame (257 tokens for Wan), or None
    -> velocity (B, 16, T', H', W')

No Ray, Lightning, DeepSpeed or torch.distributed here: this is a single-device module. Sharding intent is
declared in ``_no_split_modules`` (the Wan blocks) and applied by ``loom.training.launch.apply_sharding_intent``:
gradient checkpointing of those blocks, and under ZeRO-3 each block gathered whole.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from loom.models.checkpointing import checkpoint_blocks, uncheckpoint_blocks
from loom.models.geometry_fusion import GeometryFusion

TEXT_TOKENS = 512  # diffusers' WanAttnProcessor hard-codes this split between image and text tokens
ADAPTER = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FUSION_SUBDIR = "fusion"


def tiny_transformer_config(**overrides) -> dict:
    """A tiny random ``WanTransformer3DModel`` config in the Wan2.1-Fun-Control layout (48 = 16 noisy + 16 geometry +
    16 reference input channels, 16 output channels), with a CLIP image branch unless ``image_dim=None``."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it into 4 (t) + 4 (h) + 4 (w); each part must be even
        in_channels=48,
        out_channels=16,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=32,  # = the tiny CLIP of the tests (hidden 32), like text_dim = the tiny umT5 d_model
        rope_max_seq_len=32,
    )
    config.update(overrides)
    if "added_kv_proj_dim" not in overrides:
        # The image embedder maps image_dim to the model width, and the image k/v projections read that width.
        inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
        config["added_kv_proj_dim"] = inner_dim if config["image_dim"] is not None else None
    return config


def _check_fun_control_config(config, source: str) -> None:
    in_channels, out_channels = config.get("in_channels"), config.get("out_channels")
    if in_channels is None or out_channels is None:
        raise ValueError(f"{source}: the transformer config has no in_channels/out_channels: is it a Wan "
                         f"transformer config (class {config.get('_class_name')!r})?")
    if in_channels != 3 * out_channels:
        raise ValueError(f"{source}: the transformer has in_channels={in_channels}, out_channels={out_channels}; the "
                         f"Fun-Control layout needs in_channels = 3 * out_channels = {3 * out_channels} (noisy latent, "
                         "geometry latent and reference latent concatenated on channels). Use a Wan2.1-Fun-Control "
                         "checkpoint, not a text-to-video (16) or image-to-video (36) one")
    if (config.get("image_dim") is None) != (config.get("added_kv_proj_dim") is None):
        raise ValueError(f"{source}: image_dim={config.get('image_dim')} and added_kv_proj_dim="
                         f"{config.get('added_kv_proj_dim')} must both be set (CLIP image branch) or both be None")


def _block_linear_names(transformer: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the DiT blocks of an un-adapted transformer."""
    return [name for name, module in transformer.named_modules()
            if name.startswith("blocks.") and isinstance(module, nn.Linear)]


class TTVDiT(nn.Module):
    """Geometry fusion + Wan Fun-Control transformer: ``forward(x_t, t, geometry, reference, text, image)`` ->
    velocity. Build with `from_pretrained` (local checkpoint) or `tiny` (random test model)."""

    _no_split_modules = ["WanTransformerBlock"]

    def __init__(self, transformer: nn.Module, fusion: GeometryFusion):
        super().__init__()
        cfg = transformer.config
        _check_fun_control_config(cfg, type(transformer).__name__)
        self.transformer = transformer
        self.fusion = fusion
        self.latent_channels = int(cfg.out_channels)
        self.text_dim = int(cfg.text_dim)
        self.image_dim = None if cfg.image_dim is None else int(cfg.image_dim)
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.rope_max_seq_len = int(cfg.rope_max_seq_len)
        # A plain diffusers WanTransformer3DModel (no reference path) is accepted too.
        self.ref_channels = None if cfg.get("ref_channels") is None else int(cfg["ref_channels"])
        if self.ref_channels is not None and getattr(transformer, "ref_conv", None) is None:
            raise ValueError(f"{type(transformer).__name__} has ref_channels={self.ref_channels} but no ref_conv")
        if fusion.out_channels != self.latent_channels:
            raise ValueError(f"fusion.out_channels={fusion.out_channels} must equal the transformer's latent "
                             f"channels ({self.latent_channels}): the fused latent fills the control slot")

    @property
    def has_ref_conv(self) -> bool:
        """Whether the transformer has V1.1's reference path (then `forward` takes ``ref_latent``)."""
        return self.ref_channels is not None

    # ------------------------------------------------------------------ forward

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, geometry: torch.Tensor, reference: torch.Tensor,
                text: torch.Tensor, image: torch.Tensor | None = None,
                ref_latent: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x_t, timestep, geometry, reference, text, image, ref_latent)
        fusion_dtype = next(self.fusion.parameters()).dtype
        dtype = self.transformer.patch_embedding.weight.dtype  # not ModelMixin.dtype: some modules stay fp32
        fused = self.fusion(geometry.to(fusion_dtype))  # (B, 16, T, H, W)
        hidden = torch.cat([x_t.to(dtype), fused.to(dtype), reference.to(dtype)], dim=1)  # (B, 48, T, H, W)
        extra = {}
        if self.has_ref_conv:  # None: zeros, inside the transformer
            extra["ref_latent"] = None if ref_latent is None else ref_latent[:, :, 0].to(dtype)  # (B, 16, H, W)
        out = self.transformer(
            hidden,
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),  # (B, L, text_dim)
            encoder_hidden_states_image=None if image is None else image.to(dtype),  # (B, L_img, image_dim)
            return_dict=False,
            **extra,
        )[0]  # (B, 16, T, H, W)
        return out.to(x_t.dtype)

    def _check_inputs(self, x_t, timestep, geometry, reference, text, image, ref_latent=None) -> None:
        c = self.latent_channels
        if x_t.ndim != 5 or x_t.shape[1] != c:
            raise ValueError(f"x_t must be (B, {c}, T, H, W), got {tuple(x_t.shape)}")
        b, _, t, h, w = x_t.shape
        if tuple(geometry.shape) != (b, self.fusion.in_channels, t, h, w):
            raise ValueError(f"geometry must be {(b, self.fusion.in_channels, t, h, w)} like x_t, "
                             f"got {tuple(geometry.shape)}")
        if tuple(reference.shape) != (b, c, t, h, w):
            raise ValueError(f"reference must be {(b, c, t, h, w)} like x_t (see TTVDiT.reference_latent), "
                             f"got {tuple(reference.shape)}")
        if ref_latent is not None:
            if not self.has_ref_conv:
                raise ValueError("this transformer has no ref_conv (not a Wan2.1-Fun-V1.1 model): pass ref_latent=None")
            if tuple(ref_latent.shape) != (b, self.ref_channels, 1, h, w):
                raise ValueError(f"ref_latent must be {(b, self.ref_channels, 1, h, w)} (one reference frame's "
                                 f"latent), got {tuple(ref_latent.shape)}")
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep must be ({b},), one t = 1000 * sigma per sample, got {tuple(timestep.shape)}")
        pt, ph, pw = self.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent (T, H, W) = {(t, h, w)} must be divisible by the patch size {self.patch_size}")
        if max(t // pt, h // ph, w // pw) > self.rope_max_seq_len:
            raise ValueError(f"latent (T, H, W) = {(t, h, w)} has more than rope_max_seq_len="
                             f"{self.rope_max_seq_len} patches along an axis")
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != self.text_dim:
            raise ValueError(f"text must be ({b}, L, {self.text_dim}), got {tuple(text.shape)}")
        if self.image_dim is None:
            if image is not None:
                raise ValueError("this transformer has no image branch (image_dim=None): pass image=None")
            return
        if image is None:
            raise ValueError(f"this transformer has an image branch (image_dim={self.image_dim}): pass the first "
                             "frame's CLIP embeddings as image (zeros to drop them)")
        if image.ndim != 3 or image.shape[0] != b or image.shape[2] != self.image_dim:
            raise ValueError(f"image must be ({b}, L_img, {self.image_dim}), got {tuple(image.shape)}")
        if text.shape[1] != TEXT_TOKENS:
            raise ValueError(f"text has {text.shape[1]} tokens; with an image branch diffusers splits the context "
                             f"at [image, last {TEXT_TOKENS} tokens], so pad the umT5 embeddings to {TEXT_TOKENS} "
                             "tokens (zeros after the prompt, as WanPipeline does)")

    @staticmethod
    def reference_latent(first_frame_latent: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, C, 1, H, W) latent of the first frame -> (B, C, frames, H, W): that latent, then zeros (see the
        module docstring for why zeros)."""
        if first_frame_latent.ndim != 5 or first_frame_latent.shape[2] != 1:
            raise ValueError(f"first_frame_latent must be (B, C, 1, H, W), got {tuple(first_frame_latent.shape)}")
        if frames < 1:
            raise ValueError(f"frames={frames} must be >= 1")
        b, c, _, h, w = first_frame_latent.shape
        return torch.cat([first_frame_latent, first_frame_latent.new_zeros(b, c, frames - 1, h, w)], dim=2)

    # ------------------------------------------------------------------ building, saving, loading

    @classmethod
    def tiny(cls, seed: int = 0, image: bool = True, ref_conv: bool = True, **overrides) -> TTVDiT:
        """A tiny random model (`tiny_transformer_config` + a 32-wide fusion; V1.1's ``ref_conv`` unless
        ``ref_conv=False``), the same for the same seed; the global RNG is left as it was."""
        from loom.models.wan_fun import WanFunTransformer3DModel

        if not image:
            if overrides.get("image_dim") is not None:
                raise ValueError(f"image=False contradicts image_dim={overrides['image_dim']}")
            overrides["image_dim"] = None
        config = tiny_transformer_config(**overrides)
        c = config["out_channels"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = WanFunTransformer3DModel(**config, ref_channels=c if ref_conv else None)
            fusion = GeometryFusion(in_channels=4 * c, out_channels=c, hidden=32, blocks=2)
        return cls(transformer, fusion)

    @classmethod
    def from_pretrained(cls, transformer_dir: str, fusion_dir: str | None = None,
                        torch_dtype: torch.dtype = torch.float32) -> TTVDiT:
        """Load the transformer from ``transformer_dir``: VideoX-Fun's Wan2.1-Fun(-V1.1)-Control release folder as
        published (original Wan names; see `loom.models.wan_fun`) or a diffusers-layout folder; and, from
        ``fusion_dir``, a saved `GeometryFusion` (a fresh one, which starts as a copy of the normal latent, when
        ``fusion_dir`` is None). Both are cast to ``torch_dtype``. Local directories only."""
        from loom.models.wan_fun import load_wan_fun_transformer

        transformer_dir = os.fspath(transformer_dir)
        if not os.path.isdir(transformer_dir):
            raise FileNotFoundError(
                f"transformer directory {transformer_dir!r} does not exist: point it at the local Wan2.1-Fun-V1.1 "
                "Control release folder (e.g. a download of alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control: config.json + "
                "diffusion_pytorch_model.safetensors) or at a diffusers WanTransformer3DModel folder. Nothing is "
                "downloaded at run time: copy the checkpoint there first")
        # The Fun-Control check runs on the config, before gigabytes of weights are read.
        transformer = load_wan_fun_transformer(transformer_dir, torch_dtype, check=_check_fun_control_config)
        c = int(transformer.config.out_channels)
        if fusion_dir is None:
            fusion = GeometryFusion(in_channels=4 * c, out_channels=c)
        else:
            fusion = GeometryFusion.from_pretrained(os.fspath(fusion_dir))
        return cls(transformer, fusion.to(torch_dtype))

    def save_pretrained(self, path: str) -> None:
        """The transformer as a diffusers folder in ``path``, the fusion in ``path/fusion``; load with
        ``from_pretrained(path, path + "/fusion")``."""
        if self.has_lora:
            raise ValueError("this model has LoRA adapters, which would be saved as peft-wrapped weights no plain "
                             "WanTransformer3DModel loads: save them with save_lora(dir) (the base weights are "
                             "unchanged)")
        path = os.fspath(path)
        self.transformer.save_pretrained(path)
        self.fusion.save_pretrained(os.path.join(path, FUSION_SUBDIR))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block named in ``_no_split_modules`` in backward (`loom.models.checkpointing`, the
        mechanism training applies too; not diffusers' own flag, which would checkpoint a second time)."""
        checkpoint_blocks(self)

    def disable_gradient_checkpointing(self) -> None:
        uncheckpoint_blocks(self)

    # ------------------------------------------------------------------ LoRA

    @property
    def has_lora(self) -> bool:
        return ADAPTER in (getattr(self.transformer, "peft_config", None) or {})

    def add_lora(self, rank: int = 128, alpha: float | None = None, dropout: float = 0.0) -> None:
        """Freeze the transformer and add LoRA (adapter "default") to every nn.Linear in its blocks; the fusion
        stays trainable."""
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError(f"the transformer already has a LoRA adapter {ADAPTER!r}")
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be >= 1")
        targets = _block_linear_names(self.transformer)
        if not targets:
            raise ValueError("the transformer has no nn.Linear under 'blocks.': nothing to adapt")
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                            target_modules=targets, init_lora_weights=True)  # True: B = 0, A Kaiming-uniform
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(config, adapter_name=ADAPTER)
        self._train_only_lora_and_fusion()

    def _train_only_lora_and_fusion(self) -> None:
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(".lora_A." in name or ".lora_B." in name)
        self.fusion.requires_grad_(True)

    def lora_plus_param_groups(self, lr: float, ratio: float = 4.0, weight_decay: float = 0.0) -> list[dict]:
        """LoRA+ optimizer groups: LoRA A at ``lr``; LoRA B and the whole fusion module at ``lr * ratio``."""
        a, b = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if ".lora_A." in name:
                a.append(param)
            elif ".lora_B." in name or name.startswith("fusion."):
                b.append(param)
            else:
                raise ValueError(f"trainable parameter {name!r} is neither LoRA nor fusion: LoRA+ groups are for the "
                                 "model after add_lora (base frozen)")
        if not a:
            raise ValueError("no trainable LoRA parameters: call add_lora first")
        return [
            {"name": "lora_A", "params": a, "lr": lr, "weight_decay": weight_decay},
            {"name": "lora_B+fusion", "params": b, "lr": lr * ratio, "weight_decay": weight_decay},
        ]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights under diffusers' keys (``transformer.blocks.0.attn1.to_q.lora_A.weight``) and the fusion's
        weights under ``fusion.``; detached tensors that share storage with the model."""
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("the transformer has no LoRA adapter: call add_lora (or load_lora) first")
        lora = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER)
        state = {f"transformer.{k}": v for k, v in lora.items()}
        state.update({f"fusion.{k}": v for k, v in self.fusion.state_dict().items()})
        return state

    def save_lora(self, path: str) -> None:
        """``path/pytorch_lora_weights.safetensors`` (diffusers Wan LoRA format, with the LoraConfig as metadata)
        and ``path/fusion/``."""
        from diffusers.loaders import WanLoraLoaderMixin

        path = os.fspath(path)
        state = self.trainable_state_dict()
        lora = {k.removeprefix("transformer."): v.contiguous()
                for k, v in state.items() if k.startswith("transformer.")}
        WanLoraLoaderMixin.save_lora_weights(
            path, transformer_lora_layers=lora, weight_name=LORA_WEIGHT_NAME,
            transformer_lora_adapter_metadata=self.transformer.peft_config[ADAPTER].to_dict())
        self.fusion.save_pretrained(os.path.join(path, FUSION_SUBDIR))

    def load_lora(self, path: str) -> None:
        """Load what `save_lora` wrote. Without an adapter, diffusers' ``load_lora_adapter`` adds one from the file
        (its rank and alpha); with one (after `add_lora`), the weights are copied into it, and a file of another
        rank or alpha is refused. Either way the base is frozen and LoRA + fusion train afterwards."""
        path = os.fspath(path)
        weights_path = os.path.join(path, LORA_WEIGHT_NAME)
        fusion_path = os.path.join(path, FUSION_SUBDIR)
        if not os.path.isfile(weights_path) or not os.path.isdir(fusion_path):
            raise FileNotFoundError(f"LoRA directory {path!r} lacks {LORA_WEIGHT_NAME} or {FUSION_SUBDIR}/: pass a "
                                    "folder written by TTVDiT.save_lora")
        fusion = GeometryFusion.from_pretrained(fusion_path)
        if fusion.config != self.fusion.config:
            raise ValueError(f"{fusion_path!r} holds a fusion module {fusion.config}, this model's is "
                             f"{self.fusion.config}")
        if self.has_lora:
            self._load_into_existing_adapter(weights_path)
        else:
            self.transformer.requires_grad_(False)
            self.transformer.load_lora_adapter(path, prefix="transformer", adapter_name=ADAPTER,
                                               weight_name=LORA_WEIGHT_NAME, local_files_only=True)
        self.fusion.load_state_dict(fusion.state_dict())
        self._train_only_lora_and_fusion()

    def _load_into_existing_adapter(self, weights_path: str) -> None:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
        from peft import set_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(weights_path, framework="pt") as f:
            raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        config = self.transformer.peft_config[ADAPTER]
        if raw:
            saved = json.loads(raw)
            saved_r, saved_alpha = saved.get("transformer.r"), saved.get("transformer.lora_alpha")
            if (saved_r, saved_alpha) != (config.r, config.lora_alpha):
                raise ValueError(f"{weights_path!r} has LoRA rank {saved_r}, alpha {saved_alpha}; this model's adapter "
                                 f"has rank {config.r}, alpha {config.lora_alpha}: load it into a model without "
                                 "add_lora instead")
        state = {k.removeprefix("transformer."): v for k, v in load_file(weights_path).items()
                 if k.startswith("transformer.")}
        expected = set(self._adapter_keys())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{weights_path!r} does not match this model's LoRA adapter: missing {missing[:4]} "
                             f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})")
        set_peft_model_state_dict(self.transformer, state, adapter_name=ADAPTER)

    def _adapter_keys(self) -> list[str]:
        from peft.utils import get_peft_model_state_dict

        return list(get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER))
