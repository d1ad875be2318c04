"""Draw class-conditional (or unconditional) samples from a DiT checkpoint: one grid PNG plus the single images.

    python launch/sample.py --ckpt runs/demo/dit --labels 3 7 7 1 --cfg-scale 4 --sampler ddim --steps 50 \
        --seed 0 --out samples/grid.png
    python launch/sample.py --ckpt model_ema.safetensors --labels male female --out celeb/grid.png   (class names)
    python launch/sample.py --ckpt runs/uncond --num 16 --out uncond/grid.png                     (unconditional)

``--ckpt`` is a checkpoint directory, a run directory (its newest complete checkpoint) or a consolidated
``.safetensors`` file; everything else (model, diffusion, VAE, latent normalisation, class names) comes from its
``ditstack`` metadata through ``eval/inference.py``. The single images are written in an ImageFolder layout,
``<images dir>/<class name>/<index>.png`` (the images dir defaults to the grid's directory), so torchvision's
``ImageFolder`` and other tools read them directly; ``<out>.json`` beside the grid records every setting.
Sample ``i`` uses seed ``eval.inference.sample_seed(seed, i)``: it depends on the seed, its index and its label
only, never on the batch size (the same rule as eval/fid.py).

Every flag is checked before any weight is read (one line on stderr, exit status 2): numbers against their ranges
(those of the config's ``sample`` section), ``--steps`` against the checkpoint's diffusion steps, ``--guide-channels``
against the model's input channels, ``--num`` at most ``MAX_NUM`` (every image is held in memory for the grid; larger
sets: ``eval/fid.py --save-npz``, which streams to disk), output paths against what is on disk.

Exit status: 0 done, 2 bad input (unknown label, unreadable checkpoint, bad flag).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python launch/sample.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data_pipeline.checks import OneLineParser, Range, device_arg, guide_channels_arg, number_arg, output_dir_problem
from data_pipeline.devices import configure_tf32
from data_pipeline.files import atomic_save_image, atomic_write_json
from dit.processes import objective_of
from eval.config import (SAMPLER_FLAGS, ConfigError, EvalConfig, SampleConfig, add_config_args, add_sampler_args,
                         config_for_checkpoint, field_range, fill_from_config)
from eval.inference import (InferenceError, default_sampler, flow_options, load_checkpoint, read_checkpoint_meta,
                            sample_seed, settings_problem)
from eval.visuals import save_image_grid
from launch.progress import StepProgress

EXIT_BAD_INPUT = 2
# All images and the grid are held in memory (10,000 at 256 px: 2 GB each); larger sets go through eval/fid.py.
MAX_NUM = 10_000
NUM_RANGE = Range(1, MAX_NUM, why="every image is held in memory for the grid; for more use eval/fid.py --save-npz")
UNCONDITIONAL_DIR = "unconditional"  # the single "class" directory of an unconditional model's samples
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["SampleError", "resolve_labels", "class_dir_names", "write_image_folder", "main"]


class SampleError(ValueError):
    """Bad sampling input, described in one line."""


def resolve_labels(tokens: Optional[Sequence[str]], num: Optional[int], num_classes: int,
                   class_names: Sequence[str]) -> Optional[list[int]]:
    """Class indices for the requested samples (None for an unconditional model).

    ``tokens`` are class names (from the checkpoint's data.class_names; a name wins over an index) or indices.
    Without tokens, a conditional model draws ``num`` samples cycling through the classes.
    """
    if num is not None and num <= 0:
        raise SampleError(f"--num {num}: must be a positive number of samples")
    if num_classes == 0:
        if tokens:
            raise SampleError("the model is unconditional: use --num N instead of --labels")
        if num is None or num <= 0:
            raise SampleError("the model is unconditional: pass --num N (N > 0) samples")
        return None
    if not tokens:
        if num is None or num <= 0:
            raise SampleError("the model is class-conditional: pass --labels (names or indices) or --num N")
        return [i % num_classes for i in range(num)]
    names = [str(n) for n in class_names]
    by_name = {n: i for i, n in enumerate(names) if i < num_classes}
    labels = []
    for tok in tokens:
        if tok in by_name:
            labels.append(by_name[tok])
            continue
        try:
            idx = int(tok)
        except ValueError:
            idx = None
        if idx is None or not 0 <= idx < num_classes:
            valid = (", ".join(names[:num_classes]) + f" (or an index 0..{num_classes - 1})") if names \
                else f"an index 0..{num_classes - 1}"
            raise SampleError(f"unknown label {tok!r}; valid labels: {valid}")
        labels.append(idx)
    if num is not None and num != len(labels):
        raise SampleError(f"--num {num} does not match the {len(labels)} labels given; pass one or the other")
    return labels


def class_dir_names(num_classes: int, class_names: Sequence[str]) -> list[str]:
    """The ImageFolder directory name of each class (the class name, made path-safe; the index if unnamed)."""
    if num_classes == 0:
        return [UNCONDITIONAL_DIR]
    out = []
    for i in range(num_classes):
        name = str(class_names[i]) if i < len(class_names) else str(i)
        safe = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip().strip(".") or str(i)
        out.append(safe)
    return out


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_save_image(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img), path, "PNG")


def write_image_folder(images: np.ndarray, labels: Optional[Sequence[int]], root: Path,
                       dir_names: Sequence[str], start: int = 0) -> list[str]:
    """Save uint8 images [N, H, W, C] as ``root/<class dir>/<index>.png`` (index = start + i); returns the paths."""
    paths = []
    for i, img in enumerate(images):
        d = root / dir_names[labels[i] if labels is not None else 0]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{start + i:06d}.png"
        _save_png(img, p)
        paths.append(str(p))
    return paths


SAMPLE_FLAGS = SAMPLER_FLAGS + ["steps", "eta", "cfg_scale", "guide_channels", "guidance_interval", "seed", "dtype"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of the sampler."""
    ap = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint dir, run dir (latest checkpoint) or .safetensors")
    ap.add_argument("--labels", nargs="+", default=None, help="class names or indices, one per sample")
    ap.add_argument("--num", type=number_arg(int, NUM_RANGE), default=None,
                    help=f"number of samples, 1..{MAX_NUM} (unconditional models, or cycling through the classes "
                         f"when --labels is not given)")
    add_config_args(ap, required=False)
    # Flags left out take the `sample` section of: the schema's defaults, under the checkpoint's own training
    # config, under --config, under --set (see `config_for_checkpoint`).
    ap.add_argument("--cfg-scale", type=number_arg(float, field_range(SampleConfig, "cfg_scale")), default=None,
                    help="classifier-free guidance scale (1 = none)")
    add_sampler_args(ap, SampleConfig)
    ap.add_argument("--steps", type=number_arg(int, field_range(SampleConfig, "steps")), default=None,
                    help="sampling steps (respacing of the trained process; at most its diffusion steps)")
    ap.add_argument("--eta", type=number_arg(float, field_range(SampleConfig, "eta")), default=None,
                    help="DDIM eta (0 = deterministic)")
    ap.add_argument("--guide-channels", type=guide_channels_arg, default=None,
                    help="'all' or N leading channels (3 = official DiT), at most the model's input channels")
    ap.add_argument("--guidance-interval", type=number_arg(float, field_range(SampleConfig, "guidance_interval")),
                    nargs=2, default=None, metavar=("T_LO", "T_HI"),
                    help="apply CFG only for training timesteps in [T_LO, T_HI]")
    ap.add_argument("--seed", type=number_arg(int, field_range(SampleConfig, "seed")), default=None)
    ap.add_argument("--batch-size", type=number_arg(int, field_range(EvalConfig, "batch_size")), default=64)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="DiT autocast dtype")
    ap.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-tf32", action="store_true", help="GPUs: exact fp32 matmuls/convolutions (default: TF32 "
                                                          "on Ampere and newer)")
    ap.add_argument("--vae", default=None, help="override the VAE named in the checkpoint")
    ap.add_argument("--out", default="samples/grid.png", help="grid PNG path")
    ap.add_argument("--images-dir", default=None, help="ImageFolder root of the single images (default: the "
                                                       "grid's directory)")
    ap.add_argument("--nrow", type=number_arg(int, Range(1, MAX_NUM)), default=None,
                    help="images per grid row (default: ~sqrt(N))")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return EXIT_BAD_INPUT


