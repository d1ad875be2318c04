"""Opt-in CPU speed-ups of the DiT in bf16: `accelerate(model)`, applied by the trainer and the sampler on a CPU.

`dit.models` and `dit.layers` are the plain model on every device. On a CPU in bf16 (autocast, or weights stored in
bf16 for sampling) three costs remain that the plain modules could only avoid by branching on the device; here each
is removed by a subclass that `accelerate` puts in place of the plain class (`module.__class__ = ...`). The
parameters, their names and the state_dict stay those of the plain model, so optimizers, DeepSpeed, the EMA and
checkpoints see no difference. The subclasses decide per call: anything but a CPU tensor in bf16/fp16 outside
`torch.compile` (fp32 training and sampling, CUDA, compiled graphs) runs the plain forward unchanged.

- bf16/fp16 training: attention as softmax(q k^T / sqrt(d)) v in two batched matmuls instead of the CPU flash
  kernel, whose low-precision backward is slow. The scores are rounded to bf16, as in any non-fused attention under
  autocast.
- bf16/fp16 autocast: the token stream runs in the autocast dtype from the first block on, as in diffusers' DiT:
  LayerNorm, modulation and the residual adds need no casts and move half the bytes (the plain model keeps the
  official fp32 stream, and autocast casts every linear's input). LayerNorm statistics are still fp32.
- bf16 sampling with bf16-stored weights and no autograd: every linear is one oneDNN call with the bias, and for
  the MLP's fc1 the tanh GELU, in the matmul epilogue (ATen adds the bias in a second pass over the output and its
  bf16 tanh GELU costs more than the matmul in front of it).

Measured gains and the pieces that were removed for not paying (fused C kernels, fp32 fused block, oneDNN training
linears): benchmarks/RESULTS.md, "Issue 15: CPU speed code, kept or removed".
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp

from dit.layers import AdaLNBlock, Attention, CrossAttnBlock, DiTBlock, InContextBlock

_LOW = (torch.bfloat16, torch.float16)


def _eager_cpu(x: torch.Tensor) -> bool:
    # Under torch.compile the plain modules are traced: inductor fuses them, and these paths would split its graph.
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _autocast_low_dtype() -> Optional[torch.dtype]:
    """The CPU autocast dtype when CPU autocast is on with bf16 or fp16, else None."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW:
        return torch.get_autocast_dtype("cpu")
    return None


@functools.lru_cache(maxsize=1)
def onednn_bf16() -> bool:
    """Whether this CPU and torch build run oneDNN's bf16 kernels natively (not every x86 or ARM CPU does)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def onednn_inference(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether `layer(x)` runs as one oneDNN call: bf16 input and bf16-stored weights on the CPU, no autograd."""
    # Not for ZeRO-3-partitioned weights (`ds_id`): ZeRO gathers them in hooks around the layer's own forward,
    # which `CPUMlp` does not call for fc1.
    return (_eager_cpu(x) and x.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
            and not torch.is_grad_enabled() and not hasattr(layer.weight, "ds_id") and onednn_bf16())


def onednn_linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, then the tanh GELU when `gelu`, as one oneDNN call (see `onednn_inference` for when it applies)."""
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias,
                                             "gelu" if gelu else "none", [], "tanh" if gelu else "")
    return out.view(*x.shape[:-1], out.shape[-1])


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [..., T, d] tensors, the scale folded into the first batched matmul."""
    *batch, t, d = q.shape
    q3, k3, v3 = (z.reshape(-1, z.shape[-2], d) for z in (q, k, v))
    scores = torch.baddbmm(q3.new_zeros(()).expand(1, 1, 1), q3, k3.transpose(-1, -2), beta=0.0, alpha=d ** -0.5)
    return torch.bmm(scores.softmax(dim=-1), v3).view(*batch, t, d)


class CPULinear(nn.Linear):
    """nn.Linear; one oneDNN call (bias in the epilogue) for bf16 sampling on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(self, x) if onednn_inference(x, self) else super().forward(x)


class CPUMlp(Mlp):
    """timm's Mlp as the blocks build it (fc1, tanh GELU, fc2); fc1 and the GELU in one oneDNN call for bf16
    sampling on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_inference(x, self.fc1):
            return self.fc2(onednn_linear(self.fc1, x, gelu=True))
        return super().forward(x)


class CPUAttention(Attention):
    """Attention; the explicit softmax attention when training in bf16/fp16 on the CPU (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and (x.requires_grad or self.qkv.weight.requires_grad)
        if not (training and _eager_cpu(x) and (x.dtype in _LOW or _autocast_low_dtype() is not None)):
            return super().forward(x)
        n, t, d = x.shape
        # One copy into [3, N, H, T, d] rather than one per operand inside each batched matmul and its backward.
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        q, k, v = qkv.unbind(0)
        out = softmax_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _LowPrecisionStream(nn.Module):
    """A block that takes the token stream in the CPU autocast dtype (bf16/fp16): see the module doc."""

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = _autocast_low_dtype() if _eager_cpu(x) else None
        return super().forward(x if dtype is None else x.to(dtype), c)  # type: ignore[call-arg]


class CPUDiTBlock(_LowPrecisionStream, DiTBlock):
    """DiTBlock with the low-precision token stream on the CPU."""


class CPUAdaLNBlock(_LowPrecisionStream, AdaLNBlock):
    """AdaLNBlock with the low-precision token stream on the CPU."""


class CPUCrossAttnBlock(_LowPrecisionStream, CrossAttnBlock):
    """CrossAttnBlock with the low-precision token stream on the CPU."""


class CPUInContextBlock(_LowPrecisionStream, InContextBlock):
    """InContextBlock with the low-precision token stream on the CPU."""


_SUBCLASS = {nn.Linear: CPULinear, Mlp: CPUMlp, Attention: CPUAttention, DiTBlock: CPUDiTBlock,
             AdaLNBlock: CPUAdaLNBlock, CrossAttnBlock: CPUCrossAttnBlock, InContextBlock: CPUInContextBlock}


def accelerate(model: nn.Module) -> nn.Module:
    """Give `model`'s linears, MLPs, attention layers and blocks their CPU subclasses in place; returns `model`.

    Parameters, buffers and state_dict keys are unchanged, and so is every result outside bf16/fp16 on the CPU
    (there, they agree up to bf16 rounding). Idempotent; modules of other classes are left alone.
    """
    for module in model.modules():
        cls = _SUBCLASS.get(type(module))
        if cls is not None:
            module.__class__ = cls
    return model
