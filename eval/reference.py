"""Reference Inception statistics of real images: ``python eval/reference.py --shards DIR --out ref.npz``.

Images go through exactly the preprocessing used for generated samples: decoded to uint8 RGB (grayscale repeated,
as PIL's ``convert("RGB")``), then torch-fidelity's Inception with its own resize. The output ``.npz`` holds ``mu``,
``sigma`` (float64), the pool features ``pool`` (for KID / precision-recall; drop with ``--no-features``) and an
``info`` JSON string (source, count, extractor, weights fingerprint). ADM's reference batches need no conversion:
pass them to ``eval/fid.py --ref`` as they are.
"""
from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.checks import OneLineParser, Range, device_arg, number_arg, output_dir_problem
from data_pipeline.imaging import IMAGE_EXTS
from data_pipeline.manifest import load_spec
from data_pipeline.tario import index_tar
from eval import inception
from eval.metrics import Reference, save_reference
from eval.npzio import iter_member_rows

log = logging.getLogger(__name__)

FOLDER_EXTS = (".png", ".jpg", ".jpeg")  # torch-fidelity's default samples_find_ext
MAX_IMAGES = Range(2, 2**63 - 1)  # statistics need 2 images; a limit above the source's size takes them all

__all__ = ["iter_shard_images", "iter_folder_images", "iter_npz_images", "batched_chw", "compute_reference", "main"]


def _to_rgb_array(data: Union[bytes, str, os.PathLike]) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    return np.array(img.convert("RGB"))


def iter_shard_images(spec: Union[str, os.PathLike]) -> Iterator[Tuple[np.ndarray, int]]:
    """(uint8 RGB [H, W, 3], label) of every image sample of an image shard set, in manifest order.

    The manifest is read (and a wrong kind refused) when this is called, not when the first image is drawn."""
    manifest, paths = load_spec(spec)
    if manifest["kind"] != "image":
        raise ValueError(f"{spec}: reference statistics need image shards, the manifest says kind={manifest['kind']!r}")
    return _shard_images(paths)


def _shard_images(paths: list) -> Iterator[Tuple[np.ndarray, int]]:
    for path in paths:
        idx = index_tar(path)
        if idx.damaged:
            raise ValueError(f"{path}: damaged shard")
        with open(path, "rb") as f:
            for key, members in zip(idx.keys, idx.samples):
                ext = next((e for e in members if e.lower() in IMAGE_EXTS), None)
                if ext is None:
                    raise ValueError(f"{path}: sample {key} has no image member ({sorted(members)})")
                off, size = members[ext]
                f.seek(off)
                img = _to_rgb_array(f.read(size))
                label = 0
                if "cls" in members:
                    off, size = members["cls"]
                    f.seek(off)
                    label = int(f.read(size).decode().strip())
                yield img, label


def iter_folder_images(root: Union[str, os.PathLike]) -> Iterator[Tuple[np.ndarray, int]]:
    """(uint8 RGB [H, W, 3], 0) of every .png/.jpg/.jpeg under ``root`` (sorted paths, recursive)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_EXTS and p.is_file())
    if not files:
        raise ValueError(f"{root}: no {'/'.join(FOLDER_EXTS)} images found")
    for p in files:
        yield _to_rgb_array(p), 0


def iter_npz_images(path: Union[str, os.PathLike], chunk: int = 256) -> Iterator[Tuple[np.ndarray, int]]:
    """(uint8 [H, W, C], label) of an ADM-format sample file (``arr_0`` images, optional ``arr_1`` labels).

    Images are read ``chunk`` at a time, never the whole array (50,000 images at 256 px are 10 GB). The file is
    opened (and a file without ``arr_0`` refused) when this is called.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:  # not a zip: np.load then guesses a pickle, which it refuses (rightly)
        raise ValueError(f"{path}: not a readable .npz file (a zip of .npy arrays with arr_0; "
                         f"{type(err).__name__})") from None
    if not hasattr(data, "files"):  # a bare .npy array
        raise ValueError(f"{path}: a single .npy array, not an .npz with arr_0 (ADM sample batch)")
    with data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: no arr_0 (ADM sample batch) in the file; keys {data.files}")
        labels = data["arr_1"] if "arr_1" in data.files else None
    return _npz_images(path, labels, chunk)


