"""Loader throughput: our shard streams vs the per-file layouts they replace, in one run, 0 and 2 workers.

    python benchmarks/bench_loader.py [--num 5000] [--batch-size 64] [--workers 0 2] [--reps 3]

* latents: our latent shards (encode_latents output, ``mean_std`` float16 with flipped twin; the loader draws the
  posterior sample, picks the twin and normalises) vs fast-DiT's layout: one ``features/i.npy`` (float32
  [1, 4, 32, 32], a stored sample) and one ``labels/i.npy`` per sample, read by a torch Dataset
  (np.load + torch.from_numpy, as fast-DiT's ``CustomDataset``) through a shuffling DataLoader.
* images: our image shards (PNG) vs torchvision ``ImageFolder`` over the same PNG files with
  RandomHorizontalFlip + ToTensor + Normalize(0.5, 0.5).

Each timed run reads ``--epochs`` epochs the way a training loop does (one stream for ours; a DataLoader with
persistent workers for the baselines), start-up included, after one warm-up run (page cache). Runs of ours and the
baseline alternate and the best of ``--reps`` counts, because the CPU here is shared. Reported: samples per wall
second and samples per CPU second (this process plus its workers), the latter being robust to other load.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_pipeline.encode_latents import encode_shards
from data_pipeline.loader import build_stream
from data_pipeline.make_shards import make_shards


class NpyLatentDataset(Dataset):
    """fast-DiT's CustomDataset: one features .npy and one labels .npy file per sample."""

    def __init__(self, features_dir: str, labels_dir: str):
        self.features_dir, self.labels_dir = features_dir, labels_dir
        self.features_files = sorted(os.listdir(features_dir))
        self.labels_files = sorted(os.listdir(labels_dir))

    def __len__(self) -> int:
        return len(self.features_files)

    def __getitem__(self, idx: int):
        features = np.load(os.path.join(self.features_dir, self.features_files[idx]))
        labels = np.load(os.path.join(self.labels_dir, self.labels_files[idx]))
        return torch.from_numpy(features), torch.from_numpy(labels)


