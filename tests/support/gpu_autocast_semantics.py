"""Run launch/train.py with the autocast query behaving as on a GPU, recording the dtype of every matmul.

    python tests/support/gpu_autocast_semantics.py OUT.json -- <launch/train.py arguments>

On a GPU, the no-argument `torch.is_autocast_enabled()` reads CUDA's autocast state, i.e. the state of the device
the engine computes on; on the CPU it reads CUDA's too (always off), so CPU runs never see what DeepSpeed does with
an outer autocast on a GPU. Here the no-argument query reads the CPU's state, as it reads the engine device's on a
GPU. Every forward of the DiT runs under a dispatch mode that counts the matrix products by the dtype they run in;
OUT.json gets one record per forward: {"grad": autograd on (a training forward), "dtypes": {dtype: count}}.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MATMULS = ("mm", "addmm", "bmm", "baddbmm", "linear", "_linear_pointwise", "matmul",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


class MatmulDtypes(TorchDispatchMode):
    """Counts matrix products (after autocast has cast their inputs) by the dtype of their first input."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS and args and isinstance(args[0], torch.Tensor):
            self.counts[str(args[0].dtype)] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    original_query = torch.is_autocast_enabled

    def gpu_semantics_query(*args):
        return original_query(*args) if args else original_query("cpu")

    torch.is_autocast_enabled = gpu_semantics_query

    from dit.models import DiT
    from launch import train

    records = []
    forward = DiT.forward

    def recorded_forward(self, *args, **kwargs):
        mode = MatmulDtypes()
        with mode:
            result = forward(self, *args, **kwargs)
        records.append({"grad": torch.is_grad_enabled(), "dtypes": dict(mode.counts)})
        return result

    DiT.forward = recorded_forward
    status = train.main(argv)
    out.write_text(json.dumps(records))
    return status


if __name__ == "__main__":
    sys.exit(main())
