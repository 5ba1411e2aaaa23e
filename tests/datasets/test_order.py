"""The loader's order math alone (no shards read): closed forms for the epoch order, the rank split and the resume
point. The same properties end to end, through LoomLoader and DataLoader workers: test_loader.py."""

import numpy as np
import pytest

from loom.datasets.order import (epoch_batches, epoch_order, rank_batches, resume_point, samples_consumed,
                                 shard_offsets)

COUNTS = [3, 5, 1, 7]  # 16 samples


def test_epoch_order_is_a_seeded_permutation():
    assert epoch_order(COUNTS, 0, 0, shuffle=False).tolist() == list(range(16))
    a = epoch_order(COUNTS, 7, 0)
    assert sorted(a.tolist()) == list(range(16)) and a.tolist() != list(range(16))
    assert a.tolist() == epoch_order(COUNTS, 7, 0).tolist()  # pure
    assert a.tolist() != epoch_order(COUNTS, 7, 1).tolist() != epoch_order(COUNTS, 8, 0).tolist()


def test_a_shuffle_buffer_of_one_reads_whole_shards_in_a_seeded_shard_order():
    """With a buffer of one sample nothing is mixed: the order is the shards, permuted, each in its own order."""
    offsets = shard_offsets(COUNTS)
    assert offsets.tolist() == [0, 3, 8, 9, 16]
    order = epoch_order(COUNTS, 3, 0, shuffle_buffer=1).tolist()
    runs, p = [], 0
    while p < len(order):
        s = int(np.searchsorted(offsets, order[p], side="right")) - 1
        runs.append(s)
        assert order[p:p + COUNTS[s]] == list(range(offsets[s], offsets[s + 1]))
        p += COUNTS[s]
    assert sorted(runs) == [0, 1, 2, 3]
    # a buffer as large as the corpus mixes samples across shards
    big = epoch_order(COUNTS, 3, 0, shuffle_buffer=16).tolist()
    assert sorted(big) == list(range(16)) and big != order
    with pytest.raises(ValueError, match="shuffle_buffer=0"):
        epoch_order(COUNTS, 3, 0, shuffle_buffer=0)


def test_global_batches_go_to_ranks_in_turn_and_pad_with_the_epoch_start():
    order = np.arange(10, 20)  # 10 samples, 2 ranks x batch 2: blocks of 4 -> padded to 12
    r0, p0 = rank_batches(order, 2, 0, 2)
    r1, p1 = rank_batches(order, 2, 1, 2)
    assert r0.tolist() == [[10, 11], [14, 15], [18, 19]] and r1.tolist() == [[12, 13], [16, 17], [10, 11]]
    assert not p0.any() and p1.tolist() == [[False, False], [False, False], [True, True]]
    assert epoch_batches(10, 2, 2) == len(r0) == 3
    d0, dp = rank_batches(order, 2, 0, 2, drop_last=True)
    assert d0.tolist() == [[10, 11], [14, 15]] and not dp.any() and epoch_batches(10, 2, 2, drop_last=True) == 2
    # resumed after 6 samples: the rest (4) cut into blocks from there, padded with the epoch's first samples
    s0, _ = rank_batches(order, 2, 0, 2, start=6)
    s1, sp1 = rank_batches(order, 2, 1, 2, start=6)
    assert s0.tolist() == [[16, 17]] and s1.tolist() == [[18, 19]] and not sp1.any()
    assert epoch_batches(10, 2, 2, start=6) == 1
    with pytest.raises(ValueError, match="no samples"):
        rank_batches(np.arange(0), 2, 0, 1)


def _state(**kw):
    base = {"seed": 1, "epoch": 2, "batch": 3, "batch_size": 2, "world_size": 2, "rank": 0, "num_samples": 16,
            "shuffle": True, "shuffle_buffer": None, "drop_last": False}
    base.update(kw)
    base.setdefault("samples", samples_consumed(0, base["batch"], base["world_size"], base["batch_size"]))
    return base


def test_resume_point_keeps_or_recuts_the_global_order():
    saved = _state()  # 3 batches of 2 ranks x 2: 12 samples consumed
    assert saved["samples"] == 12
    assert resume_point(saved, _state(batch=0)) == (2, 3, 0)  # same world: the next batch of the same run
    assert resume_point(saved, _state(batch=0, world_size=3)) == (2, 2, 0)  # 12 = 2 blocks of 6: a boundary
    assert resume_point(saved, _state(batch=0, world_size=1, batch_size=5)) == (2, 0, 12)  # mid-block: recut
    old = {k: v for k, v in saved.items() if k != "samples"}  # states from before the field: batch x block
    assert resume_point(old, _state(batch=0, world_size=4)) == (2, 0, 12)  # 12 of blocks of 8: recut
    assert resume_point(old, _state(batch=0, world_size=1)) == (2, 6, 0)


def test_resume_point_refuses_another_order_or_position_naming_the_field():
    for field, value in (("seed", 2), ("num_samples", 15), ("shuffle", False), ("shuffle_buffer", 4),
                         ("drop_last", True)):
        with pytest.raises(ValueError, match=field):
            resume_point(_state(**{field: value}), _state())
    with pytest.raises(ValueError, match="samples=99"):
        resume_point(_state(samples=99), _state())
    with pytest.raises(ValueError, match="samples=17"):  # past the corpus with drop_last: nothing was padded
        resume_point(_state(samples=17, drop_last=True), _state(drop_last=True))
