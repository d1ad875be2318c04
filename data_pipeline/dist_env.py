"""Rank and world size of this process from the launcher's environment (no process group needed)."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple


def rank_world_from_env(env: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """(rank, world_size): torchrun/deepspeed (RANK, WORLD_SIZE), then SLURM (SLURM_PROCID, SLURM_NTASKS), else (0, 1)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    else:
        rank, world = 0, 1
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world} in the environment")
    return rank, world
