"""The training data of ``loom train style``: the reference images, each prepared ONCE when training starts, and the
seeded, step-indexed batches drawn from them.

Preparation of reference i, for each crop r of ``data.aspect_ratios`` (the authors' ``CustomImageControlDataset2``
with their crop drawn per sample; ``native`` keeps the image's own ratio)::

    RGB image -> centre crop to r (width:height) -> longest side data.size, sides floored to multiples of 16
      -> image (H,W,3) uint8;  edges = HED of that image (data.hed_resolution), or Canny (the stand-in), (H,W) uint8
    prompt = identifier (+ ", " caption)

One batch of the rank at step s (``StyleBatches``): sample n = (s * world + rank) * B + b draws reference
perm_e[n mod N] with perm_e a permutation of the N references seeded by (seed, e = n div N), so every reference is
seen once per N samples; the crop is drawn from (seed, s, "crop"), one per step. Nothing depends on the past, so the
position is the step alone, which checkpoints store (``{"step": s}``) and resume restores.

=========  ==============  =======  =======================================================================
key        shape           dtype    meaning
=========  ==============  =======  =======================================================================
image      (B,3,H,W)       float32  the references' crops in [-1, 1]
edges      (B,3,H,W)       float32  their edge maps in [-1, 1] (white edges), the ControlNet's condition
prompt     [B] str                  identifier (+ caption)
reference  (B,)            int64    index into the run's references
__key__    [B] str                  "<n>:<reference>", the sample's key for its t and noise
=========  ==============  =======  =======================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from loom.training.style.config import RATIOS, StyleDataSettings

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass
class Reference:
    path: str
    identifier: str
    prompt: str
    crops: dict[str, tuple[np.ndarray, np.ndarray]]  # crop -> (image (H,W,3) uint8, edges (H,W) uint8)


def reference_paths(d: StyleDataSettings) -> list[str]:
    """data.references, then the images of the folder data.source (sorted); each checked to exist."""
    paths = list(d.references)
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data.references: reference image {p!r} does not exist: give an image file "
                                    "(--reference IMG)")
    if d.source:
        if not os.path.isdir(d.source):
            raise FileNotFoundError(f"data.source={d.source!r} is not a folder of reference images (--data FOLDER)")
        found = sorted(os.path.join(d.source, f) for f in os.listdir(d.source)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(d.source, f)))
        if not found:
            raise FileNotFoundError(f"data.source={d.source!r} holds no {'/'.join(IMAGE_EXTENSIONS)} image")
        paths += found
    if not paths:
        raise ValueError("no reference image: give --reference IMG (repeatable), --data FOLDER, or "
                         "--set data.references=[a.png]")
    return paths


def prompts(d: StyleDataSettings, n: int) -> tuple[list[str], list[str]]:
    """(identifier per reference, prompt per reference) for n references."""
    ids = list(d.identifiers) or [f"[v{i + 1}]" for i in range(n)]
    if len(ids) == 1:
        ids = ids * n
    if len(ids) != n:
        raise ValueError(f"data.identifiers: {len(d.identifiers)} identifiers for {n} references: give one for all "
                         "or one per reference (--identifier, in the order of the references)")
    caps = list(d.captions)
    if caps and len(caps) not in (1, n):
        raise ValueError(f"data.captions: {len(caps)} captions for {n} references: give one for all or one each")
    caps = caps * n if len(caps) == 1 else caps
    return ids, [f"{i}, {c}" if caps and c else i for i, c in zip(ids, caps or [""] * n)]


def read_image(path: str) -> np.ndarray:
    """RGB (H,W,3) uint8; an unreadable file is named."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"reference image {path!r} cannot be read as an image ({e}): give a PNG/JPEG/WebP file") \
            from None


