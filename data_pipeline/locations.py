"""Remote locations in text: recognising a remote shard spec, and redacting the credentials a URL or command may
carry before it is shown (messages, logs) or stored (nothing stores them: manifests, positions and checkpoints hold
file names and counts only)."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

_URL_SPEC = re.compile(r"^(?i:(https?|s3|gs))://")
_URL_IN_TEXT = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s'\"]+)")
_SECRET_OPTION = re.compile(r"(?i)((?:^|\s)(?:-H|--header|-u|--user|--oauth2-bearer|--proxy-user)\s+)"
                            r"('[^']*'|\"[^\"]*\"|\S+)")
_SECRET_ASSIGN = re.compile(r"(?i)\b(\w*(?:token|secret|passw(?:or)?d|api_?key|access_?key|credential|signature|auth)"
                            r"\w*=)('[^']*'|\"[^\"]*\"|\S+)")


def is_remote(spec: Any) -> bool:
    """True for an ``http(s)://``, ``s3://``, ``gs://`` or ``pipe:`` shard spec."""
    s = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    return isinstance(s, str) and (s.startswith("pipe:") or bool(_URL_SPEC.match(s)))


def _redact_url(m: re.Match) -> str:
    scheme, rest = m.group(1), m.group(2)
    cut = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])
    host, tail = rest[:cut], rest[cut:]
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    q = tail.find("?")
    if q >= 0:
        tail = tail[:q] + "?***"
    return scheme + host + tail


def redact(text: str) -> str:
    """``text`` (a spec, a URL, a command, a message) with the credentials it may carry replaced by ``***``: URL
    user info and query strings, the value after ``-H``/``--header``/``-u``/``--user``, and ``NAME=value`` words
    whose NAME says token, secret, password, key, credential, signature or auth."""
    text = _URL_IN_TEXT.sub(_redact_url, text)
    text = _SECRET_OPTION.sub(lambda m: m.group(1) + "***", text)
    return _SECRET_ASSIGN.sub(lambda m: m.group(1) + "***", text)


_ANY_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def remote_output_problem(out: Any, flag: str = "--out") -> Optional[str]:
    """Why ``out`` cannot be an output directory (a URL or a ``pipe:`` command: shards are written locally, then
    uploaded, manifest last), or None for a local path."""
    s = os.fspath(out) if isinstance(out, os.PathLike) else str(out)
    if not (s.startswith("pipe:") or _ANY_URL.match(s)):
        return None
    return (f"{flag} {redact(s)}: shards are written to a local directory; upload them afterwards, the manifest "
            "last, e.g. aws s3 sync DIR s3://BUCKET/PREFIX --exclude manifest.json && "
            "aws s3 cp DIR/manifest.json s3://BUCKET/PREFIX/ (README: Data on HTTP / S3 / GCS)")
