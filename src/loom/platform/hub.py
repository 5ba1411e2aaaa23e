"""Model names that are Hugging Face repo ids, resolved in the LOCAL Hugging Face cache only; nothing downloads.

A model field (``model.transformer``, ``model.vae``, ...) names either a local path or a Hugging Face repo:

- a local file or folder: it wins whenever it exists (relative to the working directory, ``~`` expanded);
- ``ORG/NAME``, ``ORG/NAME@REVISION`` or ``ORG/NAME[@REVISION]/PATH/IN/REPO`` (an ``hf://`` prefix is allowed, as in
  huggingface_hub's ``HfFileSystem`` URLs): the snapshot of that revision (default ``main``) in the local cache,
  found by huggingface_hub's own ``snapshot_download(local_files_only=True)``, and ``PATH`` inside it.

The cache is the one huggingface_hub and transformers use: ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``
(legacy), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. It is
read from the environment at each call (huggingface_hub reads it once, at import), so a job, a test or a user that
sets it late is still honoured; the directory is passed to huggingface_hub explicitly.

A miss says where it looked and what to do: ``hf download ORG/NAME`` on a machine with internet (then copy the
cache folder, or point ``$HF_HUB_CACHE`` at a copy), or a local folder in the field. Why not download on a miss:
training and evaluation run where there may be no internet, and a silent multi-GiB download inside a job is worse
than a message.

A snapshot that the cache's own tree listing shows to be partial (``hf download --include ...``) is still used:
only the files a loader opens matter, and it names any that are missing. A warning says so.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
DEFAULT_REVISION = "main"
# What the Hub allows in a namespace or repo name (huggingface_hub's REPO_ID_REGEX: letters, digits, - _ .).
_PART = re.compile(r"^[\w\-.]{1,96}$")
# A commit hash, the name of a snapshot folder
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubName:
    """A model name that points into a Hugging Face repo: ``repo_id``, ``revision`` (None: main), ``path`` inside
    the repo ('' for the repo's root)."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


def parse_hub_name(name: str) -> HubName | None:
    """``name`` as a Hugging Face repo name, or None when it cannot be one (an absolute or ``./`` path, one
    segment, characters the Hub refuses). Says nothing about whether it exists locally: :func:`resolve_model_path`
    asks that first."""
    if not name:
        return None
    text = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
    if "://" in text or "\\" in text or text.startswith(("/", ".", "~")):
        return None
    parts = text.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        return None
    org, repo = parts[0], parts[1]
    repo, _, revision = repo.partition("@")
    if not (_PART.match(org) and _PART.match(repo)) or ".." in org + repo or org.startswith(("-", ".")):
        return None
    rest = [p for p in parts[2:] if p]
    if any(p in (".", "..") for p in rest):
        return None
    return HubName(f"{org}/{repo}", unquote(revision) or None, "/".join(rest))


def hub_cache_dir() -> tuple[Path, str]:
    """(the Hugging Face hub cache directory, which setting chose it), read from the environment now."""
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(env):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[env]))), f"${env}"
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub", "$HF_HOME/hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub", "$XDG_CACHE_HOME"
    return Path("~/.cache/huggingface/hub").expanduser(), "default"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """The cache folder of a model repo: ``<cache>/models--ORG--NAME`` (huggingface_hub's layout)."""
    return (cache or hub_cache_dir()[0]) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None, path: str = "") -> Path | None:
    """The local snapshot folder of ``repo_id`` at ``revision`` (None: main), or None when the cache has none.
    ``path``: the part of the repo needed; the cache's tree listing (when present) judges completeness of that part
    only, and a snapshot known to be partial is still returned, with a warning."""
    from huggingface_hub import snapshot_download

    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23 kept it in utils
        from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # huggingface_hub < 2.4: no tree listing, no completeness check
        IncompleteSnapshotError = None

    cache, _ = hub_cache_dir()
    patterns = [path, f"{path}/*"] if path else None
    try:
        return Path(snapshot_download(repo_id, revision=revision or DEFAULT_REVISION, cache_dir=cache,
                                      local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        if IncompleteSnapshotError is not None and isinstance(e, IncompleteSnapshotError):
            log.warning("%s", e)
            return Path(e.snapshot_path)
        return None
    except (OSError, ValueError):  # a name the Hub would refuse (HFValidationError is a ValueError)
        return None


def _cache_contents(repo_id: str, cache: Path) -> str:
    """What the cache holds of a repo, for messages: its refs and snapshots."""
    folder = repo_folder(repo_id, cache)
    if not folder.is_dir():
        return f"the cache has no {folder.name}"
    refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file())
    snaps = sorted(p.name for p in (folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
    return (f"the cache has {folder.name} with refs {refs or 'none'} and snapshots "
            f"{[s[:12] for s in snaps] or 'none'}")


def resolve_model_path(name: str, field: str) -> str:
    """The local path a model field names: ``name`` itself when it exists locally, else the file or folder a
    Hugging Face repo name (``ORG/NAME[@REV][/PATH]``) stands for in the local cache. Raises FileNotFoundError
    that names ``field``, where it looked and what to do. Nothing is downloaded.

    Call it where a loader is given a user's path (after sentinels such as ``tiny`` and empty fields are handled)::

        TTVDiT.from_pretrained(resolve_model_path(m.transformer, "model.transformer"), ...)
    """
    if not name:
        raise FileNotFoundError(f"{field} is empty: set it to a local path or a Hugging Face repo id (ORG/NAME)")
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    hub = parse_hub_name(name)
    if hub is None:
        raise FileNotFoundError(f"{field}={name!r} does not exist (relative to {os.getcwd()}) and is not a Hugging "
                                "Face repo id (ORG/NAME[@REVISION][/PATH]): point it at a local file or folder")
    cache, origin = hub_cache_dir()
    rev = hub.revision or DEFAULT_REVISION
    snapshot = cached_snapshot(hub.repo_id, hub.revision, hub.path)
    get = f"hf download {hub.repo_id}" + (f" --revision {hub.revision}" if hub.revision else "")
    if snapshot is None:
        raise FileNotFoundError(
            f"{field}={name!r} is no local path, and the Hugging Face cache {cache} (from {origin}) has no snapshot "
            f"of {hub.repo_id} at revision {rev!r} ({_cache_contents(hub.repo_id, cache)}). Nothing is downloaded at "
            f"run time: on a machine with internet run `{get}` (`huggingface-cli download` with an older "
            f"huggingface_hub) and copy {repo_folder(hub.repo_id, cache).name}/ into this cache (or point "
            f"$HF_HUB_CACHE at a cache that has it), or download with --local-dir DIR and set {field}=DIR")
    target = snapshot / hub.path if hub.path else snapshot
    if not target.exists():
        have = sorted(p.name + ("/" if p.is_dir() else "") for p in (target.parent if target.parent.is_dir()
                                                                     else snapshot).iterdir())
        raise FileNotFoundError(
            f"{field}={name!r}: the cached snapshot {snapshot} of {hub.repo_id} has no {hub.path!r} (next to it: "
            f"{have[:20]}): fetch it with `{get} {hub.path}` (or --include '{hub.path}/*' for a folder) on a "
            "machine with internet, or correct the path inside the repo")
    return str(target)


def hub_origin(path: str | os.PathLike) -> HubName | None:
    """The repo a path inside the local cache belongs to (``.../models--ORG--NAME/snapshots/<commit>/PATH`` ->
    ``ORG/NAME@<commit>/PATH``), or None for a path outside any cache: a model card names its base model by it."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            org_name = parts[i][len("models--"):].split("--", 1)
            if len(org_name) == 2:
                return HubName("/".join(org_name), parts[i + 2], "/".join(parts[i + 3:]))
    return None


def model_source(name: str) -> HubName | None:
    """The Hugging Face repo a model field's value comes from, if any: a repo name that is not a local path, or a
    local path inside a cache snapshot. None for a plain local folder (or an empty field)."""
    if not name:
        return None
    if os.path.exists(os.path.expanduser(name)):
        return hub_origin(os.path.expanduser(name))
    return parse_hub_name(name)


def absolute_model_name(name: str) -> str:
    """``name`` with a local path made absolute (a Ray worker or a resumed run may start elsewhere), and a Hugging
    Face repo name that is not a local path kept as it is (``os.path.abspath`` would turn ``ORG/NAME`` into a
    folder under the working directory)."""
    if not name or ("://" in name and not name.startswith(HF_PREFIX)):
        return name
    local = os.path.expanduser(name)
    if os.path.exists(local) or parse_hub_name(name) is None:
        return os.path.abspath(local)
    return name
