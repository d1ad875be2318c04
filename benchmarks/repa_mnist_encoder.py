"""Train a small ViT on the demo's MNIST digits to serve as REPA's encoder offline (issue 16 REPA experiment).

    python benchmarks/repa_mnist_encoder.py --shards runs/demo/shards/train --val runs/demo/shards/val \
        --out runs/demo/repa/digit_vit.safetensors

The model is timm's `test_vit` (6 blocks, width 64, patch 16: 0.3 M parameters) at 64 px, so a 32 px digit
(upsampled, as launch/repa.py feeds it) gives a 4x4 grid of patch tokens, the demo DiT's token grid. It is trained
as a digit classifier on the mean of its normalised patch tokens (a linear head that is not saved), so that every
patch token carries what the classification needs; the images go through `launch.repa.encoder_input`, exactly
the encoder's input in training. Written: the ViT's state dict (safetensors), for
`repa.encoder=test_vit repa.encoder_resolution=64 repa.encoder_weights=OUT`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from data_pipeline.files import atomic_save_safetensors
from data_pipeline.loader import build_stream
from launch.repa import encoder_input

log = logging.getLogger("repa_mnist_encoder")
NAME, RESOLUTION = "test_vit", 64


def _patch_mean(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)[:, model.num_prefix_tokens:].mean(dim=1)


def _inputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    mean = torch.full((1, 3, 1, 1), 0.5)
    return encoder_input(x, RESOLUTION, mean, mean.clone(), model.patch_embed.proj.in_channels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, head: torch.nn.Module, shards: str) -> float:
    """Held-out accuracy of the classifier (one pass over the shards)."""
    model.eval()
    stream = build_stream(shards, batch_size=100, flip=False, seed=0)
    it, right, seen = iter(stream), 0, 0
    for _ in range(stream.batches_per_epoch):
        x, y = next(it)
        right += int((head(_patch_mean(model, _inputs(model, x))).argmax(1) == y).sum())
        seen += len(y)
    stream.close()
    model.train()
    return right / max(seen, 1)


def main(argv: list[str] | None = None) -> int:
    """Train, report held-out accuracy, write the encoder weights."""
    import timm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True, help="image shards of the digits (training)")
    ap.add_argument("--val", default=None, help="held-out image shards (accuracy)")
    ap.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    model = timm.create_model(NAME, pretrained=False, img_size=RESOLUTION, num_classes=0)
    head = torch.nn.Linear(model.num_features, 10)
    params = list(model.parameters()) + list(head.parameters())
    stream = build_stream(args.shards, batch_size=args.batch, flip=False, seed=args.seed)
    steps = args.epochs * stream.batches_per_epoch
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    it, start = iter(stream), time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(it)
        loss = F.cross_entropy(head(_patch_mean(model, _inputs(model, x))), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % stream.batches_per_epoch == 0:
            log.info("epoch %d: loss %.3f (%.0f s)", step // stream.batches_per_epoch, float(loss.detach()),
                     time.perf_counter() - start)
    stream.close()
    if args.val:
        log.info("held-out accuracy (%s): %.4f", args.val, accuracy(model, head, args.val))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out)
    log.info("wrote %s (repa.encoder=%s repa.encoder_resolution=%d)", out, NAME, RESOLUTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
