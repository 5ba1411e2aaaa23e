"""An in-the-wild video as ShapeGen4D's conditioning video (ShapeGen4D 3.1 and 5.1; Loom SPEC section 3; issue 21).

The 4D model was trained on videos that `loom.render.anim` rendered: 16 frames evenly spread over the animation,
straight-alpha RGBA, transparent background, the object at one fixed scale for the whole sequence. A video from a
phone is none of that. `prepare_video` makes it so, in four documented steps::

    video file (.mp4 .webm .mkv ...) or folder of frames -> read_video -> (T, H, W, 3|4) uint8
      -> sample_frames: n frames (16 for the released model), the rule below       -> (n, H, W, 3|4)
      -> alpha: a mask video/folder (masks_from_video), else the video's own alpha, else rembg with a LOCAL
         ONNX model (remove_background)                                            -> (n, H, W) uint8 alpha
      -> frame_like_corpus: one square crop for the whole clip, the object at `fill` of the frame
                                                                                   -> (n, size, size, 4) uint8

Design choices (why):

- **Frame sampling** (`sample_frames`): ``uniform`` (default) takes ``n`` frames evenly spread over the WHOLE
  clip, the first and the last included (index ``round(i * (T - 1) / (n - 1))``), exactly as training subsamples a
  sequence (`loom.datasets.transforms.frame_indices` "uniform") and as the corpus spreads its 16 frames over the
  animation's range; ``stride`` takes ``n`` consecutive frames ``stride`` apart from frame 0, for a clip much longer
  than the motion of interest (trim it, or pick the stride, so the motion fills the window). A clip shorter than
  ``n`` frames is refused: repeating frames would show the model a motion it never saw.
- **Alpha**, in this order: a mask the user gives (a grey or alpha video / folder of frames, ``>= 128`` is the
  object; one mask per frame of the video, checked); the video's own alpha channel (FFV1/PNG/ProRes 4444 ...; a
  decoder that returns no alpha, like FFmpeg's native VP9 one, counts as none); a background-removal model through
  the maintained ``rembg`` package (``pip install rembg onnxruntime``) with an ONNX file from a LOCAL folder
  (``u2net_custom`` session: any network with U^2-Net's I/O, e.g. u2net.onnx or isnet-general-use.onnx).
  Nothing is downloaded: a folder without an ``.onnx`` file is refused, saying what to put there.
- **Framing** (`frame_like_corpus`): the union of the object's boxes over ALL frames (the corpus fits one field of
  view over all frames, so the object keeps one scale and moves inside the frame), a square crop centred on that
  union box, scaled so the union's larger side spans ``fill * size`` pixels (0.85, ``loom.render.anim``'s
  ``camera.fill``), transparent outside. How this relates to the corpus: `loom.geometry.camera.fit_fov` is called
  with margin ``1/fill - 1`` on a camera looking at the centre of the sequence's bounding box, so the projected
  point farthest from the principal point lies at ``fill`` of the HALF-frame on the tighter axis (square 256^2
  frames: both axes). For a projection symmetric about the image centre that is exactly a centred box whose larger
  side is ``fill`` of the frame: what this function makes. The corpus' box can sit off-centre by the perspective
  asymmetry of the 3D box (its far side then at ``fill``, its near side a little inside it); a 2D video has no 3D
  box, so the 2D box is centred instead.
- **Resampling**: PIL's antialiased resize of the exact (sub-pixel) square, colours premultiplied by alpha while
  filtering (PIL does this for RGBA), so the background's colour does not bleed into the silhouette; colour is 0
  where alpha is 0, as in the corpus' videos. Pixel centres at ``u + 0.5`` as everywhere in Loom.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")

MODEL_FRAMES = 16  # the released ShapeGen4D model and Loom's 4D corpus (loom.render.anim DEFAULTS["frames"])
CORPUS_FILL = 0.85  # loom.render.anim CAMERA_DEFAULTS["fill"] (a test holds them equal)
CORPUS_SIZE = 256  # loom.render.anim DEFAULTS width and height
SAMPLING_RULES = ("uniform", "stride")
MASK_THRESHOLD = 128  # a mask pixel >= this (0..255) is the object


@dataclasses.dataclass(frozen=True)
class Video:
    """Decoded frames (T, H, W, 3) uint8 RGB, or (T, H, W, 4) straight-alpha RGBA when the source has alpha."""

    frames: np.ndarray
    fps: float | None  # None for a folder of frames
    has_alpha: bool
    source: str


@dataclasses.dataclass(frozen=True)
class PreparedVideo:
    """What `prepare_video` made: the conditioning video and how it came from the source."""

    frames: np.ndarray  # (n, size, size, 4) uint8 straight-alpha RGBA, transparent outside the object
    indices: np.ndarray  # (n,) int64 indices of the source frames used
    crop: tuple[float, float, float, float]  # (x0, y0, x1, y1) the square crop in source pixels (edges; may overhang)
    scale: float  # output pixels per source pixel
    object_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) the union of the masks' boxes, source pixels (edges)
    alpha_source: str  # "mask", "alpha" or "matting"
    source: str


# ------------------------------------------------------------------------------------------------------------- reading


def _pixel_format_has_alpha(name: str) -> bool:
    import av

    try:
        return len(av.VideoFormat(name).components) in (2, 4)  # ya8, rgba, yuva420p, gbrap, ...
    except (ValueError, TypeError):
        return False


def _read_video_file(path: str) -> Video:
    import av

    from loom.datasets.codecs import decode_video

    with open(path, "rb") as f:
        data = f.read()
    try:
        import io

        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise ValueError("it has no video stream")
            stream = c.streams.video[0]
            pix_fmt = stream.codec_context.pix_fmt or ""
            fps = float(stream.average_rate) if stream.average_rate else None
        alpha = _pixel_format_has_alpha(pix_fmt) or pix_fmt == "pal8"  # a GIF's palette may hold transparency
        frames = decode_video(data, channels=4 if alpha else 3)
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise ValueError(f"cannot decode the video {path!r}: {e}; re-encode it (e.g. ffmpeg -i IN -c:v libx264 "
                         "OUT.mp4) or pass a folder of PNG frames") from e
    if alpha and pix_fmt == "pal8" and frames[..., 3].min() == 255:
        frames, alpha = np.ascontiguousarray(frames[..., :3]), False
    if len(frames) == 0:
        raise ValueError(f"the video {path!r} has no frames")
    return Video(frames=frames, fps=fps, has_alpha=alpha, source=path)


def _read_frame_folder(path: str) -> Video:
    from PIL import Image, UnidentifiedImageError

    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
    if not names:
        raise FileNotFoundError(f"the folder {path!r} has no frame images ({', '.join(IMAGE_EXTS)}): put the frames "
                                "there with names that sort in time order (frame_0000.png ...)")
    imgs, alpha = [], False
    for n in names:
        p = os.path.join(path, n)
        try:
            with Image.open(p) as im:
                has = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
                alpha |= has
                imgs.append(np.asarray(im.convert("RGBA" if has else "RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"frame {p!r} is not an image PIL can read: {e}") from e
    sizes = {im.shape[:2] for im in imgs}
    if len(sizes) > 1:
        raise ValueError(f"the frames in {path!r} differ in size ({sorted(sizes)}): every frame must be H x W alike")
    if alpha:
        imgs = [im if im.shape[-1] == 4 else np.concatenate([im, np.full(im.shape[:2] + (1,), 255, np.uint8)], -1)
                for im in imgs]
    return Video(frames=np.stack(imgs), fps=None, has_alpha=alpha, source=path)


def read_video(path: str) -> Video:
    """A video file (``.mp4 .mkv .webm .mov .avi .gif``, decoded by PyAV through `loom.datasets.codecs.decode_video`)
    or a folder of frame images (sorted by name) -> `Video`. RGBA (straight alpha) when the file's pixel format has
    an alpha plane (or a PNG has alpha), RGB otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist: pass a video file ({', '.join(VIDEO_EXTS)}) or a folder "
                                f"of frames ({', '.join(IMAGE_EXTS)})")
    if os.path.isdir(path):
        return _read_frame_folder(path)
    if not path.lower().endswith(VIDEO_EXTS):
        raise ValueError(f"{path!r} is not a video file this reads ({', '.join(VIDEO_EXTS)}); for single images or "
                         "frames, pass the folder that holds them")
    return _read_video_file(path)


