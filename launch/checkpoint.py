"""Writing and reading a run's training checkpoints: one object, `CheckpointStore`, owns both.

A checkpoint is written by every rank into a temporary directory, which rank 0 renames into place once every rank
has written its part; `latest` then names it and old ones are pruned (the layout and the readers' side:
eval/checkpoints.py). Every step of a save is agreed across the ranks, so a write that fails on one rank (a full
disk, the run directory gone) stops every rank with one line naming the file, and the partial checkpoint is
removed. What goes into a checkpoint comes from its owner, the trainer (`Checkpointable`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from data_pipeline.dist_env import DistInfo, all_ranks_true
from data_pipeline.files import atomic_write_text, fsync_dir
from eval.checkpoints import (LATEST_FILE, META_FILE, CheckpointError, complete_checkpoints, find_latest,
                              load_tensors_file, read_meta, step_dir, step_dir_name)

log = logging.getLogger(__name__)


class Checkpointable(Protocol):
    """What a trainer provides for its checkpoints."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """meta.json (collective: called on every rank)."""

    def save_state(self, tmp: Path) -> None:
        """Every rank writes its share of the state (e.g. the optimizer state) into `tmp` (collective)."""

    def write_files(self, tmp: Path) -> None:
        """Rank 0 writes its files into `tmp` (e.g. the EMA weights), before meta.json and the rename."""

    def rank_state(self) -> dict[str, Any]:
        """This rank's private state (RNG states, data position, ...): tensors and JSON-able values."""

    def load_state(self, path: Path, meta: dict[str, Any]) -> None:
        """Restore the shared state (models, optimizers) from checkpoint `path`."""

    def restore_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what `rank_state` returned (only on the number of ranks that wrote it)."""


class CheckpointWriteError(OSError):
    """A checkpoint write failed on another rank (its log names the file)."""


class CheckpointStore:
    """The checkpoints under `root` (RUN/checkpoints) of a run with checkpoint format `fmt`."""

    def __init__(self, root: Path, info: DistInfo, fmt: str, keep_last: int,
                 format_hints: Optional[dict[str, str]] = None) -> None:
        self.root, self.info, self.fmt, self.keep_last = Path(root), info, fmt, keep_last
        self.format_hints = format_hints or {}

    # ------------------------------------------------------------------------------------------------ reading
    def resolve(self, resume: Optional[str]) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
        """`--resume` (None, 'auto', a checkpoint or a checkpoints directory) → (checkpoint, its meta.json), or
        (None, None) to start fresh. A checkpoint of another format is a CheckpointError."""
        path = self._resolve_path(resume)
        if path is None:
            return None, None
        meta = read_meta(path)
        if meta.get("format") != self.fmt:
            hint = self.format_hints.get(str(meta.get("format")), "")
            raise CheckpointError(f"{path}: not a {self.fmt} checkpoint (format {meta.get('format')!r}){hint}")
        return path, meta

    def _resolve_path(self, resume: Optional[str]) -> Optional[Path]:
        if resume is None or resume == "":
            return None
        if resume == "auto":
            return find_latest(self.root)
        path = Path(resume)
        if path.is_dir() and path.name == "checkpoints":
            found = find_latest(path)
            if found is None:
                raise CheckpointError(f"--resume {resume}: no complete checkpoint in this directory")
            return found
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        return path

    def load(self, path: Path, meta: dict[str, Any], owner: Checkpointable) -> bool:
        """Restore `owner` from checkpoint `path`: the shared state always, this rank's private state when the
        checkpoint was written by as many ranks as this run has (returns whether it was)."""
        owner.load_state(path, meta)
        if meta.get("world_size") != self.info.world_size:
            return False
        file = Path(path) / "rank" / f"rank_{self.info.rank:05d}.pt"
        if not file.is_file():
            raise CheckpointError(f"{path}: no state for rank {self.info.rank} ({file.name} missing)")
        state = load_tensors_file(file)
        try:
            owner.restore_rank_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{file}: not a rank state of this trainer ({type(err).__name__}: {err})") from None
        return True

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, step: int, owner: Checkpointable) -> Path:
        """Write the checkpoint of `step` (collective): a temporary directory, every rank's part, rank 0's
        files and meta.json, the rename, `latest`, pruning. Each stage is agreed across the ranks."""
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        self._agree(self._attempt(lambda: self._begin(tmp)) if self.info.is_main else None, tmp)
        failure = self._attempt(lambda: owner.save_state(tmp))
        failure = failure or self._attempt(lambda: torch.save(owner.rank_state(),
                                                              tmp / "rank" / f"rank_{self.info.rank:05d}.pt"))
        self._agree(failure, tmp)
        meta = owner.checkpoint_meta()
        final = step_dir(self.root, step)
        if self.info.is_main:
            failure = self._attempt(lambda: self._finish(tmp, final, meta, owner))
        self._agree(failure, tmp)
        log.info("checkpoint written: %s", final)
        return final

    def _begin(self, tmp: Path) -> None:
        """Rank 0: a fresh temporary directory (any left by a run killed while saving are removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        (tmp / "rank").mkdir()

    def _finish(self, tmp: Path, final: Path, meta: dict[str, Any], owner: Checkpointable) -> None:
        """Rank 0, once every rank wrote its part: its files, meta.json, the rename, `latest`, pruning."""
        owner.write_files(tmp)
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True), fsync=True)
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST_FILE, final.name + "\n", fsync=True)
        for _, old in complete_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _agree(self, failure: Optional[OSError], tmp: Path) -> None:
        """Every rank learns whether any rank failed (collective); then every rank raises."""
        if all_ranks_true(failure is None, self.info.device):
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure if failure is not None else CheckpointWriteError(
            f"{tmp}: another rank could not write its part of the checkpoint (see its log)")

    @staticmethod
    def _attempt(write: Callable[[], Any]) -> Optional[OSError]:
        """Run a write; its failure as an OSError naming the file (None on success). torch.save and safetensors
        report a full disk as RuntimeError ("unexpected pos ...") or SafetensorError: those become ENOSPC."""
        try:
            write()
        except OSError as err:
            return err
        except Exception as err:  # noqa: BLE001 - serialisers wrap the OS error in their own types
            text = str(err)
            if "code: 28" in text or "No space left" in text or "unexpected pos" in text:
                match = re.search(r"(/[^\s'\"]+)", text)
                return OSError(errno.ENOSPC, "No space left on device", match.group(1) if match else None)
            raise
        return None
