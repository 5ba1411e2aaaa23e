"""The PyTorch loader over Loom shards: exactly once per epoch, the same order for any worker count, rank split
without hangs, exact mid-epoch resume, corrupt shards named or skipped-and-recorded, Ray Data."""

import io
import json
import uuid

import numpy as np
import pytest
import torch

from loom.datasets import loader as L
from loom.platform import shards, storage

torch.set_num_threads(1)

SIZES = (3, 5, 1, 7)  # uneven on purpose: 16 samples


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_corpus(out, sizes=SIZES, kind="toy", sample=None):
    """A Loom output folder with shards of ``sizes`` samples; toy samples carry their number in x.npy."""
    names, n = [], 0
    sample = sample or (lambda i: {"x.npy": _npy(np.array([i, i * 10], dtype=np.int64)),
                                   "z.npz": _zip(i), "meta.json": json.dumps({"kind": kind, "i": i}).encode()})
    for s, size in enumerate(sizes):
        name = shards.shard_name("toy", s)
        items = [(f"k{n + j:04d}", sample(n + j)) for j in range(size)]
        n += size
        sz, sha, keys = shards.write_tar(shards.shard_url(out, name), items)
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=sz, sha256=sha, keys=keys))
        names.append(name)
    shards.write_manifest(out, names, extra={"kind": kind})
    return [f"k{i:04d}" for i in range(n)]


def _zip(i):
    from loom.datasets.codecs import npz
    return npz(y=np.full((4,), i, dtype=np.float32))


@pytest.fixture
def corpus(tmp_path):
    out = str(tmp_path / "corpus")
    return out, make_corpus(out)


def run_epoch(out, nw=0, **kw):
    ld = L.LoomLoader(out, batch_size=kw.pop("batch_size", 3), num_workers=nw, **kw)
    return ld, [b for b in ld]


def keys_of(batches, with_pad=True):
    return [k for b in batches for k, p in zip(b["__key__"], b["__pad__"].tolist()) if with_pad or not p]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine, on purpose
@pytest.mark.parametrize("buffer", [None, 4])
def test_exactly_once_and_same_order_over_workers_and_ranks(corpus, buffer):
    out, keys = corpus
    per_world = {}
    for nw in (0, 1, 2, 4):
        ranks = []
        for r in range(2):
            ld, batches = run_epoch(out, nw, seed=7, rank=r, world_size=2, shuffle_buffer=buffer)
            assert len(batches) == len(ld) == 3  # 16 samples padded to 18 = 3 steps of 2 ranks x 3
            assert all(len(b["__key__"]) == 3 for b in batches)
            ranks.append([keys_of([b]) for b in batches])
        real = [k for rb in ranks for b in rb for k in b]
        # every sample exactly once among the non-padded ones; the pads repeat the start of the order
        got = keys_of([b for r in range(2) for b in run_epoch(out, nw, seed=7, rank=r, world_size=2,
                                                                 shuffle_buffer=buffer)[1]], with_pad=False)
        assert sorted(got) == keys and len(real) == 18
        per_world[nw] = ranks
    assert all(per_world[nw] == per_world[0] for nw in (1, 2, 4)), "order depends on the number of workers"
    # the ranks interleave global batches: rank r's step s is global batch 2s + r of the one-rank order
    one = [keys_of([b]) for b in run_epoch(out, 2, seed=7, rank=0, world_size=1, shuffle_buffer=buffer)[1]]
    assert [k for b in one for k in b][:16] == [k for s in range(3) for r in range(2) for k in per_world[0][r][s]][:16]
    # the order is shuffled, changes with the epoch and the seed, and is the same for the same (seed, epoch)
    o0 = keys_of(run_epoch(out, seed=7, world_size=1, rank=0, shuffle_buffer=buffer)[1])
    assert o0 != keys + keys[:2] and sorted(set(o0)) == keys
    assert L.epoch_order(list(SIZES), 7, 1, True, buffer).tolist() != L.epoch_order(list(SIZES), 7, 0, True,
                                                                                      buffer).tolist()
    assert L.epoch_order(list(SIZES), 8, 0, True, buffer).tolist() != L.epoch_order(list(SIZES), 7, 0, True,
                                                                                      buffer).tolist()