# ------------------------------------------------------------------------------------------------------------ sampling


def sample_frames(n_video: int, n: int = MODEL_FRAMES, rule: str = "uniform", stride: int = 1) -> np.ndarray:
    """The indices (n,) int64, increasing, of the ``n`` frames of an ``n_video``-frame clip the model sees.

    ``uniform``: evenly spread over the whole clip, first and last included (``round(i * (T-1) / (n-1))``; training's
    `frame_indices` "uniform"). ``stride``: ``n`` frames ``stride`` apart from frame 0. ``n = 0``: every frame."""
    from loom.datasets.transforms import frame_indices

    if rule not in SAMPLING_RULES:
        raise ValueError(f"unknown frame sampling rule {rule!r}: use one of {SAMPLING_RULES}")
    if n_video < 1:
        raise ValueError(f"the video has {n_video} frames: nothing to sample")
    if n == 0:
        return np.arange(n_video, dtype=np.int64)
    if n < 0 or stride < 1:
        raise ValueError(f"n={n} must be >= 0 and stride={stride} >= 1")
    if n > n_video:
        raise ValueError(f"the video has {n_video} frames but the model takes {n}: use a clip of at least {n} frames "
                         "(frames are never repeated)")
    if rule == "uniform":
        return frame_indices(n_video, n, "uniform")
    return frame_indices(n_video, n, "window", None, stride)


