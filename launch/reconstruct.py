"""Reconstruct held-out image shards with a VAE and report PSNR, SSIM and LPIPS, with a comparison grid.

    python launch/reconstruct.py --vae RUN/vae.safetensors --shards data/mnist_val --out RUN/recon \
        [--config C --set vae.perceptual.pretrained=false] [--num-images 1000] [--batch-size 64]

PSNR and SSIM are computed on images mapped to [0, 1] (data range 1) after clamping the reconstruction; SSIM is
Wang et al. 2004 (11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, valid region only), averaged over channels.
LPIPS uses the config's `vae.perceptual` settings (network, pretrained backbone or not); `--no-lpips` skips it.
Writes OUT/reconstruct.json (metrics and settings) and OUT/reconstruct_grid.png (originals above reconstructions).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

if __package__ in (None, ""):  # `python launch/reconstruct.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from data_pipeline.checks import OneLineParser, Range, device_arg, number_arg, output_dir_problem
from data_pipeline.devices import configure_tf32
from data_pipeline.files import atomic_save_image, atomic_write_json
from data_pipeline.loader import build_stream
from data_pipeline.vae_io import LPIPSWeightsMissing, VAELoadError, build_perceptual, load_vae
from eval.config import TrainConfig, add_config_args, config_from_args, field_range, load_config

log = logging.getLogger(__name__)

__all__ = ["psnr", "ssim", "evaluate_reconstruction", "save_comparison_grid", "iter_shard_images", "main"]


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape [B] (inf for identical images)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM, shape [B], for images [B, C, H, W] (mean over channels and valid window positions)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} are smaller than the {win_size}px window")
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma, x.dtype, x.device)
    wh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate_reconstruction(vae, batches: Iterable[torch.Tensor], perceptual: Optional[torch.nn.Module] = None,
                            max_images: Optional[int] = None, sample: bool = False,
                            generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Reconstruct images in [-1, 1] and average PSNR/SSIM/LPIPS over them.

    ``vae`` is a VAEHandle (or anything with encode -> (mean, std) and decode). Reconstructions decode the posterior
    mean unless ``sample``. Returns metrics plus ``first`` = (originals, reconstructions) of the first batch for a grid.
    """
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0, "mse": 0.0}
    n = 0
    first = None
    for x in batches:
        if max_images is not None:
            if n >= max_images:
                break
            x = x[: max_images - n]
        x = x.float()
        mean, std = vae.encode(x)
        z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device) if sample else mean
        rec = vae.decode(z).clamp(-1, 1).cpu()
        x01, r01 = (x.cpu() + 1) / 2, (rec + 1) / 2
        sums["psnr"] += psnr(x01, r01).clamp(max=100.0).sum().item()  # identical images: cap inf at 100 dB
        sums["mse"] += (x01.double() - r01.double()).pow(2).flatten(1).mean(1).sum().item()
        if min(x.shape[-2:]) >= 11:
            sums["ssim"] += ssim(x01, r01).sum().item()
        if perceptual is not None:
            dev = next(iter(perceptual.parameters())).device
            sums["lpips"] += perceptual(x.to(dev), rec.to(dev)).sum().item()
        if first is None:
            first = (x.cpu(), rec)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no images to reconstruct")
    out: Dict[str, object] = {k: v / n for k, v in sums.items()}
    out["psnr_of_mean_mse"] = 10.0 * math.log10(1.0 / max(out["mse"], 1e-20))
    if min(first[0].shape[-2:]) < 11:
        out["ssim"] = None
    if perceptual is None:
        out["lpips"] = None
    out["num_images"] = n
    out["first"] = first
    return out


