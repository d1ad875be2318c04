"""What REPA adds to a training step (issue 16): the frozen encoder's forward and the projector.

CPU, measured: the MNIST demo's DiT (configs/runs/mnist_demo.yaml: hidden 128, depth 6, 8x8x4 latents,
batch 32, fp32, dit.cpu's blocks as the trainer uses them on a CPU), one bare training step (forward, flow loss,
backward, fused AdamW) without and with REPA (encoder features of the batch's 32x32 digits + the projector on
block `--depth`'s tokens + the alignment loss), interleaved in rounds so that machine drift hits both alike. The
encoder is timm's `test_vit` at 64 px (the demo's REPA encoder, benchmarks/repa_mnist_encoder.py; random weights
time the same); `--projector-dims` lists the projector widths to time.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/bench_repa.py --steps 20 --rounds 5

On a machine other processes load, `--threads 1 --clock thread` times the CPU time of this (single) thread, which
the others barely move (wall time then says nothing).

GPU, on paper (`--paper`): forward FLOPs of DINOv2-B/14 at 224 px (built from timm's architecture with random
weights: nothing is downloaded) and of the XL projector, against DiT-XL/2's training FLOPs per image (3 x forward).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dit.cpu import accelerate
from dit.models import DiT, DiT_models
from dit.repa import Projector, REPAModel
from dit.transport import create_transport
from launch.loss import training_loss, with_alignment
from launch.repa import FrozenEncoder

DEMO = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=6, num_heads=4, num_classes=10,
            learn_sigma=False)


def _encoder(name: str, resolution: int) -> FrozenEncoder:
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(name, pretrained=False, img_size=resolution, num_classes=0)
    data = resolve_data_config({}, model=model)
    return FrozenEncoder(model, resolution, tuple(data["mean"]), tuple(data["std"]), torch.device("cpu"), False)


def paper() -> dict:
    """FLOPs per image of REPA's additions for DiT-XL/2 at 256 px (32x32x4 latents, 256 tokens)."""
    dit = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    enc = _encoder("vit_base_patch14_dinov2.lvd142m", 224)
    train = 3 * dit.model_flops_per_sample()
    encoder = enc.flops_per_image()
    projector = 3 * Projector(dit.hidden_size, 2048, enc.embed_dim).flops_per_token() * dit.x_embedder.num_patches
    return {"dit_xl2_train_gflop": train / 1e9, "dinov2_b14_224_forward_gflop": encoder / 1e9,
            "projector_train_gflop": projector / 1e9, "encoder_share": encoder / train,
            "projector_share": projector / train, "total_added": (encoder + projector) / train,
            "tokens": [dit.x_embedder.num_patches, enc.grid * enc.grid]}


def _step_fn(model: torch.nn.Module, encoder: FrozenEncoder | None, batch: tuple) -> Callable[[], None]:
    """One bare training step of `model` (a DiT, or a REPAModel with `encoder`) on a fixed batch."""
    transport = create_transport(time_sampling="logit_normal")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    x, y, images = batch
    state: dict = {}

    def model_fn(xt: torch.Tensor, t: torch.Tensor, y=None, force_drop_ids=None) -> torch.Tensor:
        out = model(xt, t, y, force_drop_ids=force_drop_ids)
        if isinstance(out, tuple):
            out, state["projected"] = out
        return out

    def step() -> None:
        features = encoder.features(images, model.grid) if encoder is not None else None
        loss = training_loss(model_fn, transport, x, y, num_classes=10, class_dropout_prob=0.1, generator=gen)
        total, _ = with_alignment(loss, state.pop("projected", None), features, 0.5)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return step


def measure(args: argparse.Namespace) -> dict:
    """Interleaved timings (ms per step, median over rounds) of the plain step and the REPA steps."""
    torch.manual_seed(0)
    batch = (torch.randn(args.batch, 4, 8, 8), torch.randint(0, 10, (args.batch,)),
             torch.randint(0, 256, (args.batch, 1, 32, 32), dtype=torch.uint8))
    enc = _encoder("test_vit", 64)
    steps = {"plain": _step_fn(accelerate(DiT(**DEMO)), None, batch)}
    for dim in args.projector_dims:
        model = REPAModel(accelerate(DiT(**DEMO)), args.depth, dim, enc.embed_dim)
        steps[f"repa_p{dim}"] = _step_fn(model, enc, batch)
    steps["encoder_forward_only"] = lambda: enc.features(batch[2], 4)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up (allocator, oneDNN primitives)
        for _ in range(3):
            fn()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    for _ in range(args.rounds):
        for name, fn in steps.items():
            start = clock()
            for _ in range(args.steps):
                fn()
            times[name].append((clock() - start) / args.steps * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    out = {"ms_per_step": ms, "threads": torch.get_num_threads(), "batch": args.batch, "clock": args.clock}
    out["overhead"] = {k: ms[k] / ms["plain"] - 1 for k in ms if k.startswith("repa_")}
    out["flops_per_sample"] = {"dit_train": 3 * DiT(**DEMO).model_flops_per_sample(),
                               "encoder_forward": enc.flops_per_image(),
                               **{f"projector_train_p{d}": 3 * Projector(128, d, enc.embed_dim).flops_per_token() * 16
                                  for d in args.projector_dims}}
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the measurement (or the paper estimate) as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paper", action="store_true", help="FLOP estimate for DiT-XL/2 + DINOv2-B/14 instead")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2, help="REPA block (1-based)")
    ap.add_argument("--projector-dims", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: CPU time of this thread (use with --threads 1 on a loaded machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(paper() if args.paper else measure(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
