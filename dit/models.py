"""The DiT model family (Peebles & Xie, 2023): a drop-in for facebookresearch/DiT's `models.py`.

`DiT(...)` accepts the official constructor arguments, keeps the official parameter names (so official checkpoints
load after `dit.convert.official_to_ours`), and adds: the paper's four conditioning variants, optional QK-norm,
per-block gradient checkpointing, unconditional models (`num_classes=0`) and classifier-free guidance over all eps
channels by default.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dit.layers import BLOCKS, CONDITIONINGS, FinalLayer, LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed

_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _keep_down_projections(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing policy: keep the outputs of down-projecting matmuls, recompute everything else.

    In a DiT block that is the MLP's fc2 ([tokens, 4D] @ [4D, D]): a quarter of the block's matmul FLOPs for one
    [tokens, D] tensor, the cheapest activation to keep per FLOP it saves from recomputation.
    """
    if op in _MATMULS:
        mat1, mat2 = args[-2], args[-1]
        if mat1.dim() == 2 and mat1.shape[1] >= 2 * mat2.shape[1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_contexts() -> Any:
    return create_selective_checkpoint_contexts(_keep_down_projections)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Args (official): input_size (square input side), patch_size, in_channels, hidden_size, depth, num_heads,
    mlp_ratio, class_dropout_prob (label dropout to the null class `num_classes`), num_classes (0 = unconditional),
    learn_sigma (output 2 * in_channels: eps and the variance interpolation).
    Args (ours): conditioning ("adaln_zero" | "adaln" | "cross_attn" | "in_context"), qk_norm (LayerNorm on
    queries and keys per head), grad_checkpointing (activation checkpointing of every block but the last eighth,
    keeping the MLP output projections), timestep_freq_shift and
    mlp_norm_eps (numerics knobs: 0 and 1e-6 are the official model; 1 and 1e-5 reproduce diffusers'
    `DiTTransformer2DModel` exactly).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, conditioning: str = "adaln_zero",
                 qk_norm: bool = False, grad_checkpointing: bool = False, timestep_freq_shift: float = 0.0,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r}; valid choices: {', '.join(CONDITIONINGS)}")
        if input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide input_size={input_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} and by 4")
        if num_classes < 0 or depth < 1:
            raise ValueError(f"need num_classes >= 0 and depth >= 1, got {num_classes} and {depth}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.conditioning = conditioning
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.num_cond_tokens = 1 + int(num_classes > 0)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding: a persistent buffer (it is in the state dict, as in official checkpoints, but it
        # is not a parameter, so optimizers and ZeRO never see it).
        self.register_buffer("pos_embed", torch.zeros(1, num_patches, hidden_size))

        block_cls = BLOCKS[conditioning]
        self.blocks = nn.ModuleList([block_cls(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                                               mlp_norm_eps=mlp_norm_eps) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      adaptive=conditioning in ("adaln_zero", "adaln"))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: xavier linears, fixed sin-cos positions, zeroed adaLN-Zero and output."""
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like a Linear, not like a Conv2d
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "adaln_zero":
            for block in self.blocks:  # every block starts as the identity
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer.adaptive:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block activation checkpointing on or off."""
        self.grad_checkpointing = enable

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [N, T, p*p*C] → images [N, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _conditioning(self, t: torch.Tensor, y: Optional[torch.Tensor], force_drop_ids: Optional[torch.Tensor]
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(timestep embedding, label embedding or None)."""
        t_emb = self.t_embedder(t)
        if self.y_embedder is None:
            return t_emb, None
        if y is None:
            raise ValueError("y (class labels) is required by a class-conditional DiT (num_classes > 0)")
        return t_emb, self.y_embedder(y, self.training, force_drop_ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict [N, out_channels, H, W] from inputs x [N, C, H, W], timesteps t [N] and labels y [N].

        y is ignored (may be None) when unconditional; force_drop_ids [N] (1 = use the null class) replaces the
        random label dropout, as in the official code.
        """
        x = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype)) + self.pos_embed
        # The patch embedding yields a transposed (channels-first) view and elementwise ops keep that layout:
        # without this one copy every LayerNorm and linear of every block would copy its input (and again in
        # the backward), on every device.
        x = x.contiguous()
        t_emb, y_emb = self._conditioning(t, y, force_drop_ids)
        if self.conditioning in ("adaln_zero", "adaln"):
            # The SiLU in front of every adaLN linear is the same function of c: apply it once here.
            cond = F.silu(t_emb if y_emb is None else t_emb + y_emb)
            final_cond = cond
        else:
            cond = torch.stack([t_emb] if y_emb is None else [t_emb, y_emb], dim=1)
            final_cond = None
            if self.conditioning == "in_context":
                x = torch.cat([cond.to(x.dtype), x], dim=1)
                cond = None
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        # The last blocks (an eighth of them, at least one) are not checkpointed: the backward would recompute them
        # first thing, so keeping their activations adds little to the peak and saves their forward. The others
        # keep fc2's output.
        first_kept = len(self.blocks) - max(1, -(-len(self.blocks) // 8))
        for i, block in enumerate(self.blocks):
            if use_ckpt and i < first_kept:
                x = checkpoint(block, x, cond, use_reentrant=False, context_fn=_checkpoint_contexts)
            else:
                x = block(x, cond)
        if self.conditioning == "in_context":
            x = x[:, self.num_cond_tokens:]
        return self.unpatchify(self.final_layer(x, final_cond))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor], cfg_scale: float,
                         guide_channels: Optional[int] = None) -> torch.Tensor:
        """Classifier-free guidance in one batched forward (official meaning).

        The batch holds the conditional half then the unconditional half (labels = the null class); only the
        first half of x is used. Guidance applies to the first `guide_channels` output channels: by default all
        eps channels (`in_channels`); `guide_channels=3` reproduces the official code. Both halves of the output
        carry the guided eps.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        gc = self.in_channels if guide_channels is None else int(guide_channels)
        eps, rest = out[:, :gc], out[:, gc:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def model_flops_per_sample(self) -> int:
        """Forward FLOPs (2 per multiply-add) of the matmuls and attention for one sample (for MFU)."""
        d, p = self.hidden_size, self.patch_size
        tokens = self.x_embedder.num_patches
        hidden = int(d * self.mlp_ratio)
        macs = tokens * self.in_channels * p * p * d  # patch embedding
        macs += 256 * d + d * d  # timestep MLP
        seq = tokens + (self.num_cond_tokens if self.conditioning == "in_context" else 0)
        per_block = seq * (3 * d * d + d * d + 2 * d * hidden) + 2 * seq * seq * d
        if self.conditioning == "adaln_zero":
            per_block += 6 * d * d
        elif self.conditioning == "adaln":
            per_block += 4 * d * d
        elif self.conditioning == "cross_attn":
            s = self.num_cond_tokens
            per_block += tokens * 2 * d * d + s * 2 * d * d + 2 * tokens * s * d
        macs += self.depth * per_block
        macs += tokens * d * p * p * self.out_channels + (2 * d * d if self.final_layer.adaptive else 0)
        return 2 * macs


def preset_kwargs(name: str) -> dict[str, Any]:
    """The architecture kwargs (depth, hidden_size, patch_size, num_heads) of a preset such as "DiT-XL/2"."""
    if name not in _PRESETS:
        raise KeyError(f"unknown DiT preset {name!r}; valid choices: {', '.join(_PRESETS)}")
    return dict(_PRESETS[name])


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_PRESETS = {f"DiT-{size}/{p}": {"depth": depth, "hidden_size": hidden, "patch_size": p, "num_heads": heads}
            for size, (depth, hidden, heads) in reversed(list(_SIZES.items())) for p in (2, 4, 8)}


def _preset_factory(name: str) -> Callable[..., DiT]:
    def build(**kwargs: Any) -> DiT:
        return DiT(**{**preset_kwargs(name), **kwargs})
    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: {preset_kwargs(name)}; other DiT kwargs pass through."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {name: _preset_factory(name) for name in _PRESETS}

# The official module-level constructors, for code written against facebookresearch/DiT.
DiT_XL_2, DiT_XL_4, DiT_XL_8 = DiT_models["DiT-XL/2"], DiT_models["DiT-XL/4"], DiT_models["DiT-XL/8"]
DiT_L_2, DiT_L_4, DiT_L_8 = DiT_models["DiT-L/2"], DiT_models["DiT-L/4"], DiT_models["DiT-L/8"]
DiT_B_2, DiT_B_4, DiT_B_8 = DiT_models["DiT-B/2"], DiT_models["DiT-B/4"], DiT_models["DiT-B/8"]
DiT_S_2, DiT_S_4, DiT_S_8 = DiT_models["DiT-S/2"], DiT_models["DiT-S/4"], DiT_models["DiT-S/8"]