def crop(image: np.ndarray, ratio: str, size: int) -> np.ndarray:
    """The centre crop of ``ratio`` (width:height; native = none), longest side ``size``, sides floored to multiples
    of 16 (the authors: crop_to_aspect_ratio, image_resize, then 32-multiples)."""
    import cv2

    h, w = image.shape[:2]
    if ratio != "native":
        rw, rh = RATIOS[ratio]
        if w / h > rw / rh:
            nw = int(h * rw / rh)
            image = image[:, (w - nw) // 2:(w - nw) // 2 + nw]
        else:
            nh = int(w * rh / rw)
            image = image[(h - nh) // 2:(h - nh) // 2 + nh]
        h, w = image.shape[:2]
    k = size / max(h, w)
    th, tw = (int(h * k) // 16) * 16, (int(w * k) // 16) * 16
    if th < 16 or tw < 16:
        raise ValueError(f"a {ratio} crop of a {w}x{h} reference is below 16 pixels at data.size={size}")
    return cv2.resize(np.ascontiguousarray(image), (tw, th), interpolation=cv2.INTER_AREA if k < 1 else
                      cv2.INTER_CUBIC)


class EdgeDetector:
    """(H,W,3) uint8 -> (H,W) uint8 edges: HED (`loom.models.hed`) detected at ``resolution`` on the short side and
    brought back to the image's size, or the Canny stand-in (cv2.Canny 100/200 of the grey image)."""

    def __init__(self, d: StyleDataSettings):
        self.kind, self.resolution, self.net = d.edge_detector, d.hed_resolution, None
        if self.kind == "hed":
            import torch

            from loom.models.hed import load_hed
            from loom.platform.hub import resolve_model_path

            self.net = load_hed(resolve_model_path(d.hed_weights, "data.hed_weights"))
            if torch.cuda.is_available():
                self.net.cuda()

    def describe(self) -> str:
        if self.kind == "hed":
            return f"HED (ControlNetHED, detected at {self.resolution or 'full'} px on the short side)"
        return "Canny stand-in (cv2.Canny 100/200 of the grey reference), not HED"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import cv2

        h, w = image.shape[:2]
        if self.kind == "canny":
            return cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 100, 200)
        from loom.models.hed import hed_edges

        x = image
        if self.resolution and min(h, w) != self.resolution:
            k = self.resolution / min(h, w)
            x = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))),
                           interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
        e = hed_edges(self.net, x)
        return e if e.shape == (h, w) else cv2.resize(e, (w, h), interpolation=cv2.INTER_CUBIC)


def load_references(d: StyleDataSettings, detector: EdgeDetector | None = None) -> list[Reference]:
    """Every reference read, cropped and its edge maps computed, once (module docstring)."""
    paths = reference_paths(d)
    ids, texts = prompts(d, len(paths))
    detector = detector or EdgeDetector(d)
    refs = []
    for path, ident, text in zip(paths, ids, texts):
        image = read_image(path)
        crops = {}
        for r in d.aspect_ratios:
            c = crop(image, r, d.size)
            crops[r] = (c, detector(c))
        refs.append(Reference(path, ident, text, crops))
    if d.batch_size > 1 and "native" in d.aspect_ratios:
        shapes = {ref.crops["native"][0].shape for ref in refs}
        if len(shapes) > 1:
            raise ValueError(f"data.batch_size={d.batch_size} with a native crop: the references' native crops differ "
                             f"in size ({sorted(shapes)}), so they do not batch; use batch_size=1 or fixed ratios")
    return refs


def _rng(*key) -> np.random.Generator:
    h = hashlib.sha256("\0".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def to_input(a: np.ndarray) -> np.ndarray:
    """(H,W,3) or (H,W) uint8 -> (3,H,W) float32 in [-1, 1]."""
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1


class StyleBatches:
    """The rank's batches from step ``state["step"]`` on (module docstring), forever; ``state_dict`` /
    ``load_state_dict`` as the loader contract of `loom.training.module.TrainBatches`."""

    def __init__(self, refs: list[Reference], ratios: tuple[str, ...], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.refs, self.ratios, self.b, self.seed, self.rank, self.world = refs, ratios, batch_size, seed, rank, world
        self.step = 0
        self._inputs = {(i, r): (to_input(img), to_input(e)) for i, ref in enumerate(refs)
                        for r, (img, e) in ref.crops.items()}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def reference_at(self, n: int) -> int:
        """The reference of global sample n."""
        num = len(self.refs)
        return int(_rng(self.seed, "epoch", n // num).permutation(num)[n % num])

    def batch(self, step: int) -> dict:
        import torch

        ratio = self.ratios[int(_rng(self.seed, step, "crop").integers(len(self.ratios)))]
        ns = [(step * self.world + self.rank) * self.b + k for k in range(self.b)]
        idx = [self.reference_at(n) for n in ns]
        return {"image": torch.from_numpy(np.stack([self._inputs[i, ratio][0] for i in idx])),
                "edges": torch.from_numpy(np.stack([self._inputs[i, ratio][1] for i in idx])),
                "prompt": [self.refs[i].prompt for i in idx], "reference": torch.tensor(idx, dtype=torch.long),
                "__key__": [f"{n}:{i}" for n, i in zip(ns, idx)]}

    def __iter__(self):
        while True:
            b = self.batch(self.step)
            self.step += 1
            yield b
