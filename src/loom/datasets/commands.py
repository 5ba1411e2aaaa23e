"""``loom shards verify`` and ``loom shards inspect``."""

from __future__ import annotations

import argparse
import itertools
import sys


def cmd_verify(args: argparse.Namespace) -> int:
    from loom.platform import shards

    problems = shards.verify(args.url, deep=not args.quick)
    m = shards.read_manifest(args.url)
    tot = m["totals"]
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{len(problems)} problem(s) in {args.url}; rerun the render command to repair unfinished shards")
        return 1
    print(f"OK {tot['shards']} shards, {tot['samples']} samples, {tot['bytes'] / 1e6:.1f} MB, "
          f"{tot['failures']} failure row(s); checksums match the manifest")
    return 0


# sample kind (meta.json "kind") -> (reader module loom.datasets.<name>, contact sheet function, what the sheet's
# columns show)
KINDS = {
    "ttv": ("ttv", "contact_sheet", "rows: frames; columns: rgb, normal, position, depth, mask (+ albedo when present)"),
    "4d": ("shape4d", "contact_sheet_4d",
           "rows: frames; columns: video, aligned queries (colour = query index), surface points (colour = normal)"),
    "scene": ("scene", "contact_sheet_scene",
              "rows: frames; columns: rgb, edges (silhouette red, crease green, boundary blue, intersection yellow), "
              "forward flow, warped noise"),
    "clips": ("clips", "contact_sheet_clips",
              "rows: frames; columns: frame, depth (white = near), edges of depth, flow to the next frame (last row: "
              "last to first), warped noise (channel 0) of the latent frame covering the row's frame"),
}


def sample_kind(url: str) -> str:
    """The kind of the samples at ``url``: from the manifest, else from the first sample's meta.json."""
    import json

    from loom.platform import shards

    kind = shards.manifest_kind(url)
    if kind:
        return kind
    for shard in shards.shard_urls(url):
        for _, files in shards.iter_tar(shard):
            return json.loads(files["meta.json"]).get("kind", "ttv")
    raise FileNotFoundError(f"no samples at {url}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from PIL import Image

    from loom.datasets import inspect as insp
    from loom.datasets import clips, scene, shape4d, ttv
    from loom.platform import shards, storage

    try:
        m = shards.read_manifest(args.url)
        t = m["totals"]
        print(f"{args.url}: {m.get('kind')} corpus, {t['shards']} shards, {t['samples']} samples, "
              f"{t['bytes'] / 1e6:.1f} MB, {t['failures']} failures, complete={m['complete']}")
    except FileNotFoundError:
        pass
    kind = sample_kind(args.url)
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r} at {args.url}; known: {sorted(KINDS)}")
    mod_name, sheet_fn, columns = KINDS[kind]
    reader = {"ttv": ttv, "shape4d": shape4d, "scene": scene, "clips": clips}[mod_name]
    sample = next(itertools.islice(reader.iter_samples(args.url), args.index, None), None)
    if sample is None:
        print(f"no sample #{args.index} in {args.url}", file=sys.stderr)
        return 1
    print(f"sample {sample['__key__']} ({kind}) from {sample['__shard__']}:")
    print("\n".join(insp.describe_sample(sample)))
    sheet = args.sheet or (storage.join(args.url, f"inspect-{sample['__key__']}.png")
                           if not args.url.endswith(".tar") else f"inspect-{sample['__key__']}.png")
    with storage.atomic_writer(sheet) as w:
        Image.fromarray(getattr(insp, sheet_fn)(sample)).save(w, format="PNG")
    print(f"contact sheet ({columns}): {sheet}")
    return 0


def register(sub) -> None:
    g = sub.add_parser("shards", help="check and look at shards").add_subparsers(dest="scmd", metavar="CMD")
    v = g.add_parser("verify", help="check shards against the manifest (sizes, sha256, readable to the end)")
    v.add_argument("url", help="a Loom output folder")
    v.add_argument("--quick", action="store_true", help="sizes and checksums only, do not read tars through")
    v.set_defaults(func=cmd_verify)
    i = g.add_parser("inspect", help="print a sample's arrays and metadata and write a contact sheet PNG")
    i.add_argument("url", help="a Loom output folder, a folder of shards or one .tar")
    i.add_argument("--index", type=int, default=0, help="which sample (default 0)")
    i.add_argument("--sheet", help="where to write the contact sheet PNG (default: in the output folder)")
    i.set_defaults(func=cmd_inspect)
