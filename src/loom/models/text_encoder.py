"""The frozen umT5 text encoder of the Video DiT (TAPESTRY 3.1: "the input text prompt ... converted into embeddings
using pre-trained text ... encoders (e.g., umT5)"; Wan2.1 / Wan2.1-Fun text conditioning).

Design choices, each as diffusers 0.42.1 ``WanPipeline._get_t5_prompt_embeds`` does it (pipelines/wan/pipeline_wan.py):

- The network is transformers' ``UMT5EncoderModel`` and the tokenizer is the checkpoint's own (``AutoTokenizer``:
  umT5-xxl's sentencepiece vocabulary as ``tokenizer.json``), both loaded with ``from_pretrained`` from LOCAL
  folders: a Wan diffusers checkpoint's ``text_encoder/`` and ``tokenizer/``. Nothing is downloaded.
- Prompt cleaning: ``ftfy.fix_text`` when ftfy is installed (diffusers applies it only then, too), HTML unescaped
  twice, whitespace runs collapsed to one space, stripped (`prompt_clean`).
- Tokens: special tokens added (umT5 appends ``</s>``), truncated to ``max_length`` = 512 (the pipeline's
  ``max_sequence_length`` default in ``__call__``), features = ``last_hidden_state`` (after the final layer norm).
- Trimmed: Wan keeps the first ``sum(attention_mask)`` rows and zero-pads them back to 512. `encode` returns only
  those real rows, (L_i, D); padding to 512 with zeros is the consumer's job (the loader or the trainer), so a cache
  does not store ~500 rows of zeros per prompt.
- Padding only to the longest prompt of a batch, not to 512: padded positions are masked out of every attention
  (their scores get the dtype's minimum, exp() = 0), and umT5's relative position bias depends only on the
  distance between real positions, so the real rows equal Wan's up to float rounding, at a fraction of the cost.
- Frozen: ``eval()``, ``requires_grad_(False)``, run under ``torch.inference_mode``; features returned as float32.

Shapes::

    prompts  list of B strings  ->  list of B tensors (L_i, D), L_i <= max_length real tokens (including </s>),
                                    D = d_model (4096 for umT5-xxl)

No Ray, Lightning or torch.distributed here: this is a single-device module.
"""

from __future__ import annotations

import html
import os
import re

import torch
from torch import nn

from loom.models.folder import checkpoint_component, companion_candidates

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_LENGTH = 512  # Wan's max_sequence_length
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def _ftfy():
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning (diffusers ``prompt_clean``): ftfy if installed, HTML unescaped twice, whitespace
    collapsed and stripped."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def cleaning() -> str:
    """What `prompt_clean` does in this environment (recorded with the features: ftfy changes a few prompts)."""
    return ("ftfy.fix_text + " if _ftfy() is not None else "") + "html.unescape x2 + whitespace collapse + strip"


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def resolve_text_dirs(text_encoder: str, tokenizer: str | None = None) -> tuple[str, str]:
    """(encoder folder, tokenizer folder) from what a user passes:

    - ``text_encoder``: the encoder folder itself (``config.json`` + weights) or a Wan checkpoint root holding
      ``text_encoder/``;
    - ``tokenizer``: a tokenizer folder; when unset, the first of: the encoder folder itself (if it holds
      tokenizer files), ``<root>/tokenizer``, the encoder folder's sibling ``../tokenizer``.

    Raises FileNotFoundError naming the path when something is missing."""
    root, enc = checkpoint_component(
        text_encoder, "text_encoder", "text_encoder",
        "umT5 encoder folder (config.json + weights), e.g. <Wan2.1 checkpoint>/text_encoder", "UMT5EncoderModel")
    if tokenizer:
        if not _has_tokenizer(tokenizer):
            raise FileNotFoundError(f"tokenizer directory tokenizer={tokenizer!r} does not exist or holds none of "
                                    f"{list(TOKENIZER_FILES)}: point it at the checkpoint's tokenizer folder")
        return enc, tokenizer
    tried = companion_candidates(enc, root, "tokenizer")
    for cand in tried:
        if _has_tokenizer(cand):
            return enc, cand
    raise FileNotFoundError(f"no tokenizer for text_encoder={text_encoder!r}: looked in {tried} for "
                            f"{list(TOKENIZER_FILES)}; pass tokenizer=DIR (e.g. <Wan2.1 checkpoint>/tokenizer)")


class TextEncoder(nn.Module):
    """A frozen ``UMT5EncoderModel`` and its tokenizer, Wan's way. Build with `load_text_encoder`."""

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dim = int(encoder.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens of each cleaned prompt before truncation (more than ``max_length`` means `encode` truncates)."""
        ids = self.tokenizer([prompt_clean(p) for p in prompts], add_special_tokens=True)["input_ids"]
        return [len(i) for i in ids]

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """B prompts -> B float32 tensors (L_i, D): ``last_hidden_state`` of each prompt's real tokens."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string")
        if not prompts:
            return []
        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="longest", max_length=self.max_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)  # (B, L)
        h = self.encoder(ids, mask).last_hidden_state.float()  # (B, L, D)
        lens = mask.gt(0).sum(dim=1).tolist()
        return [h[i, :n].cpu() for i, n in enumerate(lens)]


def load_text_encoder(path: str, dtype: str = "float32", device: str = "cpu", tokenizer: str | None = None,
                      max_length: int = MAX_LENGTH) -> TextEncoder:
    """Load a frozen umT5 encoder and its tokenizer from local folders (see `resolve_text_dirs` for what ``path``
    and ``tokenizer`` may be). ``dtype``: float32 or bfloat16 (T5 overflows in float16)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    enc_dir, tok_dir = resolve_text_dirs(path, tokenizer)
    # Imported here: only jobs that encode text need transformers.
    from transformers import AutoTokenizer, UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {tok_dir!r} has no pad token; umT5's tokenizer pads with <pad>")
    enc = UMT5EncoderModel.from_pretrained(enc_dir, dtype=DTYPES[dtype])
    return TextEncoder(enc, tok, max_length).to(device)
