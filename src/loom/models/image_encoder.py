"""The frozen CLIP vision encoder of the Video DiT's first-frame conditioning (TAPESTRY 3.1: "the initial frame
[is] converted into embeddings using pre-trained ... vision encoders (e.g., ... CLIP)"; Wan2.1 I2V / Wan2.1-Fun).

Two ways in, one network (transformers' ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``; the projection is
never used), LOCAL only: nothing is downloaded.

- Wan2.1 / Wan2.1-Fun as released: ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, the whole open-clip
  XLM-RoBERTa ViT-H/14 in Wan's layout (``wan/modules/clip.py``; VideoX-Fun ``videox_fun/models/wan_image_encoder.py``).
  It is read with ``torch.load(weights_only=True)`` (tensors only, nothing unpickled). The visual tower is mapped onto
  ``CLIPVisionModelWithProjection``; the text tower (``textual.*``, ``log_scale``), which Wan never runs, is skipped;
  any other key, a missing key or a shape off the config is refused, naming it:

      visual.patch_embedding (no bias)      -> vision_model.embeddings.patch_embedding
      visual.cls_embedding (1, 1, D)        -> vision_model.embeddings.class_embedding (D,)
      visual.pos_embedding (1, L, D)        -> vision_model.embeddings.position_embedding (L, D)
      visual.pre_norm / post_norm           -> vision_model.pre_layrnorm / post_layernorm
      visual.transformer.N.norm1 / norm2    -> vision_model.encoder.layers.N.layer_norm1 / layer_norm2
      visual.transformer.N.attn.to_qkv      -> ....self_attn.{q,k,v}_proj (rows split in three, q first)
      visual.transformer.N.attn.proj        -> ....self_attn.out_proj
      visual.transformer.N.mlp.0 / mlp.2    -> ....mlp.fc1 / fc2
      visual.head (D, E)                    -> visual_projection (E, D)

  The config comes from the shapes (ViT-H/14: width 1280, 32 layers, mlp 5120, patch 14, 224 px, 257 tokens) and
  Wan's constants: 80 features per head (16 heads at 1280), exact GELU, LayerNorm eps 1e-5.
  Preprocessing is VideoX-Fun's ``CLIPModel.forward`` (Wan2.1's ``CLIPModel.visual`` is the same), fixed in code:
  uint8 -> [0, 1] -> [-1, 1], ``F.interpolate`` bicubic (no antialias, align_corners False) of the whole frame to
  224 x 224 (no crop: the aspect ratio is not kept), back to [0, 1], OpenAI CLIP mean/std. Features: the output of
  the first 31 of 32 blocks (``use_31_block``), which is transformers' ``hidden_states[-2]``. VideoX-Fun resamples in
  the weights' dtype; Loom resamples in float32 and then casts.
- A Wan I2V diffusers checkpoint's ``image_encoder/`` (open-clip ViT-H/14 already in transformers' layout), as diffusers
  0.42.1 ``WanImageToVideoPipeline.encode_image`` runs it (pipelines/wan/pipeline_wan_i2v.py). Features:
  ``hidden_states[-2]``, every token (class token + patch tokens: 257 x 1280 for ViT-H/14 at 224 px), without the
  final layer norm. Preprocessing, one of (recorded by `ImageEncoder.preprocessing`):
  * ``preprocessor_config.json`` found (in the encoder folder, the checkpoint's ``image_processor/``, or the folder
    passed as ``image_processor``): transformers' CLIP image processor built from it, PIL backend (the class Wan's
    pipeline names, ``CLIPImageProcessor``; its PIL implementation, so results do not depend on torchvision):
    shortest edge resized to ``size`` (bicubic), centre crop, ``/ 255``, CLIP mean/std.
  * absent: the same steps in torch with CLIP's standard values and the model's own ``image_size`` (224 for
    ViT-H/14): bicubic antialiased resize of the shortest edge, rounded to uint8 like PIL, centre crop, ``/ 255``,
    OpenAI CLIP mean/std. It matches the PIL path exactly when no resize is needed and to within resampling
    differences otherwise.
- Frozen: ``eval()``, ``requires_grad_(False)``, run under ``torch.inference_mode``; features returned as float32.

Shapes::

    images (B, H, W, 3) uint8 RGB  ->  pixels (B, 3, S, S) normalised  ->  features (B, L, D) float32,
                                       S = image_size, L = (S / patch)^2 + 1, D = hidden_size

No Ray, Lightning or torch.distributed here: this is a single-device module.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from torch import nn

from loom.models.folder import checkpoint_component, companion_candidates
# The released-file helpers the two Wan encoders share (finding, reading and checking a .pth).
from loom.models.text_encoder import block_count, check_keys, load_pth, not_a_diffusers_root, released_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as transformers' OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILE = "preprocessor_config.json"
RELEASED_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"  # Wan2.1 / Wan2.1-Fun release
# Wan's constants that the weights do not hold (clip_xlm_roberta_vit_h_14: 1280 wide / 16 heads, activation 'gelu'
# = nn.GELU(), LayerNorm eps 1e-5).
WAN_CLIP_HEAD_DIM = 80
WAN_CLIP = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
SKIPPED = ("textual.", "log_scale")  # the XLM-RoBERTa text tower: Wan encodes images only
VISION, LAYERS = "vision_model.", "vision_model.encoder.layers."
WAN_CLIP_TOP = {
    "visual.patch_embedding.weight": VISION + "embeddings.patch_embedding.weight",
    "visual.cls_embedding": VISION + "embeddings.class_embedding",
    "visual.pos_embedding": VISION + "embeddings.position_embedding.weight",
    "visual.pre_norm.weight": VISION + "pre_layrnorm.weight", "visual.pre_norm.bias": VISION + "pre_layrnorm.bias",
    "visual.post_norm.weight": VISION + "post_layernorm.weight", "visual.post_norm.bias": VISION + "post_layernorm.bias",
    "visual.head": "visual_projection.weight",
}
WAN_CLIP_BLOCK = {  # inside visual.transformer.N -> inside vision_model.encoder.layers.N (to_qkv is split apart)
    "norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}


def resolve_image_dirs(image_encoder: str, image_processor: str | None = None) -> tuple[str, str | None]:
    """(encoder, folder holding preprocessor_config.json or None) from what a user passes:

    - ``image_encoder``, one of: a released Wan2.1 / Wan2.1-Fun checkpoint root holding ``RELEASED_FILE``
      (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``; the encoder returned is then that file), the
      .pth file itself, a transformers CLIP vision folder (``config.json`` + weights), or a Wan I2V diffusers
      checkpoint root holding ``image_encoder/``;
    - ``image_processor`` (transformers folders only: the .pth route preprocesses as VideoX-Fun does, in code): a
      folder with ``preprocessor_config.json``; when unset, the first of: the encoder folder,
      ``<root>/image_processor``, the encoder folder's sibling ``../image_processor``; None if none has one (then
      the torch preprocessing with CLIP's standard values is used).

    Raises FileNotFoundError naming the path when something is missing."""
    pth = released_file(image_encoder, RELEASED_FILE, "image_encoder")
    if pth is not None:
        if image_processor:
            raise ValueError(f"image_processor={image_processor!r} is set, but image_encoder={image_encoder!r} is "
                             "Wan's released .pth, which is preprocessed as VideoX-Fun does (fixed in code): leave "
                             "image_processor unset")
        return pth, None
    if image_encoder and os.path.isdir(image_encoder):
        not_a_diffusers_root(image_encoder, "image_encoder", RELEASED_FILE)
    root, enc = checkpoint_component(
        image_encoder, "image_encoder", "image_encoder",
        f"CLIP vision encoder: the released {RELEASED_FILE} or its checkpoint folder, or a transformers "
        "CLIPVisionModel folder (config.json + weights) such as <Wan2.1 I2V diffusers checkpoint>/image_encoder",
        "CLIPVisionModel")
    if image_processor:
        if not os.path.isfile(os.path.join(image_processor, PROCESSOR_FILE)):
            raise FileNotFoundError(f"image processor directory image_processor={image_processor!r} does not exist "
                                    f"or has no {PROCESSOR_FILE}")
        return enc, image_processor
    cands = companion_candidates(enc, root, "image_processor")
    return enc, next((c for c in cands if os.path.isfile(os.path.join(c, PROCESSOR_FILE))), None)


def clip_vision_from_wan(sd: dict[str, torch.Tensor], path: str = "<state dict>"):
    """(transformers ``CLIPVisionConfig``, state dict in ``CLIPVisionModelWithProjection``'s names) of Wan's open-clip
    state dict (visual tower; the text tower is skipped). Refuses an unknown key, a missing key and a shape off the
    config, naming them."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    what = "open-clip vision tower"

    def need(key):
        if key not in sd:
            raise ValueError(f"{path!r} is not an open-clip CLIP in Wan's layout: it has no {key!r} (its keys "
                             f"start {sorted(sd)[:4]})")
        return sd[key]

    dim, _, patch, _ = need("visual.patch_embedding.weight").shape  # (D, 3, P, P)
    tokens = need("visual.pos_embedding").shape[1]  # (1, 1 + (S / P)^2, D)
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid + 1 != tokens:
        raise ValueError(f"{path!r}: {tokens} position embeddings are not a class token plus a square grid")
    if dim % WAN_CLIP_HEAD_DIM:
        raise ValueError(f"{path!r}: width {dim} is not a multiple of open-clip ViT-H's {WAN_CLIP_HEAD_DIM} features "
                         "per head: not the ViT-H/14 that Wan uses")
    hf, back, unknown = {}, {}, []
    for k, v in sd.items():
        if k.startswith(SKIPPED):
            continue
        m = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)", k)
        if k in WAN_CLIP_TOP:
            names, parts = [WAN_CLIP_TOP[k]], [v]
            if k == "visual.cls_embedding":
                parts = [v.reshape(-1)]  # (1, 1, D) -> (D,)
            elif k == "visual.pos_embedding":
                parts = [v[0]]  # (1, L, D) -> (L, D)
            elif k == "visual.head":
                parts = [v.t()]  # x @ head  ==  Linear with weight head^T
        elif m and m.group(2) == "attn.to_qkv":
            # open-clip's fused projection: rows [q; k; v], each head-major as transformers' q/k/v_proj.
            names = [f"{LAYERS}{m.group(1)}.self_attn.{n}_proj.{m.group(3)}" for n in "qkv"]
            parts = list(v.chunk(3, dim=0))
        elif m and m.group(2) in WAN_CLIP_BLOCK:
            names, parts = [f"{LAYERS}{m.group(1)}.{WAN_CLIP_BLOCK[m.group(2)]}.{m.group(3)}"], [v]
        else:
            unknown.append(k)
            continue
        for n, t in zip(names, parts, strict=True):
            hf[n], back[n] = t.contiguous(), k
    if unknown:
        raise ValueError(f"{path!r} has {len(unknown)} key(s) that Wan's open-clip ViT-H/14 does not, e.g. "
                         f"{sorted(unknown)[:5]}: is it the released {RELEASED_FILE}?")
    cfg = CLIPVisionConfig(
        hidden_size=dim, intermediate_size=need("visual.transformer.0.mlp.0.weight").shape[0],
        num_hidden_layers=block_count(sd, "visual.transformer.", path),
        num_attention_heads=dim // WAN_CLIP_HEAD_DIM, image_size=grid * patch, patch_size=patch,
        projection_dim=need("visual.head").shape[1], **WAN_CLIP)
    with torch.device("meta"):  # the expected names and shapes, without allocating the tower
        want = {k: tuple(v.shape) for k, v in CLIPVisionModelWithProjection(cfg).state_dict().items()}
    check_keys(hf, want, back, path, what,
               lambda k: k.replace(LAYERS, "visual.transformer.").split(".self_attn")[0].split(".mlp")[0])
    return cfg, hf


