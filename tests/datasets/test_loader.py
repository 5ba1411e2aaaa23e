"""The PyTorch loader over Loom shards: exactly once per epoch, the same order for any worker count, rank split
without hangs, exact mid-epoch resume, prefetching, Ray Data. (The reading engine: test_io.py; the order math
alone: test_order.py.)"""

import json

import numpy as np
import pytest
import torch

from loom.datasets import io as dio
from loom.datasets import loader as L
from loom.platform import shards, storage
from tests.datasets.toy_corpus import SIZES, consume, keys_of, make_corpus, run_epoch


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
    for x, y in zip(batches, general, strict=True):
        assert x["__key__"] == y["__key__"] and torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_forked_workers_after_reading_in_the_main_process(corpus):
    out, _ = corpus
    ld = L.LoomLoader(out, batch_size=3, seed=2, world_size=1, rank=0)
    ref = [keys_of([b]) for b in ld]  # the main process made its reading state (batch memory, scratch)
    ld.num_workers = 2  # forked workers inherit that state without pickling: they must make their own
    ld.set_epoch(0)
    assert [keys_of([b]) for b in ld] == ref


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


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("k", [1, 2])
def test_resume_with_another_world_or_batch_size_sees_each_sample_once(corpus, k):
    out, keys = corpus  # 16 samples
    seen, states = [], []
    for r in range(2):  # 2 ranks x batches of 2: each step consumes a block of 4 samples of the global order
        got, st = consume(L.LoomLoader(out, batch_size=2, seed=4, rank=r, world_size=2), k)
        assert not any(b["__pad__"].any() for b in got)
        seen += keys_of(got)
        states.append(st)
    assert states[0]["samples"] == states[1]["samples"] == 4 * k
    order = L.epoch_order(list(SIZES), 4, 0).tolist()
    # (world, batch, workers): 1 rank on a block boundary; 4 ranks mid-block for k=1; 3 ranks never on one, with a
    # remainder to pad (3 x 3) or not (3 x 2); another batch size
    for ws, bs, nw in ((1, 2, 0), (4, 2, 0), (3, 3, 2), (3, 2, 0)):
        runs = []
        for r in range(ws):
            ld = L.LoomLoader(out, batch_size=bs, seed=4, rank=r, world_size=ws, num_workers=nw)
            ld.load_state_dict(states[r % 2])  # every rank of the old run holds the same position
            runs.append(list(ld))
            assert ld.epoch == 1 and ld.batch == 0, "the resumed epoch did not run to its end"
        assert len({len(b) for b in runs}) == 1, f"ranks would wait for each other: {[len(b) for b in runs]}"
        assert all(len(b["__key__"]) == bs for rb in runs for b in rb)
        rest = [b for rb in runs for b in rb]
        assert sorted(seen + keys_of(rest, with_pad=False)) == keys, f"world {ws} x batch {bs}: not exactly once"
        # the new run continues the same global order: its samples are those after the 4k consumed ones
        got_ids = {i for b in rest for i, p in zip(b["__index__"].tolist(), b["__pad__"].tolist(), strict=True)
                   if not p}
        assert got_ids == set(order[4 * k:])
    # after the resumed epoch, the next one is the new world's own epoch
    ld = L.LoomLoader(out, batch_size=3, seed=4, rank=1, world_size=3)
    ld.load_state_dict(states[1])
    list(ld)
    ref = L.LoomLoader(out, batch_size=3, seed=4, rank=1, world_size=3)
    ref.set_epoch(1)
    assert keys_of(list(ld)) == keys_of(list(ref))


def test_resume_after_a_remapped_resume_is_exact(corpus):
    out, _ = corpus
    _, state = consume(L.LoomLoader(out, batch_size=2, seed=4, rank=0, world_size=2), 1)  # 4 samples consumed
    kw = {"batch_size": 2, "seed": 4, "rank": 3, "world_size": 4}  # blocks of 8: resumed mid-block
    a = L.LoomLoader(out, **kw)
    a.load_state_dict(state)
    first, state2 = consume(a, 1)
    assert state2["samples"] == 12
    rest_a = [keys_of([b]) + b["__pad__"].tolist() for b in a]  # the uninterrupted run, padding included
    b_ = L.LoomLoader(out, **kw)
    b_.load_state_dict(state2)
    rest_b = [keys_of([b]) + b["__pad__"].tolist() for b in b_]
    assert rest_b == rest_a and len(rest_a) == 1 and any(rest_a[0][2:])  # the last batch holds padding


def test_old_states_without_a_sample_position_still_resume(corpus):
    out, keys = corpus
    kw = {"batch_size": 2, "seed": 5, "rank": 0, "world_size": 2}
    ref = [keys_of([b]) for b in L.LoomLoader(out, **kw)]
    _, state = consume(L.LoomLoader(out, **kw), 2)
    del state["samples"]  # a state saved before the field existed
    b = L.LoomLoader(out, **kw)
    b.load_state_dict(state)
    assert [keys_of([x]) for x in b] == ref[2:]
    one = L.LoomLoader(out, batch_size=2, seed=5, rank=0, world_size=1)  # derived: batch * world * batch size
    one.load_state_dict(state)
    seen = [k for r in range(2) for x in consume(L.LoomLoader(out, **{**kw, "rank": r}), 2)[0] for k in keys_of([x])]
    assert sorted(seen + keys_of(list(one), with_pad=False)) == keys


