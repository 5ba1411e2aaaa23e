"""CLIP image and text embeddings for the CLIP score, through transformers, from a local folder only.

Registry entry ``clip`` of :mod:`loom.eval.weights`: a transformers folder (``save_pretrained`` of a
``CLIPModel``, its tokenizer and its ``preprocessor_config.json``), by default ``openai/clip-vit-large-patch14``
(torchmetrics' default for CLIPScore): the folder in the weights directory, else that repo's snapshot in the local
Hugging Face cache (``hf download`` leaves exactly such a folder). No registry package ships CLIP weights.

Image preprocessing is CLIPImageProcessor's, done in torch on the float input instead of through PIL: images
(N,3,H,W) in [0,1] -> resize so the shortest side is ``size`` (bicubic, antialiased; skipped when it already is) ->
centre crop ``crop x crop`` -> normalise with the folder's ``image_mean``/``image_std``. At 224x224 input this is
exactly the processor's result (torchmetrics parity is tested there); at other sizes it differs from PIL's bicubic
by interpolation rounding only. Text: the folder's tokenizer, padded, truncated to the model's 77 positions.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _embeds(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, 5.x a ModelOutput whose pooler_output is the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPFeatures(nn.Module):
    """Unit-norm CLIP embeddings of images (N,3,H,W) in [0,1] and of texts."""

    def __init__(self, model, tokenizer, size: int = 224, crop: int = 224, mean=_CLIP_MEAN, std=_CLIP_STD):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.size, self.crop = int(size), int(crop)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.max_len = int(model.config.text_config.max_position_embeddings)
        for p in self.parameters():
            p.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N,3,H,W), got shape {tuple(images.shape)}")
        x = images.float()
        h, w = x.shape[-2:]
        if min(h, w) != self.size:
            s = self.size / min(h, w)
            x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bicubic", align_corners=False, antialias=True)
        h, w = x.shape[-2:]
        if h < self.crop or w < self.crop:
            raise ValueError(f"image of {h}x{w} after resizing is smaller than the {self.crop} crop")
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std  # (N,3,crop,crop)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        e = _embeds(self.model.get_image_features(pixel_values=self.preprocess(images).to(self.mean.device)))
        return e / e.norm(dim=-1, keepdim=True)  # (N,D)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        dev = self.mean.device
        e = _embeds(self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                 attention_mask=tok["attention_mask"].to(dev)))  # fmt: skip
        return e / e.norm(dim=-1, keepdim=True)  # (N,D)


def load_folder(path: str | os.PathLike, device: str | torch.device = "cpu") -> CLIPFeatures:
    """A CLIP from a transformers folder, with local files only."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cfg: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (path / name).is_file():
            cfg = json.loads((path / name).read_text())
            cfg = cfg.get("image_processor", cfg)
            break
    size = cfg.get("size", {}).get("shortest_edge", 224) if isinstance(cfg.get("size"), dict) else cfg.get("size", 224)
    crop = cfg.get("crop_size", {}).get("height", 224) if isinstance(cfg.get("crop_size"), dict) else cfg.get(
        "crop_size", 224)  # fmt: skip
    return CLIPFeatures(model, tok, size, crop, cfg.get("image_mean", _CLIP_MEAN), cfg.get("image_std", _CLIP_STD)).to(
        device
    )


def load(root: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> CLIPFeatures:
    """The CLIP of registry entry ``clip``: the weights directory's folder, else the Hugging Face cache's snapshot."""
    from loom.eval.weights import resolve

    (path,) = resolve("clip", root)
    return load_folder(path, device)


def save_tiny_random(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random CLIP folder (2-layer towers, width 32, 224x224 input with 32-px patches, a byte-level
    tokenizer without merges) with the layout of a real one, for tests of the folder-loading path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(path)
    return path


def tiny_random(seed: int = 0) -> CLIPFeatures:
    """A tiny random CLIP, loaded through the same folder path as the real one."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_folder(save_tiny_random(Path(tmp) / "clip", seed))