def load_clip_vision_pth(path: str, dtype: torch.dtype = torch.float32):
    """Wan's released open-clip file -> a transformers ``CLIPVisionModelWithProjection`` in ``dtype`` (see the module
    docstring for the mapping)."""
    from transformers import CLIPVisionModelWithProjection

    cfg, hf = clip_vision_from_wan(load_pth(path, "open-clip CLIP"), path)
    model, info = CLIPVisionModelWithProjection.from_pretrained(None, config=cfg, state_dict=hf, dtype=dtype,
                                                                output_loading_info=True)
    left = {k: v for k, v in info.items() if v}
    if left:  # clip_vision_from_wan checked these already; a transformers release that names weights otherwise
        raise RuntimeError(f"{path!r}: transformers did not take every weight: {left}")
    return model


def _pil_processor_class():
    import transformers

    # transformers >= 5 splits the PIL implementation into CLIPImageProcessorPil (CLIPImageProcessor needs
    # torchvision there); in 4.x CLIPImageProcessor itself is the PIL one.
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ImageEncoder(nn.Module):
    """A frozen CLIP vision tower giving penultimate-layer tokens, Wan's way. Build with `load_image_encoder`.

    ``resize`` (without a ``processor`` only): "shortest_edge" (diffusers' Wan I2V: shortest edge to S, centre crop)
    or "squash" (VideoX-Fun / Wan2.1: the whole frame to S x S, aspect not kept)."""

    RESIZES = ("shortest_edge", "squash")

    def __init__(self, model: nn.Module, processor=None, resize: str = "shortest_edge"):
        super().__init__()
        if resize not in self.RESIZES:
            raise ValueError(f"resize={resize!r} is not one of {self.RESIZES}")
        if processor is not None and resize != "shortest_edge":
            raise ValueError(f"resize={resize!r} is for the torch preprocessing; a processor resizes by its config")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.resize = resize
        cfg = model.config
        self.image_size = int(cfg.image_size)
        self.dim = int(cfg.hidden_size)
        self.tokens = (self.image_size // int(cfg.patch_size)) ** 2 + 1
        if processor is not None:
            crop = processor.crop_size if processor.do_center_crop else processor.size
            hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop.height, crop.width)
            if tuple(hw) != (self.image_size, self.image_size):
                raise ValueError(f"image processor gives {hw[1]}x{hw[0]} images but the CLIP model takes "
                                 f"{self.image_size}x{self.image_size}: the processor belongs to another model")
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def preprocessing(self) -> str:
        if self.processor is not None:
            return f"{type(self.processor).__name__} (preprocessor_config.json)"
        if self.resize == "squash":
            return (f"torch, as VideoX-Fun CLIPModel.forward: bicubic (no antialias) of the whole frame to "
                    f"{self.image_size}x{self.image_size}, no crop, CLIP mean/std")
        return f"torch: bicubic shortest edge {self.image_size}, centre crop, CLIP mean/std"

    def preprocess(self, images) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 normalised pixels."""
        a = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"images must be (B, H, W, 3) uint8 RGB, got {a.shape} {a.dtype}")
        if self.processor is not None:
            out = self.processor(images=list(a), return_tensors="pt", input_data_format="channels_last")
            return out["pixel_values"].float()
        # on the buffers' device: an encoder moved to a GPU preprocesses there (and the mean/std are there)
        x = torch.from_numpy(np.ascontiguousarray(a)).to(self.mean.device).permute(0, 3, 1, 2).float()  # (B,3,H,W)
        s, (h, w) = self.image_size, x.shape[-2:]
        if self.resize == "squash":
            # VideoX-Fun's steps in its order (to_tensor, to [-1, 1], resample, back to [0, 1]), so the float
            # rounding is the same too; bicubic overshoot past [0, 1] is kept, as there.
            x = (x / 255.0 - 0.5) / 0.5
            x = nn.functional.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)  # (B, 3, S, S)
            return (x * 0.5 + 0.5 - self.mean) / self.std
        if min(h, w) != s:
            # transformers' rule for the long edge: int(S * long / short).
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            # PIL resamples uint8 and rounds back to uint8; doing the same keeps the two paths within a level.
            x = nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)
        h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top: top + s, left: left + s] / 255.0  # (B, 3, S, S)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, L, D) float32 penultimate-layer hidden states."""
        px = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        return self.model(pixel_values=px, output_hidden_states=True).hidden_states[-2].float()  # (B, L, D)


def load_image_encoder(path: str, dtype: str = "float32", device: str = "cpu",
                       image_processor: str | None = None) -> ImageEncoder:
    """Load a frozen CLIP vision encoder (and its preprocessor config, if any) from local files (see
    `resolve_image_dirs` for what ``path`` and ``image_processor`` may be)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    enc_path, proc_dir = resolve_image_dirs(path, image_processor)
    # Imported here: only jobs that encode images need transformers.
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if os.path.isfile(enc_path):
        return ImageEncoder(load_clip_vision_pth(enc_path, DTYPES[dtype]), resize="squash").to(device)
    with open(os.path.join(enc_path, "config.json")) as f:
        arch = json.load(f).get("architectures") or []
    cls = (transformers.CLIPVisionModelWithProjection if "CLIPVisionModelWithProjection" in arch
           else transformers.CLIPVisionModel)
    model = cls.from_pretrained(enc_path, dtype=DTYPES[dtype], local_files_only=True)
    processor = _pil_processor_class().from_pretrained(proc_dir, local_files_only=True) if proc_dir else None
    return ImageEncoder(model, processor).to(device)
