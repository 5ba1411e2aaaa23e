"""Latent samples: what ``loom cache latents`` writes from a turntable corpus, so training reads latents, not pixels.

A latent sample has the SAME key as the turntable sample it was encoded from, and decodes to (C = the VAE's
z_dim, 16 for Wan2.1; T' = 1 + (T_used - 1) / 4 latent frames; H' = H / 8, W' = W / 8):

=====================  ==============  =======  ============================================================
key                    shape           dtype    meaning
=====================  ==============  =======  ============================================================
``rgb_latent``         (C,T',H',W')    float32  VAE posterior mean of the RGB video, Wan-normalised (below)
``normal_latent``      (C,T',H',W')    float32  same, of the normal video (normals are already in [-1, 1])
``position_latent``    (C,T',H',W')    float32  same, of the position video divided by ``position_radius``
``mask_latent``        (T',H',W')      float32  object coverage fraction in [0, 1] per latent cell (not encoded:
                                                 average of the mask over the cell's frames and 8x8 pixels)
``known_latent``       (C,T',H',W')    float32  same, of one partial texture's known video (``partial``, below)
``inpaint_latent``     (C,T',H',W')    float32  same, of its inpainting-mask video (+1 generate, -1 given)
``text_embed``         (L,D)           float32  umT5 ``last_hidden_state`` of the sample's text, its L real tokens
                                                 only (L <= 512, counting ``</s>``; D = 4096 for umT5-xxl)
``image_embed``        (L_img,D_img)   float32  CLIP vision ``hidden_states[-2]`` of the source rgb frame 0, every
                                                 token (257 x 1280 for Wan's ViT-H/14 at 224 px)
``K``                  (T,3,3)         float32  the source sample's intrinsics, all T source frames, unchanged
``c2w``                (T,4,4)         float32  the source sample's OpenCV camera-to-world, unchanged
``meta``               dict                     the source meta plus ``meta["latents"]`` (below)
=====================  ==============  =======  ============================================================

Only the passes the job was configured with are present (``meta["latents"]["passes"]``); ``text_embed`` and
``image_embed`` only when the job had a text or image encoder (``meta["latents"]["text_encoder"]``,
``meta["latents"]["image_encoder"]``: folders, content digests, dims, preprocessing).

Partial textures (``meta["latents"]["partial"]``, when the job had ``partial=true``, its default): one per sample, as
training draws it from pixels (`loom.models.ttv.partial_known`), seeded by the sample key: the render's ``known``
pass where the source sample has one (``"source": "render known pass"``), else a random plane cut (``"plane cut"``),
with the fraction of the object given (``known_fraction``). Training takes them with probability
``data.known_prob`` in place of the all-unknown constants.

Text and image conditioning (Wan2.1 / Wan2.1-Fun, as diffusers 0.42.1's Wan pipelines compute it):

- ``text_embed`` is stored trimmed. Wan's pipeline zero-pads each prompt's features to 512 rows, and the loader
  or trainer must do the same (`pad_text_embed`): the DiT's cross-attention has no key mask (padding with anything
  else, or not at all, changes its input), and with image tokens ``WanAttnProcessor`` takes everything before the
  LAST 512 rows of the context to be image tokens (the 512 is hardcoded in diffusers).
  The text encoded is ``meta["latents"]["text"]["prompt"]`` (after Wan's cleaning), ``["from"]`` says whether it
  came from the captions file or the prompt template, ``["truncated"]`` whether it had more than 512 tokens.
- ``image_embed`` goes before the text along the sequence: the DiT's condition embedder projects it, and
  ``WanTransformer3DModel`` attends over ``cat([image_tokens, text_tokens], dim=1)``.
- ``meta["latents"]["warnings"]``: e.g. a uid missing from the captions file (the template was used instead).

Inputs to the VAE are videos in [-1, 1] (B, 3, T, H, W):

- rgb: ``uint8 / 127.5 - 1``.
- normal: as stored (world-space unit normals, 0 outside the mask).
- position: ``clip(position / position_radius, -1, 1)``; world coordinates lie in the unit sphere, so the default
  radius 1 maps them into [-1, 1] without clipping anything. 0 outside the mask (the origin's value: use
  ``mask_latent`` to tell background from a point at the origin).

Frames: Wan's causal VAE takes T = 1 + 4k frames. ``meta["latents"]["frames"]`` records the source count, the
policy (``trim``: drop the last frames down to 1 + 4k; ``pad``: repeat the last frame up to 1 + 4k; ``exact``:
refuse other counts) and ``used`` (source frames the latents cover, counting repeats).

Normalisation: ``z = (mu - mean) / std`` per channel with ``meta["latents"]["normalization"]["mean"|"std"]``
(the VAE config's ``latents_mean``/``latents_std``), or raw ``mu`` when ``normalization["kind"] == "none"``;
``mu = z * std + mean`` gives what ``AutoencoderKLWan.decode`` takes.

On disk: ``<pass>_latent.npy`` (float16 or float32, ``meta["latents"]["store_dtype"]``; float16 keeps a
relative error of at most 2**-11), ``mask_latent.npy``, ``text_embed.npy`` and ``image_embed.npy`` (same dtype),
``camera.npz`` (copied byte for byte from the source) and ``meta.json``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from loom.datasets.codecs import iter_decoded
from loom.datasets.codecs import unnpz as _unnpz

KIND = "latents"
PASSES = ("rgb", "normal", "position")
EMBEDS = ("text_embed", "image_embed")
TEXT_LENGTH = 512  # Wan's max_sequence_length: what text_embed is padded to for the DiT


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def unnpy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{ext: bytes}`` -> the documented dict (latents as float32). ``keys`` limits what is decoded."""
    want = set(keys) if keys else None
    if "meta.json" not in files or "camera.npz" not in files:
        raise ValueError(f"sample lacks {[e for e in ('meta.json', 'camera.npz') if e not in files]}: "
                         "not a latent sample")
    out: dict[str, Any] = {}
    for ext, data in files.items():
        name = ext.removesuffix(".npy")
        if (ext.endswith("_latent.npy") or name in EMBEDS) and (want is None or name in want):
            out[name] = unnpy(data).astype(np.float32)
    if want is None or "K" in want or "c2w" in want:
        cam = _unnpz(files["camera.npz"])
        out["K"], out["c2w"] = cam["K"], cam["c2w"]
    out["meta"] = json.loads(files["meta.json"])
    return out


def pad_text_embed(z: np.ndarray, length: int = TEXT_LENGTH) -> np.ndarray:
    """(L, D) trimmed text features -> (length, D) with zero rows after the real tokens, as Wan's pipeline feeds
    its DiT. Refuses L > length rather than cutting tokens."""
    if z.ndim != 2 or z.shape[0] > length:
        raise ValueError(f"text_embed has shape {z.shape}; expected (L, D) with L <= {length}")
    return np.concatenate([z, np.zeros((length - z.shape[0], z.shape[1]), z.dtype)])


def iter_samples(url: str, keys: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """Yield decoded latent samples from a shard, a folder of shards or a Loom output folder (manifest order), each
    with ``__key__``, ``__shard__`` and ``__index__``. ``keys`` limits decoding (e.g. ("rgb_latent", "mask_latent"))."""
    return iter_decoded(url, decode_sample, keys)
