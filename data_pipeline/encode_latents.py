"""Encode image shards into latent shards with a VAE, on every rank, each rank writing its own shards.

    python data_pipeline/encode_latents.py --vae runs/vae/vae.safetensors --shards data/mnist --out data/mnist_lat
    torchrun --nproc_per_node 8 -m data_pipeline.encode_latents --vae /models/sd-vae-ft-ema --shards ... \
        --out ... --scale-factor 0.18215

Input shard i is encoded by rank ``i % world_size`` into an output shard of the same name (disjoint by
construction). Every sample stores the posterior of the image AND of its horizontal flip, so the loader can keep
flipping as an augmentation. Stored (``latent.stored``):

* ``mean_std`` (default): ``key.npy`` float16 ``[2 (image, hflip), 2 (posterior mean, std), C, H, W]``. The
  loader draws a fresh ``z = mean + std * eps`` every time it reads the sample, which is what the DiT recipe does
  when it encodes on the fly; storing one sample (as fast-DiT does) freezes that noise for the whole run.
* ``sample``: ``key.npy`` float16 ``[2 (image, hflip), C, H, W]``, one posterior sample (half the bytes).

With ``--keep-images`` each sample also keeps its source image, the input member's bytes as they are (e.g.
``key.png``), for what needs the pixels of a latent: REPA's image encoder (the loader's ``with_images``, which
flips the image exactly when it hands out the flipped twin). The manifest then has ``images: {"format": EXT}``.

The manifest's ``latent`` block records the VAE, the latent shape, the per-channel mean/std of z over the dataset
(both twins; for mean_std the variance includes the posterior's) and the normalisation the trainer must use:
``shift = mean, scale = 1/std`` by default, or ``shift = 0, scale = --scale-factor`` (e.g. the SD-VAE's 0.18215).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from data_pipeline import manifest as mf
from data_pipeline.devices import DeviceLayoutError, configure_tf32, select_device
from data_pipeline.dist_env import local_world_size, rank_world_from_env
from data_pipeline.imaging import IMAGE_EXTS, decode_to_array
from data_pipeline.locations import remote_output_problem
from data_pipeline.order import mix64
from data_pipeline.tario import ShardReader, ShardWriter
from data_pipeline.vae_io import load_vae

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
LAYOUTS = {"mean_std": "[2 (image, hflip), 2 (mean, std), C, H, W]", "sample": "[2 (image, hflip), C, H, W]"}


def _npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return out.getvalue()


class _Stats:
    """Per-channel float64 sums of z and z^2 over all stored latents."""

    def __init__(self) -> None:
        self.s1: Optional[np.ndarray] = None
        self.s2: Optional[np.ndarray] = None
        self.n = 0

    def add(self, first: np.ndarray, second: np.ndarray) -> None:
        """Add a batch [N, C, H, W] of first moments (z or mean) and second moments (z^2 or mean^2 + std^2)."""
        s1 = first.astype(np.float64).sum(axis=(0, 2, 3))
        s2 = second.astype(np.float64).sum(axis=(0, 2, 3))
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += first.shape[0] * first.shape[2] * first.shape[3]


def _encode_batch(encode_fn: EncodeFn, images: List[np.ndarray], stored: str, noise_seed: int,
                  stats: _Stats) -> List[np.ndarray]:
    """Per-sample float16 arrays (layout of ``stored``) for a list of uint8 [H, W, C] images."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    x = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.no_grad():
        mean, std = encode_fn(x)
    mean = mean.detach().float().cpu()
    std = std.detach().float().cpu()
    n = len(images)
    if stored == "mean_std":
        arr = torch.stack([mean, std], dim=1).numpy().astype(np.float16)  # [2n, 2, C, h, w]
        m, s = arr[:, 0].astype(np.float64), arr[:, 1].astype(np.float64)
        stats.add(m, m * m + s * s)
    else:
        g = torch.Generator().manual_seed(noise_seed)
        z = (mean + std * torch.randn(mean.shape, generator=g)).numpy().astype(np.float16)  # [2n, C, h, w]
        stats.add(z, z.astype(np.float64) ** 2)
        arr = z
    return [np.stack([arr[i], arr[n + i]]) for i in range(n)]