def _flag_problem(args: argparse.Namespace, out: Path, images_root: Path) -> Optional[str]:
    """What is wrong with the flags on their own (before the checkpoint is opened), as one line; None if nothing."""
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        lo, hi = args.guidance_interval
        return f"--guidance-interval {lo:g} {hi:g}: T_LO must not exceed T_HI"
    if out.suffix.lower() != ".png":
        return f"--out {out}: the grid is written as PNG; give a path ending in .png"
    if out.is_dir():
        return f"--out {out}: is a directory; give the grid's .png path"
    for flag, given, path in (("--out", out, out.parent), ("--images-dir", images_root, images_root)):
        problem = output_dir_problem(path)
        if problem:
            return f"{flag} {given}: {problem}"
    if args.vae is not None and not Path(args.vae).exists():
        return f"--vae {args.vae}: no such file or directory"
    return None


def _with_config(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every sampling flag left out filled from the config (`config_for_checkpoint`)."""
    try:
        stored = read_checkpoint_meta(args.ckpt)[1].get("config")
    except InferenceError:
        stored = None  # an unreadable checkpoint is reported with its own message once the flags are checked
    fill_from_config(args, config_for_checkpoint(args.config, args.overrides, stored).sample, SAMPLE_FLAGS)
    return args


def _load(args: argparse.Namespace) -> tuple[Any, dict, Optional[list[int]], bool, torch.device]:
    """(generator, metadata, labels, TF32 on, device) once the settings are checked against the checkpoint's
    metadata (read first: no weight is loaded for a bad setting). Raises SampleError / InferenceError."""
    _, meta = read_checkpoint_meta(args.ckpt)
    args.sampler = args.sampler or default_sampler(objective_of(meta["diffusion"]), "sample")
    problem = settings_problem(meta, args.steps, args.guide_channels, args.sampler)
    if problem:
        raise SampleError(problem)
    class_names = list((meta.get("data") or {}).get("class_names") or [])
    labels = resolve_labels(args.labels, args.num, int(meta["model"].get("num_classes", 0)), class_names)
    if labels is not None and len(labels) > MAX_NUM:
        raise SampleError(f"--labels: {len(labels)} labels; at most {MAX_NUM} samples per call ({NUM_RANGE.why})")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tf32 = configure_tf32(device, not args.no_tf32)
    gen, meta = load_checkpoint(args.ckpt, device, vae=args.vae)
    return gen, meta, labels, tf32, device


def _draw(gen: Any, args: argparse.Namespace, labels: Optional[list[int]], seeds: list[int], images_root: Path,
          dir_names: list[str], cfg_scale: float) -> tuple[np.ndarray, list[str]]:
    """Sample in batches, writing each image into the ImageFolder tree; (all images, their paths)."""
    chunks, paths = [], []
    progress = StepProgress(total=len(seeds), desc="sample", enabled=not args.no_progress)
    try:
        for i in range(0, len(seeds), args.batch_size):
            lab = labels[i:i + args.batch_size] if labels is not None else None
            imgs = gen.generate(lab, seeds[i:i + args.batch_size], batch_size=args.batch_size,
                                sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=cfg_scale,
                                guide_channels=args.guide_channels, guidance_interval=args.guidance_interval,
                                dtype=DTYPES[args.dtype], **flow_options(args))
            paths += write_image_folder(imgs, lab, images_root, dir_names, start=i)
            chunks.append(imgs)
            progress.update(len(imgs))
    finally:
        progress.close()
    return np.concatenate(chunks), paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Sample and write the grid, the single images and the settings record; returns the exit status."""
    args = parse_args(argv)
    try:
        args = _with_config(args)
    except ConfigError as err:
        return _fail(f"config: {err}")
    out = Path(args.out)
    images_root = Path(args.images_dir) if args.images_dir else out.parent
    problem = _flag_problem(args, out, images_root)
    if problem:
        return _fail(problem)
    try:
        gen, meta, labels, tf32, device = _load(args)
    except (SampleError, InferenceError) as err:
        return _fail(str(err))
    except (OSError, RuntimeError) as err:  # e.g. an unreadable VAE override
        return _fail(f"{args.ckpt}: {type(err).__name__}: {err}")
    num_classes = gen.num_classes
    n = len(labels) if labels is not None else int(args.num)
    cfg_scale = args.cfg_scale if num_classes > 0 else 1.0
    seeds = [sample_seed(args.seed, i) for i in range(n)]
    dir_names = class_dir_names(num_classes, list(meta["data"].get("class_names") or []))
    try:
        images, paths = _draw(gen, args, labels, seeds, images_root, dir_names, cfg_scale)
        save_image_grid(images, out, nrow=args.nrow or max(1, math.ceil(math.sqrt(n))))
    except InferenceError as err:
        return _fail(str(err))
    except OSError as err:  # a full disk, a directory made read-only meanwhile: what was written stays whole
        return _fail(f"writing samples: {err.strerror or err} ({err.filename or out})")
    record = {"grid": str(out), "images_dir": str(images_root), "images": paths,
              "labels": labels, "class_names": [dir_names[lab] for lab in labels] if labels is not None else None,
              "seeds": seeds, "checkpoint": meta["weights_file"], "step": meta.get("step"),
              "settings": {"sampler": args.sampler, "steps": args.steps, "eta": args.eta, "cfg_scale": cfg_scale,
                           "guide_channels": args.guide_channels, "guidance_interval": args.guidance_interval,
                           "seed": args.seed, "dtype": args.dtype, "vae": args.vae, "tf32": tf32,
                           "device": str(device), **flow_options(args)},
              "seed_rule": "sample i: seed eval.inference.sample_seed(seed, i)"}
    atomic_write_json(out.with_suffix(".json"), record)
    print(f"wrote {n} samples: grid {out}, images under {images_root}/<class>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
