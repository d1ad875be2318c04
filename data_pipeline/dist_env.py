"""Where this process sits in the job, and its process group: single process, torchrun, deepspeed, or SLURM's srun.

The one place that reads ranks from the environment (every entry point uses it: trainers, eval/fid.py,
make_shards.py, encode_latents.py). Rank, local rank and world size are read in this order of preference:
torchrun/deepspeed variables (RANK, LOCAL_RANK, WORLD_SIZE), then SLURM (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS), else a single process. The device is picked from the LOCAL rank and the GPUs this process can see
(`data_pipeline.devices.select_device`): NCCL on GPUs, gloo on the CPU.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

from data_pipeline.devices import select_device

log = logging.getLogger(__name__)

# Collective timeout of the process group. Rank 0 alone writes sample grids (hundreds of sampler steps of the
# EMA model), finishes checkpoints (renames and pruning of multi-GB folders on a network file system), and at the
# end draws the loss curve and samples.gif, while the other ranks wait in the next collective; torch's and
# DeepSpeed's 10-30 minute defaults can kill a healthy run of a big model there. A real hang is rare (a crashed
# rank ends the whole srun step through --kill-on-bad-exit), so a long timeout costs little.
DEFAULT_DIST_TIMEOUT = timedelta(minutes=60)

# SLURM jobs derive the rendezvous port from the job id (the same on every task and across requeues; jobs
# sharing a node differ). The range stays below Linux's ephemeral ports (32768+, net.ipv4.ip_local_port_range),
# where an outgoing connection may already hold the port. slurm/lib.sh (dit_master_port) uses the same formula.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000

# torch's own default since 2.2 (tear the process down on a collective error/timeout without first aborting the
# communicator, which can itself hang); set explicitly so every launcher and torch version behaves the same.
NCCL_ASYNC_ERROR_HANDLING = "3"


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


def slurm_master_port(job_id: int) -> int:
    """Rendezvous port of SLURM job `job_id` (15000-29999; the same formula as slurm/lib.sh's dit_master_port)."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


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


def _expand_tasks_per_node(spec: str) -> Optional[list[int]]:
    """SLURM's compressed per-node task counts (`8(x4)`, `2(x2),1`) as a list; None when unparsable."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts or None


def local_world_size(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """Number of processes of the job on this node, or None when the launcher does not say.

    From LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed's launcher) when the ranks come from RANK/WORLD_SIZE;
    from SLURM_STEP_TASKS_PER_NODE (else SLURM_TASKS_PER_NODE) and SLURM_NODEID under srun.
    """
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if "RANK" in env and "WORLD_SIZE" in env:
        return None  # torchrun-style ranks without a local size: SLURM's counts would describe the outer srun
    if "SLURM_PROCID" not in env:
        return None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    counts = _expand_tasks_per_node(spec) if spec else None
    if not counts:
        return None
    if len(set(counts)) == 1:
        return counts[0]
    node = env.get("SLURM_NODEID", "")
    # SLURM_NODEID counts the job's nodes; the step's list matches it only when the step spans all of them.
    if node.isdigit() and int(node) < len(counts) and len(counts) == int(env.get("SLURM_JOB_NUM_NODES",
                                                                                env.get("SLURM_NNODES", "-1"))):
        return counts[int(node)]
    return None


def _ranks(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK from torchrun/deepspeed variables, else SLURM's, else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"], "LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def resolve_env(env: Optional[Mapping[str, str]] = None) -> dict:
    """Return RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (and LOCAL_WORLD_SIZE when known) for this
    process as strings, from the launcher."""
    env = dict(os.environ if env is None else env)
    out = _ranks(env)
    local_world = local_world_size(env) if int(out["WORLD_SIZE"]) > 1 else 1
    if local_world is not None:
        out["LOCAL_WORLD_SIZE"] = str(local_world)
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in env and int(out["WORLD_SIZE"]) > 1:
        out["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"])
    else:
        out["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(slurm_master_port(int(env["SLURM_JOB_ID"])))
    elif int(out["WORLD_SIZE"]) == 1:
        out["MASTER_PORT"] = str(_free_port())
    else:
        raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with torchrun, deepspeed or srun")
    return out


def rank_world_from_env(env: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """(rank, world_size): torchrun/deepspeed (RANK, WORLD_SIZE), then SLURM (SLURM_PROCID, SLURM_NTASKS), else (0, 1)."""
    ranks = _ranks(os.environ if env is None else env)
    rank, world = int(ranks["RANK"]), int(ranks["WORLD_SIZE"])
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world} in the environment")
    return rank, world


def dist_timeout(timeout: Union[timedelta, float, int, None]) -> timedelta:
    """The collective timeout for `timeout` (a timedelta, or minutes; None: DEFAULT_DIST_TIMEOUT)."""
    if timeout is None:
        return DEFAULT_DIST_TIMEOUT
    value = timeout if isinstance(timeout, timedelta) else timedelta(minutes=float(timeout))
    if value.total_seconds() <= 0:
        raise ValueError(f"distributed timeout must be positive, got {timeout!r}")
    return value


def init_distributed(use_deepspeed: bool = True, timeout: Union[timedelta, float, int, None] = None) -> DistInfo:
    """Set up the process group for this launcher and return where this process sits.

    Exports RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (and LOCAL_WORLD_SIZE) so DeepSpeed and torch
    agree, picks the device with `select_device`, and initialises the process group (also for a single process, so
    collectives work everywhere) with collective timeout `timeout` (a timedelta or minutes; default
    DEFAULT_DIST_TIMEOUT). Raises `DeviceLayoutError` when the local rank has no GPU of its own.
    """
    pg_timeout = dist_timeout(timeout)
    resolved = resolve_env()
    os.environ.update(resolved)
    rank, local_rank, world = int(resolved["RANK"]), int(resolved["LOCAL_RANK"]), int(resolved["WORLD_SIZE"])
    local_world = int(resolved["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in resolved else None
    device = select_device(local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", NCCL_ASYNC_ERROR_HANDLING)
    else:
        backend = "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=pg_timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=pg_timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (collective; one process: no tensor, no device sync)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    ok = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Tear the process group down."""
    if dist.is_initialized():
        dist.destroy_process_group()
