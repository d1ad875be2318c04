"""The training stream: shards → decoded, flipped, normalised batches, per rank and per DataLoader worker, resumable.

``build_stream(spec, batch_size=..., rank=..., world_size=..., num_workers=..., seed=...)`` returns a
:class:`ShardStream`. Iterating it yields ``(x, y)`` forever, epoch after epoch:

* x float32 ``[B, C, H, W]``: images scaled to [-1, 1], or latents ``(z - shift) * scale`` with the manifest's
  shift/scale, where z is a fresh posterior sample ``mean + std * eps`` (``stored == "mean_std"``) or the stored
  sample; y int64 ``[B]`` (zeros when unconditional).
* ``with_images=True`` (latent shards written with ``encode_latents.py --keep-images``): ``(x, y, images)``, images
  uint8 ``[B, C, H, W]``, each the latent's source image, flipped exactly when its flipped twin is handed out (a
  corrupt sample's replacement brings its own image). The batches, their order and ``position()`` are those of
  the same stream without images.
* The batch sequence is a pure function of (seed, manifest counts, rank, world size, batch size, mode, shuffle
  buffer), see :mod:`data_pipeline.order`: flips are a function of (seed, epoch, sample id), latent noise of
  (seed, epoch, rank, batch). Workers split a rank's batches round-robin (worker w makes batches w, w+W, ...), which
  is the order in which the DataLoader returns them, so the stream is identical for any ``num_workers`` and
  ``position()`` (the number of batches consumed) continues it exactly.
* Every rank yields ``batches_per_epoch`` batches per epoch. Fewer shards than ranks × workers needs no fallback:
  ranks split samples, not shards, and workers split batches.
* A corrupt sample (an unreadable member, non-finite latents) is replaced by a readable sample of the same batch
  (if none, by the next readable sample of the epoch order) and counted in ``corrupt_count`` (the first one of a
  shard is logged with its reason, and the number per epoch when the epoch ends); a stream with no readable sample
  at all raises :class:`NoReadableSamplesError` naming the shards.
* Shards that do not match the manifest: in exact mode a :class:`ShardError` (a ManifestError: one line naming the
  file). ``build_stream`` finds shards missing on disk from one directory listing (every rank, the same answer) and
  files of the wrong size with one ``stat`` per shard this rank reads in its first epoch; a tar that holds fewer
  (or more) samples than the manifest says, or ends early, raises when it is first read. In resampled mode such a
  shard is skipped instead, loudly: a missing one is never drawn, a short one serves the samples it has (the rest
  count as corrupt); each is logged once (a warning naming it) and listed in ``bad_shards``.
* An error raised in a DataLoader worker (``NoReadableSamplesError``, ``ShardError``) reaches the training process
  as itself (type, one-line message, attributes), the workers stopped.

Remote specs (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``; :mod:`data_pipeline.remote`): exact mode downloads
each shard on first use into a local cache (verified against the manifest, LRU-bounded; :mod:`.shard_cache`) and
reads it as above, so everything above holds, bit for bit the stream of the same shards on local disk; resampled
mode streams the shards (:mod:`.streaming`; its draws depend on the number of workers, and a resume continues the
batch count with fresh draws). A shard that cannot be downloaded after the retries is skipped and counted (exact
mode: its samples replaced, as corrupt ones; resampled: another shard drawn), listed in ``bad_shards`` with its
redacted URL; shards that keep failing stop the stream with a :class:`RemoteShardError` (a ShardError).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import order as order_mod
from .decoders import NoReadableSamplesError, make_decoder, replace_corrupt
from .locations import is_remote
from .manifest import ManifestError, ShardError, file_problem, load_spec, missing_files, name_list
from .remote import (FetchError, RemoteOptions, RemoteShardError, parse_remote_spec, read_manifest, redact)
from .shard_cache import ShardCache
from .streaming import StreamingMaker
from .tario import ShardReader

__all__ = ["ManifestError", "NoReadableSamplesError", "RemoteShardError", "STREAM_ERRORS", "ShardError",
           "ShardStream", "build_stream"]

log = logging.getLogger(__name__)

POSITION_VERSION = 1
_MAX_SHARD_WARNINGS = 20  # per process: a wholly corrupt data set of 10,000 shards must not log 10,000 lines
_POSITION_KEYS = ("seed", "world_size", "batch_size", "mode", "total", "shuffle_buffer", "flip")


# What iterating a stream can raise about the data, on one rank only (the others may be fine): a trainer carries it
# to every rank. Raised in a DataLoader worker, they reach the training process as themselves.
STREAM_ERRORS = (NoReadableSamplesError, ShardError)


class _WorkerError:
    """A data error of a DataLoader worker, sent to the training process as an item (not raised in the worker, which
    the DataLoader would turn into a multi-line traceback message) and raised there unchanged."""

    def __init__(self, error: BaseException):
        self.error = error


# ------------------------------------------------------------------------------------------------ batches
class BatchMaker:
    """Makes batch number ``g`` of the stream (counted over all epochs) from scratch: any process, any order."""

    def __init__(self, manifest: Dict[str, Any], paths: List[str], *, seed: int, rank: int, world_size: int,
                 batch_size: int, mode: str, shuffle_buffer: int, flip: bool,
                 available: Optional[np.ndarray] = None, cache: Optional[ShardCache] = None,
                 with_images: bool = False):
        self.manifest = manifest
        self.paths = paths
        self.cache = cache  # remote shards (exact mode): fetched into this local cache on first use
        self.counts = np.array([s["num_samples"] for s in manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.mode, self.shuffle_buffer, self.flip = batch_size, mode, shuffle_buffer, flip
        self.batches_per_epoch = order_mod.batches_per_epoch(self.total, world_size, batch_size)
        self.available = available  # resampled mode: False for shards never drawn (missing on disk)
        # a cache evicts files that readers may still hold open: fewer open descriptors bound the space they keep
        self.reader = ShardReader(paths, expected=self.counts.tolist(), max_open=64 if cache is None else 8,
                                  fetch=None if cache is None else cache.fetch)
        self.decoder = make_decoder(manifest, with_images)
        self._cached_epoch: Optional[int] = None
        self._cached_order: Optional[np.ndarray] = None
        self._warned: set = set()
        self._bad: Dict[int, str] = {}  # resampled mode: shards found short or damaged by this process
        self._new_bad: List[Tuple[str, str]] = []  # ... and not yet reported with a batch
        self._fetch_noted: set = set()  # remote shards whose failed download this process reported

    def order(self, epoch: int) -> np.ndarray:
        """Global sample ids of this rank's epoch, in batch order (cached for the current epoch)."""
        if self._cached_epoch != epoch:
            self._cached_order = order_mod.epoch_order(
                self.counts, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer, mode=self.mode,
                available=self.available)
            self._cached_epoch = epoch
        return self._cached_order

    def prepare(self, epoch: int) -> None:
        """Compute the epoch order and index the shards it reads (up to the index cache size), so DataLoader
        workers forked afterwards inherit them instead of each repeating the work."""
        shards = self._locate(self.order(epoch))[0]
        _, first = np.unique(shards, return_index=True)
        for shard in shards[np.sort(first)][:self.reader.max_indexed].tolist():  # in the order they are read
            if self.cache is None or self.cache.present(shard):  # downloads are left to the workers
                self.reader.index(shard)

    def _locate(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def _shard_problem(self, shard: int, problem: str) -> None:
        """A shard that does not match the manifest: ShardError in exact mode; in resampled mode noted once (its
        unreadable samples are then counted as corrupt without a warning each)."""
        if self.mode == "exact":
            raise ShardError(f"{self.paths[shard]}: {problem}; restore the file or remake the shards",
                             [os.path.basename(self.paths[shard])])
        if shard not in self._bad:
            self._bad[shard] = problem
            self._warned.add(shard)
            self._new_bad.append((os.path.basename(self.paths[shard]), problem))

    def _read_one(self, gid: int, shard: int, idx: int, flip: bool, out: np.ndarray, i: int) -> Optional[int]:
        """Decode one sample into ``out[i]``; its label, or None if it is corrupt (logged)."""
        try:
            index = self.reader.index(shard)
            if index.problem is not None:
                self._shard_problem(shard, index.problem)
            if idx >= len(index.samples):
                raise ValueError("missing from the tar (truncated or damaged shard)")
            members = index.samples[idx]
            label = self.decoder.label(self.reader, members, shard)
            self.decoder.read(self.reader, shard, members, flip, out, i)
            return label
        except ShardError:
            raise
        except FetchError as err:  # a remote shard that could not be downloaded: its samples count as corrupt
            if shard not in self._fetch_noted:
                self._fetch_noted.add(shard)
                self._new_bad.append((os.path.basename(self.paths[shard]), f"download failed ({err})"))
            return None
        except Exception as err:  # any decode failure is a corrupt sample, never a crash
            if shard not in self._warned:  # one warning per shard and process; the stream counts them all
                self._warned.add(shard)
                if len(self._warned) <= _MAX_SHARD_WARNINGS:
                    last = len(self._warned) == _MAX_SHARD_WARNINGS
                    log.warning("%s: sample %d unreadable, skipped (%s); further unreadable samples of this shard "
                                "are counted (corrupt_count), not logged%s", os.path.basename(self.paths[shard]), idx,
                                err, "; no more such warnings from this process" if last else "")
            return None

    def batch(self, g: int) -> Tuple[Any, torch.Tensor, int, Tuple[Tuple[str, str], ...]]:
        """(x, y, number of corrupt samples replaced, shards this process found bad since its last batch as
        (name, reason) pairs: resampled mode only, usually empty) of batch ``g``; x is (x, images) when the
        stream has images."""
        epoch, j = divmod(g, self.batches_per_epoch)
        order = self.order(epoch)
        if self.cache is not None:
            self.cache.start_epoch(epoch)
        b = self.batch_size
        ids = order[j * b:(j + 1) * b]
        flips = order_mod.flip_bits(self.seed, epoch, ids) if self.flip else np.zeros(len(ids), dtype=bool)
        shards, idxs = self._locate(ids)
        self.reader.enter_process()
        out = self.decoder.new_batch(b)
        labels = np.zeros(b, dtype=np.int64)
        good: List[int] = []
        for i in range(b):
            y = self._read_one(int(ids[i]), int(shards[i]), int(idxs[i]), bool(flips[i]), out, i)
            if y is not None:
                labels[i] = y
                good.append(i)
        invalid = self.decoder.invalid_rows(out)
        if invalid[good].any():
            for i in [i for i in good if invalid[i]]:
                log.warning("%s: sample %d has non-finite values, skipped",
                            os.path.basename(self.paths[shards[i]]), idxs[i])
            good = [i for i in good if not invalid[i]]
        corrupt = b - len(good)
        if corrupt:
            if not good:
                self._rescue(epoch, j, out, labels)
                good = [0]
            replace_corrupt(out, labels, good)
        x = self.decoder.finish(out, order_mod.noise_seed(self.seed, epoch, self.rank, j))
        new_bad: Tuple[Tuple[str, str], ...] = ()
        if self._new_bad:
            new_bad, self._new_bad = tuple(self._new_bad), []
        return x, torch.from_numpy(labels), corrupt, new_bad

    def batches(self, start: int, worker: int, num_workers: int) -> Iterator[Any]:
        """Batches start + worker, start + worker + num_workers, ... (a DataLoader worker's share)."""
        g = start + worker
        while True:
            yield self.batch(g)
            g += num_workers

    def _rescue(self, epoch: int, j: int, out: np.ndarray, labels: np.ndarray) -> None:
        """Fill slot 0 with the next readable sample of the epoch order after batch j, or raise."""
        order = self.order(epoch)
        b, n = self.batch_size, len(order)
        for k in range(n):
            gid = int(order[((j + 1) * b + k) % n])
            shard, idx = self._locate(np.array([gid]))
            flip = bool(order_mod.flip_bits(self.seed, epoch, np.array([gid]))[0]) if self.flip else False
            y = self._read_one(gid, int(shard[0]), int(idx[0]), flip, out, 0)
            if y is not None and not self.decoder.invalid_rows(out[:1])[0]:
                labels[0] = y
                return
        names = sorted({os.path.basename(self.paths[s]) for s in self._locate(order)[0].tolist()})
        raise NoReadableSamplesError(
            f"rank {self.rank}: no readable sample in {len(names)} shard(s) {name_list(names)} (all {n} samples "
            f"of epoch {epoch} are corrupt)", shards=names, rank=self.rank, epoch=epoch)


Maker = Union[BatchMaker, StreamingMaker]


class _BatchDataset(IterableDataset):
    """Batches start, start+1, ... of a maker, split round-robin over DataLoader workers."""

    def __init__(self, maker: Maker, start: int):
        super().__init__()
        self.maker = maker
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.maker.batches(self.start, wid, nw)
        while True:
            try:
                item = next(batches)
            except STREAM_ERRORS as err:
                if info is None:
                    raise
                yield _WorkerError(err)  # in place of the next batch: raised when the stream reaches it
                return
            yield item


# ------------------------------------------------------------------------------------------------ stream
class ShardStream:
    """An endless, resumable stream of ``(x, y)`` (or ``(x, y, images)``) batches for one rank (see module docstring).

    Made by :func:`build_stream` from a maker of batches: a :class:`BatchMaker` (local shards, or remote shards
    through a local cache in exact mode) or a ``StreamingMaker`` (remote shards streamed, resampled mode). Counters
    for the trainer: ``corrupt_count`` (samples replaced since the run began, carried by ``position()``),
    ``bad_shards`` (file name -> why it was skipped: resampled mode, and remote shards that failed to download)
    and ``bad_shard_count``.
    """

    def __init__(self, manifest: Dict[str, Any], maker: Maker, *, mode: str, num_workers: int,
                 position: Optional[Dict[str, Any]] = None, pin_memory: bool = False, prefetch_factor: int = 2,
                 bad_shards: Optional[Dict[str, str]] = None):
        self.manifest, self.maker, self.mode = manifest, maker, mode
        self.batch_size, self.rank, self.world_size = maker.batch_size, maker.rank, maker.world_size
        self.num_workers, self.seed = num_workers, maker.seed
        self.shuffle_buffer, self.flip = maker.shuffle_buffer, maker.flip
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.batches_per_epoch = self.maker.batches_per_epoch
        self.total = self.maker.total
        self._consumed = 0
        self.corrupt_count = 0
        self._epoch_corrupt = 0  # corrupt samples of the current epoch (logged when it ends)
        self.bad_shards: Dict[str, str] = dict(bad_shards or {})
        self._loader_iter = None
        self._batches: Optional[Iterator[Any]] = None  # the batches of an iteration without workers
        if position is not None:
            self._restore(position)
        if isinstance(maker, BatchMaker) and maker.cache is None:
            self._check_sizes()

    # -- bookkeeping
    @property
    def epoch(self) -> int:
        """Epoch of the next batch (= epochs completed)."""
        return self._consumed // self.batches_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already consumed."""
        return self._consumed % self.batches_per_epoch

    @property
    def bad_shard_count(self) -> int:
        """Shards skipped as missing, short or damaged so far (resampled mode; exact mode raises instead)."""
        return len(self.bad_shards)

    def _settings(self) -> Dict[str, Any]:
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "mode": self.mode, "total": self.total, "shuffle_buffer": self.shuffle_buffer, "flip": self.flip}

    def position(self) -> Dict[str, Any]:
        """JSON-able position after the batches consumed so far; ``build_stream(..., position=p)`` continues here.
        Valid at any time, also after the stream raised (the failed batch is not counted as consumed)."""
        return {"version": POSITION_VERSION, "batches": self._consumed, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "corrupt_count": self.corrupt_count,
                "corrupt_in_epoch": self._epoch_corrupt, "rank": self.rank, **self._settings()}

    def _restore(self, pos: Dict[str, Any]) -> None:
        if not isinstance(pos, dict) or pos.get("version") != POSITION_VERSION or "batches" not in pos:
            raise ValueError(f"not a loader position (version {POSITION_VERSION}): {str(pos)[:200]}")
        mine = self._settings()
        for key in _POSITION_KEYS:
            if pos.get(key) != mine[key]:
                raise ValueError(f"loader position was saved with {key}={pos.get(key)!r}, this stream has "
                                 f"{key}={mine[key]!r}: cannot continue it exactly")
        self._consumed = int(pos["batches"])
        self.corrupt_count = int(pos.get("corrupt_count", 0))
        self._epoch_corrupt = int(pos.get("corrupt_in_epoch", 0)) if self.batch_in_epoch else 0

    def _check_sizes(self) -> None:
        """One stat per shard this rank reads in the current epoch: a size that cannot match the manifest is a
        ShardError (exact mode) or a skipped shard (resampled)."""
        paths, entries = self.maker.paths, self.manifest["shards"]
        shards = np.unique(self.maker._locate(self.maker.order(self.epoch))[0]).tolist()
        problems = [(k, why) for k in shards if (why := file_problem(paths[k], entries[k])) is not None]
        if not problems:
            return
        if self.mode == "exact":
            k, why = problems[0]
            also = ""
            if len(problems) > 1:
                also = (f"; {len(problems) - 1} more of this rank's shards do not match either: "
                        f"{name_list([os.path.basename(paths[j]) for j, _ in problems[1:]])}")
            files = "the file" if len(problems) == 1 else "the files"
            raise ShardError(f"{paths[k]}: {why}{also}; restore {files} or remake the shards",
                             [os.path.basename(paths[j]) for j, _ in problems])
        for k, why in problems:
            self._note_bad(os.path.basename(paths[k]), why)

    def _note_bad(self, name: str, why: str) -> None:
        if name not in self.bad_shards:
            self.bad_shards[name] = why
            what = "skipped (resampled mode)" if self.mode == "resampled" else \
                "its samples are replaced by others and counted as corrupt this epoch"
            log.warning("rank %d: %s: %s; %s, %d bad shard(s) so far", self.rank, name, why, what,
                        len(self.bad_shards))

    def _account(self, corrupt: int, new_bad: Tuple[Tuple[str, str], ...]) -> None:
        """Count one consumed batch (per batch, not per sample)."""
        self._consumed += 1
        if corrupt:
            self.corrupt_count += corrupt
            self._epoch_corrupt += corrupt
        for name, why in new_bad:
            self._note_bad(name, why)
        if self._epoch_corrupt and self._consumed % self.batches_per_epoch == 0:
            log.warning("rank %d: %d corrupt sample(s) replaced in epoch %d (%d since the run began)", self.rank,
                        self._epoch_corrupt, self.epoch - 1, self.corrupt_count)
            self._epoch_corrupt = 0

    # -- iteration
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Yield batches forever from the current position (one active iterator per stream). A data error
        (``NoReadableSamplesError``, ``ShardError``) is raised as itself, also from a worker, the workers stopped."""
        self.close()
        if self.num_workers == 0:
            self._batches = batches = self.maker.batches(self._consumed, 0, 1)
            while True:
                x, y, bad, new_bad = next(batches)
                self._account(bad, new_bad)
                batch = _batch_tuple(x, y)
                if self.pin_memory:  # what the DataLoader's pinning thread does with workers
                    batch = tuple(t.pin_memory() for t in batch)
                yield batch
        self.maker.prepare(self.epoch)
        loader = DataLoader(_BatchDataset(self.maker, self._consumed), batch_size=None,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor)
        self._loader_iter = iter(loader)
        try:
            for item in self._loader_iter:
                if isinstance(item, _WorkerError):
                    raise item.error
                x, y, bad, new_bad = item
                self._account(int(bad), new_bad)
                yield _batch_tuple(x, y)
        except Exception:
            self.close()  # no worker outlives a failed stream
            raise

    def close(self) -> None:
        """Stop DataLoader workers and downloads in progress (they are restarted by the next ``iter()``)."""
        batches, self._batches = self._batches, None
        if batches is not None and hasattr(batches, "close"):
            try:
                batches.close()
            except ValueError:  # closed from inside its own iteration: it ends with it
                pass
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _batch_tuple(x: Any, y: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """What the stream yields: (x, y), or (x, y, images) when a maker's x is (latents, images)."""
    return (x[0], y, x[1]) if isinstance(x, (tuple, list)) else (x, y)