# -------------------------------------------------------------------------------------------------------------- alpha


def _alpha_of(frames: np.ndarray) -> np.ndarray:
    """(T,H,W,C) uint8 mask frames -> (T,H,W) uint8: the alpha channel when there is one, else the grey level."""
    if frames.shape[-1] == 4:
        return np.ascontiguousarray(frames[..., 3])
    if frames.shape[-1] == 1:
        return np.ascontiguousarray(frames[..., 0])
    luma = frames[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # BT.601
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)


def masks_from_video(path: str, n_frames: int) -> np.ndarray:
    """A mask video or folder of mask frames -> (T, H, W) bool, ``>= 128`` (grey level, or alpha when the frames
    have alpha) is the object. It must have exactly ``n_frames`` frames: one mask per frame of the video."""
    alpha = masks_alpha_from_video(path, n_frames)
    return alpha >= MASK_THRESHOLD


def masks_alpha_from_video(path: str, n_frames: int) -> np.ndarray:
    """As `masks_from_video`, the mask's own levels: (T, H, W) uint8 (a soft mask stays soft as alpha)."""
    video = read_video(path)
    if len(video.frames) != n_frames:
        raise ValueError(f"the mask {path!r} has {len(video.frames)} frames but the video has {n_frames}: give one "
                         "mask frame per video frame (same frame rate and length; cut both the same way)")
    return _alpha_of(video.frames)


def _onnx_model(model_dir: str) -> str:
    if os.path.isfile(model_dir) and model_dir.lower().endswith(".onnx"):
        return os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"background-removal model folder {model_dir!r} does not exist: make it and put one "
                                "U^2-Net-style .onnx file in it (e.g. u2net.onnx or isnet-general-use.onnx from "
                                "rembg's releases); nothing is downloaded")
    found = sorted(n for n in os.listdir(model_dir) if n.lower().endswith(".onnx"))
    if len(found) != 1:
        what = "no .onnx file" if not found else f"{len(found)} .onnx files ({', '.join(found)})"
        raise FileNotFoundError(f"background-removal model folder {model_dir!r} has {what}: put exactly one "
                                "U^2-Net-style .onnx file there (input 1x3x320x320, ImageNet-normalised RGB; first "
                                "output 1x1x320x320 foreground), e.g. u2net.onnx; nothing is downloaded")
    return os.path.abspath(os.path.join(model_dir, found[0]))


