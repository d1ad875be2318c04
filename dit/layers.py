"""Building blocks of the DiT family: embeddings, attention and the four conditioning variants of the paper.

Parameter names follow facebookresearch/DiT (`attn.qkv`, `mlp.fc1`, `adaLN_modulation.1`, ...) so that official
checkpoints map onto these modules key for key. Plain torch modules on every device; the optional CPU speed-ups
live in `dit.cpu`, which swaps these classes for subclasses with the same parameters.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attn", "in_context")


def approx_gelu() -> nn.Module:
    """The tanh-approximated GELU used by DiT's MLPs."""
    return nn.GELU(approximate="tanh")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift` for x [N, T, D] and per-sample shift, scale [N, D] (one fused kernel)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's residual: `x + gate * y` for x, y [N, T, D] and a per-sample gate [N, D] (one fused kernel)."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


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
        # [N, T, 3, H, d] split at dim 2 (not permuted to [3, N, H, T, d] first): the backward then stacks the
        # q/k/v gradients straight into the projection's layout, one copy instead of two.
        q, k, v = (z.transpose(1, 2) for z in self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim).unbind(2))
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


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
        k, v = self.kv(context).view(n, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


# --------------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """The constructor the four variants share: pre-norm self-attention and a tanh-GELU MLP, plus the variant's
    conditioning layers (`modulations` x D adaLN outputs regressed from c, or a cross-attention layer).

    The adaLN variants' LayerNorms have no affine parameters (the modulation replaces them); the others' do.
    """

    modulations = 0  # adaLN outputs per channel: 6 (adaLN-Zero), 4 (adaLN) or 0
    cross_attention = False

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        affine = not self.modulations
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        if self.cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=mlp_norm_eps)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu,
                       drop=0)
        if self.modulations:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.modulations * hidden_size))


class DiTBlock(Block):
    """adaLN-Zero block (the official DiT block): modulation (shift, scale, gate) x 2 regressed from c."""

    modulations = 6

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c = silu(conditioning) [N, D] (the SiLU is applied once by the model)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation[1](c).chunk(6, dim=1)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class AdaLNBlock(Block):
    """adaLN block (paper ablation): shift and scale regressed from c, no gate."""

    modulations = 4

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c = silu(conditioning) [N, D]."""
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation[1](c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttnBlock(Block):
    """Pre-norm transformer block with an extra cross-attention layer to the conditioning tokens."""

    cross_attention = True

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c = conditioning tokens [N, S, D]."""
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class InContextBlock(Block):
    """Plain pre-norm ViT block; the conditioning travels as extra tokens in the sequence."""

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, S + T, D] (conditioning tokens first); c is unused."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
        if not self.adaptive:
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation[1](c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
