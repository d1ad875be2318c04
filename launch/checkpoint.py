"""Checkpoint directories: written under a temporary name, renamed when complete, `latest` pointer, pruning.

Layout of `RUN/checkpoints/step_%07d/` (see docs/ARCHITECTURE.md): `meta.json`, `ema.safetensors` (a consolidated
checkpoint on its own: its safetensors metadata holds the same meta under `ditstack`), `ds/` (the DeepSpeed engine
state, or any other per-trainer state), `rank/rank_%05d.pt` (each rank's RNG states and data position).
Because a directory only gets its final name after every rank finished writing, a `step_*` directory is complete
by construction; a run killed mid-write leaves only a `.tmp-*` directory, which resume ignores and the next save
removes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch


log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{7,})$")
META_FILE = "meta.json"
EMA_FILE = "ema.safetensors"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, described in one line naming it."""


def step_dir_name(step: int) -> str:
    """Final directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:07d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None
                            ) -> None:
    """Write a safetensors file under a temporary name and rename it into place, with the mode other files get
    (0666 minus the umask: safetensors itself creates 0600 files)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
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


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories under `root`, sorted by step (oldest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_meta(ckpt: Path) -> dict:
    """The `meta.json` of a checkpoint directory; raises CheckpointError naming the path when unusable."""
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: not a checkpoint directory (no {META_FILE})") from None
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: "
                              f"{str(err)[:160]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    return meta


def find_latest(root: Path) -> Optional[Path]:
    """Newest complete checkpoint under `root` (the `latest` pointer if it names a complete one), or None."""
    root = Path(root)
    latest = root / LATEST_FILE
    candidates = complete_checkpoints(root)
    if latest.is_file():
        name = latest.read_text().strip()
        named = root / name
        if STEP_DIR.match(name) and (named / META_FILE).is_file():
            # the pointer may lag behind if a run died between the rename and the pointer update
            if not candidates or candidates[-1][1] == named:
                return named
    return candidates[-1][1] if candidates else None


def resolve_resume(resume: Optional[str], root: Path) -> Optional[Path]:
    """Map `--resume` (None, 'auto' or a path) to a checkpoint directory, or None to start fresh."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if path.is_dir() and path.name == "checkpoints":
        found = find_latest(path)
        if found is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint in this directory")
        return found
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    read_meta(path)
    return path


def tmp_dir(root: Path, step: int) -> Path:
    """The temporary directory the checkpoint of `step` is written into before it is renamed."""
    return Path(root) / f".tmp-{step_dir_name(step)}"


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: create the temporary directory every rank writes the checkpoint of `step` into (after removing
    any left by a run killed while saving). The caller makes the ranks wait for it."""
    root = Path(root)
    tmp = tmp_dir(root, step)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    (tmp / "rank").mkdir()
    return tmp


def save_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """Write this rank's private state (RNG states, data position) into the checkpoint being written."""
    path = Path(tmp) / "rank" / f"rank_{rank:05d}.pt"
    torch.save(state, path)


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """Read this rank's private state from a checkpoint."""
    path = Path(ckpt) / "rank" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no state for rank {rank} ({path.name} missing)")
    return load_tensors_file(path)


def load_tensors_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` (never runs code from the file) with a one-line CheckpointError
    naming the file when it is not a plain tensor file (a planted pickle payload, a truncated or foreign file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many types; all mean "not our file"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a plain tensor file, refused ({type(err).__name__}: {first[:160]})") from None


def load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a one-line CheckpointError naming it when it is not one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad header
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {first[:160]})") from None


def step_dir(root: Path, step: int) -> Path:
    """Final directory of the checkpoint of `step` under `root`."""
    return Path(root) / step_dir_name(step)


def finish_save(root: Path, tmp: Path, step: int, meta: dict, keep_last: int,
                write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Rank 0, once every rank wrote its part: write the extra files and meta, rename the checkpoint into place,
    update `latest`, prune old ones. The caller makes the ranks agree before and after."""
    root = Path(root)
    final = step_dir(root, step)
    if write_extra is not None:
        write_extra(tmp)
    atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True))
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. preemption right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    for _, old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final