def test_uneven_ranks_get_equal_batches_and_drop_last(corpus):
    out, _ = corpus
    for ws in (3, 5):  # 16 samples: no world size divides them
        counts = [len(run_epoch(out, 0, batch_size=2, rank=r, world_size=ws)[1]) for r in range(ws)]
        assert len(set(counts)) == 1, f"ranks would wait for each other at the end of the epoch: {counts}"
    got = []
    for r in range(2):
        _, b = run_epoch(out, 0, rank=r, world_size=2, drop_last=True)
        assert len(b) == 2 and not any(x["__pad__"].any() for x in b)
        got += keys_of(b)
    assert len(got) == len(set(got)) == 12


def test_batches_are_tensors_and_collated(corpus):
    out, _ = corpus
    _, batches = run_epoch(out, 0, batch_size=4, shuffle=False, world_size=1, rank=0)
    b = batches[0]
    assert b["x"].dtype == torch.int64 and b["x"].shape == (4, 2)
    assert b["x"][:, 0].tolist() == [0, 1, 2, 3] and b["y"].shape == (4, 4)
    assert [m["i"] for m in b["meta"]] == [0, 1, 2, 3] and b["__key__"] == ["k0000", "k0001", "k0002", "k0003"]
    assert b["__index__"].tolist() == [0, 1, 2, 3]
    # .npy members read straight into the batch == the general decode path (forced by a transform)
    _, general = run_epoch(out, 0, batch_size=4, shuffle=False, world_size=1, rank=0, transform=lambda s, r: s)
    for x, y in zip(batches, general):
        assert x["__key__"] == y["__key__"] and torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_mid_epoch_gives_the_same_next_batches(corpus, nw):
    out, _ = corpus
    kw = {"batch_size": 2, "seed": 3, "rank": 1, "world_size": 2, "num_workers": nw}
    ref = L.LoomLoader(out, **kw)
    full = [keys_of([b]) for _ in range(2) for b in ref]  # two epochs, uninterrupted
    assert len(full) == 2 * len(ref) == 8
    for stop in (1, 3, 5):  # mid-epoch 0, mid-epoch 0 at an odd batch, mid-epoch 1
        a = L.LoomLoader(out, **kw)
        seen = []
        while len(seen) < stop:
            for b in a:
                seen.append(keys_of([b]))
                if len(seen) == stop:
                    break
        state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint file
        del a  # "crash"
        b_ = L.LoomLoader(out, **kw)
        b_.load_state_dict(state)
        rest = []
        while len(seen) + len(rest) < len(full):
            rest += [keys_of([b]) for b in b_]
        assert seen + rest == full, f"resume after {stop} batches differs"


def test_resume_refuses_a_different_setup(corpus):
    out, _ = corpus
    a = L.LoomLoader(out, batch_size=2, seed=1, world_size=1, rank=0)
    b = L.LoomLoader(out, batch_size=2, seed=2, world_size=1, rank=0)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def _truncate(out, name, keep):
    url = shards.shard_url(out, name)
    storage.write_bytes(url, storage.read_bytes(url)[:keep])


