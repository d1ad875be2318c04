"""Building blocks of the DiT family: embeddings, attention and the four conditioning variants of the paper.

Parameter names follow facebookresearch/DiT (`attn.qkv`, `mlp.fc1`, `adaLN_modulation.1`, ...) so that official
checkpoints map onto these modules key for key.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from dit import bf16_linear, fused_block, native
from dit.native import gated_residual, gelu_tanh, modulate  # noqa: F401  (re-exported: part of this API)

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attn", "in_context")


def approx_gelu() -> nn.Module:
    """The tanh-approximated GELU used by DiT's MLPs."""
    return nn.GELU(approximate="tanh")


_onednn_bf16 = bf16_linear.onednn_bf16


def _onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for bf16 inference on the CPU with bf16-stored weights, where oneDNN's fused linear applies."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and _onednn_bf16())


def linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, followed by the tanh GELU when `gelu`.

    For bf16 inference on the CPU (weights stored in bf16, no autograd) this is one oneDNN call with the bias and
    the GELU applied in the matmul epilogue: ATen's bf16 tanh-GELU alone costs 4x the matmul it follows, and the
    bias add is a second pass over the output. For bf16 training on the CPU: `dit.bf16_linear` and the one-pass
    GELU of `dit.native`. Everywhere else: the plain modules.
    """
    if _onednn_inference(x, layer.weight):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias,
                                                 "gelu" if gelu else "none", [], "tanh" if gelu else "")
        return out.view(*x.shape[:-1], out.shape[-1])
    out = bf16_linear.linear_bf16(layer, x) if bf16_linear.applies(layer, x) else layer(x)
    return gelu_tanh(out) if gelu else out


def mlp(module: Mlp, x: torch.Tensor) -> torch.Tensor:
    """timm `Mlp` (fc1, tanh GELU, fc2; no dropout or norm, as built by the blocks here) applied to x."""
    return linear(module.fc2, linear(module.fc1, x, gelu=True))


# --------------------------------------------------------------------------------------------- positions
def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos embedding [M, embed_dim] of the positions `pos` (any shape, flattened), sin half first."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding [grid_size**2, embed_dim], as in MAE/DiT (row-major tokens)."""
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    # The official order: the first half encodes the column index, the second half the row index.
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                           get_1d_sincos_pos_embed(embed_dim // 2, rows)], axis=1)


# --------------------------------------------------------------------------------------------- conditioning
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0
                       ) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps, cos half first.

    Frequencies are `max_period ** (-i / (dim/2 - freq_shift))`; `freq_shift=0` is the official DiT/GLIDE
    embedding, `freq_shift=1` is diffusers' DiT (`downscale_freq_shift=1`).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timesteps → sinusoidal features → 2-layer SiLU MLP → [N, hidden_size]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps t [N]."""
        freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels → vectors; label dropout to the null class `num_classes` for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace dropped labels by the null class (random with `dropout_prob`, or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = torch.as_tensor(force_drop_ids, device=labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Embed labels [N]; dropout applies in training (if dropout_prob > 0) or when force_drop_ids is given."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.dropout_prob <= 0:
                raise ValueError("force_drop_ids needs a null class: build the model with class_dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [N, H, T, d] tensors.

    `scaled_dot_product_attention` (flash kernels) everywhere, except when training in bf16/fp16 on the CPU: the
    CPU flash kernel's backward is slow, and the explicit softmax(QK^T)V (scale folded into the batched matmul)
    was 1.5x faster in forward+backward for DiT-S/2 shapes on a 2-core Sapphire Rapids (benchmarks/RESULTS.md);
    its scores are then rounded to bf16 like in any non-fused attention under autocast. Without gradients the
    flash kernel is the fastest on the CPU too (4x the explicit forward).
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and needs_grad:
        *batch, t, d = q.shape
        q3, k3, v3 = (z.reshape(-1, z.shape[-2], d) for z in (q, k, v))
        scores = torch.baddbmm(q3.new_zeros(()).expand(1, 1, 1), q3, k3.transpose(-1, -2), beta=0.0,
                               alpha=d ** -0.5)
        return torch.bmm(scores.softmax(dim=-1), v3).view(*batch, t, d)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, D] → [N, T, D]."""
        n, t, d = x.shape
        tokens = linear(self.qkv, x).view(n, t, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, nn.Identity) and native.packed_attention_applies(tokens):
            out = native.packed_attention(tokens)  # bf16 CPU training: fused layout changes and softmax
        else:
            qkv = tokens.permute(2, 0, 3, 1, 4)
            if x.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16):
                # One copy into [3, N, H, T, d] instead of one per operand inside each matmul of the explicit CPU
                # attention (and its backward). fp32 goes to the flash kernel, which takes the strided views as
                # they are.
                qkv = qkv.contiguous()
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            out = attention(q, k, v)
        return linear(self.proj, out.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens to a short sequence of conditioning tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [N, T, D] attends to context [N, S, D] → [N, T, D]."""
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(n, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4
                                                                                                   ).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


# --------------------------------------------------------------------------------------------- blocks
class DiTBlock(nn.Module):
    """adaLN-Zero block (the official DiT block): modulation (shift, scale, gate) x 2 regressed from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu,
                       drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def _fused_fp32(self, x: torch.Tensor) -> bool:
        """Whether this block runs through `dit.fused_block` (fp32 CPU training; the modules as built here)."""
        attn, mlp_ = self.attn, self.mlp
        plain = (isinstance(attn.q_norm, nn.Identity) and isinstance(mlp_.norm, nn.Identity)
                 and isinstance(mlp_.act, nn.GELU) and mlp_.act.approximate == "tanh"
                 and all(lin.bias is not None for lin in (attn.qkv, attn.proj, mlp_.fc1, mlp_.fc2)))
        return plain and fused_block.applies(x, attn, mlp_)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c = silu(conditioning) [N, D] (the SiLU is applied once by the model)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation[1](c).chunk(6, dim=1)
        if self._fused_fp32(x):
            h = fused_block.qkv_attention(fused_block.norm_modulate(x, shift_msa, scale_msa, self.norm1.eps),
                                          self.attn.qkv, self.attn.num_heads)
            x = fused_block.linear_gated_residual(x, gate_msa, h, self.attn.proj)
            h = fused_block.norm_modulate(x, shift_mlp, scale_mlp, self.norm2.eps)
            return fused_block.linear_gated_residual(x, gate_mlp, fused_block.linear_gelu(h, self.mlp.fc1),
                                                     self.mlp.fc2)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return gated_residual(x, gate_mlp, mlp(self.mlp, modulate(self.norm2(x), shift_mlp, scale_mlp)))


class AdaLNBlock(nn.Module):
    """adaLN block (paper ablation): shift and scale regressed from c, no gate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu,
                       drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c = silu(conditioning) [N, D]."""
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation[1](c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + mlp(self.mlp, modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttnBlock(nn.Module):
    """Pre-norm transformer block with an extra cross-attention layer to the conditioning tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, eps=mlp_norm_eps)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu,
                       drop=0)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c = conditioning tokens [N, S, D]."""
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), c)
        return x + mlp(self.mlp, self.norm2(x))


class InContextBlock(nn.Module):
    """Plain pre-norm ViT block; the conditioning travels as extra tokens in the sequence."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, eps=mlp_norm_eps)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu,
                       drop=0)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, S + T, D] (conditioning tokens first); c is unused."""
        x = x + self.attn(self.norm1(x))
        return x + mlp(self.mlp, self.norm2(x))


BLOCKS = {"adaln_zero": DiTBlock, "adaln": AdaLNBlock, "cross_attn": CrossAttnBlock, "in_context": InContextBlock}


class FinalLayer(nn.Module):
    """Final norm (adaptive for the adaLN variants) and the linear decoder to patch_size**2 * out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        """x [N, T, D], c = silu(conditioning) [N, D] (ignored when not adaptive) → [N, T, p*p*C]."""
        if self.adaptive:
            shift, scale = self.adaLN_modulation[1](c).chunk(2, dim=1)
            if fused_block.applies(x, self.linear):  # fp32 CPU training: LayerNorm and modulation in one pass
                return self.linear(fused_block.norm_modulate(x, shift, scale, self.norm_final.eps))
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))
