"""REPA's frozen image encoder (Yu et al. 2024): a timm ViT built without download, weights from a local file.

`load_encoder(cfg.repa, device, bf16)` builds `timm.create_model(repa.encoder, pretrained=False,
img_size=repa.encoder_resolution, num_classes=0)`, loads `repa.encoder_weights` (safetensors, or a torch state dict
read with weights_only=True; timm's own checkpoint filter of the model family adapts it, e.g. resamples DINOv2's
518 px position embedding to the 224 px grid, or converts Meta's DINOv2 file), freezes it and puts it in eval
mode. `FrozenEncoder.features(images, grid)` gives the patch features REPA aligns with (cls and register tokens
dropped), computed on the fly each step: REPA's choice too, since stored features of ImageNet would take ~0.5 TB.
The projector and the loss are in dit/repa.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dit.repa import resize_token_grid
from eval.config import ConfigError, REPAConfig

log = logging.getLogger(__name__)


class EncoderWeightsMissing(ValueError):
    """The REPA encoder's weights file is missing or unreadable: one line naming the key and where to get it."""


def weights_source(name: str) -> str:
    """Where the weights of timm model `name` are published (its Hugging Face hub id), for error messages."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - any lookup failure just gives the generic hint
        cfg = None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub:
        return f"the Hugging Face hub repository {hub} (model.safetensors)"
    return f"timm's pretrained weights of {name} (timm.create_model({name!r}, pretrained=True) where there is internet)"


def _read_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a torch file read with weights_only=True)."""
    if not path.is_file():
        raise EncoderWeightsMissing(f"repa.encoder_weights: {path} not found; download the weights of {name} from "
                                    f"{weights_source(name)} and point repa.encoder_weights at the file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, safetensors and zip errors alike
        raise EncoderWeightsMissing(f"repa.encoder_weights: {path} is not a readable weights file "
                                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict):
        raise EncoderWeightsMissing(f"repa.encoder_weights: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _adapt(state: dict[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's checkpoint filter of the model's family (position embedding resampling, key conversions)."""
    import importlib

    family = importlib.import_module(type(model).__module__)
    adapt = getattr(family, "checkpoint_filter_fn", None)
    return adapt(state, model) if adapt is not None else state


def encoder_input(images: torch.Tensor, resolution: int, mean: torch.Tensor, std: torch.Tensor,
                  in_chans: int) -> torch.Tensor:
    """Images (uint8 0..255, or float in [-1, 1]) [B, C, H, W] → an encoder's normalised float32 input
    [B, in_chans, resolution, resolution]: one channel repeated to `in_chans`, bicubic resize (REPA's), then
    (x - mean) / std with `mean`, `std` shaped [1, in_chans, 1, 1] on the images' device."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float().add(1.0).mul(0.5)
    if x.shape[1] != in_chans:
        if x.shape[1] != 1:
            raise ValueError(f"{x.shape[1]}-channel images for a {in_chans}-channel REPA encoder")
        x = x.expand(-1, in_chans, -1, -1)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return (x - mean) / std


class FrozenEncoder:
    """A frozen timm ViT giving REPA's targets: `features(images, grid)` → [B, grid*grid, embed_dim].

    Images: uint8 [B, C, H, W] (0..255) or float in [-1, 1] (the pixel-space training input); one channel is
    repeated to the encoder's three. They are resized (bicubic, as REPA) to `resolution`, normalised with the
    encoder's mean/std (DINOv2: ImageNet's), run through the encoder (in bf16 autocast when `bf16`, REPA's mixed
    precision) and its patch tokens kept. When the encoder's patch grid (resolution / patch size) differs from the
    DiT's token grid, the features are resampled to the DiT's grid (`dit.repa.resize_token_grid`).
    """

    def __init__(self, model: torch.nn.Module, resolution: int, mean: tuple, std: tuple, device: torch.device,
                 bf16: bool) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.resolution, self.device, self.bf16 = resolution, device, bf16
        self.embed_dim = int(getattr(model, "num_features", None) or model.embed_dim)
        self.in_chans = int(model.patch_embed.proj.in_channels)
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.grid = int(model.patch_embed.grid_size[0])
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images → the encoder's normalised float32 input [B, in_chans, resolution, resolution]."""
        return encoder_input(images.to(self.device, non_blocking=True), self.resolution, self.mean, self.std,
                             self.in_chans)

    @torch.no_grad()
    def features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """Patch features [B, grid*grid, embed_dim] (float32) of a batch of images, on the encoder's device."""
        x = self.preprocess(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            tokens = self.model.forward_features(x)
        return resize_token_grid(tokens[:, self.prefix:].float(), grid)

    def flops_per_image(self) -> int:
        """Forward FLOPs (2 per multiply-add) of the encoder's matmuls and attention for one image."""
        blocks = list(getattr(self.model, "blocks", []))
        d, seq = self.embed_dim, self.prefix + self.grid * self.grid
        hidden = blocks[0].mlp.fc1.out_features if blocks and hasattr(blocks[0].mlp, "fc1") else 4 * d
        per_block = seq * (4 * d * d + 2 * d * hidden) + 2 * seq * seq * d
        patch = self.model.patch_embed.proj
        embed = self.grid * self.grid * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * d
        return 2 * (embed + len(blocks) * per_block)


def load_encoder(cfg: REPAConfig, device: torch.device, bf16: bool) -> FrozenEncoder:
    """The frozen encoder of a `repa` config section (see the module docstring). Raises ConfigError for a bad
    encoder name or resolution and EncoderWeightsMissing for a missing or unfitting weights file (exit 2)."""
    import timm
    from timm.data import resolve_data_config

    path = Path(cfg.encoder_weights or "")
    state = _read_state(path, cfg.encoder)  # first: a missing file is the likeliest problem
    try:
        model = timm.create_model(cfg.encoder, pretrained=False, img_size=cfg.encoder_resolution, num_classes=0)
    except RuntimeError as err:
        raise ConfigError(f"repa.encoder: {cfg.encoder!r} is not a timm model ({err})") from None
    except (TypeError, AssertionError, ValueError) as err:
        raise ConfigError(f"repa.encoder: cannot build {cfg.encoder!r} at repa.encoder_resolution="
                          f"{cfg.encoder_resolution} (REPA needs a ViT with patch tokens: {err})") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(model, "forward_features"):
        raise ConfigError(f"repa.encoder: {cfg.encoder!r} has no patch embedding (REPA needs a ViT)")
    if cfg.encoder_resolution % patch[0]:
        raise ConfigError(f"repa.encoder_resolution: {cfg.encoder_resolution} is not a multiple of {cfg.encoder}'s "
                          f"patch size {patch[0]}")
    try:
        adapted = _adapt(state, model)
        missing, unexpected = model.load_state_dict(adapted, strict=False)
    except (RuntimeError, KeyError, ValueError) as err:
        raise EncoderWeightsMissing(f"repa.encoder_weights: {path} does not fit {cfg.encoder} "
                                    f"({str(err).splitlines()[0]})") from None
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc_norm.", "head_drop."))]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected tensor {unexpected[0]}"
        raise EncoderWeightsMissing(f"repa.encoder_weights: {path} does not fit {cfg.encoder} ({what}; "
                                    f"{len(missing)} missing, {len(unexpected)} unexpected)")
    data = resolve_data_config({}, model=model)
    log.info("REPA encoder %s from %s: %dx%d patch grid at %d px, %d features", cfg.encoder, path,
             model.patch_embed.grid_size[0], model.patch_embed.grid_size[1], cfg.encoder_resolution,
             model.num_features)
    return FrozenEncoder(model, cfg.encoder_resolution, tuple(data["mean"]), tuple(data["std"]), device, bf16)
