"""The sample order of a stream as a pure function of (seed, epoch, shard counts, rank, world size).

Nothing here reads data: the order of an epoch is recomputed from the manifest's counts, so resuming means
recomputing it and starting at the saved batch, and every DataLoader worker can compute any batch on its own.

Exact mode: the shard list is permuted with (seed, epoch), identically on every rank; the samples of the permuted
shards, concatenated, are cut into ``world_size`` contiguous ranges of ``total // world_size`` samples, so each rank
reads a run of consecutive shards (a shard at a boundary is shared by two neighbouring ranks; with fewer shards than
ranks the ranges simply lie inside shards). Each rank's range passes through a seeded shuffle buffer and is cut
into ``batches_per_epoch`` batches; the remainder (< batch_size per rank, < world_size overall) is dropped, and it
is a different remainder every epoch. Resampled mode: each rank draws shards with replacement, seeded by (seed,
epoch, rank), until it has ``total // world_size`` samples, then the same buffer and batching; shards marked
unavailable (missing on disk) are never drawn, and the samples per rank stay ``total // world_size``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

MASK64 = (1 << 64) - 1
_TAG_SHARDS, _TAG_BUFFER, _TAG_RESAMPLE, _TAG_FLIP, _TAG_NOISE = 1, 2, 3, 4, 5


def mix64(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers (splitmix64 chained): seeds derived from (seed, epoch, ...)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 31
    return h


def mix64_array(key: int, values: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 of ``key ^ values`` (uint64 array)."""
    z = np.asarray(values).astype(np.uint64) ^ np.uint64(key)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def flip_bits(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """Whether each sample (global id) is flipped in ``epoch``: a pure function of (seed, epoch, sample id)."""
    return (mix64_array(mix64(seed, epoch, _TAG_FLIP), sample_ids) >> np.uint64(63)).astype(bool)


def noise_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """Seed of the latent posterior noise of batch ``batch`` of ``epoch`` on ``rank`` (63 bits)."""
    return mix64(seed, epoch, rank, batch, _TAG_NOISE) >> 1


def batches_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: ``(total // world_size) // batch_size``."""
    return (total // world_size) // batch_size


def buffer_shuffle(seq: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Stream ``seq`` through a shuffle buffer of ``size`` items (webdataset semantics: emit a random buffered item,
    replace it with the next input; drain the buffer in random order at the end)."""
    n = len(seq)
    if size <= 1 or n <= 1:
        return seq.copy()
    size = min(size, n)
    items = seq.tolist()
    buf = items[:size]
    picks = rng.integers(0, size, size=n - size).tolist()
    out = []
    append = out.append
    for k, item in enumerate(items[size:]):
        j = picks[k]
        append(buf[j])
        buf[j] = item
    tail = rng.permutation(len(buf)).tolist()
    out.extend(buf[j] for j in tail)
    return np.asarray(out, dtype=seq.dtype)


def _concat_shards(offsets: np.ndarray, counts: np.ndarray, shards: np.ndarray) -> np.ndarray:
    lens = counts[shards]
    starts = offsets[shards]
    idx = np.arange(int(lens.sum()), dtype=np.int64)
    shard_start_in_seq = np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(starts, lens) + (idx - shard_start_in_seq)


def rank_sequence(counts: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int,
                  mode: str = "exact", available: Optional[np.ndarray] = None) -> np.ndarray:
    """Global sample ids this rank reads in ``epoch``, in shard order (before the shuffle buffer).

    ``available`` (resampled mode): a bool per shard, False for shards never to draw (None: all may be drawn).
    """
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    total = int(counts.sum())
    per = total // world_size
    if mode == "exact":
        perm = np.random.default_rng([seed, epoch, _TAG_SHARDS]).permutation(len(counts))
        ends = np.cumsum(counts[perm])
        starts = ends - counts[perm]
        lo, hi = rank * per, (rank + 1) * per
        mine = (ends > lo) & (starts < hi)  # only this rank's shards are expanded into sample ids
        if per == 0 or not mine.any():
            return np.zeros(0, dtype=np.int64)
        seq = _concat_shards(offsets, counts, perm[mine])
        first = int(starts[mine][0])
        return seq[lo - first:hi - first]
    if mode == "resampled":
        rng = np.random.default_rng([seed, epoch, rank, _TAG_RESAMPLE])
        drawable = counts > 0 if available is None else (counts > 0) & np.asarray(available, dtype=bool)
        nonempty = np.flatnonzero(drawable)
        if per > 0 and len(nonempty) == 0:
            raise ValueError("no shard is available to draw from")
        chosen, got = [], 0
        while got < per:
            draw = nonempty[rng.integers(0, len(nonempty), size=max(1, len(nonempty)))]
            for s in draw:
                chosen.append(s)
                got += counts[s]
                if got >= per:
                    break
        return _concat_shards(offsets, counts, np.asarray(chosen, dtype=np.int64))[:per]
    raise ValueError(f"unknown mode {mode!r} (exact or resampled)")


def epoch_order(counts: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                shuffle_buffer: int, mode: str = "exact", available: Optional[np.ndarray] = None) -> np.ndarray:
    """Global sample ids of this rank's ``batches_per_epoch * batch_size`` samples of ``epoch``, in batch order
    (``available``: see :func:`rank_sequence`)."""
    seq = rank_sequence(counts, seed=seed, epoch=epoch, rank=rank, world_size=world_size, mode=mode,
                        available=available)
    rng = np.random.default_rng([seed, epoch, rank, _TAG_BUFFER])
    seq = buffer_shuffle(seq, shuffle_buffer, rng)
    n = batches_per_epoch(int(np.sum(counts)), world_size, batch_size) * batch_size
    return seq[:n]