def test_truncated_shard_is_named_or_skipped_and_recorded(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    name = shards.shard_name("toy", 1)
    _truncate(out, name, 1536)  # cut inside the second sample (5 in this shard)
    with pytest.raises(shards.ShardError, match=name):
        L.LoomLoader(out, batch_size=2)
    ld = L.LoomLoader(out, batch_size=2, on_error="skip", world_size=1, rank=0)
    assert [s["shard"].endswith(name) for s in ld.skipped] == [True]
    got = keys_of(list(ld), with_pad=False)
    assert sorted(got) == keys[:3] + keys[8:]  # the other shards, each sample once


def test_truncated_at_a_header_boundary_without_manifest_is_caught(tmp_path):
    out = str(tmp_path / "c")
    make_corpus(out)
    storage.remove(storage.join(out, shards.MANIFEST))  # a bare folder of tars: no sizes or keys to compare with
    url = shards.shard_url(out, shards.shard_name("toy", 3))
    data = storage.read_bytes(url)
    members = L.scan_shard(url).members
    cut = members[4]["meta.json"][0] - 512  # exactly before a header: tarfile alone would see a clean end
    storage.write_bytes(url, data[:cut])
    with pytest.raises(shards.ShardError, match="toy-000003.tar.*end-of-archive"):
        L.scan_shard(url)


def test_corrupt_member_names_shard_and_key_or_is_skipped(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    name = shards.shard_name("toy", 3)
    url = shards.shard_url(out, name)
    ix = L.scan_shard(url)
    o, n = ix.members[2]["z.npz"]
    data = bytearray(storage.read_bytes(url))
    data[o + n // 2:o + n // 2 + 8] = b"\xff" * 8  # a bit-rot in the compressed payload: same size, same keys
    storage.write_bytes(url, bytes(data))
    bad = ix.keys[2]
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False)
    with pytest.raises(shards.ShardError, match=f"{name}.*{bad}"):
        list(ld)
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, on_error="skip", num_workers=2)
    batches = list(ld)
    assert [s["key"] for s in ld.skipped] == [bad] and name in ld.skipped[0]["shard"]
    got = keys_of(batches, with_pad=False)
    assert sorted(got) == [k for k in keys if k != bad]
    assert len(batches) == 4 and sum(len(b["__skipped__"]) for b in batches) == 1


def test_memory_filesystem_and_index_cache(tmp_path):
    out = f"memory://loom-loader-{uuid.uuid4().hex}"
    keys = make_corpus(out)
    ld = L.LoomLoader(out, batch_size=5, world_size=1, rank=0, read_threads=4)
    assert sorted(keys_of(list(ld), with_pad=False)) == keys
    assert storage.exists(storage.join(out, L.INDEX))
    cached, _, _ = L.build_index(out)
    assert [c.keys for c in cached] == [ix.keys for ix in ld.dataset.index]


def test_folder_of_tars_and_generic_kind(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out, sizes=(2, 2))
    storage.remove(storage.join(out, shards.MANIFEST))
    ld = L.LoomLoader(storage.join(out, "shards"), batch_size=2, world_size=1, rank=0)
    assert ld.dataset.kind == "toy" and sorted(keys_of(list(ld))) == keys


def test_ttv_samples_with_transform_reproducible_over_workers(tmp_path):
    from loom.datasets import transforms as T
    from loom.datasets import ttv

    rng = np.random.default_rng(0)

    def sample(i):
        t, h, w = 3, 8, 8
        K = np.tile(np.array([[10.0, 0, 4], [0, 10.0, 4], [0, 0, 1]], np.float32), (t, 1, 1))
        a = {"rgb": rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8),
             "normal": np.zeros((t, h, w, 3), np.float32), "position": np.zeros((t, h, w, 3), np.float32),
             "depth": np.full((t, h, w), float(i), np.float32), "mask": np.ones((t, h, w), bool),
             "K": K, "c2w": np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))}
        return ttv.encode_sample(a, {"kind": "ttv", "i": i})

    out = str(tmp_path / "ttv")
    keys = make_corpus(out, sizes=(2, 3), kind="ttv", sample=sample)
    tf = T.Compose(T.SubsampleFrames(2, mode="random"), T.CropResize((4, 4), scale=(0.5, 1.0)))
    runs = [list(L.LoomLoader(out, batch_size=2, world_size=1, rank=0, transform=tf, num_workers=nw, seed=5))
            for nw in (0, 2)]
    b = runs[0][0]
    assert b["rgb"].shape == (2, 2, 4, 4, 3) and b["rgb"].dtype == torch.uint8
    assert b["K"].shape == (2, 2, 3, 3) and b["mask"].dtype == torch.bool and b["depth"].dtype == torch.float32
    assert b["frame_indices"].shape == (2, 2)
    for x, y in zip(*runs):
        assert x["__key__"] == y["__key__"] and torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["K"], y["K"])
    assert sorted(keys_of(runs[0], with_pad=False)) == keys


@pytest.mark.integration
def test_ray_dataset_reads_every_sample(tmp_path, ray_local):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    ds = L.ray_dataset(out)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == keys
    r = next(r for r in rows if r["__key__"] == "k0005")
    assert np.asarray(r["x"]).tolist() == [5, 50] and json.loads(r["meta"])["i"] == 5