def _missing_shards(manifest: Dict[str, Any], paths: List[str], mode: str, rank: int) -> List[int]:
    """Shards listed in the manifest but missing on disk, from one listing of the shard directory on every rank
    (all ranks decide alike): a ShardError in exact mode or when none is left, else a warning."""
    missing = missing_files(paths)
    if not missing:
        return missing
    names = [os.path.basename(paths[i]) for i in missing]
    where = os.path.join(os.path.dirname(paths[0]), "manifest.json")
    gone = set(missing)
    left = sum(1 for i, s in enumerate(manifest["shards"]) if s["num_samples"] > 0 and i not in gone)
    if mode == "exact" or left == 0:
        what = (f"{paths[missing[0]]}: listed in {where} but missing on disk" if len(missing) == 1 else
                f"{len(missing)} of the {len(paths)} shards listed in {where} are missing on disk: "
                f"{name_list(names)}")
        them = "it" if len(missing) == 1 else "them"
        hint = (f"; restore {them}, remake the shards, or name the present ones with a brace pattern (resampled "
                f"mode skips {them})" if mode == "exact" else "; no shard is left to draw from")
        raise ShardError(what + hint, names)
    log.warning("rank %d: %d of the %d shards listed in %s are missing on disk and are skipped (resampled "
                "mode): %s", rank, len(missing), len(paths), where, name_list(names))
    return missing