def remove_background(frames: np.ndarray, model_dir: str) -> np.ndarray:
    """(T, H, W, 3|4) uint8 frames -> (T, H, W) uint8 alpha, by ``rembg``'s ``u2net_custom`` session on the one
    ``.onnx`` file in ``model_dir`` (a local folder; never downloads). rembg resizes each frame to 320^2, runs the
    network, min-max normalises the first output and resizes it back (Lanczos)."""
    path = _onnx_model(model_dir)
    try:
        from rembg import new_session, remove
    except ImportError as e:
        raise ImportError(f"background removal needs the rembg package ({e}): pip install rembg onnxruntime, or "
                          "pass a mask video instead") from e
    from PIL import Image

    # rembg >= 2.0.70 accepts a custom model only under its home folders ($REMBG_HOME, $U2NET_HOME): point both at
    # the model's folder while the session is made, so no file is copied and nothing is fetched.
    folder = os.path.dirname(path)
    saved = {k: os.environ.get(k) for k in ("REMBG_HOME", "U2NET_HOME")}
    os.environ.update(REMBG_HOME=folder, U2NET_HOME=folder)
    try:
        session = new_session("u2net_custom", model_path=path, providers=["CPUExecutionProvider"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = np.empty(frames.shape[:3], np.uint8)
    for t, frame in enumerate(frames):
        mask = remove(Image.fromarray(np.ascontiguousarray(frame[..., :3])), session=session, only_mask=True)
        out[t] = np.asarray(mask.convert("L"))
    return out


# ------------------------------------------------------------------------------------------------------------ framing


def object_box(masks: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel edges of the union of the masks' boxes over all frames (T, H, W) bool."""
    any_t = np.asarray(masks).any(axis=0)
    rows, cols = np.nonzero(any_t.any(axis=1))[0], np.nonzero(any_t.any(axis=0))[0]
    if len(rows) == 0:
        raise ValueError("the mask is empty in every frame: no object to frame (check the mask video, or the "
                         "background-removal model)")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def corpus_crop(masks: np.ndarray, size: int = CORPUS_SIZE, fill: float = CORPUS_FILL) -> dict:
    """The one square crop of a sequence's masks (T, H, W) (bool, or uint8 alpha: ``>= 128`` is the object):
    ``object_box`` (x0, y0, x1, y1), the union of the masks' boxes in source pixel edges; ``crop`` (x0, y0, x1, y1),
    the square centred on it whose side is ``L / fill`` for the union's larger side ``L`` (it may overhang the
    frame); ``scale``, output pixels per source pixel (``fill * size / L``)."""
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill={fill} must be in (0, 1]")
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    masks = np.asarray(masks)
    box = object_box(masks if masks.dtype == bool else masks >= MASK_THRESHOLD)
    x0, y0, x1, y1 = box
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    side = max(x1 - x0, y1 - y0) / fill  # source pixels
    crop = (cx - 0.5 * side, cy - 0.5 * side, cx + 0.5 * side, cy + 0.5 * side)
    return {"object_box": box, "crop": crop, "scale": size / side}


def frame_like_corpus(frames: np.ndarray, masks: np.ndarray, size: int = CORPUS_SIZE,
                      fill: float = CORPUS_FILL) -> np.ndarray:
    """(T, H, W, 3|4) uint8 frames and (T, H, W) masks -> (T, size, size, 4) uint8 straight-alpha RGBA.

    One square crop for the whole sequence (`corpus_crop`): centred on the union of the masks' boxes, so the union
    spans ``fill * size`` output pixels on its larger side and is centred (the corpus' framing: module docstring).
    Masks are bool (alpha 255 inside) or uint8 alpha (the box from ``>= 128``, the level kept as alpha; a frame's
    own alpha channel is replaced by it). Outside the frame and outside the mask is transparent, colour 0."""
    from PIL import Image

    frames, masks = np.asarray(frames), np.asarray(masks)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"frames must be (T,H,W,3|4) uint8, got {frames.shape} {frames.dtype}")
    if masks.shape != frames.shape[:3]:
        raise ValueError(f"masks {masks.shape} do not match the frames {frames.shape[:3]}: one (H,W) mask per frame")
    crop = corpus_crop(masks, size, fill)["crop"]
    alpha = np.where(masks, 255, 0).astype(np.uint8) if masks.dtype == bool else masks.astype(np.uint8)
    side = crop[2] - crop[0]
    t, h, w = frames.shape[:3]
    # PIL wants the box inside the image: pad with transparency by whole pixels (the box shifts with it, exactly).
    pad = max(0, math.ceil(max(-crop[0], -crop[1], crop[2] - w, crop[3] - h))) + 1
    box = tuple(c + pad for c in crop)
    # Area averaging when shrinking, bilinear when enlarging, as loom.datasets.transforms resizes colour.
    resample = Image.BILINEAR if side <= size else Image.BOX
    out = np.empty((t, size, size, 4), np.uint8)
    rgba = np.zeros((h + 2 * pad, w + 2 * pad, 4), np.uint8)
    for i in range(t):
        a = alpha[i]
        rgba[pad:pad + h, pad:pad + w, :3] = np.where(a[..., None] > 0, frames[i, ..., :3], 0)
        rgba[pad:pad + h, pad:pad + w, 3] = a
        # RGBA is premultiplied inside PIL's resize, so the background's colour does not bleed into the edge.
        out[i] = np.asarray(Image.fromarray(rgba, "RGBA").resize((size, size), resample, box=box))
    out[..., :3][out[..., 3] == 0] = 0
    return out


def prepare_video(video: str | np.ndarray, *, n: int = MODEL_FRAMES, size: int = CORPUS_SIZE,
                  fill: float = CORPUS_FILL, mask: str | np.ndarray | None = None, matting: str | None = None,
                  rule: str = "uniform", stride: int = 1) -> PreparedVideo:
    """An in-the-wild video (a path, or (T,H,W,3|4) uint8 frames) -> the 4D model's conditioning video.

    Frames: `sample_frames` (``n``, ``rule``, ``stride``). Alpha: ``mask`` (a mask video / folder, or (T,H,W)
    bool / uint8 alpha for the whole clip) if given, else the video's alpha channel, else ``matting`` (a local folder
    with one rembg ``.onnx`` model, `remove_background`); none of the three is an error. Framing:
    `frame_like_corpus` (``size``, ``fill``)."""
    if isinstance(video, str):
        src = read_video(video)
    else:
        arr = np.asarray(video)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"video frames must be (T,H,W,3|4) uint8, got {arr.shape} {arr.dtype}")
        src = Video(frames=arr, fps=None, has_alpha=arr.shape[-1] == 4, source="<array>")
    total = len(src.frames)
    idx = sample_frames(total, n, rule, stride)
    frames = src.frames[idx]
    if mask is not None:
        if isinstance(mask, str):
            full = masks_alpha_from_video(mask, total)
        else:
            full = np.asarray(mask)
            if len(full) != total:
                raise ValueError(f"mask has {len(full)} frames but the video has {total}: one mask per frame")
            full = np.where(full, 255, 0).astype(np.uint8) if full.dtype == bool else full.astype(np.uint8)
        alpha, how = full[idx], "mask"
        if alpha.shape != frames.shape[:3]:
            raise ValueError(f"the mask's frames are {alpha.shape[1:]} (H, W) but the video's are "
                             f"{frames.shape[1:3]}: masks must have the video's resolution")
    elif src.has_alpha and frames[..., 3].min() < 255:
        alpha, how = frames[..., 3], "alpha"
    elif matting is not None:
        alpha, how = remove_background(frames, matting), "matting"
    else:
        raise ValueError(f"{src.source!r} has no alpha channel (or an opaque one) and no mask or background-removal "
                         "model was given: pass a mask video (mask=..., '--mask') or a folder with a rembg .onnx model "
                         "(matting=..., '--matting')")
    info = corpus_crop(alpha, size, fill)
    out = frame_like_corpus(frames, alpha, size, fill)
    return PreparedVideo(frames=out, indices=idx, crop=info["crop"], scale=info["scale"],
                         object_box=info["object_box"], alpha_source=how, source=src.source)
