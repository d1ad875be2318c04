"""The shard manifest: reading a shard spec, atomic JSON writes, and merging per-rank partial manifests.

A shard directory holds ``NAME-%06d.tar`` files and ``manifest.json`` (see docs/ARCHITECTURE.md "Shards"). Several
writer ranks each write their own shards plus a partial manifest ``.partial-rank%05d-of-%05d.json``; rank 0 waits
for all partials of the same run (same ``signature``), merges them into ``manifest.json`` (written last, atomically)
and deletes the partials. No two ranks ever write the same file.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from data_pipeline.files import atomic_write_json
from data_pipeline.locations import is_remote, redact

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("kind", "shards", "total", "image_size", "channels", "class_names")


class ManifestError(ValueError):
    """A shard spec or manifest that cannot be used, described in one line naming the file and key."""


class ShardError(ManifestError):
    """Shards on disk that do not match the manifest (missing, short, damaged), in one line naming them.

    ``shards``: the file names concerned. A ManifestError, so the trainers exit with status 2.
    """

    def __init__(self, message: str, shards: Sequence[str] = ()):
        super().__init__(message)  # args = (message,): pickles through DataLoader workers with ``shards`` intact
        self.shards: List[str] = list(shards)


TAR_BLOCK = 512  # a tar file is a whole number of 512-byte blocks


def name_list(names: Sequence[str], first: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 995 more``: a few names and how many others, for a one-line message."""
    shown = ", ".join(names[:first])
    return shown + (f" and {len(names) - first} more" if len(names) > first else "")


def missing_files(paths: Sequence[str]) -> List[int]:
    """Indices of ``paths`` that are not on disk, from one listing of each directory (not a stat per file: on a
    cluster filesystem a directory listing of 10,000 shards costs a few metadata requests, 10,000 stats as many)."""
    by_dir: Dict[str, List[int]] = {}
    for i, p in enumerate(paths):
        by_dir.setdefault(os.path.dirname(p) or ".", []).append(i)
    missing: List[int] = []
    for d, idxs in by_dir.items():
        try:
            present = set(os.listdir(d))
        except OSError:
            present = set()
        missing += [i for i in idxs if os.path.basename(paths[i]) not in present]
    return sorted(missing)


def file_problem(path: str, entry: Dict[str, Any]) -> Optional[str]:
    """Why the shard file at ``path`` cannot match its manifest ``entry`` by its size alone (one stat), or None:
    missing, a size other than the recorded ``bytes``, or (manifests without sizes) not whole 512-byte blocks."""
    try:
        size = os.stat(path).st_size
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    want = entry.get("bytes")
    if want is not None and size != int(want):
        return f"{size} bytes on disk, the manifest says {int(want)} (cut short or replaced?)"
    if size == 0 or size % TAR_BLOCK:
        return f"{size} bytes on disk, not a whole number of {TAR_BLOCK}-byte tar blocks (cut short?)"
    return None


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index``: ``PREFIX-%06d.tar``."""
    return f"{prefix}-{index:06d}.tar"


def command_line() -> str:
    """The exact command that started this process, shell-quoted (recorded in manifests)."""
    argv0 = sys.argv[0] if sys.argv else ""
    exe = "python" if argv0.endswith(".py") else ""
    return " ".join([exe] * bool(exe) + [shlex.quote(a) for a in sys.argv])


def _expand_braces(pattern: str) -> List[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def load_spec(spec: str | os.PathLike) -> Tuple[Dict[str, Any], List[str]]:
    """(manifest, shard paths) for a shard spec: a directory holding manifest.json, a manifest path, or a brace
    pattern of shard paths (``dir/train-{000000..000009}.tar``) whose directory holds the manifest.

    With a brace pattern the manifest is restricted to the named shards (``total`` recomputed).
    """
    spec = os.fspath(spec)
    if is_remote(spec):
        raise ManifestError(f"{redact(spec)}: remote shards are read by the training stream only; copy them to a "
                            "local directory for this tool")
    p = Path(spec)
    subset: Optional[List[str]] = None
    if p.is_dir():
        mpath = p / MANIFEST_NAME
    elif p.name == MANIFEST_NAME or (p.suffix == ".json" and p.is_file()):
        mpath = p
    elif "{" not in spec and not p.suffix == ".tar":
        raise ManifestError(f"{spec}: no such shard directory (expected a directory with {MANIFEST_NAME}, a "
                            f"manifest path, or a brace pattern of .tar shards)")
    else:
        names = _expand_braces(spec)
        dirs = {str(Path(n).parent) for n in names}
        if len(dirs) != 1:
            raise ManifestError(f"{spec}: a brace pattern must name shards of one directory, got {sorted(dirs)}")
        mpath = Path(dirs.pop()) / MANIFEST_NAME
        subset = [Path(n).name for n in names]
    if not mpath.is_file():
        raise ManifestError(f"{mpath}: no manifest (shards are read through their manifest.json; was the "
                            "writer interrupted?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{mpath}: unreadable manifest ({err})") from None
    validate_manifest(manifest, str(mpath))
    if subset is not None:
        manifest = restrict_manifest(manifest, subset, str(mpath), spec)
    paths = [str(mpath.parent / s["name"]) for s in manifest["shards"]]
    return manifest, paths


def restrict_manifest(manifest: Dict[str, Any], names: Sequence[str], where: str, spec: str) -> Dict[str, Any]:
    """``manifest`` restricted to the shards ``names`` (a brace pattern's), ``total`` recomputed; ManifestError
    naming ``where`` if one of them is not in it."""
    by_name = {s["name"]: s for s in manifest["shards"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ManifestError(f"{where}: shards {missing[:3]} of {spec} are not in the manifest")
    manifest = dict(manifest, shards=[by_name[n] for n in names])
    manifest["total"] = sum(s["num_samples"] for s in manifest["shards"])
    return manifest


def validate_manifest(manifest: Any, where: str) -> None:
    """Raise ManifestError naming ``where`` and the key if ``manifest`` lacks a required field."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: a manifest must be a JSON object")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise ManifestError(f"{where}: missing key '{key}'")
    if manifest["kind"] not in ("image", "latent"):
        raise ManifestError(f"{where}: kind must be 'image' or 'latent', got {manifest['kind']!r}")
    if manifest["kind"] == "latent":
        lat = manifest.get("latent")
        for key in ("shape", "shift", "scale", "stored"):
            if not isinstance(lat, dict) or key not in lat:
                raise ManifestError(f"{where}: missing key 'latent.{key}'")
    for i, s in enumerate(manifest["shards"]):
        if not isinstance(s, dict) or "name" not in s or "num_samples" not in s:
            raise ManifestError(f"{where}: shards[{i}] needs 'name' and 'num_samples'")
        if "bytes" in s and not (isinstance(s["bytes"], int) and s["bytes"] >= 0):
            raise ManifestError(f"{where}: shards[{i}].bytes must be a file size in bytes, got {s['bytes']!r}")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["total"]:
        raise ManifestError(f"{where}: 'total' does not equal the sum of the shards' num_samples")


