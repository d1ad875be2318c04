"""KL autoencoder (AutoencoderKL-style) and PatchGAN discriminator, pure torch.

The autoencoder follows the layout of the Latent Diffusion / Stable Diffusion VAE: ResNet blocks with GroupNorm and
SiLU, strided-conv downsampling, nearest-neighbour upsampling, optional self-attention in the middle, and a diagonal
Gaussian posterior. The downsampling factor is ``2 ** (len(channel_mult) - 1)`` (so ``(1, 2, 4)`` gives 4 and
``(1, 2, 4, 4)`` gives 8). Images are expected in [-1, 1].
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AutoencoderKL", "PatchDiscriminator", "sample_posterior"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # same clamp as LDM's DiagonalGaussianDistribution


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    if channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} does not divide a layer width of {channels} channels")
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU and a (1x1-projected when widths differ) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = _norm(ch, num_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; asymmetric (0,1,0,1) padding as in LDM, so odd sizes round down."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, num_groups: int, dropout: float, attn: bool) -> nn.Sequential:
    layers = [ResnetBlock(ch, ch, num_groups, dropout)]
    if attn:
        layers.append(AttnBlock(ch, num_groups))
    layers.append(ResnetBlock(ch, ch, num_groups, dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image -> 2*z_channels moments (mean, logvar) at 1/2**(levels-1) resolution."""

    def __init__(self, in_channels, base_channels, channel_mult, num_res_blocks, z_channels, num_groups, dropout,
                 attn_mid):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks = []
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            out = base_channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, out, num_groups, dropout))
                ch = out
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid(ch, num_groups, dropout, attn_mid)
        self.norm_out = _norm(ch, num_groups)
        self.conv_out = nn.Conv2d(ch, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent -> image, mirror of the encoder with num_res_blocks + 1 blocks per level."""

    def __init__(self, out_channels, base_channels, channel_mult, num_res_blocks, z_channels, num_groups, dropout,
                 attn_mid):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = _mid(ch, num_groups, dropout, attn_mid)
        blocks = []
        for level in reversed(range(len(channel_mult))):
            out = base_channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, out, num_groups, dropout))
                ch = out
            if level != 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(ch, num_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def sample_posterior(mean: torch.Tensor, std: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw z = mean + std * eps from the diagonal Gaussian posterior."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


class AutoencoderKL(nn.Module):
    """Convolutional KL-regularised autoencoder.

    Args:
        in_channels: image channels (1 for MNIST, 3 for RGB).
        out_channels: decoded channels (defaults to ``in_channels``).
        base_channels: width of the first level; level i has ``base_channels * channel_mult[i]`` channels.
        channel_mult: width multipliers per level; ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: ResNet blocks per encoder level (decoder uses one more, as in LDM).
        z_channels: latent channels.
        attn_mid: self-attention between the two middle ResNet blocks.
        dropout: dropout inside ResNet blocks.
        num_groups: GroupNorm groups (must divide every layer width).
    """

    def __init__(self, in_channels: int = 3, out_channels: Optional[int] = None, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, z_channels: int = 4,
                 attn_mid: bool = True, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")
        out_channels = in_channels if out_channels is None else out_channels
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                           attn_mid=attn_mid, dropout=dropout, num_groups=num_groups)
        args = (base_channels, tuple(channel_mult), num_res_blocks, z_channels, num_groups, dropout, attn_mid)
        self.encoder = Encoder(in_channels, *args)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.decoder = Decoder(out_channels, *args)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent z."""
        return self.config["z_channels"]

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor between image and latent."""
        return 2 ** (len(self.config["channel_mult"]) - 1)

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        """Latent [C, H, W] for a square image of side ``image_size`` (sizes round down at odd widths)."""
        s = image_size
        for _ in range(len(self.config["channel_mult"]) - 1):
            s = (s - 2) // 2 + 1  # pad (0,1) then 3x3 stride-2 conv
        return (self.latent_channels, s, s)

    def encode_moments(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) for images x in [-1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) for images x in [-1, 1]."""
        mean, logvar = self.encode_moments(x)
        return mean, torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents z to images (nominally in [-1, 1]; not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x; returns (reconstruction, posterior mean, posterior logvar)."""
        mean, logvar = self.encode_moments(x)
        z = sample_posterior(mean, torch.exp(0.5 * logvar), generator) if sample else mean
        return self.decode(z), mean, logvar

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's final conv (used by the LDM adaptive GAN weight)."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix NLayerDiscriminator): one logit per overlapping patch.

    Args:
        in_channels: image channels.
        base_channels: width of the first conv; doubles per layer up to 8x.
        n_layers: number of stride-2 convs (3 in LDM for 256px; 2 suits 28-32px images).
        norm: "batch" (as in LDM; use SyncBatchNorm or a single process), "group" or "none".
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")
        self.config = dict(in_channels=in_channels, base_channels=base_channels, n_layers=n_layers, norm=norm)

        def norm_layer(ch: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(ch)
            if norm == "group":
                return nn.GroupNorm(math.gcd(32, ch), ch)
            return nn.Identity()

        bias = norm != "batch"
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=bias),
                       norm_layer(base_channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # pix2pix / LDM initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits [B, 1, h, w]."""
        return self.main(x)
