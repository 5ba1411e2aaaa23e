"""Assets, the input of every render job: where they come from, what is recorded about them, and the checks that
stand between an untrusted file and Blender.

- `records`: `AssetRecord` (uid, source, path, sha256, licence, size, format, annotations), safe ids
  (`validate_uid`, `uid_from_relpath`) and the asset manifest (`write_manifest`, `read_manifest`).
- `sources`: ``--assets SOURCE`` (`resolve_source`): ``bundled``, ``bundled-animated``, ``bundled-scene``, a
  folder or fsspec URL, a single mesh file, a manifest, ``objaverse:...``. Its docstring gives the syntax.
- `checks`: the untrusted-file checks (`check_gltf_uris`, `check_obj_refs`) and `fetch_local`, which runs them on
  every asset it hands to a render task.

Trust. Asset ids and paths come from outside. `validate_uid` refuses any id that could name something other than
one folder entry (so an output path built from it cannot escape the output folder); `fetch_local` refuses files
whose references leave their folder, whose sha256 changed, or whose format Loom does not import.
"""

from loom.corpora.assets.checks import check_gltf_uris, check_obj_refs, fetch_local, referenced_files
from loom.corpora.assets.records import (FORMATS, UNSUPPORTED_FORMATS, AssetRecord, read_manifest, sha256_file,
                                         uid_from_relpath, unsupported_reason, validate_uid, write_manifest)
from loom.corpora.assets.sources import (bundled_animated_assets, bundled_assets, objaverse_assets, resolve_source,
                                         scan_folder)

__all__ = [
    "FORMATS",
    "UNSUPPORTED_FORMATS",
    "AssetRecord",
    "validate_uid",
    "uid_from_relpath",
    "unsupported_reason",
    "check_gltf_uris",
    "check_obj_refs",
    "referenced_files",
    "scan_folder",
    "bundled_assets",
    "bundled_animated_assets",
    "objaverse_assets",
    "resolve_source",
    "write_manifest",
    "read_manifest",
    "fetch_local",
    "sha256_file",
]