def save_comparison_grid(x: torch.Tensor, rec: torch.Tensor, path: str | os.PathLike, ncol: int = 8) -> Path:
    """PNG with rows of originals, each followed by a row of their reconstructions (images in [-1, 1])."""
    from PIL import Image
    from torchvision.utils import make_grid

    x, rec = x.detach().float().cpu(), rec.detach().float().cpu()
    n = min(x.shape[0], rec.shape[0])
    ncol = max(1, min(ncol, n))
    n = (n // ncol) * ncol
    rows = []
    for i in range(0, n, ncol):
        rows += [x[i:i + ncol], rec[i:i + ncol]]
    grid = make_grid(torch.cat(rows).clamp(-1, 1).add(1).div(2), nrow=ncol, padding=2, pad_value=1.0)
    arr = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return atomic_save_image(Image.fromarray(arr), path, "PNG")


def iter_shard_images(shards: str, batch_size: int, seed: int = 0, max_images: Optional[int] = None):
    """One pass over image shards (no flips, no shuffle buffer): yields x [B, C, H, W] in [-1, 1], the last batch
    possibly smaller, up to ``max_images`` images (every image when None)."""
    # batch size 1 underneath: a training stream drops the incomplete last batch, an evaluation must not
    stream = build_stream(shards, batch_size=1, rank=0, world_size=1, num_workers=0, seed=seed, mode="exact",
                          shuffle_buffer=0, flip=False)
    try:
        kind = (stream.manifest or {}).get("kind")
        if kind not in (None, "image"):
            raise ValueError(f"{shards}: manifest kind is {kind!r}; reconstruction needs image shards")
        total = stream.batches_per_epoch if max_images is None else min(max_images, stream.batches_per_epoch)
        it = iter(stream)
        done = 0
        while done < total:
            n = min(batch_size, total - done)
            yield torch.cat([next(it)[0] for _ in range(n)])
            done += n
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.add_argument("--vae", required=True, help="our .safetensors / checkpoint or run dir, or a diffusers directory")
    p.add_argument("--shards", default=None, help="held-out image shards (default: data.val_shards, else data.shards)")
    p.add_argument("--out", required=True, help="output directory for reconstruct.json and reconstruct_grid.png")
    p.add_argument("--num-images", type=number_arg(int, Range(0, 2**63 - 1)), default=1000,
                   help="images to evaluate (0: the whole pass)")
    p.add_argument("--batch-size", type=number_arg(int, Range(1, 65536)), default=64)
    p.add_argument("--grid-images", type=number_arg(int, Range(1, 1024)), default=16,
                   help="images shown in the grid (at most one batch)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=number_arg(int, field_range(TrainConfig, "seed")), default=0)
    p.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-tf32", action="store_true", help="GPUs: exact fp32 matmuls/convolutions (default: TF32 "
                                                          "on Ampere and newer)")
    return p


def main(argv: Optional[list] = None) -> int:
    """CLI entry point; returns the exit status (2 for a bad config or input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args) if args.config or args.overrides else load_config(None)
    shards = args.shards or cfg.data.val_shards or cfg.data.shards
    if not shards:
        print("error: no shards given (--shards, data.val_shards or data.shards)", file=sys.stderr)
        return 2
    problem = output_dir_problem(args.out)
    if problem:  # checked before the VAE is loaded and the images are reconstructed
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_tf32(device, not args.no_tf32)
    try:
        vae = load_vae(args.vae, device)
        perceptual = None if args.no_lpips else build_perceptual(cfg.vae.perceptual.net,
                                                                 cfg.vae.perceptual.pretrained, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        images = iter_shard_images(shards, args.batch_size, seed=args.seed, max_images=args.num_images or None)
        res = evaluate_reconstruction(vae, images, perceptual, sample=args.sample, generator=gen)
    except (VAELoadError, LPIPSWeightsMissing, FileNotFoundError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else repr(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    out = Path(args.out)
    x, rec = res.pop("first")
    grid = save_comparison_grid(x[: args.grid_images], rec[: args.grid_images], out / "reconstruct_grid.png")
    summary = {**res, "vae": vae.name, "vae_kind": vae.kind, "shards": shards, "sample": args.sample,
               "lpips_net": None if perceptual is None else cfg.vae.perceptual.net,
               "lpips_pretrained": None if perceptual is None else cfg.vae.perceptual.pretrained,
               "grid": str(grid)}
    atomic_write_json(out / "reconstruct.json", summary)
    print(json.dumps({k: summary[k] for k in ("num_images", "psnr", "ssim", "lpips")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
