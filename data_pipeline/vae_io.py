"""Save and load VAEs behind one encode/decode interface.

Two formats load through :func:`load_vae`:

* ours: one ``.safetensors`` file with the ``AutoencoderKL`` weights and, under the safetensors metadata key
  ``ditstack_vae``, a JSON document: ``{"format": "ditstack-vae", "version": 1, "model": <constructor kwargs>,
  "latent": {"channels", "downsample", "shape", "stats"}, "data": {"image_size", "channels"}, "step"}``.
  A directory holding ``vae.safetensors`` (a training checkpoint directory) or a run directory with
  ``checkpoints/latest`` resolves to that file.
* diffusers: a local directory saved by ``diffusers.AutoencoderKL.save_pretrained`` (e.g. sd-vae-ft-ema), or a
  pipeline directory with a ``vae/`` subfolder. Its latents are scaled by ``config.scaling_factor`` (0.18215 for the
  Stable Diffusion VAE) downstream. diffusers is imported only when such a directory is loaded.

``VAEHandle.encode`` returns the *raw* posterior (mean, std); normalisation (``(z - shift) * scale``) is the latent
manifest's job, which takes ``scale_factor`` (diffusers) or measured per-channel statistics (ours).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from data_pipeline.files import atomic_save_safetensors
from dit.vae import AutoencoderKL

log = logging.getLogger(__name__)

METADATA_KEY = "ditstack_vae"
FORMAT_NAME = "ditstack-vae"
FORMAT_VERSION = 1
VAE_FILENAME = "vae.safetensors"

__all__ = ["VAEHandle", "VAELoadError", "load_vae", "save_vae", "read_vae_metadata", "resolve_vae_path",
           "LPIPSWeightsMissing", "lpips_backbone_path", "build_perceptual", "METADATA_KEY", "VAE_FILENAME"]


class VAELoadError(ValueError):
    """A VAE path that cannot be loaded, described in one line naming the path."""


@dataclass
class VAEHandle:
    """A frozen VAE on one device: ``encode(x in [-1,1]) -> (mean, std)``, ``decode(z) -> x``.

    Attributes:
        name: where it came from (absolute path), recorded as the latent manifest's ``vae``.
        kind: "ditstack" or "diffusers".
        latent_channels, downsample: latent layout (latent side = image side / downsample).
        image_channels: channels the encoder expects.
        scale_factor / shift_factor: the model's published latent scale (diffusers); None for ours.
        latent_stats: per-channel {"mean": [...], "std": [...]} measured at export (ours), else None.
        metadata: the full ``ditstack_vae`` metadata (ours), else the diffusers config dict.
    """

    module: torch.nn.Module
    name: str
    kind: str
    latent_channels: int
    downsample: int
    image_channels: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    scale_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    latent_stats: Optional[Dict[str, list]] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    _encode: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None
    _decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) as float32 on the handle's device, for images x in [-1, 1] of shape [B,C,H,W]."""
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"{self.name}: expected images [B, {self.image_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(f"{self.name}: image size {tuple(x.shape[-2:])} is not divisible by the VAE's "
                             f"downsampling factor {self.downsample}")
        mean, std = self._encode(x.to(self.device, self.dtype))
        return mean.float(), std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (float32, nominally [-1, 1], not clamped) from raw latents z [B, latent_channels, h, w]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name}: expected latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        return self._decode(z.to(self.device, self.dtype)).float()

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        """Latent [C, h, w] for square images of side ``image_size``."""
        return (self.latent_channels, image_size // self.downsample, image_size // self.downsample)


# ----------------------------------------------------------------------------------------------------- ours
def save_vae(path: str | os.PathLike, model: AutoencoderKL, *, image_size: Optional[int] = None,
             step: Optional[int] = None, latent_stats: Optional[Dict[str, list]] = None,
             state_dict: Optional[Dict[str, torch.Tensor]] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the VAE weights (``state_dict`` if given, e.g. EMA weights, else ``model``'s) with their metadata.

    The file is written under a temporary name and renamed, so a reader never sees a partial file.
    """
    path = Path(path)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in sd.items()}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": dict(model.config),
        "latent": {
            "channels": model.latent_channels,
            "downsample": model.downsample,
            "shape": list(model.latent_shape(image_size)) if image_size else None,
            "stats": latent_stats,
        },
        "data": {"image_size": image_size, "channels": model.config["in_channels"]},
        "step": step,
    }
    if extra:
        meta.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)

    atomic_save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})
    return path


def read_vae_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """The ``ditstack_vae`` metadata of one of our VAE files (no weights are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise VAELoadError(f"{path}: not a readable safetensors file ({err})") from None
    if raw is None:
        raise VAELoadError(f"{path}: no '{METADATA_KEY}' metadata; not a ditstack VAE file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise VAELoadError(f"{path}: '{METADATA_KEY}' metadata is not JSON ({err})") from None
    if meta.get("format") != FORMAT_NAME or not isinstance(meta.get("model"), dict):
        raise VAELoadError(f"{path}: '{METADATA_KEY}' metadata lacks format={FORMAT_NAME!r} or model kwargs")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise VAELoadError(f"{path}: VAE format version {meta['version']} is newer than this code ({FORMAT_VERSION})")
    return meta


def _load_ours(path: Path, device: torch.device, dtype: torch.dtype) -> VAEHandle:
    from safetensors.torch import load_file

    meta = read_vae_metadata(path)
    try:
        model = AutoencoderKL(**meta["model"])
    except (TypeError, ValueError) as err:
        raise VAELoadError(f"{path}: model kwargs in metadata do not build an AutoencoderKL ({err})") from None
    missing, unexpected = model.load_state_dict(load_file(str(path), device="cpu"), strict=False)
    if missing or unexpected:
        raise VAELoadError(f"{path}: weights do not match the recorded model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    latent = meta.get("latent") or {}
    return VAEHandle(module=model, name=str(path.resolve()), kind="ditstack", latent_channels=model.latent_channels,
                     downsample=model.downsample, image_channels=model.config["in_channels"], device=device,
                     dtype=dtype, latent_stats=latent.get("stats"), metadata=meta,
                     _encode=model.encode, _decode=model.decode)


# ------------------------------------------------------------------------------------------------ diffusers
def _is_diffusers_vae_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, json.JSONDecodeError):
        return False


def _load_diffusers(path: Path, device: torch.device, dtype: torch.dtype) -> VAEHandle:
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError:
        raise VAELoadError(f"{path}: is a diffusers AutoencoderKL directory but diffusers is not installed "
                           f"(pip install diffusers)") from None
    try:
        model = DiffusersAutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise VAELoadError(f"{path}: cannot load the diffusers AutoencoderKL ({str(err).splitlines()[0]})") from None
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    cfg = dict(model.config)

    def encode(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dist = model.encode(x).latent_dist
        return dist.mean, dist.std

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z).sample

    shift = cfg.get("shift_factor")
    return VAEHandle(module=model, name=str(path.resolve()), kind="diffusers", latent_channels=cfg["latent_channels"],
                     downsample=2 ** (len(cfg["block_out_channels"]) - 1), image_channels=cfg["in_channels"],
                     device=device, dtype=dtype, scale_factor=float(cfg.get("scaling_factor") or 0.18215),
                     shift_factor=float(shift) if shift is not None else 0.0, metadata=cfg,
                     _encode=encode, _decode=decode)


# ---------------------------------------------------------------------------------------------------- entry
def resolve_vae_path(path: str | os.PathLike) -> Tuple[str, Path]:
    """Classify a VAE location: ("ditstack", file) or ("diffusers", directory); VAELoadError otherwise.

    Accepts our ``.safetensors`` file, a checkpoint directory holding ``vae.safetensors``, a run directory (or its
    ``checkpoints/``) whose ``latest`` names a checkpoint, a diffusers AutoencoderKL directory, or a diffusers
    pipeline directory with a ``vae/`` subfolder.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VAELoadError(f"VAE path not found: {p}")
    if p.is_file():
        return "ditstack", p
    if _is_diffusers_vae_dir(p):
        return "diffusers", p
    if _is_diffusers_vae_dir(p / "vae"):
        return "diffusers", p / "vae"
    if (p / VAE_FILENAME).is_file():
        return "ditstack", p / VAE_FILENAME
    for ckpts in (p / "checkpoints", p):
        latest = ckpts / "latest"
        if latest.is_file():
            target = ckpts / latest.read_text().strip()
            if (target / VAE_FILENAME).is_file():
                return "ditstack", target / VAE_FILENAME
            raise VAELoadError(f"{latest} names {target}, which holds no {VAE_FILENAME}")
    raise VAELoadError(f"{p}: neither a ditstack VAE (.safetensors, or a directory with {VAE_FILENAME} or "
                       f"checkpoints/latest) nor a diffusers AutoencoderKL directory (config.json)")


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> VAEHandle:
    """Load a frozen VAE (ours or diffusers, see module doc) onto ``device`` in eval mode."""
    kind, p = resolve_vae_path(path)
    device = torch.device(device)
    if kind == "diffusers":
        return _load_diffusers(p, device, dtype)
    return _load_ours(p, device, dtype)


# ------------------------------------------------------------------------------------------------ perceptual
# torchvision weights enum per lpips backbone; lpips builds them with `tv.<net>(pretrained=True)`, which resolves to
# these enums and `torch.hub.load_state_dict_from_url(url)` -> <torch.hub.get_dir()>/checkpoints/<url basename>.
_LPIPS_BACKBONES = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class LPIPSWeightsMissing(RuntimeError):
    """The LPIPS backbone file is not in the torch hub cache (and we never download at run time)."""


def lpips_backbone_path(net: str = "vgg") -> Tuple[Path, str]:
    """Where torchvision looks for the LPIPS backbone weights, and the URL it would download them from."""
    import torch.hub
    import torchvision.models as tvm

    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {', '.join(_LPIPS_BACKBONES)}, got {net!r}")
    url = getattr(tvm, _LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


# smallest input side each backbone's pooling stack accepts (measured); smaller images are upsampled to it
_LPIPS_MIN_SIZE = {"vgg": 16, "alex": 32, "squeeze": 32}


class _LPIPSWrapper(torch.nn.Module):
    """LPIPS on [-1, 1] images of 1 or 3 channels: grey is repeated to RGB, tiny images are upsampled (bilinear)
    to the backbone's minimum size, and the distance is returned per image, shape [B]."""

    def __init__(self, lpips_module: torch.nn.Module, min_size: int):
        super().__init__()
        self.inner = lpips_module
        self.min_size = min_size

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS needs 1- or 3-channel images, got {x.shape[1]} channels")
        if min(x.shape[-2:]) < self.min_size:
            h, w = x.shape[-2:]
            f = self.min_size / min(h, w)
            size = (max(self.min_size, round(h * f)), max(self.min_size, round(w * f)))
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = torch.nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.inner(x, y).flatten(1).mean(1)


def build_perceptual(net: str = "vgg", pretrained: bool = True, device: str | torch.device = "cpu",
                     seed: int = 0) -> torch.nn.Module:
    """A frozen LPIPS module ``(x, y) -> [B]`` distances for images in [-1, 1].

    ``pretrained=True`` needs the torchvision backbone file in the torch hub cache and raises
    LPIPSWeightsMissing (one line: where to put it, where to get it) when it is absent; ``pretrained=False`` uses a
    randomly initialised backbone with LPIPS's shipped linear heads (for tests and offline demos), drawn from
    ``seed`` without touching the global RNG, so every rank, every resume and launch/reconstruct.py measure with
    the same random network.
    """
    import warnings

    try:
        import lpips
    except ImportError:
        raise LPIPSWeightsMissing("the 'lpips' package is not installed (pip install lpips)") from None
    if pretrained:
        file, url = lpips_backbone_path(net)
        if not file.is_file():
            raise LPIPSWeightsMissing(
                f"LPIPS backbone weights not found: put {file.name} at {file} (download it from {url}; the directory "
                f"follows $TORCH_HOME), or set vae.perceptual.pretrained=false for a random backbone")
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation warning inside lpips
        torch.manual_seed(seed)
        module = lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
    return _LPIPSWrapper(module, _LPIPS_MIN_SIZE[net]).to(device).eval().requires_grad_(False)
