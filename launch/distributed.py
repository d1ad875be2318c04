"""Distributed setup for every launcher: single process, torchrun, deepspeed, or SLURM's srun.

Rank, local rank and world size are read in this order of preference: torchrun/deepspeed variables (RANK,
LOCAL_RANK, WORLD_SIZE), then SLURM (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS), else a single process. The
device is picked from the LOCAL rank (never the global one): `cuda:LOCAL_RANK` with NCCL on GPUs, CPU with gloo.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as `gpu[01-04],gpu07`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("scontrol show hostnames failed (%s); parsing the nodelist", err)
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def resolve_env(env: Optional[dict] = None) -> dict:
    """Return RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for this process as strings, from the launcher."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"], "LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
               "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    else:
        out = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in env and int(out["WORLD_SIZE"]) > 1:
        out["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"])
    else:
        out["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(15000 + int(env["SLURM_JOB_ID"]) % 20000)
    elif int(out["WORLD_SIZE"]) == 1:
        out["MASTER_PORT"] = str(_free_port())
    else:
        raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with torchrun, deepspeed or srun")
    return out


def init_distributed(use_deepspeed: bool = True) -> DistInfo:
    """Set up the process group for this launcher and return where this process sits.

    Exports RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT so DeepSpeed and torch agree, picks the device from
    LOCAL_RANK, and initialises the process group (also for a single process, so collectives work everywhere).
    """
    resolved = resolve_env()
    os.environ.update(resolved)
    rank, local_rank, world = int(resolved["RANK"]), int(resolved["LOCAL_RANK"]), int(resolved["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Tear the process group down."""
    if dist.is_initialized():
        dist.destroy_process_group()
