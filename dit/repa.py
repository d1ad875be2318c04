"""REPA, representation alignment (Yu et al. 2024, "Representation Alignment for Generation"): the maths.

A small MLP (the projector) maps the tokens of DiT block k to the feature space of a frozen pretrained image
encoder (DINOv2 in the paper); the alignment loss is the negative cosine similarity between each projected token
and the encoder's patch feature at the same place, averaged over tokens and samples. The training loss becomes
diffusion (or flow) loss + λ · alignment loss. The paper's settings: k = 8 of 28 blocks (XL), λ = 0.5, a 3-layer
SiLU MLP D → 2048 → 2048 → z_dim.

Here: `Projector`, `alignment_loss`, `resize_token_grid` (encoder features on another grid than the DiT's tokens),
`BlockCapture` (a forward hook that keeps block k's output: the DiT's forward has no REPA branch), and
`REPAModel`, the module the trainer optimises (the DiT and the projector; the DiT alone is what is sampled and
exported). Pure torch; the encoder itself (timm, weights from a file) lives in launch/repa.py.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Sequential):
    """REPA's projector: Linear(D, P), SiLU, Linear(P, P), SiLU, Linear(P, z_dim), applied per token.

    Initialised as the DiT's linears (xavier-uniform weights, zero biases), as REPA's SiT does for its projectors.
    """

    def __init__(self, hidden_size: int, projector_dim: int, z_dim: int) -> None:
        super().__init__(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def flops_per_token(self) -> int:
        """Forward FLOPs (2 per multiply-add) of the three matmuls for one token."""
        return 2 * sum(layer.in_features * layer.out_features for layer in self if isinstance(layer, nn.Linear))


def alignment_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """REPA's loss: the mean over samples and tokens of -cos(projected token, feature), in fp32 (a 0-dim tensor).

    projected, features: [B, T, C] (the same T: resize the features with `resize_token_grid` first). Its range is
    [-1, 1]; -1 is perfect alignment. The features are constants (no gradient flows into them).
    """
    if projected.shape != features.shape:
        raise ValueError(f"projected tokens {tuple(projected.shape)} and encoder features "
                         f"{tuple(features.shape)} differ in shape")
    p = F.normalize(projected.float(), dim=-1)
    z = F.normalize(features.detach().float(), dim=-1)
    return -(p * z).sum(dim=-1).mean()


def resize_token_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Features of a square token grid [B, g*g, C] resampled to [B, grid*grid, C] (row-major tokens).

    Bilinear (antialiased when shrinking) over the 2-D grid, so each DiT token is aligned with the features of
    the image region it covers: e.g. DINOv2-B/14 at 224 px gives 16x16 features, which a DiT/2 on 32x32 latents
    uses as they are, while a 4x4 DiT grid takes their area averages.
    """
    b, t, c = features.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"{t} encoder tokens do not form a square grid")
    if side == grid:
        return features
    img = features.transpose(1, 2).reshape(b, c, side, side)
    out = F.interpolate(img.float(), size=(grid, grid), mode="bilinear", align_corners=False,
                        antialias=grid < side)
    return out.to(features.dtype).reshape(b, c, grid * grid).transpose(1, 2)


class BlockCapture:
    """A forward hook on one block that keeps its output tokens while armed (one forward at a time).

    Armed only around the training forward, so the recomputation of a checkpointed block in the backward pass
    (which runs the block and its hooks again) leaves nothing behind. `num_tokens`: keep the last that many
    tokens (the image tokens; in-context conditioning prepends its condition tokens).
    """

    def __init__(self, block: nn.Module, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.armed = False
        self.tokens: Optional[torch.Tensor] = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.armed:
            self.tokens = output[:, -self.num_tokens:]

    def take(self) -> torch.Tensor:
        """The captured tokens [B, T, D] of the last armed forward (then forgotten)."""
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            raise RuntimeError("the REPA block hook captured nothing: was the block run in this forward?")
        return tokens

    def remove(self) -> None:
        """Unregister the hook."""
        self.handle.remove()


class REPAModel(nn.Module):
    """The trained module of a REPA run: the DiT (`.dit`) and the projector (`.projector`) on block `depth`'s
    tokens (1-based). `forward(x, t, y, force_drop_ids)` returns (DiT output, projected tokens [B, T, z_dim]).

    The state dict holds `dit.*` and `projector.*`; `.dit` alone is the sampling model (its state dict is the
    plain DiT's). Block `depth`'s output is read by a forward hook (`BlockCapture`): the DiT's code is unchanged.
    """

    def __init__(self, dit: nn.Module, depth: int, projector_dim: int, z_dim: int) -> None:
        super().__init__()
        blocks = dit.blocks
        if not 1 <= depth <= len(blocks):
            raise ValueError(f"REPA depth {depth} is outside the DiT's blocks 1..{len(blocks)}")
        self.dit = dit
        self.depth = depth
        self.projector = Projector(dit.hidden_size, projector_dim, z_dim)
        self.capture = BlockCapture(blocks[depth - 1], dit.x_embedder.num_patches)

    @property
    def grid(self) -> int:
        """The side of the DiT's token grid."""
        return math.isqrt(self.dit.x_embedder.num_patches)

    def projector_flops_per_sample(self) -> int:
        """Forward FLOPs (2 per multiply-add) of the projector over one sample's tokens."""
        return self.projector.flops_per_token() * self.dit.x_embedder.num_patches

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                force_drop_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the DiT's prediction, block `depth`'s tokens through the projector)."""
        self.capture.armed = True
        try:
            out = self.dit(x, t, y, force_drop_ids=force_drop_ids)
        finally:
            self.capture.armed = False
        return out, self.projector(self.capture.take())