def test_resume_with_drop_last_and_another_world_never_repeats(corpus):
    out, _ = corpus
    seen = []
    for r in range(2):
        got, state = consume(L.LoomLoader(out, batch_size=2, seed=6, rank=r, world_size=2, drop_last=True), 1)
        seen += keys_of(got)
    for r in range(4):
        ld = L.LoomLoader(out, batch_size=2, seed=6, rank=r, world_size=4, drop_last=True)
        ld.load_state_dict(state)
        got = list(ld)
        assert len(got) == 1 and not any(b["__pad__"].any() for b in got)  # 12 left: one block of 8, 4 cut
        seen += keys_of(got)
    assert len(seen) == len(set(seen)) == 12


def test_resume_refuses_a_different_setup(corpus, tmp_path):
    out, _ = corpus
    a = L.LoomLoader(out, batch_size=2, seed=1, world_size=1, rank=0)
    for kw, field in (({"seed": 2}, "seed"), ({"shuffle_buffer": 4}, "shuffle_buffer"), ({"drop_last": True},
                                                                                          "drop_last")):
        b = L.LoomLoader(out, batch_size=2, world_size=1, rank=0, **{"seed": 1, **kw})
        with pytest.raises(ValueError, match=field):
            b.load_state_dict(a.state_dict())
    other = str(tmp_path / "other")
    make_corpus(other, sizes=(3, 5))
    with pytest.raises(ValueError, match="num_samples"):
        L.LoomLoader(other, batch_size=2, seed=1, world_size=1, rank=0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="samples=99"):
        L.LoomLoader(out, batch_size=2, seed=1, world_size=1, rank=0).load_state_dict({**a.state_dict(), "samples": 99})


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
    for x, y in zip(*runs, strict=True):
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


@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_prefetched_batches_and_states_equal_those_made_on_demand(corpus, prefetch):
    out, _ = corpus
    kw = {"batch_size": 2, "seed": 5, "rank": 0, "world_size": 1}
    want = [keys_of([b]) for b in L.LoomLoader(out, prefetch=0, **kw)]
    ld = L.LoomLoader(out, prefetch=prefetch, **kw)
    got, states = [], []
    for b in ld:
        got.append(keys_of([b]))
        states.append(ld.state_dict()["samples"])
    assert got == want and states == [2 * (i + 1) for i in range(len(want))]
    # stopping early: the batches made ahead are not consumed; resuming continues right after the last one yielded
    a = L.LoomLoader(out, prefetch=prefetch, **kw)
    first, state = consume(a, 2)
    b = L.LoomLoader(out, prefetch=prefetch, **kw)
    b.load_state_dict(state)
    assert [keys_of([x]) for x in first] + [keys_of([x]) for x in b] == want


def test_prefetch_thread_raises_the_shard_error_after_the_good_batches_and_stops(tmp_path):
    import threading

    out = str(tmp_path / "c")
    make_corpus(out)
    name = shards.shard_name("toy", 3)
    url = shards.shard_url(out, name)
    ix = dio.scan_shard(url)
    o, n = ix.members[2]["z.npz"]
    data = bytearray(storage.read_bytes(url))
    data[o + n // 2:o + n // 2 + 8] = b"\xff" * 8
    storage.write_bytes(url, bytes(data))
    want = []
    with pytest.raises(shards.ShardError):
        for b in L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False, prefetch=0):
            want.append(keys_of([b]))
    got = []
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False, prefetch=3)
    with pytest.raises(shards.ShardError, match=f"{name}.*{ix.keys[2]}"):
        for b in ld:
            got.append(keys_of([b]))
    assert got == want and ld.state_dict()["batch"] == len(want)  # every good batch before the error, in order
    assert not [t for t in threading.enumerate() if t.name == "loom-prefetch"]  # the thread ended

    it = iter(L.LoomLoader(out, batch_size=1, world_size=1, rank=0, shuffle=False, prefetch=2))
    next(it)
    it.close()  # a consumer that stops early ends the thread too
    assert not [t for t in threading.enumerate() if t.name == "loom-prefetch"]
    with pytest.raises(ValueError, match="prefetch"):
        L.LoomLoader(out, batch_size=1, prefetch=-1)


def test_workers_on_latent_shards_get_a_warning_that_says_what_is_faster(tmp_path, caplog):
    import logging

    out = str(tmp_path / "lat")
    keys = make_corpus(out)  # generic samples: read straight into the batch
    with caplog.at_level(logging.WARNING, logger=L.log.name):
        L.LoomLoader(out, batch_size=2, num_workers=2)
    assert "num_workers=0 with prefetch=2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=L.log.name):
        L.LoomLoader(out, batch_size=2, num_workers=0, prefetch=2)
    assert caplog.text == "" and keys
