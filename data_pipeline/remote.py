"""Shard specs that live elsewhere: HTTP(S) URLs, S3 and GCS object URLs, and ``pipe:`` commands.

Spec forms (the manifest is read from the same place as the shards):

* ``https://host/data/lat256`` (a prefix: ``.../manifest.json`` and ``.../NAME`` for each shard it lists),
  ``https://host/data/lat256/manifest.json``, or a brace pattern of shards
  ``https://host/data/lat256/train-{000000..000099}.tar`` (a subset, as for local patterns). A query string
  (``?sig=...``, a container-wide token) is kept on every object's URL.
* ``s3://bucket/prefix`` and ``gs://bucket/prefix``: the same three forms.
* ``pipe:COMMAND``: a shell command that writes one shard to stdout, as webdataset and open_clip write it, e.g.
  ``pipe:aws s3 cp s3://bucket/train-{000000..000999}.tar -``. The one argument naming ``.tar`` files is a brace
  pattern of shards; the manifest is read by the same command with that argument's file name replaced by
  ``manifest.json``.

HTTP(S) objects are read in this process (:class:`HttpReader`: ``urllib``, Basic authentication from the URL or
``~/.netrc``); the others by a download command through webdataset's ``Pipe`` (its ``gopen`` machinery):
``aws s3 cp URL -`` for S3 (the awscli; credentials and ``AWS_ENDPOINT_URL`` from the environment or ``~/.aws``),
``gsutil cat URL`` for GCS (as webdataset's own ``gs://`` handler), the user's command for ``pipe:``. Every read
waits at most ``timeout`` seconds for data (then the download is abandoned, its command killed): no read can hang.
Credentials are never stored: messages and logs show locations through :func:`redact`.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import http.client
import io
import json
import logging
import math
import os
import re
import select
import shlex
import netrc
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

from webdataset.gopen import Pipe

from data_pipeline.locations import is_remote, redact
from data_pipeline.manifest import MANIFEST_NAME, ManifestError, ShardError, restrict_manifest, validate_manifest

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "s3", "gs")
_TAR_ARG = re.compile(r"\.tar(?=$|[?#])")
_CHUNK = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read: timeouts, retries and the exact-mode cache."""

    timeout: float = 60.0  # seconds a download may go without receiving data (connecting included) before it is abandoned
    retries: int = 3  # further attempts after a failed download (backoff retry_backoff, doubling, at most 30 s)
    retry_backoff: float = 1.0  # seconds before the first retry
    cache_dir: Optional[str] = None  # exact mode: local cache of downloaded shards (None: default_cache_dir())
    cache_max_gb: float = 100.0  # exact mode: the cache is kept under this size, least recently used shards evicted

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not (math.isfinite(self.retry_backoff) and self.retry_backoff >= 0):
            raise ValueError(f"retry_backoff must be >= 0 seconds, got {self.retry_backoff}")
        if not (math.isfinite(self.cache_max_gb) and self.cache_max_gb > 0):
            raise ValueError(f"cache_max_gb must be > 0, got {self.cache_max_gb}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(MAX_BACKOFF, self.retry_backoff * 2 ** (attempt - 1))


class FetchError(OSError):
    """A download that failed (command error, timeout, truncated or damaged object), in one line, credentials
    redacted."""

    def __init__(self, message: str):
        super().__init__(message)  # args = (message,): pickles through DataLoader workers

    def __str__(self) -> str:
        return str(self.args[0])


class RemoteShardError(ShardError):
    """Shard downloads keep failing (the source is down, unreachable or refuses us): one line naming the spec and
    the first error. A ManifestError, so the trainers exit with status 2."""


def default_cache_dir() -> str:
    """Where exact mode caches remote shards by default: ``$TMPDIR`` (node-local on most clusters) or /tmp."""
    return os.path.join(tempfile.gettempdir(), f"ditstack-shard-cache-{os.getuid()}")


# ------------------------------------------------------------------------------------------------ specs
def _expand(pattern: str) -> List[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def _split_query(text: str) -> Tuple[str, str]:
    q = min([i for i in (text.find("?"), text.find("#")) if i >= 0] or [len(text)])
    return text[:q], text[q:]


def _pattern_names(spec: str, pattern: str) -> Tuple[str, List[str]]:
    """(directory, shard file names) of a brace pattern of ``.tar`` objects in one directory."""
    dirs, names = set(), []
    for path in _expand(pattern):
        d, _, name = path.rpartition("/")
        dirs.add(d)
        names.append(name)
    if len(dirs) != 1 or not all(n.endswith(".tar") for n in names):
        raise ManifestError(f"{redact(spec)}: a brace pattern must name .tar shards of one directory")
    return dirs.pop(), names


@dataclass(frozen=True)
class RemoteSpec:
    """A parsed remote shard spec: where its manifest is, how a shard's location is formed, the named subset."""

    spec: str
    manifest_location: str
    template: str  # the shard location with "{name}" where the shard's file name goes
    subset: Optional[Tuple[str, ...]]

    @property
    def label(self) -> str:
        """The spec for messages and logs (credentials redacted)."""
        return redact(self.spec)

    def location(self, name: str) -> str:
        """Where shard ``name`` is read from (a URL or a ``pipe:`` command)."""
        return self.template.replace("{name}", name)


def parse_remote_spec(spec: str) -> RemoteSpec:
    """The :class:`RemoteSpec` of an ``http(s)://``, ``s3://``, ``gs://`` or ``pipe:`` spec (see the module
    docstring); raises ManifestError (one line, redacted) for a spec of none of these forms."""
    if spec.startswith("pipe:"):
        return _parse_pipe(spec)
    if not is_remote(spec):
        raise ManifestError(f"{redact(spec)}: not a remote shard spec (http(s)://, s3://, gs:// or pipe:)")
    path, query = _split_query(spec)
    if "{" in path or path.endswith(".tar"):
        base, names = _pattern_names(spec, path)
        subset: Optional[Tuple[str, ...]] = tuple(names)
    elif path.endswith(".json"):
        base, subset = path.rpartition("/")[0], None
    else:
        base, subset = path.rstrip("/"), None
    if base.endswith(":/") or base.endswith(":"):
        raise ManifestError(f"{redact(spec)}: no bucket or host path")
    manifest = path if path.endswith(".json") else f"{base}/{MANIFEST_NAME}"
    return RemoteSpec(spec, manifest + query, f"{base}/{{name}}{query}", subset)


def _parse_pipe(spec: str) -> RemoteSpec:
    cmd = spec[len("pipe:"):]
    try:
        words = shlex.split(cmd)
    except ValueError as err:
        raise ManifestError(f"{redact(spec)}: not a shell command ({err})") from None
    tars = [w for w in words if _TAR_ARG.search(_split_query(w)[0] + "?")]
    hint = "e.g. pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"
    if len(tars) != 1:
        raise ManifestError(f"{redact(spec)}: a pipe: spec needs exactly one argument naming its .tar shards "
                            f"(a brace pattern; {hint}), found {len(tars)}")
    arg = tars[0]
    if arg not in cmd:
        raise ManifestError(f"{redact(spec)}: write the .tar argument without shell escapes ({hint})")
    path, query = _split_query(arg)
    base, names = _pattern_names(spec, path)
    prefix = f"{base}/" if base else ""
    manifest = "pipe:" + cmd.replace(arg, f"{prefix}{MANIFEST_NAME}{query}", 1)
    template = "pipe:" + cmd.replace(arg, f"{prefix}{{name}}{query}", 1)
    return RemoteSpec(spec, manifest, template, tuple(names))


# ------------------------------------------------------------------------------------------------ commands
def _tool(name: str) -> str:
    """The executable ``name``: on PATH, else beside this Python (a virtual environment not activated)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None:
        hints = {"curl": "apt-get install curl", "aws": "pip install awscli",
                 "gsutil": "install the Google Cloud SDK"}
        raise FetchError(f"{name} not found (needed to read these shards; {hints.get(name, 'install it')})")
    return found


def download_command(location: str, timeout: float) -> Tuple[Any, bool]:
    """(argv or shell command, through a shell?) that writes the object at ``location`` to stdout."""
    if location.startswith("pipe:"):
        return location[len("pipe:"):], True
    scheme = location.split("://", 1)[0].lower()
    t = str(max(1, math.ceil(timeout)))
    if scheme == "s3":
        return [_tool("aws"), "s3", "cp", "--only-show-errors", "--cli-connect-timeout", t, "--cli-read-timeout", t,
                location, "-"], False
    if scheme == "gs":
        return [_tool("gsutil"), "-q", "cat", location], False
    raise FetchError(f"{redact(location)}: no download command for scheme {scheme!r} ({', '.join(URL_SCHEMES)})")


class PipeReader(io.RawIOBase):
    """The bytes of one remote object: the stdout of its download command (a webdataset ``Pipe``), each read
    waiting at most ``timeout`` seconds. A command that fails or ends early raises :class:`FetchError` (one line:
    the redacted location and the command's last error line) from the read that reaches the end of its output.
    ``close()`` after a complete read reaps the command; before it, the command is killed."""

    def __init__(self, location: str, timeout: float):
        super().__init__()
        self.label = redact(location)
        self.timeout = timeout
        self.nbytes = 0
        self.error: Optional[FetchError] = None
        self._done = False
        cmd, shell = download_command(location, timeout)
        self._stderr = tempfile.TemporaryFile()
        # a session of its own: a shell command's children are killed with it
        self._pipe = Pipe(cmd, mode="rb", bufsize=0, shell=shell, stderr=self._stderr, ignore_errors=True,
                          start_new_session=True, stdin=subprocess.DEVNULL)
        self._raw = self._pipe.stream
        self._fd = self._raw.fileno()
        with contextlib.suppress(OSError):  # a larger pipe: fewer wake-ups per MB (64 KiB by default on Linux)
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, _CHUNK)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        """Read into ``buf``; 0 at the end of a complete object; raises FetchError (also kept in ``error``)."""
        if self.error is not None:
            raise self.error
        if self._done:
            return 0
        try:
            ready, _, _ = select.select([self._fd], [], [], self.timeout)
            if not ready:
                raise FetchError(f"{self.label}: no data for {self.timeout:g} s (timed out after {self.nbytes} "
                                 f"bytes)")
            n = self._raw.readinto(buf)
            if n:
                self.nbytes += n
                return n
            self._finish()
            return 0
        except FetchError as err:
            self.error = err
            self._kill()
            raise
        except OSError as err:
            self.error = FetchError(f"{self.label}: {err.strerror or err}")
            self._kill()
            raise self.error from None

    def _finish(self) -> None:
        """At the end of the output: the command's exit status decides whether the object is complete."""
        try:
            status = self._pipe.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise FetchError(f"{self.label}: the download command did not exit {self.timeout:g} s after its "
                             f"output ended") from None
        self._done = True
        if status != 0:
            raise FetchError(f"{self.label}: {self._stderr_line() or f'download command exited with {status}'} "
                             f"(after {self.nbytes} bytes)")

    def _stderr_line(self) -> str:
        try:
            self._stderr.seek(0)
            lines = [ln.strip() for ln in self._stderr.read()[-4096:].decode("utf-8", "replace").splitlines()]
        except (OSError, ValueError):
            return ""
        last = next((ln for ln in reversed(lines) if ln), "")
        return redact(last)[:300]

    def _kill(self) -> None:
        proc = self._pipe.proc
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL did not end
            log.warning("%s: download command %d did not exit after SIGKILL", self.label, proc.pid)

    def close(self) -> None:
        """Reap the download command (killed unless it completed); idempotent."""
        if self.closed:
            return
        try:
            if not self._done:
                self._kill()
            self._raw.close()
            self._stderr.close()
        finally:
            self._pipe.stream = self._raw  # already closed: Pipe.__del__ has nothing left to wait for
            super().close()


def _http_auth(parts: urllib.parse.SplitResult) -> Optional[str]:
    """A Basic ``Authorization`` header from the URL's user info or ``~/.netrc`` (as ``curl --netrc-optional``)."""
    user, password = parts.username, parts.password
    if user is None:
        try:
            found = netrc.netrc().authenticators(parts.hostname or "")
        except (OSError, netrc.NetrcParseError):
            found = None
        if found is None:
            return None
        user, _, password = found
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(token).decode()


class HttpReader(io.RawIOBase):
    """The body of an HTTP(S) object, read in this process (``urllib``: redirects, ``*_proxy`` variables, the
    system's CA certificates; user info in the URL or ``~/.netrc`` for Basic authentication), every socket operation
    waiting at most ``timeout`` seconds. Errors, a timeout or a body shorter than its ``Content-Length`` raise
    :class:`FetchError` (one line, redacted), also kept in ``error``.

    Not through ``curl`` as webdataset's ``gopen`` does: measured on loopback, ``curl`` piped 0.4 GB/s at 1.5 ms
    of CPU per MB, this reader 0.9 GB/s at 0.35 ms (benchmarks/RESULTS.md); ``pipe:curl ...`` remains available."""

    def __init__(self, url: str, timeout: float):
        super().__init__()
        self.label, self.timeout = redact(url), timeout
        self.nbytes = 0
        self.error: Optional[FetchError] = None
        parts = urllib.parse.urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        headers = {"User-Agent": "ditstack", "Accept-Encoding": "identity"}
        auth = _http_auth(parts)
        if auth:
            headers["Authorization"] = auth
        request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), headers=headers)
        try:
            self._resp = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            err.close()
            raise FetchError(f"{self.label}: HTTP {err.code} {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"{self.label}: {self._why(err)}") from None

    def _why(self, err: BaseException) -> str:
        if isinstance(err, urllib.error.URLError) and not isinstance(err.reason, str):
            err = err.reason
        if isinstance(err, (socket.timeout, TimeoutError)):
            return f"no data for {self.timeout:g} s (timed out after {self.nbytes} bytes)"
        if isinstance(err, http.client.IncompleteRead):
            return f"connection closed after {self.nbytes + len(err.partial)} bytes, {err.expected} more expected"
        return redact(" ".join(str(getattr(err, "strerror", None) or err).split())) or type(err).__name__

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        """Read into ``buf``; 0 at the end of a complete body; raises FetchError."""
        if self.error is not None:
            raise self.error
        try:
            n = self._resp.readinto(buf)
        except (OSError, http.client.HTTPException, ValueError) as err:
            self.error = FetchError(f"{self.label}: {self._why(err)}")
            raise self.error from None
        self.nbytes += n
        return n

    def close(self) -> None:
        """Close the connection."""
        if not self.closed:
            with contextlib.suppress(Exception):
                self._resp.close()
            super().close()


RawReader = Union[HttpReader, PipeReader]


def open_source(location: str, timeout: float) -> RawReader:
    """An unbuffered reader of the object at ``location``: :class:`HttpReader` for http(s), else
    :class:`PipeReader`."""
    if location[:8].lower().startswith(("http://", "https://")):
        return HttpReader(location, timeout)
    return PipeReader(location, timeout)


def open_remote(location: str, timeout: float) -> io.BufferedReader:
    """A buffered reader of the object at ``location`` (see :func:`open_source`)."""
    return io.BufferedReader(open_source(location, timeout), _CHUNK)


T = TypeVar("T")


def with_retries(what: Callable[[], T], label: str, opts: RemoteOptions) -> T:
    """``what()``, retried with backoff after a FetchError, up to ``opts.retries`` times; the last FetchError
    (naming the number of tries) when every attempt failed."""
    for attempt in range(opts.retries + 1):
        if attempt:
            wait = opts.backoff(attempt)
            log.info("%s: retry %d of %d in %.1f s", label, attempt, opts.retries, wait)
            time.sleep(wait)
        try:
            return what()
        except FetchError as err:
            last = err
            log.debug("%s: attempt %d failed: %s", label, attempt + 1, err)
    tries = opts.retries + 1
    raise FetchError(f"{last} ({tries} tr{'y' if tries == 1 else 'ies'})")


def read_all(location: str, opts: RemoteOptions, limit: int = 1 << 30) -> bytes:
    """The whole object at ``location`` (small objects: a manifest), with retries; FetchError when it fails."""
    def attempt() -> bytes:
        with open_remote(location, opts.timeout) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FetchError(f"{redact(location)}: larger than {limit} bytes")
        return data
    return with_retries(attempt, redact(location), opts)


def read_manifest(rs: RemoteSpec, opts: RemoteOptions) -> Dict[str, Any]:
    """The validated manifest of a remote spec, restricted to a brace pattern's shards; ManifestError (one line,
    redacted) when it cannot be read."""
    where = redact(rs.manifest_location)
    try:
        raw = read_all(rs.manifest_location, opts)
    except FetchError as err:
        raise ManifestError(f"{rs.label}: cannot read its manifest ({err})") from None
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise ManifestError(f"{where}: unreadable manifest ({err})") from None
    validate_manifest(manifest, where)
    if rs.subset is not None:
        manifest = restrict_manifest(manifest, list(rs.subset), where, rs.label)
    return manifest


class FailureTracker:
    """Consecutive failed shard downloads in one process. ``limit`` distinct shards failing with no successful
    download in between means the source itself is failing: :class:`RemoteShardError` naming the spec and the
    first error of the run (a few bad shards among good ones never add up to it)."""

    def __init__(self, label: str, limit: int):
        self.label, self.limit = label, max(1, limit)
        self._failed: Dict[str, str] = {}

    def success(self) -> None:
        """A download succeeded: the run of failures is over."""
        self._failed.clear()

    def failure(self, name: str, error: str) -> None:
        """Shard ``name`` could not be downloaded (after its retries)."""
        self._failed.setdefault(name, error)
        if len(self._failed) >= self.limit:
            first = next(iter(self._failed.values()))
            raise RemoteShardError(f"{self.label}: {len(self._failed)} shard downloads failed in a row with none "
                                   f"succeeding (first error: {first}); check the server, the network and the "
                                   f"credentials", list(self._failed))


def failure_limit(num_shards: int) -> int:
    """How many distinct shards must fail in a row before a stream gives up (see FailureTracker)."""
    return min(16, max(1, num_shards))
