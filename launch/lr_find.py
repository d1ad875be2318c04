"""LR range test: train the run's DiT for a few hundred steps with an exponentially increasing learning rate.

    python launch/lr_find.py --config configs/runs/mnist_demo.yaml [--set train.global_batch_size=64] \
        [--min-lr 1e-7 --max-lr 1 --steps 200] --out runs/lr_find

The model, diffusion, optimizer (AdamW with the config's betas/eps/weight decay, its gradient clipping and
precision) and data stream are built exactly as launch/train.py builds them (``launch.builders``,
``data_pipeline.loader.build_stream``), but in one plain torch process without DeepSpeed: a range test only needs
the loss-vs-lr shape, which does not depend on how the optimizer state is sharded. The batch is
``train.global_batch_size`` (or ``--batch-size``) in one step, without accumulation.

The lr of step i is ``min_lr * (max_lr / min_lr) ** (i / (steps - 1))``. The diffusion loss is very noisy (random
timesteps), so the curve is smoothed with a bias-corrected exponential moving average; the test stops early once
the smoothed loss exceeds ``--diverge`` times its minimum (or becomes non-finite). Outputs in ``--out``:
``lr_find.png`` (raw and smoothed loss vs lr, suggestions marked) and ``lr_find.json`` (the curve, the
suggestions, the settings). The suggested max lr is the lr of the minimum smoothed loss divided by 10 (Smith's rule);
the lr of the steepest descent of the smoothed loss is reported too.

Exit status: 0 done, 2 bad config / input.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python launch/lr_find.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data_pipeline.checks import OneLineParser
from data_pipeline.devices import autocast
from data_pipeline.files import atomic_save_image, atomic_write_json
from data_pipeline.loader import build_stream
from data_pipeline.manifest import ManifestError
from dit.cpu import accelerate
from dit.models import DiT
from dit.processes import create_process
from eval.config import ConfigError, add_config_args, config_from_args
from launch.builders import diffusion_kwargs, model_kwargs
from launch.loss import training_loss
from launch.progress import StepProgress
from launch.run_utils import seed_everything, setup_logging

log = logging.getLogger("launch.lr_find")

EXIT_BAD_INPUT = 2

__all__ = ["lr_schedule", "smooth", "suggest", "range_test", "plot_curve", "main"]


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """The exponentially increasing learning rates of a range test (first min_lr, last max_lr)."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    if steps < 2:
        raise ValueError(f"need at least 2 steps, got {steps}")
    return min_lr * (max_lr / min_lr) ** (np.arange(steps, dtype=np.float64) / (steps - 1))


def smooth(values: Sequence[float], beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average (as in Adam's first moment) of a sequence."""
    out = np.empty(len(values), dtype=np.float64)
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1.0 - beta) * float(v)
        out[i] = avg / (1.0 - beta ** (i + 1))
    return out


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = 10,
            skip_end: int = 5) -> dict[str, Optional[float]]:
    """Suggested learning rates from a smoothed range-test curve.

    ``min_loss_lr``: the lr of the minimum smoothed loss; ``suggested_max_lr``: that lr / 10;
    ``steepest_lr``: where the smoothed loss falls fastest per decade of lr (the first ``skip_start`` and last
    ``skip_end`` points are ignored for it: the average is still warming up there, and the tail is diverging).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    sm = np.asarray(smoothed, dtype=np.float64)
    finite = np.isfinite(sm)
    if not finite.any():
        return {"min_loss_lr": None, "suggested_max_lr": None, "steepest_lr": None}
    i_min = int(np.nanargmin(np.where(finite, sm, np.nan)))
    out: dict[str, Optional[float]] = {"min_loss_lr": float(lrs[i_min]), "suggested_max_lr": float(lrs[i_min] / 10)}
    lo, hi = min(skip_start, len(sm) - 3), len(sm) - skip_end
    if hi - lo >= 3 and lo >= 0 and np.isfinite(sm[lo:hi]).all():
        slope = np.gradient(sm[lo:hi], np.log10(lrs[lo:hi]))
        out["steepest_lr"] = float(lrs[lo + int(np.argmin(slope))])
    else:
        out["steepest_lr"] = None
    return out


def _setup(cfg: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The stream, model, diffusion, optimizer and generator of a range test (as the trainer builds them)."""
    stream = build_stream(cfg.data.shards, batch_size=batch_size, rank=0, world_size=1,
                          num_workers=cfg.data.num_workers, seed=cfg.train.seed, mode=cfg.data.mode,
                          shuffle_buffer=cfg.data.shuffle_buffer, flip=cfg.data.flip)
    mkw, dkw = model_kwargs(cfg, stream.manifest), diffusion_kwargs(cfg)
    seed_everything(cfg.train.seed)
    model = DiT(**mkw).to(device).train()
    if device.type == "cpu":
        accelerate(model)  # as the trainer runs it
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps,
                            weight_decay=cfg.train.weight_decay)
    return {"stream": stream, "mkw": mkw, "dkw": dkw, "model": model, "diffusion": create_process(**dkw),
            "opt": opt, "gen": torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003)}


