"""fp32 CPU training of the adaLN-Zero DiT block with one-pass kernels around the matmuls (dit/native_kernels.c).

In fp32 the block's matmuls are MKL sgemm and its attention is ATen's flash kernel, as in any implementation; the
rest is memory traffic over [tokens, channels] tensors, and ATen spends passes there that need not exist:
`addmm` writes the broadcast bias into its output before the matmul and the bias gradient is a separate column
sum; LayerNorm and the adaLN modulation after it are two passes forward and three backward; the gradients of q, k
and v are stacked and then copied back into the QKV projection's layout. Here:

- the biases of fc1, fc2 and the attention's output projection are added by the kernel that reads the matmul's
  output (the GELU, the gated residual), and their gradients are summed by the kernel that writes the matmul's
  output gradient;
- LayerNorm (no affine) + modulation is one pass forward and one backward (the normalised tensor is not kept);
- the gradients of q, k and v go into the QKV layout in one pass that also sums the QKV bias gradient.

The values are those of the plain modules up to fp32 rounding (tests/test_fused_block.py compares both against
float64). Applies when `applies(...)` says so: fp32 training on the CPU, no autocast, not under torch.compile,
parameters not partitioned by ZeRO-3, kernels built. `dit.layers.DiTBlock` calls it.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from dit import native

_aten = torch.ops.aten
_FLASH = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def applies(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether the fused fp32 path runs for input x [N, T, D] and the layers whose parameters it uses."""
    if not (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False  # inductor traces the plain ops; under autocast the matmuls run in bf16
    params = [p for layer in layers for p in layer.parameters()]
    # ZeRO-3 gathers parameters in hooks around each module's own forward, which this path does not call.
    if any(p.dtype != torch.float32 or p.device.type != "cpu" or hasattr(p, "ds_id") for p in params):
        return False
    if not (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return _FLASH is not None and _FLASH_BWD is not None and native.available()


def _check(name: str, t: torch.Tensor, shape: Optional[tuple[int, ...]] = None) -> None:
    """The C kernels index raw memory: every operand must be fp32 on the CPU with exactly the expected shape
    (`shape`, or any [N, T, C] when None)."""
    fits = t.dim() == 3 if shape is None else tuple(t.shape) == tuple(shape)
    if t.dtype != torch.float32 or t.device.type != "cpu" or not fits:
        want = "[N, T, C]" if shape is None else str(list(shape))
        raise ValueError(f"fused_block: {name} must be a float32 CPU tensor of shape {want}, "
                         f"got {t.dtype} {t.device.type} {list(t.shape)}")


def _check_linear(layer: nn.Linear, in_features: int) -> None:
    if layer.bias is None:
        raise ValueError("fused_block: the linear layer needs a bias")
    _check("weight", layer.weight, (layer.weight.shape[0], in_features))
    _check("bias", layer.bias, (layer.weight.shape[0],))


def _lib() -> ctypes.CDLL:
    lib = native._library()
    if lib is None:
        raise RuntimeError(f"fused_block: the fused CPU kernels are unavailable ({native.unavailable_reason()}); "
                           f"check fused_block.applies() first")
    return lib


_ptr, _threads = native._ptr, native._threads


def _weight_grads(ctx: torch.autograd.function.FunctionCtx, gout: torch.Tensor, x: torch.Tensor,
                  weight: torch.Tensor, input_index: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(input gradient, weight gradient) of `x @ weight.T` for the output gradient gout [M, out], x [M, in]."""
    grad_x = gout.mm(weight) if ctx.needs_input_grad[input_index] else None
    grad_w = None
    if ctx.needs_input_grad[input_index + 1]:
        # MKL is faster with the wider matrix as the right operand (x^T gout for up-projections such as fc1 and
        # QKV, gout^T x for fc2): 10-25 % on these shapes with 2 threads.
        grad_w = x.t().mm(gout).t() if weight.shape[0] > weight.shape[1] else gout.t().mm(x)
    return grad_x, grad_w


# --------------------------------------------------------------------------------------------- LayerNorm + adaLN
class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,  # type: ignore[override]
                eps: float) -> torch.Tensor:
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        n, t, d = x.shape
        out = torch.empty_like(x)
        mean = x.new_empty(n * t)
        rstd = x.new_empty(n * t)
        _lib().dit_norm_modulate_fwd_f32(_ptr(x), _ptr(shift), _ptr(scale), eps, _ptr(out), _ptr(mean), _ptr(rstd),
                                         n, t, d, _threads())
        ctx.save_for_backward(x, mean, rstd, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, mean, rstd, scale = ctx.saved_tensors
        n, t, d = x.shape
        grad = grad.contiguous()
        gx = torch.empty_like(x)
        gscale = x.new_empty(n, d)
        gshift = x.new_empty(n, d)
        _lib().dit_norm_modulate_bwd_f32(_ptr(grad), _ptr(x), _ptr(mean), _ptr(rstd), _ptr(scale), _ptr(gx),
                                         _ptr(gscale), _ptr(gshift), n, t, d, _threads())
        return gx, gshift, gscale, None


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """`modulate(layer_norm(x, eps, no affine), shift, scale)` for x [N, T, D], shift and scale [N, D]."""
    _check("x", x)
    for name, v in (("shift", shift), ("scale", scale)):
        _check(name, v, (x.shape[0], x.shape[2]))
    return _NormModulate.apply(x, shift, scale, float(eps))


# --------------------------------------------------------------------------------------------- MLP
class _LinearGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor  # type: ignore[override]
                ) -> torch.Tensor:
        n, t, k = x.shape
        x2 = x.reshape(n * t, k)
        u = x2.mm(weight.t())  # the bias is added by the GELU kernel
        out = torch.empty_like(u)
        _lib().dit_gelu_bias_fwd_f32(_ptr(u), _ptr(bias), _ptr(out), n * t, u.shape[1], _threads())
        ctx.save_for_backward(x2, weight, bias, u)
        ctx.tokens = (n, t)
        return out.view(n, t, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x2, weight, bias, u = ctx.saved_tensors
        (n, t), c = ctx.tokens, u.shape[1]
        grad = grad.contiguous()
        gu = torch.empty_like(u)
        gbias = u.new_empty(n, c)
        _lib().dit_gelu_bias_bwd_f32(_ptr(grad), _ptr(u), _ptr(bias), _ptr(gu), _ptr(gbias), n, t, c, _threads())
        grad_x, grad_w = _weight_grads(ctx, gu, x2, weight, 0)
        grad_b = gbias.sum(0) if ctx.needs_input_grad[2] else None
        return (grad_x.view(n, t, -1) if grad_x is not None else None), grad_w, grad_b


def linear_gelu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`gelu_tanh(layer(x))` for x [N, T, in] (a Linear with a bias)."""
    _check("x", x)
    _check_linear(layer, x.shape[2])
    return _LinearGelu.apply(x, layer.weight, layer.bias)


# --------------------------------------------------------------------------------------------- gated residual
class _LinearGatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, res: torch.Tensor, gate: torch.Tensor, h: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, t, k = h.shape
        res, gate = res.contiguous(), gate.contiguous()
        h2 = h.reshape(n * t, k)
        y = h2.mm(weight.t())  # the bias is added by the residual kernel
        out = torch.empty_like(res)
        _lib().dit_gated_bias_fwd_f32(_ptr(res), _ptr(gate), _ptr(y), _ptr(bias), _ptr(out), n, t, y.shape[1],
                                      _threads())
        ctx.save_for_backward(gate, h2, weight, bias, y)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, h2, weight, bias, y = ctx.saved_tensors
        n, d = gate.shape
        # out = res + gate * (y + bias): the branch's gradient grad * gate, sum_t grad * y and sum_t grad per sample
        gy, gm, gsum = native._rowscale_backward(grad, y.view(n, -1, d), gate, 0.0, with_sum=True)
        assert gsum is not None
        ggate = torch.addcmul(gm, gsum, bias.unsqueeze(0)) if ctx.needs_input_grad[1] else None
        grad_b = (gsum * gate).sum(0) if ctx.needs_input_grad[4] else None
        grad_h, grad_w = _weight_grads(ctx, gy.view(-1, d), h2, weight, 2)
        return (grad if ctx.needs_input_grad[0] else None), ggate, \
            (grad_h.view(n, -1, h2.shape[1]) if grad_h is not None else None), grad_w, grad_b


def linear_gated_residual(res: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`res + gate[:, None] * layer(h)` for res [N, T, D], gate [N, D], h [N, T, in] (adaLN-Zero's residual)."""
    _check("h", h)
    _check_linear(layer, h.shape[2])
    n, t, d = h.shape[0], h.shape[1], layer.weight.shape[0]
    _check("res", res, (n, t, d))
    _check("gate", gate, (n, d))
    return _LinearGatedResidual.apply(res, gate, h, layer.weight, layer.bias)


# --------------------------------------------------------------------------------------------- attention
class _QKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                heads: int) -> torch.Tensor:
        n, t, k = x.shape
        d = weight.shape[0] // 3
        x2 = x.reshape(n * t, k)
        tokens = torch.addmm(bias, x2, weight.t())
        q, k_, v = tokens.view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = _FLASH(q, k_, v)
        # The flash kernel writes its output as [N, T, H, d] for token-layout queries: this reshape is a view.
        result = out.transpose(1, 2).reshape(n, t, d)
        ctx.save_for_backward(x2, weight, tokens, result, lse)
        ctx.shape = (n, t, heads)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x2, weight, tokens, result, lse = ctx.saved_tensors
        n, t, heads = ctx.shape
        d = weight.shape[0] // 3
        q, k, v = tokens.view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = result.view(n, t, heads, d // heads).transpose(1, 2)
        gout = grad.contiguous().view(n, t, heads, d // heads).transpose(1, 2)
        grads = _FLASH_BWD(gout, q, k, v, out, lse, 0.0, False)
        # Each gradient as [N, T, D] rows: ATen writes them in the [N, T, H, d] layout of token-layout inputs.
        grads = [g if g.stride(3) == 1 and g.stride(1) == g.shape[3] else g.transpose(1, 2).contiguous().transpose(1, 2)
                 for g in grads]
        sn = (ctypes.c_int64 * 3)(*(g.stride(0) for g in grads))
        st = (ctypes.c_int64 * 3)(*(g.stride(2) for g in grads))
        gtokens = tokens.new_empty(n * t, 3 * d)
        gbias = tokens.new_empty(n, 3 * d)
        _lib().dit_qkv_grad_f32(*(_ptr(g) for g in grads), sn, st, _ptr(gtokens), _ptr(gbias), n, t, d, _threads())
        grad_x, grad_w = _weight_grads(ctx, gtokens, x2, weight, 0)
        grad_b = gbias.sum(0) if ctx.needs_input_grad[2] else None
        return (grad_x.view(n, t, -1) if grad_x is not None else None), grad_w, grad_b, None


def qkv_attention(x: torch.Tensor, qkv: nn.Linear, heads: int) -> torch.Tensor:
    """Multi-head self-attention of x [N, T, D] through the fused projection `qkv` (D -> 3D), before the output
    projection: [N, T, D] with the heads concatenated, as `dit.layers.Attention` computes it without QK-norm."""
    _check("x", x)
    _check_linear(qkv, x.shape[2])
    if qkv.weight.shape[0] % 3 or (qkv.weight.shape[0] // 3) % heads:
        raise ValueError(f"fused_block: QKV output size {qkv.weight.shape[0]} is not 3 x a multiple of {heads} heads")
    return _QKVAttention.apply(x, qkv.weight, qkv.bias, heads)