# ------------------------------------------------------------------------------------------ partial manifests
def partial_path(out_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its partial manifest."""
    return Path(out_dir) / f".partial-rank{rank:05d}-of-{world_size:05d}.json"


def write_partial(out_dir: str | os.PathLike, rank: int, world_size: int, signature: Dict[str, Any],
                  body: Dict[str, Any]) -> Path:
    """Atomically write this rank's partial manifest (``body`` plus the run ``signature``)."""
    path = partial_path(out_dir, rank, world_size)
    atomic_write_json(path, {"signature": signature, "rank": rank, "world_size": world_size, **body}, fsync=True)
    return path


def clear_stale(out_dir: str | os.PathLike, rank: int, world_size: int) -> None:
    """Before writing: remove this rank's old partial, and on rank 0 the old manifest (a crashed rerun must not
    leave a manifest that claims shards which are being rewritten)."""
    partial_path(out_dir, rank, world_size).unlink(missing_ok=True)
    if rank == 0:
        (Path(out_dir) / MANIFEST_NAME).unlink(missing_ok=True)


def gather_partials(out_dir: str | os.PathLike, world_size: int, signature: Dict[str, Any],
                    timeout: float = 24 * 3600.0, poll: float = 0.5) -> List[Dict[str, Any]]:
    """Wait until every rank's partial manifest with ``signature`` exists; return them ordered by rank."""
    deadline = time.monotonic() + timeout
    found: Dict[int, Dict[str, Any]] = {}
    while True:
        for r in range(world_size):
            if r in found:
                continue
            p = partial_path(out_dir, r, world_size)
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if data.get("signature") == signature:
                found[r] = data
        if len(found) == world_size:
            return [found[r] for r in range(world_size)]
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(found))
            raise TimeoutError(f"{out_dir}: ranks {missing} did not write their partial manifest within "
                               f"{timeout:.0f}s")
        time.sleep(poll)


def finish_manifest(out_dir: str | os.PathLike, rank: int, world_size: int, signature: Dict[str, Any],
                    body: Dict[str, Any], merge: Callable[[Sequence[Dict[str, Any]]], Dict[str, Any]],
                    timeout: float = 24 * 3600.0) -> Optional[Dict[str, Any]]:
    """Write this rank's partial; on rank 0 also wait for all partials, write the merged manifest (atomically,
    last) and remove the partials. Returns the merged manifest on rank 0, else None."""
    write_partial(out_dir, rank, world_size, signature, body)
    if rank != 0:
        return None
    parts = gather_partials(out_dir, world_size, signature, timeout=timeout)
    manifest = merge(parts)
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest, fsync=True)
    for r in range(world_size):
        partial_path(out_dir, r, world_size).unlink(missing_ok=True)
    return manifest