def _local_maker(manifest: Dict[str, Any], paths: List[str], common: Dict[str, Any],
                 bad_shards: Dict[str, str], with_images: bool = False) -> BatchMaker:
    missing = _missing_shards(manifest, paths, common["mode"], common["rank"])
    available = None
    if missing:
        available = np.ones(len(paths), dtype=bool)
        available[missing] = False
        bad_shards.update((os.path.basename(paths[i]), "missing on disk") for i in missing)
    return BatchMaker(manifest, paths, available=available, with_images=with_images, **common)


def _remote_maker(spec: str, common: Dict[str, Any], opts: RemoteOptions,
                  with_images: bool = False) -> Tuple[Dict[str, Any], Maker]:
    rs = parse_remote_spec(spec)
    manifest = read_manifest(rs, opts)
    _check_batches(rs.label, manifest, common)
    _check_images(rs.label, manifest, with_images)
    locations = [rs.location(s["name"]) for s in manifest["shards"]]
    if common["mode"] == "resampled":
        kw = {k: v for k, v in common.items() if k != "mode"}
        maker = StreamingMaker(manifest, rs.label, locations, opts=opts, **kw)
        if with_images:  # the streamed samples carry their image members: decode them too
            maker.decoder = make_decoder(manifest, with_images=True)
        return manifest, maker
    cache = ShardCache(rs.label, redact(rs.manifest_location), locations, manifest, opts)
    return manifest, BatchMaker(manifest, cache.paths, cache=cache, with_images=with_images, **common)


