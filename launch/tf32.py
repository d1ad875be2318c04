"""TF32 for fp32 matrix products and convolutions on NVIDIA GPUs (Ampere and newer).

TF32 runs fp32 matmuls on the tensor cores with a 10-bit mantissa: several times the fp32 throughput, at a rounding
error of about 1e-3 relative per product (the official DiT trains and samples with it on). PyTorch leaves it off
for matmuls (on for cuDNN convolutions). Our entry points turn both on by default on CUDA and record the choice;
`train.tf32: false` (or `--no-tf32`) gives exact fp32. The CPU is never affected.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def configure_tf32(device: torch.device, enabled: bool = True) -> bool:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions when `device` is a GPU; returns whether fp32
    work on `device` now runs in TF32 (False on the CPU)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    log.info("TF32 for fp32 matmuls and convolutions: %s", "on" if enabled else "off (exact fp32)")
    return bool(enabled)