def _step(run: dict[str, Any], x: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float,
          use_bf16: bool) -> float:
    """One optimizer step at learning rate `lr`; returns the loss (NaN/inf without stepping when non-finite)."""
    model, opt, device = run["model"], run["opt"], x.device

    def model_fn(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        with autocast(device, torch.bfloat16 if use_bf16 else None):
            return model(x, t, **kw).float()

    for group in opt.param_groups:
        group["lr"] = float(lr)
    loss = training_loss(model_fn, run["diffusion"], x, y, num_classes=run["mkw"]["num_classes"],
                         class_dropout_prob=run["mkw"]["class_dropout_prob"], generator=run["gen"])
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return value


def range_test(cfg: Any, *, min_lr: float, max_lr: float, steps: int, batch_size: Optional[int] = None,
               beta: float = 0.98, diverge: float = 4.0, device: Optional[torch.device] = None,
               progress: bool = True) -> dict[str, Any]:
    """Run the range test for a ``eval.config.Config``; returns the curve, suggestions and settings."""
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: set it to a shard directory (with manifest.json)")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bs = batch_size or cfg.train.global_batch_size
    run = _setup(cfg, bs, device)
    lrs = lr_schedule(min_lr, max_lr, steps)
    bar = StepProgress(total=steps, desc="lr_find", enabled=progress)
    losses: list[float] = []
    smoothed: list[float] = []
    stop_reason, best, avg, t0 = "max_lr reached", math.inf, 0.0, time.perf_counter()
    it = iter(run["stream"])
    try:
        for i, lr in enumerate(lrs):
            x, y = next(it)
            value = _step(run, x.to(device), y.to(device), lr, cfg.train.grad_clip, cfg.train.precision == "bf16")
            if not math.isfinite(value):
                stop_reason = f"non-finite loss at lr {lr:.3g}"
                break
            losses.append(value)
            avg = beta * avg + (1.0 - beta) * value  # the same bias-corrected EMA as smooth(), incrementally
            smoothed.append(avg / (1.0 - beta ** len(losses)))
            best = min(best, smoothed[-1])
            bar.update(1)
            if i >= 10 and smoothed[-1] > diverge * best:
                stop_reason = f"diverged at lr {lr:.3g} (smoothed loss > {diverge:g} x its minimum)"
                break
    finally:
        bar.close()
        run["stream"].close()
    n = len(losses)
    return {
        "lr": [float(v) for v in lrs[:n]], "loss": losses, "smoothed_loss": smoothed,
        **suggest(lrs[:n], smoothed), "stop_reason": stop_reason, "steps_run": n,
        "settings": {"min_lr": min_lr, "max_lr": max_lr, "steps": steps, "batch_size": bs, "beta": beta,
                     "diverge": diverge, "precision": cfg.train.precision, "grad_clip": cfg.train.grad_clip,
                     "betas": list(cfg.train.betas), "weight_decay": cfg.train.weight_decay,
                     "shards": cfg.data.shards, "device": str(device)},
        "model": run["mkw"], "diffusion": run["dkw"], "seconds": time.perf_counter() - t0,
    }


def plot_curve(result: dict[str, Any], out: Path) -> Path:
    """Loss vs lr (log x) with the smoothed curve and the suggestions, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lr"], result["loss"], color="0.75", lw=0.8, label="loss")
    ax.plot(result["lr"], result["smoothed_loss"], color="C0", lw=1.8, label="smoothed")
    for key, color in (("suggested_max_lr", "C3"), ("steepest_lr", "C2")):
        if result.get(key):
            ax.axvline(result[key], color=color, ls="--", lw=1, label=f"{key.replace('_', ' ')} {result[key]:.2g}")
    ax.set_xscale("log")
    sm = [v for v in result["smoothed_loss"] if math.isfinite(v)]
    if sm:  # keep the interesting part in view: the divergent tail would squash it
        lo = min(sm)
        hi = min(max(sm), 1.1 * max(sm[: max(2, len(sm) // 2)]))  # the first half: before any divergence
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.15 * (hi - lo + 1e-12))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_image(fig, out, "PNG", dpi=100)
    plt.close(fig)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of the range test."""
    ap = OneLineParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--min-lr", type=float, default=1e-7)
    ap.add_argument("--max-lr", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.global_batch_size")
    ap.add_argument("--beta", type=float, default=0.98, help="smoothing of the loss (EMA factor)")
    ap.add_argument("--diverge", type=float, default=4.0, help="stop when the smoothed loss exceeds this "
                                                               "multiple of its minimum")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", required=True, help="output directory (lr_find.png, lr_find.json)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the range test and write its plot and JSON; returns the exit status."""
    args = parse_args(argv)

    setup_logging(0)
    cfg = config_from_args(args)
    if not 0 < args.min_lr < args.max_lr or args.steps < 2 or not 0 <= args.beta < 1 or args.diverge <= 1:
        sys.stderr.write("error: need 0 < --min-lr < --max-lr, --steps >= 2, 0 <= --beta < 1, --diverge > 1\n")
        return EXIT_BAD_INPUT
    if args.batch_size is not None and args.batch_size <= 0:
        sys.stderr.write("error: --batch-size must be > 0\n")
        return EXIT_BAD_INPUT
    try:
        result = range_test(cfg, min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps,
                            batch_size=args.batch_size, beta=args.beta, diverge=args.diverge,
                            device=torch.device(args.device) if args.device else None,
                            progress=not args.no_progress)
    except (ConfigError, ManifestError) as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    except ValueError as err:  # e.g. a batch larger than the data set
        sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    if not result["loss"]:
        sys.stderr.write(f"error: no finite loss at all ({result['stop_reason']}); lower --min-lr\n")
        return EXIT_BAD_INPUT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["config"] = args.config
    result["overrides"] = list(args.overrides)
    png = plot_curve(result, out / "lr_find.png")
    atomic_write_json(out / "lr_find.json", result)
    sug = result["suggested_max_lr"]
    steep = result["steepest_lr"]
    print(f"{result['steps_run']} steps ({result['stop_reason']}); suggested max lr {sug:.3g} (min-loss lr / 10)"
          + (f", steepest descent at {steep:.3g}" if steep else "") + f"; plot {png}, curve {out / 'lr_find.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
