"""Resampled mode on remote shards: shards drawn with replacement and streamed, through webdataset.

Each DataLoader worker of each rank draws shards with webdataset's ``ResampledShards`` (seeded by the stream's
seed, the rank, the worker, the number of workers and the batch the iteration starts at), reads each drawn shard
from its source (``remote.open_source``: a timeout on every read), splits it into samples as it arrives
(``tario.iter_tar_samples``: plain tar headers parsed 3-5x faster than webdataset's tarfile-based iterator, which
takes over at any other header type), mixes them in webdataset's ``shuffle`` buffer (``shuffle_buffer`` samples
per worker, at most a rank's epoch) and makes the worker's batches (w, w + W, ... as the exact reader does, so the
DataLoader returns them in order). No shard splitting across ranks or workers is needed: every (rank, worker) draws
its own shards.

What is the same as for local shards: batches per epoch, flips as a function of (seed, epoch, sample id), latent
noise as a function of (seed, epoch, rank, batch), corrupt samples replaced and counted, ``position()``. What
differs: the draws depend on the number of workers, and a resumed stream continues the batch count with fresh draws
seeded by its start batch (resampling has no order to continue; an exact resume needs exact mode).

Failures: a shard that cannot be downloaded is retried with backoff when nothing of it arrived; then it is skipped,
its samples counted as corrupt and its URL logged (redacted), and another shard is drawn. A shard that breaks off
(the tar ends early, the command fails, a read times out) or holds fewer samples than the manifest lists gives the
samples that arrived and is counted the same way. When distinct shards keep failing with no success in between, the
stream stops with a RemoteShardError naming the spec and the first error.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from webdataset.filters import shuffle as wds_shuffle
from webdataset.shardlists import ResampledShards

from data_pipeline import order as order_mod
from data_pipeline.decoders import NoReadableSamplesError, make_decoder, replace_corrupt
from data_pipeline.remote import FailureTracker, FetchError, RemoteOptions, failure_limit, open_source, redact
from data_pipeline.tario import iter_tar_samples

log = logging.getLogger(__name__)

_TAG_STREAM = 6
Item = Tuple[torch.Tensor, torch.Tensor, int, Tuple[Tuple[str, str], ...]]
Sample = Tuple[int, int, Dict[str, Any]]  # (global sample id, shard, member bytes by extension)


@dataclass
class _Outcome:
    """How one attempt at streaming a shard ended: samples delivered, the error that stopped it (if any)."""

    got: int = 0
    error: Optional[str] = None


def _first_line(err: BaseException) -> str:
    # webdataset appends " @ <stream>" to an error's first argument; the message before it is the one to show
    text = str(err.args[0]) if err.args else type(err).__name__
    return " ".join(text.split(" @ ")[0].split()) or type(err).__name__


class StreamingMaker:
    """Makes the batches of one rank from remote shards streamed in resampled mode (see the module docstring)."""

    def __init__(self, manifest: Dict[str, Any], label: str, locations: Sequence[str], *, seed: int, rank: int,
                 world_size: int, batch_size: int, shuffle_buffer: int, flip: bool, opts: RemoteOptions):
        self.manifest, self.label, self.locations, self.opts = manifest, label, list(locations), opts
        self.names = [s["name"] for s in manifest["shards"]]
        self.counts = np.array([s["num_samples"] for s in manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.shuffle_buffer, self.flip = batch_size, shuffle_buffer, flip
        self.batches_per_epoch = order_mod.batches_per_epoch(self.total, world_size, batch_size)
        self.decoder = make_decoder(manifest)
        self.drawable = [k for k in range(len(self.names)) if self.counts[k] > 0]
        self.tracker = FailureTracker(label, failure_limit(len(self.drawable)))
        self._lost = 0  # samples of failed or short shards since the last batch
        self._new_bad: List[Tuple[str, str]] = []
        self._warned: set = set()

    def prepare(self, epoch: int) -> None:
        """Nothing to prepare before workers start (kept for the stream's interface)."""

    # -- samples
    def _draws(self, start: int, worker: int, num_workers: int) -> Iterator[int]:
        key = order_mod.mix64(self.seed, self.rank, worker, num_workers, start, _TAG_STREAM)
        shards = ResampledShards([str(k) for k in self.drawable], seed=self.seed, worker_seed=lambda: key,
                                 deterministic=True)
        for draw in shards:
            yield int(draw["url"])

    def _stream_shard(self, shard: int, outcome: _Outcome) -> Iterator[Dict[str, Any]]:
        """The samples of one attempt at streaming ``shard`` (at most the manifest's count); ``outcome`` says how
        it ended."""
        try:
            reader = open_source(self.locations[shard], self.opts.timeout)
        except FetchError as err:  # refused, not found, timed out before the first byte
            outcome.error = str(err)
            return
        stopped: List[BaseException] = []
        try:
            for _, sample in iter_tar_samples(reader):
                if outcome.got == self.counts[shard]:
                    outcome.error = f"holds more samples than the {outcome.got} the manifest lists"
                    break
                outcome.got += 1
                yield sample
        except Exception as exn:  # the tar ends early or is damaged; the command failed or timed out
            stopped.append(exn)
        finally:
            reader.close()
        if reader.error is not None:
            outcome.error = str(reader.error)
        elif stopped:
            outcome.error = f"{redact(self.locations[shard])}: {_first_line(stopped[0])}"

    def _shard_samples(self, shard: int) -> Iterator[Sample]:
        """The samples of a drawn shard, retried while nothing of it arrived; failures counted and reported."""
        outcome = _Outcome()
        for attempt in range(self.opts.retries + 1):
            if attempt:
                time.sleep(self.opts.backoff(attempt))
            outcome = _Outcome()
            base = int(self.offsets[shard])
            for sample in self._stream_shard(shard, outcome):
                yield base + outcome.got - 1, shard, sample
            if outcome.error is None or outcome.got:
                break
        self._account(shard, outcome)

    def _account(self, shard: int, outcome: _Outcome) -> None:
        expected = int(self.counts[shard])
        if outcome.got:
            self.tracker.success()
        if outcome.error is None and outcome.got == expected:
            return
        if outcome.got < expected:
            self._lost += expected - outcome.got
        if outcome.got == 0:
            tries = self.opts.retries + 1
            why = f"download failed ({outcome.error}; {tries} tr{'y' if tries == 1 else 'ies'})"
            self._new_bad.append((self.names[shard], why))
            self.tracker.failure(self.names[shard], outcome.error or "no samples")  # may raise RemoteShardError
            return
        what = outcome.error or f"{redact(self.locations[shard])}: the tar ends early"
        self._new_bad.append((self.names[shard], f"{what}; {outcome.got} of its {expected} samples used"))

    def samples(self, start: int, worker: int, num_workers: int) -> Iterator[Sample]:
        """This worker's endless stream of (global id, shard, sample), through the shuffle buffer."""
        def drawn() -> Iterator[Sample]:
            for shard in self._draws(start, worker, num_workers):
                yield from self._shard_samples(shard)

        # at most a rank's epoch of samples (as the exact reader's buffer), yielding from 100 on (webdataset's
        # default): a first batch must not wait for a thousand samples of a small data set
        size = min(self.shuffle_buffer, max(1, self.total // self.world_size))
        if size <= 1:
            return drawn()
        seed = order_mod.mix64(self.seed, self.rank, worker, num_workers, start, _TAG_STREAM + 1)
        return iter(wds_shuffle(size, min(size, 100), seed=seed)(drawn()))

    # -- batches
    def batches(self, start: int, worker: int, num_workers: int) -> Iterator[Item]:
        """Batches start + worker, start + worker + num_workers, ... of the stream."""
        samples = self.samples(start, worker, num_workers)
        g = start + worker
        while True:
            yield self.batch(g, samples)
            g += num_workers

    def _decode(self, sample: Sample, flip: bool, out: np.ndarray, labels: np.ndarray, i: int) -> bool:
        gid, shard, members = sample
        try:
            labels[i] = self.decoder.label_of(members.get("cls"))
            self.decoder.read_bytes(members, flip, out, i)
            return True
        except Exception as err:  # any decode failure is a corrupt sample, never a crash
            if shard not in self._warned and len(self._warned) < 20:
                self._warned.add(shard)
                log.warning("%s: sample %d unreadable, skipped (%s); further unreadable samples of this shard are "
                            "counted (corrupt_count), not logged", self.names[shard],
                            gid - int(self.offsets[shard]), err)
            return False

    def _flips(self, epoch: int, ids: np.ndarray) -> np.ndarray:
        return order_mod.flip_bits(self.seed, epoch, ids) if self.flip else np.zeros(len(ids), dtype=bool)

    def batch(self, g: int, samples: Iterator[Sample]) -> Item:
        """Batch ``g`` (its epoch and place in it set the flips and the latent noise) from the next samples."""
        epoch, j = divmod(g, self.batches_per_epoch)
        b = self.batch_size
        drawn = [next(samples) for _ in range(b)]
        flips = self._flips(epoch, np.array([s[0] for s in drawn], dtype=np.int64))
        out, labels = self.decoder.new_batch(b), np.zeros(b, dtype=np.int64)
        good = [i for i in range(b) if self._decode(drawn[i], bool(flips[i]), out, labels, i)]
        invalid = self.decoder.invalid_rows(out)
        good = [i for i in good if not invalid[i]]
        corrupt = b - len(good)
        if corrupt:
            if not good:
                self._rescue(epoch, samples, out, labels)
                good = [0]
            replace_corrupt(out, labels, good)
        x = self.decoder.finish(out, order_mod.noise_seed(self.seed, epoch, self.rank, j))
        lost, self._lost = self._lost, 0
        new_bad, self._new_bad = tuple(self._new_bad), []
        return x, torch.from_numpy(labels), corrupt + lost, new_bad

    def _rescue(self, epoch: int, samples: Iterator[Sample], out: np.ndarray, labels: np.ndarray) -> None:
        """Fill slot 0 with the next readable sample of the stream, or raise after a rank's epoch of them."""
        per_rank = max(1, self.total // self.world_size)
        for _ in range(per_rank):
            sample = next(samples)
            flip = bool(self._flips(epoch, np.array([sample[0]], dtype=np.int64))[0])
            if self._decode(sample, flip, out, labels, 0) and not self.decoder.invalid_rows(out[:1])[0]:
                return
        raise NoReadableSamplesError(
            f"rank {self.rank}: no readable sample among {per_rank} streamed from {self.label} (all corrupt)",
            shards=sorted({self.names[k] for k in self.drawable})[:100], rank=self.rank, epoch=epoch)