def _check_images(label: str, manifest: Dict[str, Any], with_images: bool) -> None:
    """``with_images`` needs latent shards that carry their source images."""
    if not with_images:
        return
    if manifest.get("kind") != "latent":
        raise ManifestError(f"{label}: with_images is for latent shards; image shards' x is the image itself")
    if not isinstance(manifest.get("images"), dict):
        raise ManifestError(f"{label}: the latent shards carry no source images; re-encode them with "
                            f"data_pipeline/encode_latents.py --keep-images")


def _check_batches(label: str, manifest: Dict[str, Any], common: Dict[str, Any]) -> None:
    world_size, batch_size = common["world_size"], common["batch_size"]
    if order_mod.batches_per_epoch(manifest["total"], world_size, batch_size) < 1:
        raise ManifestError(f"{label}: {manifest['total']} samples cannot give each of {world_size} ranks one "
                            f"batch of {batch_size}")


def build_stream(spec: str | os.PathLike, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, mode: str = "exact", shuffle_buffer: int = 1000,
                 flip: bool = True, position: Optional[Dict[str, Any]] = None, pin_memory: bool = False,
                 prefetch_factor: int = 2, timeout: float = 60.0, retries: int = 3, retry_backoff: float = 1.0,
                 cache_dir: Optional[str] = None, cache_max_gb: float = 100.0, with_images: bool = False) -> ShardStream:
    """The training stream of shard spec ``spec`` for ``rank`` of ``world_size``; see the module docstring for the
    guarantees. ``spec``: a directory with manifest.json, a manifest path, or a brace pattern of shards; or a
    remote spec (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``; see :mod:`data_pipeline.remote`): resampled
    mode streams those shards, exact mode reads them from a local cache (``cache_dir``, at most ``cache_max_gb``,
    see :mod:`data_pipeline.shard_cache`). Remote reads wait at most ``timeout`` seconds for data and are retried
    ``retries`` times (backoff from ``retry_backoff`` seconds, doubling). ``with_images``: yield (x, y, images)
    from latent shards that carry their source images (``encode_latents.py --keep-images``).

    Raises ManifestError (ShardError for shards missing on disk or of the wrong size: exact mode, or resampled
    mode with no shard left) in one line naming the file; remote specs: a manifest that cannot be read likewise."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if mode not in ("exact", "resampled"):
        raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}")
    common = dict(seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, mode=mode,
                  shuffle_buffer=shuffle_buffer, flip=flip)
    bad_shards: Dict[str, str] = {}
    if is_remote(spec):
        opts = RemoteOptions(timeout=timeout, retries=retries, retry_backoff=retry_backoff, cache_dir=cache_dir,
                             cache_max_gb=cache_max_gb)
        opts.check()
        manifest, maker = _remote_maker(os.fspath(spec), common, opts, with_images)
    else:
        manifest, paths = load_spec(spec)
        _check_batches(str(spec), manifest, common)
        _check_images(str(spec), manifest, with_images)
        maker = _local_maker(manifest, paths, common, bad_shards, with_images)
    return ShardStream(manifest, maker, mode=mode, num_workers=num_workers, position=position,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor, bad_shards=bad_shards)