def _encode_shard(encode_fn: EncodeFn, reader: ShardReader, shard: int, in_manifest: Dict[str, Any],
                  out_path: Path, *, batch_size: int, stored: str, seed: int, stats: _Stats,
                  keep_images: bool = False) -> Dict[str, Any]:
    """Encode one input shard into ``out_path`` (with ``keep_images``, each sample's source image member beside its
    latent); its manifest entry, skipped inputs and latent shape."""
    entry = in_manifest["shards"][shard]
    index = reader.index(shard)
    skipped = []
    if len(index.samples) < entry["num_samples"]:
        reason = (f"{entry['num_samples'] - len(index.samples)} of its {entry['num_samples']} samples missing "
                  f"({index.error or 'truncated or damaged shard'})")
        log.warning("%s: %s; encoding the %d readable ones", reader.paths[shard], reason, len(index.samples))
        skipped.append({"input": entry["name"], "reason": reason})
    size, channels = int(in_manifest["image_size"]), int(in_manifest["channels"])
    first = in_manifest.get("image_format", "png")
    exts = (first,) + tuple(e for e in IMAGE_EXTS if e != first)
    shape = None
    with ShardWriter(out_path) as w:
        pending: List[Tuple[str, np.ndarray, Optional[bytes], Dict[str, bytes]]] = []

        def flush(batch_no: int) -> None:
            nonlocal shape
            if not pending:
                return
            lats = _encode_batch(encode_fn, [p[1] for p in pending], stored, mix64(seed, shard, batch_no) >> 1,
                                 stats)
            shape = list(lats[0].shape[-3:])
            for (key, _, cls, image), lat in zip(pending, lats):
                members = {"npy": _npy_bytes(lat), **image}
                if cls is not None:
                    members["cls"] = cls
                w.write(key, members)
            pending.clear()

        batch_no = 0
        for key, members in zip(index.keys, index.samples):
            try:
                ext = next((e for e in exts if e in members), None)
                if ext is None:
                    raise ValueError("no image member")
                data = reader.read(shard, *members[ext])
                img = decode_to_array(data, channels, size)
                cls_loc = members.get("cls")
                cls = reader.read(shard, *cls_loc) if cls_loc else None
                if cls is not None:
                    int(cls)
            except Exception as err:  # corrupt input sample: skip and list it
                skipped.append({"input": f"{entry['name']}:{key}", "reason": str(err)})
                continue
            pending.append((key, img, cls, {ext: data} if keep_images else {}))
            if len(pending) == batch_size:
                flush(batch_no)
                batch_no += 1
        flush(batch_no)
        n = w.num_samples
    if n == 0:
        out_path.unlink(missing_ok=True)
    return {"name": out_path.name, "num_samples": n, "bytes": w.num_bytes, "skipped": skipped, "shape": shape}


def _image_shards(in_spec: str | os.PathLike) -> tuple[Dict[str, Any], List[str]]:
    """(manifest, shard paths) of the image shards to encode; every listed shard must be on disk (checked on every
    rank alike, before any rank writes a shard)."""
    in_manifest, paths = mf.load_spec(in_spec)
    if in_manifest["kind"] != "image":
        raise mf.ManifestError(f"{in_spec}: encode_latents needs image shards, got kind={in_manifest['kind']!r}")
    missing = mf.missing_files(paths)
    if missing:
        names = [os.path.basename(paths[i]) for i in missing]
        raise mf.ShardError(f"{in_spec}: {len(missing)} of the {len(paths)} image shards listed in its manifest are "
                            f"missing on disk: {mf.name_list(names)}", names)
    return in_manifest, paths


def _merge_manifest(parts: Sequence[Dict[str, Any]], in_spec: str | os.PathLike, in_manifest: Dict[str, Any],
                    image_shards: str, vae_name: str, stored: str, scale_factor: Optional[float],
                    keep_images: bool = False) -> Dict[str, Any]:
    """Rank 0: the latent manifest from every rank's part (shards, the latents' channel statistics)."""
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["name"])
    with_data = [p for p in parts if p["n"]]
    if not shards or not with_data:
        raise ValueError(f"{in_spec}: no readable image to encode")
    shape_set = {tuple(p["shape"]) for p in with_data}
    if len(shape_set) != 1:
        raise ValueError(f"ranks produced latents of different shapes {sorted(shape_set)}")
    n = sum(p["n"] for p in with_data)
    mean = np.sum([p["s1"] for p in with_data], axis=0) / n
    std = np.sqrt(np.maximum(np.sum([p["s2"] for p in with_data], axis=0) / n - mean * mean, 1e-12))
    if scale_factor is None:
        shift, scale = mean.tolist(), (1.0 / std).tolist()
    else:
        shift, scale = [0.0] * len(mean), [float(scale_factor)] * len(mean)
    images = {"images": {"format": in_manifest.get("image_format", "png")}} if keep_images else {}
    return {"kind": "latent", "shards": shards, "total": sum(s["num_samples"] for s in shards), **images,
            "image_size": in_manifest["image_size"], "channels": in_manifest["channels"],
            "class_names": in_manifest["class_names"], "source": in_manifest.get("source"),
            "split": in_manifest.get("split"), "image_shards": image_shards, "command": parts[0]["command"],
            "skipped": list(in_manifest.get("skipped", [])) + [s for p in parts for s in p["skipped"]],
            "latent": {"shape": list(shape_set.pop()), "vae": vae_name, "shift": shift, "scale": scale,
                       "mean": mean.tolist(), "std": std.tolist(), "stored": stored, "dtype": "float16",
                       "layout": LAYOUTS[stored], "scale_factor": scale_factor}}