def make_image_folder(root: Path, num: int, size: int, classes: int = 10) -> None:
    """``num`` smooth random RGB PNGs (upsampled noise, so PNG compresses like photos do, roughly) in class dirs."""
    rng = np.random.default_rng(0)
    for i in range(num):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(size // 4, size // 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(d / f"{i:06d}.png")


def fake_encoder(latent_channels: int = 4) -> Callable:
    """A cheap stand-in VAE for the benchmark data: any deterministic (mean, std) of the right shape will do."""
    def encode(x: torch.Tensor):
        mean = x.mean(dim=1, keepdim=True).repeat(1, latent_channels, 1, 1) * 3.0
        std = torch.full_like(mean, 0.1) + 0.05 * x[:, :1].abs()
        return mean, std
    return encode


def setup(work: Path, num: int, latent_side: int, image_size: int) -> Dict[str, Path]:
    """Build (once) the image folder, image shards, latent shards and the fast-DiT .npy layout."""
    paths = {k: work / k for k in ("folder", "img_shards", "lat_src", "lat_shards", "features", "labels")}
    if not (paths["img_shards"] / "manifest.json").exists():
        make_image_folder(paths["folder"], num, image_size)
        make_shards("folder", paths["img_shards"], root=str(paths["folder"]), image_size=image_size,
                    shard_size=1000, workers=2, command="bench_loader")
    if not (paths["lat_shards"] / "manifest.json").exists():
        make_image_folder(paths["lat_src"] / "src", num, latent_side)
        make_shards("folder", paths["lat_src"] / "shards", root=str(paths["lat_src"] / "src"),
                    image_size=latent_side, shard_size=1000, workers=2, command="bench_loader")
        encode_shards(fake_encoder(), paths["lat_src"] / "shards", paths["lat_shards"], batch_size=256,
                      vae_name="bench-fake", command="bench_loader")
    if not paths["features"].exists():
        paths["features"].mkdir(parents=True)
        paths["labels"].mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(num):
            np.save(paths["features"] / f"{i}.npy",
                    rng.standard_normal((1, 4, latent_side, latent_side), dtype=np.float32))
            np.save(paths["labels"] / f"{i}.npy", np.array([i % 10]))
    return paths


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_ours(spec: Path, batch: int, workers: int, epochs: int) -> Tuple[float, float, int]:
    """(wall s, CPU s, samples) for ``epochs`` epochs of one stream (workers start once, as in training)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    stream = build_stream(spec, batch_size=batch, num_workers=workers, seed=0)
    it = iter(stream)
    n = epochs * stream.batches_per_epoch
    for _ in range(n):
        x, y = next(it)
    wall = time.perf_counter() - t0
    stream.close()
    return wall, cpu_seconds() - c0, n * batch


def time_loader(ds: Dataset, batch: int, workers: int, epochs: int) -> Tuple[float, float, int]:
    """(wall s, CPU s, samples) for ``epochs`` epochs of a shuffling DataLoader (persistent workers)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    n = 0
    for _ in range(epochs):
        for x, y in loader:
            n += 1
    wall = time.perf_counter() - t0
    del loader
    gc.collect()
    return wall, cpu_seconds() - c0, n * batch


def main(argv: List[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bench_loader", help="where the data sets are built (reused)")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    p.add_argument("--latent-side", type=int, default=32, help="latent side (32 = 256px images with SD-VAE)")
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args(argv)
    work = Path(args.work)
    paths = setup(work, args.num, args.latent_side, args.image_size)
    b = args.batch_size

    def fastdit(nw):
        ds = NpyLatentDataset(str(paths["features"]), str(paths["labels"]))
        return lambda: time_loader(ds, b, nw, args.epochs)

    def imagefolder(nw):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        tf = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        ds = ImageFolder(str(paths["folder"]), transform=tf)
        return lambda: time_loader(ds, b, nw, args.epochs)

    def ours(spec):
        return lambda nw: (lambda: time_ours(spec, b, nw, args.epochs))

    pairs = [("latents", ours(paths["lat_shards"]), "fast-DiT per-file .npy", fastdit),
             ("images", ours(paths["img_shards"]), "torchvision ImageFolder", imagefolder)]
    rows = []
    for kind, our_fn, base_name, base_fn in pairs:
        for nw in args.workers:
            runs = {"ours": our_fn(nw), "base": base_fn(nw)}
            for run in runs.values():  # warm-up (page cache, imports)
                run()
            best = {k: (0.0, 0.0) for k in runs}  # (samples per wall s, samples per CPU s)
            for _ in range(args.reps):  # interleaved, so changes in machine load hit both
                for k, run in runs.items():
                    wall, cpu, n = run()
                    best[k] = (max(best[k][0], n / wall), max(best[k][1], n / cpu))
            rows.append((kind, nw, best["ours"], best["base"], base_name))
            print(f"{kind} workers={nw}: ours {best['ours'][0]:.0f}/s ({best['ours'][1]:.0f}/CPU-s), {base_name} "
                  f"{best['base'][0]:.0f}/s ({best['base'][1]:.0f}/CPU-s)", flush=True)
    print(f"\n{args.num} samples, batch {b}, latents 4x{args.latent_side}x{args.latent_side} (ours: mean+std fp16 "
          f"with flipped twin, posterior sampled per read), images {args.image_size}px PNG; "
          f"best of {args.reps} runs of {args.epochs} epochs after a warm-up run\n")
    print("| data | workers | ours samples/s | baseline | baseline samples/s | ratio | ours samples/CPU-s "
          "| baseline samples/CPU-s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, nw, o, base, name in rows:
        print(f"| {kind} | {nw} | {o[0]:.0f} | {name} | {base[0]:.0f} | {o[0] / base[0]:.2f} | {o[1]:.0f} "
              f"| {base[1]:.0f} | {o[1] / base[1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
