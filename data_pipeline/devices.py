"""The device of a process and how it computes there: which GPU a local rank uses, TF32, autocast.

- `select_device` picks the GPU from the local rank and the GPUs the process can see (SLURM's GPU binding).
- TF32 runs fp32 matmuls on the tensor cores of NVIDIA GPUs (Ampere and newer) with a 10-bit mantissa: several
  times the fp32 throughput, at a rounding error of about 1e-3 relative per product (the official DiT trains and
  samples with it on). PyTorch leaves it off for matmuls (on for cuDNN convolutions). Our entry points turn both on
  by default on CUDA and record the choice; `train.tf32: false` (or `--no-tf32`) gives exact fp32. The CPU is never
  affected.
- `autocast` is the one mixed-precision context of the inference paths (sampling, evaluation, the LR finder); the
  trainer's bf16 is DeepSpeed's `torch_autocast` inside the engine (launch/builders.py says why).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import ContextManager, Mapping, Optional, Union

import torch

log = logging.getLogger(__name__)


class DeviceLayoutError(RuntimeError):
    """This process's local rank has no GPU of its own among the visible ones."""


def _gpu_list_len(value: str) -> int:
    """Number of GPUs in a SLURM GPU list such as `0,1,2,3` or `0-3,6`."""
    count = 0
    for part in value.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = (int(x) for x in part.split("-"))
            count += max(hi - lo + 1, 0)
        elif part:
            count += 1
    return count


def _bound_to_own_gpus(visible: int, env: Mapping[str, str]) -> bool:
    """Whether SLURM gave this task a subset of the node's GPUs (so other local ranks see other GPUs)."""
    if visible == 1:
        return True  # --gpus-per-task=1 / --gpu-bind=single:1 / map_gpu: each task sees its own one GPU
    if env.get("SLURM_GPUS_PER_TASK"):
        return True  # --gpus-per-task=k binds k GPUs to each task (--gpu-bind=per_task:k) unless overridden
    step_gpus = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    return _gpu_list_len(step_gpus) > visible  # the step holds more GPUs on this node than this task sees


def select_device(local_rank: int, local_world_size: Optional[int] = None,
                  env: Optional[Mapping[str, str]] = None) -> torch.device:
    """The device of the process with node-local rank `local_rank` among the GPUs it can see.

    With n visible GPUs (torch.cuda.device_count(), after CUDA_VISIBLE_DEVICES) the rule is `cuda:(local_rank % n)`:
    - every node GPU visible to every task (torchrun, srun with --gpus-per-node): cuda:local_rank;
    - one GPU visible (srun --gpus-per-task=1 or --gpu-bind=single:1/map_gpu): cuda:0;
    - k GPUs visible per task while the tasks are bound to different GPUs (--gpus-per-task=k, --gpu-bind=closest
      with SLURM's default block distribution): the (local_rank mod k)-th of them.
    More local ranks (`local_world_size`, else `local_rank + 1`) than visible GPUs without such a binding would put
    two ranks on one GPU: `DeviceLayoutError`, on every local rank alike. No CUDA: the CPU.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    env = os.environ if env is None else env
    visible = torch.cuda.device_count()
    needed = local_world_size if local_world_size is not None else local_rank + 1
    if needed > visible and not _bound_to_own_gpus(visible, env):
        tasks = f"{local_world_size} local ranks" if local_world_size is not None else f"local rank {local_rank}"
        raise DeviceLayoutError(
            f"{tasks} on this node but only {visible} visible GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', '<unset>')}, local rank {local_rank}): start at most {visible} "
            f"tasks per node, or give each task its own GPU (srun --gpus-per-task=1)")
    return torch.device("cuda", local_rank % visible)


def configure_tf32(device: Union[str, torch.device], enabled: bool = True) -> bool:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions when `device` is a GPU; returns whether fp32
    work on `device` now runs in TF32 (False on the CPU)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    log.info("TF32 for fp32 matmuls and convolutions: %s", "on" if enabled else "off (exact fp32)")
    return bool(enabled)


def autocast(device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> ContextManager:
    """`torch.autocast` to `dtype` on `device`'s type; no context for None or fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