def encode_shards(encode_fn: EncodeFn, in_spec: str | os.PathLike, out_dir: str | os.PathLike, *, rank: int = 0,
                  world_size: int = 1, batch_size: int = 64, vae_name: str = "", stored: str = "mean_std",
                  scale_factor: Optional[float] = None, seed: int = 0, command: Optional[str] = None,
                  merge_timeout: float = 24 * 3600.0, keep_images: bool = False) -> Optional[Dict[str, Any]]:
    """Encode this rank's share of the image shards ``in_spec`` into latent shards in ``out_dir``.

    ``encode_fn(x)`` takes images in [-1, 1], float32 ``[B, C, H, W]`` and returns the posterior ``(mean, std)``.
    ``keep_images``: store each sample's source image member beside its latent (manifest ``images``).
    Rank 0 waits for the other ranks, writes the merged manifest and returns it; other ranks return None.
    """
    if stored not in LAYOUTS:
        raise ValueError(f"stored must be one of {sorted(LAYOUTS)}, got {stored!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    problem = remote_output_problem(out_dir)
    if problem:
        raise ValueError(problem)
    in_manifest, paths = _image_shards(in_spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mf.clear_stale(out_dir, rank, world_size)
    reader = ShardReader(paths)
    stats = _Stats()
    results = []
    for shard in range(rank, len(paths), world_size):
        res = _encode_shard(encode_fn, reader, shard, in_manifest, out_dir / in_manifest["shards"][shard]["name"],
                            batch_size=batch_size, stored=stored, seed=seed, stats=stats, keep_images=keep_images)
        log.info("rank %d: %s: %d latents", rank, res["name"], res["num_samples"])
        results.append(res)
    reader.close()
    shapes = {tuple(r["shape"]) for r in results if r["shape"]}
    if len(shapes) > 1:
        raise ValueError(f"encode_fn returned latents of different shapes {sorted(shapes)}")
    signature = {"in": str(Path(paths[0]).parent.resolve()) if paths else str(in_spec), "stored": stored,
                 "vae": vae_name, "seed": seed, "scale_factor": scale_factor, "shards": len(paths),
                 "keep_images": keep_images}
    body = {"shards": [{"name": r["name"], "num_samples": r["num_samples"], "bytes": r["bytes"]}
                       for r in results if r["num_samples"]],
            "skipped": [s for r in results for s in r["skipped"]],
            "shape": list(shapes.pop()) if shapes else None,
            "s1": stats.s1.tolist() if stats.s1 is not None else None,
            "s2": stats.s2.tolist() if stats.s2 is not None else None, "n": stats.n,
            "command": command if command is not None else mf.command_line()}
    return mf.finish_manifest(out_dir, rank, world_size, signature, body,
                              lambda parts: _merge_manifest(parts, in_spec, in_manifest, signature["in"], vae_name,
                                                            stored, scale_factor, keep_images), timeout=merge_timeout)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="VAE checkpoint (ours) or a local diffusers AutoencoderKL directory")
    p.add_argument("--shards", required=True, help="image shard spec (directory with manifest.json)")
    p.add_argument("--out", required=True, help="output directory for the latent shards")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stored", default="mean_std", choices=sorted(LAYOUTS))
    p.add_argument("--scale-factor", type=float, default=None,
                   help="use shift 0 and this scale (SD-VAE: 0.18215) instead of the measured mean/std")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the stored posterior samples (--stored sample)")
    p.add_argument("--merge-timeout", type=float, default=24 * 3600.0)
    p.add_argument("--keep-images", action="store_true", help="store each sample's source image beside its latent "
                                                              "(REPA's encoder needs the pixels: repa.enabled)")
    p.add_argument("--no-tf32", action="store_true", help="GPUs: exact fp32 in the VAE (default: TF32 matmuls and "
                                                         "convolutions on Ampere and newer)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: rank/world from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    rank, world = rank_world_from_env()
    device = args.device

    try:
        if device is None:
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
            device = str(select_device(local_rank, local_world_size() if world > 1 else 1))
        configure_tf32(torch.device(device), not args.no_tf32)

        vae = load_vae(args.vae, device=device)
        manifest = encode_shards(vae.encode, args.shards, args.out, rank=rank, world_size=world,
                                 batch_size=args.batch_size, vae_name=getattr(vae, "name", str(args.vae)),
                                 stored=args.stored, scale_factor=args.scale_factor, seed=args.seed,
                                 merge_timeout=args.merge_timeout, keep_images=args.keep_images)
    except (ValueError, TimeoutError, OSError, DeviceLayoutError) as err:
        print(f"encode_latents: error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:
        lat = manifest["latent"]
        print(f"wrote {len(manifest['shards'])} latent shards, {manifest['total']} samples, shape {lat['shape']}, "
              f"{len(manifest['skipped'])} skipped -> {args.out}/{mf.MANIFEST_NAME}")
    else:
        print(f"rank {rank}: latent shards written; rank 0 writes the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
