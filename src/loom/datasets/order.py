"""The order in which the loader hands out samples: pure integer math on sample ids, no data read.

Every rank and worker computes the same epoch order from (seed, epoch, samples per shard) alone, whatever their
number, so the order can be cut by rank, by worker and by resume position without any of them talking to another
(design notes 2, 3 and 5 of :mod:`loom.datasets.loader`).

- :func:`epoch_order`: the epoch's global order of sample ids (positions in the concatenation of the shards).
- :func:`rank_batches`: one rank's batches of that order, padded or cut so every rank gets as many.
- :func:`epoch_batches`: how many batches that is.
- :func:`resume_point`: where a loader resumes from a saved state, possibly of another world or batch size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# the fields of a loader state that fix the epoch order: a state that differs in one cannot be resumed exactly
ORDER_FIELDS = ("seed", "num_samples", "shuffle", "shuffle_buffer", "drop_last")


def shard_offsets(counts: list[int]) -> np.ndarray:
    """(len(counts) + 1,) int64: the global id of each shard's first sample, then the total."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def epoch_order(counts: list[int], seed: int, epoch: int, shuffle: bool = True,
                shuffle_buffer: int | None = None) -> np.ndarray:
    """Global sample ids (positions in the concatenation of the shards, in index order) for one epoch: a pure
    function of its arguments. ``shuffle_buffer=None`` is a full permutation; an int N applies a literal
    shuffle buffer of N samples to the stream of the seed-permuted shards."""
    offsets = shard_offsets(counts)
    n = int(offsets[-1])
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, 0x10AD])
    if shuffle_buffer is None:
        return rng.permutation(n).astype(np.int64)
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer}: use None (full permutation) or a size >= 1")
    perm = rng.permutation(len(counts))
    stream = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm] or [np.zeros(0, np.int64)])
    out = np.empty(n, dtype=np.int64)
    buf = list(stream[:shuffle_buffer])
    picks = rng.random(n)
    o = 0
    for x in stream[shuffle_buffer:]:
        j = int(picks[o] * len(buf))
        out[o] = buf[j]
        buf[j] = x
        o += 1
    tail = rng.permutation(len(buf))
    out[o:] = np.asarray(buf, dtype=np.int64)[tail] if buf else []
    return out


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int,
                 drop_last: bool = False, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, pad) of shape (num_batches, batch_size) for ``rank``: global batch g goes to rank g % world_size;
    the order is padded by repeating its start (pad=True) or cut (drop_last) to a multiple of
    world_size * batch_size, so all ranks get the same number of full batches.

    ``start``: the first ``start`` samples of the order were consumed already (a run with another world or batch
    size, resumed): the rest of the order is cut into global batches from there and padded or cut the same way."""
    n, block = len(order), batch_size * world_size
    if n == 0:
        raise ValueError("no samples to load")
    start = min(max(int(start), 0), n)
    rest = n - start
    if drop_last:
        used = rest // block * block
        ids, pad = order[start:start + used], np.zeros(used, bool)
    else:
        used = -(-rest // block) * block
        # repeats of the epoch's first samples (wrapping if the order is tiny), whatever ``start``: a resume at any
        # point of the same run pads with the same samples
        reps = np.resize(order, used - rest)
        ids = np.concatenate([order[start:], reps])
        pad = np.concatenate([np.zeros(rest, bool), np.ones(used - rest, bool)])
    ids = ids.reshape(-1, world_size, batch_size)[:, rank]
    pad = pad.reshape(-1, world_size, batch_size)[:, rank]
    return ids, pad


def epoch_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool = False,
                  start: int = 0) -> int:
    """Batches per rank in an epoch whose first ``start`` samples were consumed already (see :func:`rank_batches`)."""
    rest, block = num_samples - min(max(int(start), 0), num_samples), batch_size * world_size
    return rest // block if drop_last else -(-rest // block)


def samples_consumed(offset: int, batch: int, world_size: int, batch_size: int) -> int:
    """Position in the epoch's global order after ``batch`` batches per rank that started at sample ``offset``."""
    return offset + batch * world_size * batch_size


def resume_point(state: dict[str, Any], mine: dict[str, Any]) -> tuple[int, int, int]:
    """(epoch, batch, offset) at which a loader whose own state is ``mine`` resumes from the saved ``state``:
    its next batch is batch ``batch`` of the epoch's batches cut after the first ``offset`` samples.

    With the same world and batch size this is the saved run's next batch. With others: on a boundary of the new
    global batches, the batches are the new world's own (``offset`` 0); elsewhere the rest of the epoch is cut into
    new global batches from the saved position. States without ``samples`` (older ones) derive it from ``batch``,
    ``world_size`` and ``batch_size``. Raises ValueError, naming the field, for a state of another order (one of
    :data:`ORDER_FIELDS` differs) or a position outside the epoch."""
    for k in ORDER_FIELDS:
        if k in state and state[k] != mine[k]:
            raise ValueError(f"loader state has {k}={state[k]!r} but this loader has {mine[k]!r}: the order "
                             "would differ, so resuming would not be exact (build the loader with the same "
                             "arguments and shards)")
    n, drop_last = mine["num_samples"], mine["drop_last"]
    old_block = state.get("world_size", mine["world_size"]) * state.get("batch_size", mine["batch_size"])
    pos = state.get("samples", state["batch"] * old_block)
    limit = n if drop_last else n + old_block - 1  # past n: padding consumed
    if not (isinstance(pos, (int, np.integer)) and 0 <= pos <= limit and 0 <= state["batch"]):
        raise ValueError(f"loader state samples={pos} (batch={state['batch']}) is outside this epoch's "
                         f"0..{limit} samples: not a state of this corpus")
    pos, block = min(int(pos), n), mine["world_size"] * mine["batch_size"]  # past n: only padding was left
    batch, offset = (pos // block, 0) if pos % block == 0 else (0, pos)
    return int(state["epoch"]), batch, offset


__all__ = ["ORDER_FIELDS", "epoch_batches", "epoch_order", "rank_batches", "resume_point", "samples_consumed",
           "shard_offsets"]
