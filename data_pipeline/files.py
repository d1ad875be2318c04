"""Writing files so that a reader never sees a torn one, and reading append-only logs.

Every file the project writes for others to read (manifests, shards, checkpoints, weights, metrics, images) goes
through `atomic_save`: the content is written under a temporary name in the same directory, given the mode any
other new file gets (0666 minus the umask: some writers, e.g. safetensors, create 0600 files), and renamed over the
final name, which is atomic on POSIX filesystems (NFS and Lustre included). A crash leaves either the old file or
the new one, and at worst a `.NAME.tmp-PID` file that the next write of that name replaces.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

PathLike = Union[str, os.PathLike]


def temp_name(path: PathLike) -> Path:
    """The temporary name `atomic_save` writes `path` under (same directory, hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def commit(tmp: PathLike, path: PathLike) -> Path:
    """Give the finished temporary file `tmp` the usual mode and rename it over `path` (for streaming writers
    that wrote `temp_name(path)` themselves)."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)
    return Path(path)


def atomic_save(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to write the content to a temporary path, then rename it to `path`; returns `path`.

    The parent directory is created if needed. The temporary file is removed when `write` fails (the old `path`,
    if any, is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically (`fsync`: on disk before the rename, for checkpoints)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return atomic_save(path, write)


def atomic_write_text(path: PathLike, text: str, fsync: bool = False) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode(), fsync=fsync)


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 1, fsync: bool = False) -> Path:
    """Write `obj` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n", fsync=fsync)


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write a safetensors file atomically (contiguous copies where needed)."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_save(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def atomic_save_npz(path: PathLike, **arrays: Any) -> Path:
    """`np.savez` of `arrays` to `path` atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(fh, **arrays)
    return atomic_save(path, write)


def atomic_save_image(image: Any, path: PathLike, fmt: Optional[str] = None, **save_kwargs: Any) -> Path:
    """Save a PIL image (or a matplotlib figure) atomically; `fmt` defaults to the path's suffix (PNG, GIF...)."""
    fmt = fmt or Path(path).suffix.lstrip(".").upper() or "PNG"
    if hasattr(image, "savefig"):
        return atomic_save(path, lambda tmp: image.savefig(tmp, format=fmt.lower(), **save_kwargs))
    return atomic_save(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def read_jsonl(path: PathLike) -> list[dict]:
    """Records of a JSONL log (a torn last line from a killed run is ignored)."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
