"""Write image shards (webdataset tars + manifest.json) from MNIST, an image folder, or CelebA.

    python data_pipeline/make_shards.py --source mnist --out data/mnist --split train
    python -m data_pipeline.make_shards --source folder --root /data/imagenet/train --out shards/in256 \
        --image-size 256 --format jpg --workers 8
    srun -n 4 python -m data_pipeline.make_shards --source celeba --root /data/celeba --label-attr Male ...

Items are listed in a fixed order, shuffled with ``--seed`` (so shards mix classes), split into contiguous blocks
per writer rank, and each block into shards of ``--shard-size`` samples. Rank r names its shards after the shards
of ranks < r, so ranks write disjoint files; rank 0 merges the per-rank partial manifests into ``manifest.json``
(written last, atomically). Unreadable inputs are skipped and listed under ``skipped``.
"""
from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from data_pipeline import manifest as mf
from data_pipeline.dist_env import rank_world_from_env
from data_pipeline.imaging import MODES, center_crop_arr, encode_image, load_image
from data_pipeline.locations import remote_output_problem
from data_pipeline.sources import Item, SourceError, celeba_items, folder_items, mnist_items, select_split
from data_pipeline.tario import ShardWriter

log = logging.getLogger(__name__)

SOURCES = ("mnist", "folder", "celeba")


def list_items(source: str, root: Optional[str], label_attr: Optional[str] = None,
               attr_file: Optional[str] = None) -> Tuple[List[Item], List[str], List[dict]]:
    """(items, class names, inputs skipped while listing) of a source."""
    if source == "mnist":
        items, classes = mnist_items()
        return items, classes, []
    if not root:
        raise SourceError(f"--source {source} needs --root")
    if source == "folder":
        items, classes = folder_items(root)
        return items, classes, []
    if source == "celeba":
        return celeba_items(root, label_attr, attr_file)
    raise SourceError(f"unknown source {source!r} ({', '.join(SOURCES)})")


def prepare_image(payload: Any, image_size: int, channels: int) -> Image.Image:
    """Decode one input (path or uint8 array), convert to L/RGB and centre-crop-resize; raises on bad input."""
    if isinstance(payload, np.ndarray):
        img = Image.fromarray(payload, "L" if payload.ndim == 2 else "RGB")
        if img.mode != MODES[channels]:
            img = img.convert(MODES[channels])
    else:
        img = load_image(payload, channels)
    return center_crop_arr(img, image_size)


def _write_shard(task: Tuple[str, List[Tuple[str, Item]], int, int, str, int]) -> Dict[str, Any]:
    """Write one shard; returns its manifest entry and the inputs it skipped."""
    path, keyed_items, image_size, channels, fmt, quality = task
    skipped = []
    with ShardWriter(path) as w:
        for key, (ident, payload, label) in keyed_items:
            try:
                data = encode_image(prepare_image(payload, image_size, channels), fmt, quality)
            except Exception as err:  # corrupt / truncated / unsupported input: skip and list it
                skipped.append({"input": ident, "reason": f"{type(err).__name__}: {err}"})
                continue
            w.write(key, {fmt: data, "cls": str(label).encode()})
        n = w.num_samples
    if n == 0:
        Path(path).unlink(missing_ok=True)
    return {"name": Path(path).name, "num_samples": n, "bytes": w.num_bytes, "skipped": skipped}


def plan_blocks(n_items: int, world_size: int, shard_size: int) -> List[Tuple[int, int, int]]:
    """Per writer rank: (first item, end item, first shard number) of its contiguous block."""
    out, shard0 = [], 0
    for r in range(world_size):
        lo, hi = r * n_items // world_size, (r + 1) * n_items // world_size
        out.append((lo, hi, shard0))
        shard0 += math.ceil((hi - lo) / shard_size)
    return out


def _keyed_items(items: list, seed: int, max_samples: Optional[int], what: str, split: str) -> list:
    """(key, item) pairs in the seeded order that mixes classes across shards (at most `max_samples`)."""
    order = np.random.default_rng(seed).permutation(len(items))
    if max_samples is not None:
        order = order[:max_samples]
    if len(order) == 0:
        raise SourceError(f"{what}: no items in split {split!r}")
    return [(f"{i:09d}", items[j]) for i, j in enumerate(order)]


def _run_tasks(tasks: list, workers: int) -> list[Dict[str, Any]]:
    """Write the shards of `tasks` (in `workers` processes when there are several)."""
    if workers > 1 and len(tasks) > 1:
        with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(min(workers, len(tasks))) as pool:
            results = list(pool.imap(_write_shard, tasks))
    else:
        results = [_write_shard(t) for t in tasks]
    for res in results:
        log.info("%s: %d samples", res["name"], res["num_samples"])
    return results


