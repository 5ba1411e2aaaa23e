"""The frozen CLIP vision encoder of the Video DiT's first-frame conditioning (TAPESTRY 3.1: "the initial frame
[is] converted into embeddings using pre-trained ... vision encoders (e.g., ... CLIP)"; Wan2.1 I2V / Wan2.1-Fun).

Design choices, each as diffusers 0.42.1 ``WanImageToVideoPipeline.encode_image`` does it
(pipelines/wan/pipeline_wan_i2v.py):

- The network is transformers' ``CLIPVisionModel`` (or ``CLIPVisionModelWithProjection`` when the folder's config
  names it; the projection is not used), loaded with ``from_pretrained`` from a LOCAL folder: a Wan I2V diffusers
  checkpoint's ``image_encoder/`` (open-clip ViT-H/14). Nothing is downloaded.
- Features: ``hidden_states[-2]``, the output of the penultimate transformer layer, every token (class token + patch
  tokens: 257 x 1280 for ViT-H/14 at 224 px), without the final layer norm.
- Preprocessing, one of (recorded by `ImageEncoder.preprocessing`):
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

import numpy as np
import torch
from torch import nn

from loom.models.folder import checkpoint_component, companion_candidates

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as transformers' OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILE = "preprocessor_config.json"


def resolve_image_dirs(image_encoder: str, image_processor: str | None = None) -> tuple[str, str | None]:
    """(encoder folder, folder holding preprocessor_config.json or None) from what a user passes:

    - ``image_encoder``: the CLIP vision folder itself (``config.json`` + weights) or a Wan I2V checkpoint root
      holding ``image_encoder/``;
    - ``image_processor``: a folder with ``preprocessor_config.json``; when unset, the first of: the encoder folder,
      ``<root>/image_processor``, the encoder folder's sibling ``../image_processor``; None if none has one (then
      the torch preprocessing with CLIP's standard values is used).

    Raises FileNotFoundError naming the path when something is missing."""
    root, enc = checkpoint_component(
        image_encoder, "image_encoder", "image_encoder",
        "CLIP vision folder (config.json + weights), e.g. <Wan2.1 I2V checkpoint>/image_encoder", "CLIPVisionModel")
    if image_processor:
        if not os.path.isfile(os.path.join(image_processor, PROCESSOR_FILE)):
            raise FileNotFoundError(f"image processor directory image_processor={image_processor!r} does not exist "
                                    f"or has no {PROCESSOR_FILE}")
        return enc, image_processor
    cands = companion_candidates(enc, root, "image_processor")
    return enc, next((c for c in cands if os.path.isfile(os.path.join(c, PROCESSOR_FILE))), None)


def _pil_processor_class():
    import transformers

    # transformers >= 5 splits the PIL implementation into CLIPImageProcessorPil (CLIPImageProcessor needs
    # torchvision there); in 4.x CLIPImageProcessor itself is the PIL one.
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ImageEncoder(nn.Module):
    """A frozen CLIP vision tower giving penultimate-layer tokens, Wan's way. Build with `load_image_encoder`."""

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
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
        return f"torch: bicubic shortest edge {self.image_size}, centre crop, CLIP mean/std"

    def preprocess(self, images) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 normalised pixels."""
        a = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"images must be (B, H, W, 3) uint8 RGB, got {a.shape} {a.dtype}")
        if self.processor is not None:
            out = self.processor(images=list(a), return_tensors="pt", input_data_format="channels_last")
            return out["pixel_values"].float()
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        s, (h, w) = self.image_size, x.shape[-2:]
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
    """Load a frozen CLIP vision encoder (and its preprocessor config, if any) from local folders (see
    `resolve_image_dirs` for what ``path`` and ``image_processor`` may be)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    enc_dir, proc_dir = resolve_image_dirs(path, image_processor)
    # Imported here: only jobs that encode images need transformers.
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with open(os.path.join(enc_dir, "config.json")) as f:
        arch = json.load(f).get("architectures") or []
    cls = (transformers.CLIPVisionModelWithProjection if "CLIPVisionModelWithProjection" in arch
           else transformers.CLIPVisionModel)
    model = cls.from_pretrained(enc_dir, dtype=DTYPES[dtype])
    processor = _pil_processor_class().from_pretrained(proc_dir) if proc_dir else None
    return ImageEncoder(model, processor).to(device)
