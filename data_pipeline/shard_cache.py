"""Exact mode on remote shards: each shard downloaded once into a local cache, verified, LRU-bounded.

Exact epochs and exact mid-epoch resume need random access to samples (:mod:`data_pipeline.order` computes any
batch from scratch, in any process); a stream has none. So in exact mode every shard is downloaded when a process
first needs it into ``CACHE_DIR/<data set key>/NAME`` and read there by the local reader (``tario.ShardReader``,
``pread``), exactly as local shards are. A download enters the cache only after it is verified against the
manifest: its byte count (when the manifest records it) and its sample count (the tar's headers indexed; the tar
must end cleanly). A truncated or damaged download is retried and never cached.

The cache is shared by every process that names the same directory (a rank's DataLoader workers, the ranks of a
node): a lock per shard lets one process download while the others wait for it. The directory is kept under
``max_bytes``, and 5% of its disk (at least 1 GB) is kept free, by evicting the least recently used shards first
(a shard evicted while a reader has it open stays readable by that reader; its space is freed when the reader
closes it). The data set key is a hash of the (redacted) manifest location and the manifest's shard list, so two
data sets never share files.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from data_pipeline.manifest import ManifestError, ShardError
from data_pipeline.remote import (FailureTracker, FetchError, RemoteOptions, default_cache_dir, failure_limit,
                                  open_remote, redact, with_retries)
from data_pipeline.tario import index_tar

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20


def dataset_key(manifest_label: str, manifest: Dict[str, Any]) -> str:
    """A short hash naming a data set's cache directory: its redacted manifest location and shard list."""
    shards = [(s["name"], int(s["num_samples"]), s.get("bytes")) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps([manifest_label, shards]).encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """Local copies of a remote data set's shards (see the module docstring).

    ``paths[k]`` is where shard k lives once :meth:`fetch` returned it. ``fetch`` raises :class:`FetchError` when a
    shard cannot be downloaded and verified after the retries (it is not tried again in this process until
    :meth:`start_epoch` starts another epoch), and :class:`RemoteShardError` when shards keep failing (see
    ``remote.FailureTracker``)."""

    def __init__(self, label: str, manifest_label: str, locations: Sequence[str], manifest: Dict[str, Any],
                 opts: RemoteOptions):
        root = Path(opts.cache_dir or default_cache_dir())
        self.dir = root / dataset_key(manifest_label, manifest)
        try:
            (self.dir / ".locks").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ManifestError(f"{root}: cannot create the shard cache ({err.strerror or err}); set another "
                                "cache directory (data.remote.cache_dir)") from None
        self.label, self.opts = label, opts
        self.locations = list(locations)
        self.names: List[str] = [s["name"] for s in manifest["shards"]]
        self.expected: List[int] = [int(s["num_samples"]) for s in manifest["shards"]]
        self.sizes: List[Optional[int]] = [s.get("bytes") for s in manifest["shards"]]
        self.paths: List[str] = [str(self.dir / n) for n in self.names]
        self.max_bytes = int(opts.cache_max_gb * 1e9)
        self.tracker = FailureTracker(label, failure_limit(sum(1 for n in self.expected if n)))
        self._failed: Dict[int, str] = {}  # shard -> why it failed in this process, this epoch
        self._epoch: Optional[int] = None
        self._clean_stale_parts()
        source = self.dir / ".source"
        if not source.exists():
            with contextlib.suppress(OSError):
                source.write_text(manifest_label + "\n")  # which data set this is, for people (redacted)

    # -- queries
    def present(self, shard: int) -> bool:
        """True when shard ``shard`` is in the cache (complete and verified)."""
        try:
            size = os.stat(self.paths[shard]).st_size
        except OSError:
            return False
        want = self.sizes[shard]
        return want is None or size == int(want)

    def start_epoch(self, epoch: int) -> None:
        """A new epoch: shards that failed in the last one may be tried again."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._failed.clear()

    # -- fetching
    def fetch(self, shard: int) -> str:
        """The local path of shard ``shard``, downloaded and verified first if it is not in the cache."""
        failed = self._failed.get(shard)
        if failed is not None:
            raise FetchError(failed)
        path = self.paths[shard]
        if self.present(shard):
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: evicted last
            return path
        with self._lock(shard):
            if not self.present(shard):  # another process may have fetched it while we waited
                try:
                    with_retries(lambda: self._download(shard), redact(self.locations[shard]), self.opts)
                except FetchError as err:
                    self._failed[shard] = str(err)
                    self.tracker.failure(self.names[shard], str(err))  # RemoteShardError when all keep failing
                    raise
                self.tracker.success()
        return path

    @contextlib.contextmanager
    def _lock(self, shard: int) -> Iterator[None]:
        fd = os.open(self.dir / ".locks" / self.names[shard], os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _download(self, shard: int) -> None:
        """One attempt: download into a temporary file, verify, move into the cache; FetchError if it fails."""
        label = redact(self.locations[shard])
        tmp = self.dir / f".{self.names[shard]}.part-{socket.gethostname()}-{os.getpid()}"
        try:
            with open_remote(self.locations[shard], self.opts.timeout) as src:
                try:
                    with open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, _COPY_CHUNK)
                except FetchError:
                    raise
                except OSError as err:  # the local disk, not the network: no retry helps
                    raise ShardError(f"{self.dir}: cannot write the shard cache ({err.strerror or err}); free space "
                                     "or set another cache directory (data.remote.cache_dir)", [self.names[shard]]) from None
            problem = self._problem(tmp, shard)
            if problem is not None:
                raise FetchError(f"{label}: {problem}")
            self._admit(tmp, shard)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _problem(self, path: Path, shard: int) -> Optional[str]:
        """Why a downloaded shard does not match the manifest (truncated, damaged, another file), or None."""
        size, want = os.path.getsize(path), self.sizes[shard]
        if want is not None and size != int(want):
            if size < int(want):
                return f"only {size} of the {int(want)} bytes the manifest lists arrived (truncated download)"
            return f"{size} bytes, the manifest lists {int(want)} (another file of that name?)"
        idx = index_tar(str(path))
        got, expected = len(idx.samples), self.expected[shard]
        if got != expected:
            return (f"holds {got} readable samples, the manifest lists {expected}"
                    + (f" ({idx.error})" if idx.error else " (truncated?)"))
        if idx.damaged:
            return f"damaged after its {expected} samples ({idx.error})"
        return None

    def _admit(self, tmp: Path, shard: int) -> None:
        """Make room (LRU) and move a verified download into the cache, under the directory lock."""
        fd = os.open(self.dir / ".locks" / ".dir", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._make_room(os.path.getsize(tmp), keep=self.names[shard])
            os.replace(tmp, self.paths[shard])
        finally:
            os.close(fd)

    def _make_room(self, incoming: int, keep: str) -> None:
        entries = []
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name.startswith(".") or e.name == keep or not e.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        entries.sort()
        # the new shard is on disk already (its temporary file); keep 5% of the disk (at least 1 GB) free as well:
        # a default cache on a small or RAM-backed /tmp must not fill it
        usage = shutil.disk_usage(self.dir)
        short = max(1 << 30, usage.total // 20) - usage.free
        evicted = 0
        while entries and (total + incoming > self.max_bytes or short > 0):
            _, size, path = entries.pop(0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
            short -= size
            evicted += 1
        if evicted:
            log.info("shard cache %s: evicted %d least recently used shard(s) to stay under %.3g GB and keep %.3g "
                     "GB free", self.dir, evicted, self.max_bytes / 1e9, max(1 << 30, usage.total // 20) / 1e9)

    def _clean_stale_parts(self) -> None:
        """Remove partial downloads left by processes of this host that died (a cache on a shared filesystem may
        hold other hosts' downloads in progress)."""
        mine = f".part-{socket.gethostname()}-"
        with contextlib.suppress(OSError), os.scandir(self.dir) as it:
            for e in it:
                pid = e.name.rpartition(mine)[2]
                if e.name.startswith(".") and mine in e.name and pid.isdigit() and not _pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)

