"""CLIP score: CLIP cosine similarity of images to captions (Hessel et al. 2021) or to reference images.

Definition: per item, ``max(100 * cos(E_I, E_C), 0)`` with ``E_I`` the CLIP image embedding of the image and
``E_C`` the text embedding of its caption (``text=``), or the image embedding of its reference image
(``reference=``, the image-image form used for renders against ground truth); the result is the mean over items.
Scale 100 and the clamp at 0 as torchmetrics' ``clip_score`` (which clamps the mean instead of each item; the two
agree whenever no item has a negative cosine, which real CLIP models practically never produce). The network is
:mod:`loom.eval.networks.clip` (default ``openai/clip-vit-large-patch14`` from the weights directory).
"""

from __future__ import annotations

import torch

from loom.eval.metrics._common import as_images, reduce


def clip_similarity(images, text=None, *, reference=None, network=None, batch_size: int = 32) -> torch.Tensor:
    """Per-item ``100 * cos`` (not clamped), (N,)."""
    if (text is None) == (reference is None):
        raise ValueError("give exactly one of text= (captions) or reference= (reference images)")
    frames = torch.as_tensor(images).shape[1] if torch.as_tensor(images).ndim == 5 else 1  # videos: per frame
    x = as_images(images, "images")
    if network is None:
        from loom.eval.networks import clip

        network = clip.load()
    if text is not None:
        texts = [text] * (x.shape[0] // frames) if isinstance(text, str) else list(text)
        texts = [c for c in texts for _ in range(frames)]
        if len(texts) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(texts)} captions")
    else:
        ref = torch.as_tensor(reference)
        ref = as_images(ref.repeat_interleave(frames, 0) if ref.ndim == 4 and frames > 1 else ref, "reference")
        if ref.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {ref.shape[0]} reference images")
    out = []
    for i in range(0, x.shape[0], batch_size):
        a = network.image_embeds(x[i : i + batch_size])
        b = network.text_embeds(texts[i : i + batch_size]) if text is not None else network.image_embeds(
            ref[i : i + batch_size])  # fmt: skip
        out.append(100.0 * (a * b).sum(-1).double().cpu())
    return torch.cat(out)


def clip_score(images, text=None, *, reference=None, network=None, batch_size: int = 32, reduction: str = "mean"):
    """CLIP score of images (N,3,H,W) in [0,1] (or videos, per frame) against captions or reference images."""
    sim = clip_similarity(images, text, reference=reference, network=network, batch_size=batch_size)
    return reduce(sim.clamp(min=0.0), reduction)
