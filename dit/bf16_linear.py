"""A Linear layer's forward and backward for bf16 training on the CPU, arranged for oneDNN's AMX kernels.

Two costs of ATen's path on a Sapphire Rapids core (benchmarks/RESULTS.md): `addmm` writes the broadcast bias into
its output before the matmul (an extra pass over [tokens, out] per layer), and the weight gradient `gy^T @ x`, a
matmul with a transposed left operand and the token count (tens of thousands) as its inner dimension, runs at a
third of the forward's rate. Here the forward is one oneDNN call with the bias in the epilogue, and the weight
gradient is computed from a transposed copy of whichever operand is narrower (a [tokens, 384] copy costs less than
the matmul time it saves). The values are the same matmuls with fp32 accumulation, so gradients agree with
ATen's to bf16 rounding.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

# Below this many rows the plain transposed-operand matmul is as fast as copying first.
_MIN_ROWS_FOR_TRANSPOSE = 1024
# Rows appended to a transposed input for the bias gradient: a multiple of AMX's tile height keeps the matmul fast.
_PAD = 16


@functools.lru_cache(maxsize=1)
def onednn_bf16() -> bool:
    """Whether this CPU and torch build run oneDNN's bf16 kernels natively (not on every x86/ARM CPU)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _transposed(m: torch.Tensor, ones_row: bool = False) -> torch.Tensor:
    """A contiguous copy of m.t() for a [rows, cols] matrix, copied in 512-row blocks (ATen's single transposing
    copy of a large bf16 matrix is several times slower). With `ones_row`: 16 more rows, all zero but the first
    (ones), so that `_transposed(x, True) @ g` also yields the column sums of g (a bias gradient) in its row `cols`.
    """
    rows, cols = m.shape
    out = m.new_empty(cols + (_PAD if ones_row else 0), rows)
    for i in range(0, rows, 512):
        out[:cols, i:i + 512].copy_(m[i:i + 512].t())
    if ones_row:
        out[cols:].zero_()
        out[cols].fill_(1.0)
    return out


class _LinearBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]  # type: ignore[override]
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        rows, (n_out, k_in) = x.shape[0], weight.shape
        if ctx.needs_input_grad[1] and rows >= _MIN_ROWS_FOR_TRANSPOSE and k_in < n_out:
            # [x^T; 1 0...] @ grad = [grad_w^T; grad_b; 0...]: the bias gradient rides in the matmul (a column sum
            # of a bf16 [tokens, out] matrix costs more than the padded rows).
            prod = _transposed(x, ones_row=want_b).mm(grad)
            grad_w = prod[:k_in].t()
            grad_b = prod[k_in] if want_b else None
        elif ctx.needs_input_grad[1] and rows >= _MIN_ROWS_FOR_TRANSPOSE and n_out < k_in:
            grad_t = _transposed(grad)
            grad_w = grad_t.mm(x)
            grad_b = grad_t.sum(1) if want_b else None  # contiguous rows: cheap
        elif ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)
        if want_b and grad_b is None:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def applies(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether `linear_bf16` handles this call: CPU training under bf16 autocast (or on bf16 tensors), oneDNN bf16
    available, plain (not ZeRO-3-partitioned) parameters."""
    # Not under torch.compile: inductor lowers oneDNN's linear only with constant (frozen) weights.
    if not (torch.is_grad_enabled() and x.device.type == "cpu") or torch.compiler.is_compiling():
        return False
    weight = layer.weight
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    in_bf16 = x.dtype == torch.bfloat16 and (autocast_bf16 or weight.dtype == torch.bfloat16)
    # ZeRO-3 gathers a module's parameters in hooks around the module's own forward, which this path bypasses.
    return in_bf16 and not hasattr(weight, "ds_id") and onednn_bf16()


def linear_bf16(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for CPU bf16 training (see `applies`), as the module computes it under bf16 autocast."""
    weight = layer.weight.to(torch.bfloat16)
    bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
    out = _LinearBF16.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])