def _npz_images(path: Union[str, os.PathLike], labels: Optional[np.ndarray],
                chunk: int) -> Iterator[Tuple[np.ndarray, int]]:

    n = 0
    for imgs in iter_member_rows(path, "arr_0", chunk):
        for img in imgs:
            if labels is not None and n >= len(labels):  # as zip(images, labels): as many as both have
                return
            yield img, int(labels[n]) if labels is not None else 0
            n += 1


def batched_chw(items: Iterator[Tuple[np.ndarray, int]], batch_size: int,
                limit: Optional[int] = None) -> Iterator[torch.Tensor]:
    """uint8 tensors [B, C, H, W] from (HWC array, label) items, at most ``limit`` images."""
    buf = []
    for n, (img, _) in enumerate(items):
        if limit is not None and n >= limit:
            break
        if img.ndim == 2:
            img = img[:, :, None]
        buf.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def compute_reference(items: Iterator[Tuple[np.ndarray, int]], out: Union[str, os.PathLike], *,
                      weights: Optional[str] = None, device: Union[str, torch.device] = "cpu", batch_size: int = 64,
                      limit: Optional[int] = None, keep_features: bool = True, source: str = "") -> Reference:
    """Inception statistics of ``items`` written to ``out`` (.npz); returns them."""
    wpath = inception.resolve_weights(weights)
    ext = inception.load_extractor(wpath, device, features=[inception.POOL])
    feats = inception.extract_features(ext, batched_chw(items, batch_size, limit))[inception.POOL]
    if feats.shape[0] < 2:
        raise ValueError(f"{source}: need at least 2 images for statistics, got {feats.shape[0]}")
    info = {"source": source, "extractor": inception.EXTRACTOR_NAME, "feature": inception.POOL,
            "weights_sha256": inception.weights_fingerprint(wpath)}
    return save_reference(out, feats, info, keep_features=keep_features)


def main(argv: Optional[list] = None) -> int:
    """CLI entry point."""
    ap = OneLineParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="image shard directory (with manifest.json) or brace pattern")
    src.add_argument("--folder", help="folder of .png/.jpg images (searched recursively)")
    src.add_argument("--npz", help="ADM-format .npz with arr_0 uint8 images")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (default: hub cache)")
    ap.add_argument("--batch-size", type=number_arg(int, Range(1, 65536)), default=64)
    ap.add_argument("--max-images", type=number_arg(int, MAX_IMAGES), default=None,
                    help="use only the first N images (at least 2)")
    ap.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-features", action="store_true", help="store only mu/sigma (no KID/PR against this file)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The arguments and the source are checked before the Inception weights are looked for, so that each message
    # names the real problem.
    problem = None
    out = Path(args.out)
    if out.is_dir():
        problem = f"--out {out}: is a directory; give the .npz path"
    elif output_dir_problem(out.parent):
        problem = f"--out {out}: {output_dir_problem(out.parent)}"
    elif args.folder and not Path(args.folder).is_dir():
        problem = f"--folder {args.folder}: not a directory"
    elif args.npz and not Path(args.npz).is_file():
        problem = f"--npz {args.npz}: no such file"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.shards:
            items, source = iter_shard_images(args.shards), f"shards:{Path(args.shards).resolve()}"
        elif args.folder:
            items, source = iter_folder_images(args.folder), f"folder:{Path(args.folder).resolve()}"
        else:
            items, source = iter_npz_images(args.npz), f"npz:{Path(args.npz).resolve()}"
        ref = compute_reference(items, args.out, weights=args.inception_weights, device=device,
                                batch_size=args.batch_size, limit=args.max_images,
                                keep_features=not args.no_features, source=source)
    except (OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {ref.info['num_images']} images from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
