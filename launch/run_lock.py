"""One trainer per run directory: a lock file that a second trainer refuses and a dead holder does not keep.

`RUN/.lock` holds the holder's host, pid, SLURM job id and restart count, and when it took the lock; while the
holder runs, a background thread touches the file every `HEARTBEAT_S` seconds. What it relies on, chosen for
cluster filesystems where `flock`/`fcntl` locks are unreliable or not shared between nodes (NFS, Lustre):

- creating the file with O_CREAT|O_EXCL is atomic on local filesystems, NFSv3+ and Lustre, so two trainers that
  start together cannot both create it;
- staleness is judged by the file server's clocks, not the nodes': the lock's mtime (set by the server at each
  heartbeat) is compared with the mtime of a probe file touched in the same directory just now, so clock skew
  between nodes does not matter.

A lock is taken over when its holder is gone: the same SLURM job (a requeued job restarts with the same id after
SLURM killed the previous incarnation), or a dead pid on this host, or no heartbeat for `STALE_S` seconds (a holder
killed with kill -9 elsewhere, or a node lost: the requeued job waits at most that long). Otherwise `RunLockBusy`
names the holder. Orphaned workers of a killed launcher keep their heartbeat going, so a resumed run never races
them.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunLockBusy(RuntimeError):
    """The run directory is held by a live trainer; the message names it (host, pid, job, since when)."""


def _holder_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _seconds_since_touch(path: Path) -> float:
    """Seconds between the last touch of `path` and now, both by the clock of the filesystem that holds it."""
    probe = path.with_name(f".lock-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        probe.touch()
        now = probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)
    return now - path.stat().st_mtime


class RunLock:
    """The lock of one run directory, held by this process until `release()` (see the module docstring)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = _holder_record()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "RunLock":
        """Take the lock (taking over a dead holder's) or raise `RunLockBusy`; starts the heartbeat."""
        for _ in range(3):  # a holder may let go between our attempts
            if self._create():
                break
            holder = self._read()
            reason = self._takeover_reason(holder)
            if reason is None:
                age = self._age()
                raise RunLockBusy(
                    f"{self.path.parent} is in use by another trainer: host {holder.get('host')} pid "
                    f"{holder.get('pid')}{' (SLURM job ' + str(holder['job']) + ')' if holder.get('job') else ''} "
                    f"since {holder.get('since')}, last heartbeat {age:.0f} s ago; stop it, wait {self.stale_s:.0f} s "
                    f"after it died, or use another --run-dir")
            log.warning("taking over the lock of %s from host %s pid %s: %s", self.path.parent, holder.get("host"),
                        holder.get("pid"), reason)
            self.path.unlink(missing_ok=True)
        else:
            raise RunLockBusy(f"{self.path}: could not take the run directory's lock (another trainer keeps taking it)")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._read()
        if holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ internals
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # being written, or garbage: judged by its age alone

    def _age(self) -> float:
        try:
            return _seconds_since_touch(self.path)
        except FileNotFoundError:
            return 0.0

    def _takeover_reason(self, holder: dict[str, Any]) -> Optional[str]:
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("job") == job and holder.get("restart") != self.record["restart"]:
            return f"an earlier run of this SLURM job {job} (restart {holder.get('restart')})"
        pid = holder.get("pid")
        if holder.get("host") == self.record["host"] and isinstance(pid, int) and not _pid_alive(pid):
            return f"pid {pid} is no longer running"
        age = self._age()
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_s:.0f} s)"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()
                if (holder.get("pid"), holder.get("host")) != (self.record["pid"], self.record["host"]):
                    log.error("%s: the run directory's lock was taken over by another trainer", self.path.parent)
                    return
                os.utime(self.path)
            except OSError as err:  # e.g. the run directory was removed: the trainer reports that itself
                log.warning("%s: heartbeat failed (%s)", self.path, err)
