"""The frozen umT5 text encoder of the Video DiT (TAPESTRY 3.1: "the input text prompt ... converted into embeddings
using pre-trained text ... encoders (e.g., umT5)"; Wan2.1 / Wan2.1-Fun text conditioning).

Two ways in, one network (transformers' ``UMT5EncoderModel``) and one tokenizer class (``AutoTokenizer``), both
LOCAL (``local_files_only``): nothing is downloaded.

- Wan2.1 / Wan2.1-Fun as released (VideoX-Fun's ``config/wan2.1/wan_civitai.yaml``): ``models_t5_umt5-xxl-enc-bf16.pth``
  (Wan's own layout, ``wan/modules/t5.py``) and the tokenizer folder ``google/umt5-xxl/`` beside it. The file is read
  with ``torch.load(weights_only=True)`` (tensors only, nothing unpickled), its names mapped onto transformers':

      token_embedding                      -> shared (tied to encoder.embed_tokens)
      blocks.N.norm1 / attn.{q,k,v,o}      -> encoder.block.N.layer.0.layer_norm / SelfAttention.{q,k,v,o}
      blocks.N.pos_embedding.embedding     -> encoder.block.N.layer.0.SelfAttention.relative_attention_bias
                                              (umT5: a bucket table per layer; Wan's shared_pos=False)
      blocks.N.norm2 / ffn.{gate.0,fc1,fc2}-> encoder.block.N.layer.1.layer_norm / DenseReluDense.{wi_0,wi_1,wo}
      norm                                 -> encoder.final_layer_norm

  The config comes from the weights' shapes (umT5-xxl: vocab 256384, d_model 4096, 64 heads x 64, d_ff 10240, 24
  layers, 32 buckets), with Wan's constants for what shapes do not hold: gated tanh-GELU (``gelu_new``), RMS norm eps
  1e-6, bucket max distance 128, no attention scaling (T5's). Every key is used and none is missing, or the load is
  refused naming the keys; weights are cast from bf16 to the requested dtype.
- A Wan diffusers checkpoint: its ``text_encoder/`` and ``tokenizer/`` folders, read with ``from_pretrained``.

What is done with them, as Wan does (Wan2.1 ``T5EncoderModel.__call__``; diffusers 0.42.1
``WanPipeline._get_t5_prompt_embeds``; VideoX-Fun ``WanFunControlPipeline._get_t5_prompt_embeds`` and
``scripts/wan2.1_fun/train_control.py``):

- Prompt cleaning: ``ftfy.fix_text`` when ftfy is installed (diffusers applies it only then, too), HTML unescaped
  twice, whitespace runs collapsed to one space, stripped (`prompt_clean`): Wan2.1's ``clean='whitespace'`` and
  diffusers' ``prompt_clean``. VideoX-Fun's Fun pipelines and training scripts pass the raw prompt; the two agree on
  every prompt that cleaning leaves unchanged (no HTML entities, no runs or ends of whitespace, no mojibake).
- Tokens: special tokens added (umT5 appends ``</s>``), truncated to ``max_length`` = 512 (Wan's ``text_len``),
  features = ``last_hidden_state`` (after the final layer norm).
- Trimmed: Wan keeps the first ``sum(attention_mask)`` rows and zero-pads them back to 512 (VideoX-Fun's transformer
  pads to its ``text_len``). `encode` returns only those real rows, (L_i, D); padding to 512 with zeros is the
  consumer's job (the loader or the trainer), so a cache does not store ~500 rows of zeros per prompt.
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
import json
import os
import re

import torch
from torch import nn

from loom.models.folder import checkpoint_component, companion_candidates

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_LENGTH = 512  # Wan's max_sequence_length
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
RELEASED_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # Wan2.1 / Wan2.1-Fun release: the encoder ...
RELEASED_TOKENIZER = os.path.join("google", "umt5-xxl")  # ... and its tokenizer, both in the checkpoint root
# Wan's constants that the weights do not hold (wan/modules/t5.py: T5RelativeEmbedding max_dist, T5LayerNorm eps,
# the tanh GELU of T5FeedForward's gate).
WAN_T5 = {"relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}
# Wan's names inside blocks.N -> transformers' inside encoder.block.N
WAN_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
WAN_T5_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


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


def released_file(path: str, name: str, field: str) -> str | None:
    """The released ``.pth`` that ``path`` names (the file itself, or a checkpoint root holding ``name``), or None
    when ``path`` is a folder without it (then it may be a transformers folder). Refuses a file that is not a .pth."""
    if os.path.isfile(path):
        if not path.endswith(".pth"):
            raise ValueError(f"{field}={path!r} is a file but not a .pth: pass the released {name}, the checkpoint "
                             "folder holding it, or a transformers model folder")
        return path
    cand = os.path.join(path, name) if path else ""
    return cand if os.path.isfile(cand) else None


def not_a_diffusers_root(path: str, field: str, name: str) -> None:
    """A released Wan root without ``name`` still has a config.json (the DiT's): say so instead of letting
    transformers fail on a config of another model."""
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            raw = json.load(f)
        if isinstance(raw, dict) and "_class_name" in raw:
            raise FileNotFoundError(f"{field}={path!r} holds a diffusers {raw['_class_name']} config.json and no "
                                    f"{name}: pass the released checkpoint folder that has {name}, the file itself, "
                                    "or a transformers model folder")


def resolve_text_dirs(text_encoder: str, tokenizer: str | None = None) -> tuple[str, str]:
    """(encoder, tokenizer folder) from what a user passes:

    - ``text_encoder``, one of: a released Wan2.1 / Wan2.1-Fun checkpoint root holding ``RELEASED_FILE``
      (``models_t5_umt5-xxl-enc-bf16.pth``; the encoder returned is then that file), the .pth file itself, a
      transformers encoder folder (``config.json`` + weights), or a Wan diffusers checkpoint root holding
      ``text_encoder/``;
    - ``tokenizer``: a tokenizer folder; when unset, for a .pth: the file's folder (if it holds tokenizer files),
      then ``<its folder>/google/umt5-xxl``; for a transformers folder: the encoder folder itself, ``<root>/tokenizer``,
      the encoder folder's sibling ``../tokenizer``.

    Raises FileNotFoundError naming the path when something is missing."""
    pth = released_file(text_encoder, RELEASED_FILE, "text_encoder")
    if pth is None:
        if text_encoder and os.path.isdir(text_encoder):
            not_a_diffusers_root(text_encoder, "text_encoder", RELEASED_FILE)
        root, enc = checkpoint_component(
            text_encoder, "text_encoder", "text_encoder",
            f"umT5 encoder: the released {RELEASED_FILE} or its checkpoint folder, or a transformers "
            "UMT5EncoderModel folder (config.json + weights) such as <Wan2.1 diffusers checkpoint>/text_encoder",
            "UMT5EncoderModel")
        tried = companion_candidates(enc, root, "tokenizer")
        hint = "<Wan2.1 diffusers checkpoint>/tokenizer"
    else:
        enc, here = pth, os.path.dirname(os.path.abspath(pth))
        tried = [here, os.path.join(here, RELEASED_TOKENIZER)]
        hint = f"the release's {RELEASED_TOKENIZER} folder"
    if tokenizer:
        if not _has_tokenizer(tokenizer):
            raise FileNotFoundError(f"tokenizer directory tokenizer={tokenizer!r} does not exist or holds none of "
                                    f"{list(TOKENIZER_FILES)}: point it at the checkpoint's tokenizer folder ({hint})")
        return enc, tokenizer
    for cand in tried:
        if _has_tokenizer(cand):
            return enc, cand
    raise FileNotFoundError(f"no tokenizer for text_encoder={text_encoder!r}: looked in {tried} for "
                            f"{list(TOKENIZER_FILES)}; pass tokenizer=DIR ({hint})")


def load_pth(path: str, what: str) -> dict[str, torch.Tensor]:
    """A released .pth state dict, read as tensors only (``weights_only``: no pickled code runs), memory-mapped when
    the file allows it."""
    import pickle

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # a pre-zip-format file
    except pickle.UnpicklingError as e:
        raise ValueError(f"{what} file {path!r} holds more than tensors, and Loom reads .pth files with "
                         f"weights_only=True (nothing unpickled): pass the released file ({e})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in sd.items()):
        raise ValueError(f"{what} file {path!r} is not a flat state dict (name -> tensor): pass the released file")
    return sd


def _need(sd: dict, key: str, path: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{path!r} is not a {what} in Wan's layout: it has no {key!r} (its keys start "
                         f"{sorted(sd)[:4]})")
    return sd[key]


def umt5_from_wan(sd: dict[str, torch.Tensor], path: str = "<state dict>"):
    """(transformers ``UMT5Config``, state dict in transformers' names) of a Wan-layout umT5 encoder state dict.
    Refuses a key it does not map, a missing key and a shape that disagrees with the config, naming them."""
    from transformers import UMT5Config, UMT5EncoderModel

    what = "umT5 encoder"
    if "pos_embedding.embedding.weight" in sd:
        raise ValueError(f"{path!r} has one position bias shared by all layers (Wan's shared_pos=True, a T5): "
                         "umT5 has one per layer (blocks.N.pos_embedding); pass the released " + RELEASED_FILE)
    vocab, d_model = _need(sd, "token_embedding.weight", path, what).shape
    buckets, heads = _need(sd, "blocks.0.pos_embedding.embedding.weight", path, what).shape
    dim_attn = _need(sd, "blocks.0.attn.q.weight", path, what).shape[0]
    d_ff = _need(sd, "blocks.0.ffn.fc1.weight", path, what).shape[0]
    if dim_attn % heads:
        raise ValueError(f"{path!r}: attention width {dim_attn} is not a multiple of its {heads} heads")
    hf, back, unknown = {}, {}, []
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k in WAN_T5_TOP:
            name = WAN_T5_TOP[k]
        elif m and m.group(2) in WAN_T5_BLOCK:
            name = f"encoder.block.{m.group(1)}.{WAN_T5_BLOCK[m.group(2)]}"
        else:
            unknown.append(k)
            continue
        hf[name], back[name] = v, k
    if unknown:
        raise ValueError(f"{path!r} has {len(unknown)} key(s) that a Wan umT5 encoder does not, e.g. "
                         f"{sorted(unknown)[:5]}: is it the released {RELEASED_FILE}?")
    layers = block_count(sd, "blocks.", path)
    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=dim_attn // heads, d_ff=d_ff, num_layers=layers,
                     num_heads=heads, relative_attention_num_buckets=buckets, dropout_rate=0.0, **WAN_T5)
    with torch.device("meta"):  # the expected names and shapes, without allocating 5.7B parameters
        want = {k: tuple(v.shape) for k, v in UMT5EncoderModel(cfg).state_dict().items()
                if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    check_keys(hf, want, back, path, what, lambda k: k.replace("encoder.block.", "blocks.").split(".layer.")[0])
    return cfg, hf


def block_count(sd: dict, prefix: str, path: str) -> int:
    """How many blocks ``<prefix>N.`` a state dict has, refusing numbers that are not 0..N-1."""
    found = sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})
    if found != list(range(len(found))):
        raise ValueError(f"{path!r}: its blocks {prefix}N are numbered {found}, not 0..N-1: the file is incomplete "
                         "or of another model")
    return len(found)


def check_keys(got: dict, want: dict, back: dict, path: str, what: str, hint) -> None:
    """Refuse a state dict whose (mapped) keys or shapes differ from the model's, in the checkpoint's own names."""
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"{path!r} lacks {len(missing)} weight(s) of its {what} (near {hint(missing[0])!r}, "
                         f"transformers name {missing[0]!r}): the file is incomplete or of another model")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{path!r} has weights its {what} does not, e.g. {[back[k] for k in extra[:5]]}: the "
                         "file is of another model")
    bad = [(back[k], tuple(got[k].shape), want[k]) for k in sorted(want) if tuple(got[k].shape) != want[k]]
    if bad:
        raise ValueError(f"{path!r}: {len(bad)} weight(s) disagree with the {what} that its first layer's shapes "
                         f"describe, e.g. (name, shape, expected) {bad[:3]}")


def load_umt5_pth(path: str, dtype: torch.dtype = torch.float32):
    """Wan's released umT5 encoder file -> a transformers ``UMT5EncoderModel`` in ``dtype`` (see the module
    docstring for the mapping)."""
    from transformers import UMT5EncoderModel

    cfg, hf = umt5_from_wan(load_pth(path, "umT5 encoder"), path)
    model, info = UMT5EncoderModel.from_pretrained(None, config=cfg, state_dict=hf, dtype=dtype,
                                                   output_loading_info=True)
    left = {k: v for k, v in info.items() if v}
    if left:  # umt5_from_wan checked these already; a transformers release that names weights otherwise lands here
        raise RuntimeError(f"{path!r}: transformers did not take every weight: {left}")
    return model


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
    """Load a frozen umT5 encoder and its tokenizer from local files (see `resolve_text_dirs` for what ``path``
    and ``tokenizer`` may be). ``dtype``: float32 or bfloat16 (T5 overflows in float16)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    enc_path, tok_dir = resolve_text_dirs(path, tokenizer)
    # Imported here: only jobs that encode text need transformers.
    from transformers import AutoTokenizer, UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {tok_dir!r} has no pad token; umT5's tokenizer pads with <pad>")
    if os.path.isfile(enc_path):
        enc = load_umt5_pth(enc_path, DTYPES[dtype])
    else:
        enc = UMT5EncoderModel.from_pretrained(enc_path, dtype=DTYPES[dtype], local_files_only=True)
    if len(tok) > enc.config.vocab_size:  # ids past the embedding table would fail inside the first forward
        raise ValueError(f"tokenizer in {tok_dir!r} has {len(tok)} tokens but the encoder {enc_path!r} embeds "
                         f"{enc.config.vocab_size}: they belong to different models")
    return TextEncoder(enc, tok, max_length).to(device)
