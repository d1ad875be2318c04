"""Training checkpoints as readers see them: the directory layout, finding the newest complete one, and loading
their files without ever running code from them.

Layout of `RUN/checkpoints/step_%07d/` (docs/ARCHITECTURE.md): `meta.json`, `ema.safetensors` (a consolidated
checkpoint on its own: its safetensors metadata holds the same meta under `ditstack`), `optim/` (the optimizer
state, launch/optimizer_state.py), `rank/rank_%05d.pt` (each rank's RNG states, data position and logging window).
A `step_*` directory is complete by construction: it gets its final name only after every rank finished writing
(launch/checkpoint.py writes them); a run killed mid-write leaves only a `.tmp-*` directory, which readers ignore.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

STEP_DIR = re.compile(r"^step_(\d{7,})$")
META_FILE = "meta.json"
EMA_FILE = "ema.safetensors"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, described in one line naming it."""


def step_dir_name(step: int) -> str:
    """Final directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:07d}"


def step_dir(root: Path, step: int) -> Path:
    """Final directory of the checkpoint of `step` under `root`."""
    return Path(root) / step_dir_name(step)


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