def make_shards(source: str, out: str | os.PathLike, *, image_size: Optional[int] = None, fmt: str = "png",
                quality: int = 95, shard_size: int = 1000, workers: int = 1, rank: int = 0, world_size: int = 1,
                root: Optional[str] = None, label_attr: Optional[str] = None, attr_file: Optional[str] = None,
                channels: Optional[int] = None, max_samples: Optional[int] = None, split: str = "all",
                val_fraction: float = 0.05, seed: int = 0, name: Optional[str] = None,
                command: Optional[str] = None, merge_timeout: float = 24 * 3600.0) -> Optional[Dict[str, Any]]:
    """Write this rank's shards of ``source`` into ``out``; rank 0 also writes the merged manifest and returns it."""
    image_size = image_size or (32 if source == "mnist" else 256)
    channels = channels or (1 if source == "mnist" else 3)
    if channels not in MODES:
        raise SourceError(f"--channels must be 1 or 3, got {channels}")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("png", "jpg"):
        raise SourceError(f"--format must be png or jpg, got {fmt!r}")
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0 <= rank < world_size:
        raise SourceError(f"--rank {rank} is not in [0, --world-size {world_size})")
    name = name or ("data" if split == "all" else split)
    problem = remote_output_problem(out)
    if problem:
        raise SourceError(problem)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mf.clear_stale(out, rank, world_size)

    items, class_names, list_skipped = list_items(source, root, label_attr, attr_file)
    keyed = _keyed_items(select_split(items, split, val_fraction), seed, max_samples, f"{source} {root or ''}", split)
    lo, hi, shard0 = plan_blocks(len(keyed), world_size, shard_size)[rank]
    tasks = [(str(out / mf.shard_name(name, shard0 + k)), keyed[start:min(start + shard_size, hi)], image_size,
              channels, fmt, quality) for k, start in enumerate(range(lo, hi, shard_size))]
    results = _run_tasks(tasks, workers)

    signature = {"source": source, "root": str(Path(root).resolve()) if root else None, "split": split,
                 "val_fraction": val_fraction, "image_size": image_size, "channels": channels, "format": fmt,
                 "shard_size": shard_size, "seed": seed, "items": len(keyed), "name": name}
    body = {"shards": [{"name": r["name"], "num_samples": r["num_samples"], "bytes": r["bytes"]}
                       for r in results if r["num_samples"]],
            "skipped": [s for r in results for s in r["skipped"]],
            "command": command if command is not None else mf.command_line()}

    def merge(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["name"])
        total = sum(s["num_samples"] for s in shards)
        if total == 0:
            raise SourceError(f"{out}: every input was unreadable; no shards written")
        return {"kind": "image", "shards": shards, "total": total, "image_size": image_size, "channels": channels,
                "class_names": class_names, "source": source, "root": signature["root"], "split": split,
                "val_fraction": val_fraction if split != "all" else None, "image_format": fmt, "seed": seed,
                "writer_ranks": world_size, "command": parts[0]["command"],
                "skipped": list_skipped + [s for p in parts for s in p["skipped"]]}

    return mf.finish_manifest(out, rank, world_size, signature, body, merge, timeout=merge_timeout)


def _bounded(kind: type, lo: float, hi: float):
    """An argparse type: a `kind` number in [lo, hi] (finite), else one-line usage error naming the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not lo <= value <= hi:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range [{lo:g}, {hi:g}]")
        return value
    return parse


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (no usage block)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = _OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--out", required=True, help="output directory for NAME-%%06d.tar and manifest.json")
    p.add_argument("--root", help="input folder (folder, celeba)")
    p.add_argument("--image-size", type=_bounded(int, 8, 8192), default=None, help="side after centre crop (default 32 mnist, 256 else)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default 1 for mnist, 3 else")
    p.add_argument("--format", default="png", choices=("png", "jpg", "jpeg"))
    p.add_argument("--quality", type=_bounded(int, 1, 100), default=95, help="JPEG quality")
    p.add_argument("--shard-size", type=_bounded(int, 1, 10**7), default=1000, help="samples per tar")
    p.add_argument("--workers", type=_bounded(int, 1, 1024), default=1, help="processes encoding images on this rank")
    p.add_argument("--rank", type=int, default=None, help="writer rank (default: RANK or SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="writer ranks (default: WORLD_SIZE/SLURM_NTASKS)")
    p.add_argument("--label-attr", default=None, help="celeba: label by this attribute (e.g. Male)")
    p.add_argument("--attr-file", default=None, help="celeba: attribute file (default: found beside the images)")
    p.add_argument("--max-samples", type=_bounded(int, 1, 10**12), default=None, help="keep a seeded random subset of this size")
    p.add_argument("--split", default="all", choices=("all", "train", "val"))
    p.add_argument("--val-fraction", type=_bounded(float, 1e-6, 0.999999), default=0.05, help="held-out fraction for --split train/val")
    p.add_argument("--seed", type=int, default=0, help="seed of the item order across shards")
    p.add_argument("--name", default=None, help="shard name prefix (default: the split, or 'data')")
    p.add_argument("--merge-timeout", type=_bounded(float, 1.0, 30 * 24 * 3600.0), default=24 * 3600.0, help="rank 0: seconds to wait for ranks")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; prints a one-line summary, returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    env_rank, env_world = rank_world_from_env()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    try:
        manifest = make_shards(args.source, args.out, image_size=args.image_size, fmt=args.format,
                               quality=args.quality, shard_size=args.shard_size, workers=args.workers, rank=rank,
                               world_size=world, root=args.root, label_attr=args.label_attr,
                               attr_file=args.attr_file, channels=args.channels, max_samples=args.max_samples,
                               split=args.split, val_fraction=args.val_fraction, seed=args.seed, name=args.name,
                               merge_timeout=args.merge_timeout)
    except (SourceError, mf.ManifestError, TimeoutError, OSError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(f"wrote {len(manifest['shards'])} shards, {manifest['total']} samples, "
              f"{len(manifest['skipped'])} skipped -> {args.out}/{mf.MANIFEST_NAME}")
    else:
        print(f"rank {rank}: shards written; rank 0 writes the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
