"""Small synthetic shard sets for tests and benchmarks (no download, no source folder needed).

Image sample ``i`` encodes its global id in its pixels, so a test can recover which sample a batch holds, even
after a horizontal flip: row 0 is ``i % 256``, row 1 is ``i // 256`` (constant rows), and the left-most pixel of
row 2 is 255 (it moves to the right edge when flipped). Latent sample ``i`` has posterior mean ``+i`` (image twin)
and ``-i`` (flipped twin) everywhere and std ``latent_std``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .files import atomic_write_json
from .imaging import MODES, encode_image
from .manifest import MANIFEST_NAME, shard_name
from .tario import ShardWriter


def id_image(i: int, image_size: int = 8, channels: int = 1) -> np.ndarray:
    """uint8 [H, W, C] image carrying id ``i`` (see module docstring)."""
    arr = np.zeros((image_size, image_size, channels), dtype=np.uint8)
    arr[0] = i % 256
    arr[1] = i // 256
    arr[2, 0] = 255
    return arr


def ids_from_images(x: Any) -> np.ndarray:
    """Sample ids of a batch x in [-1, 1] ``[B, C, H, W]`` made of :func:`id_image` images."""
    u8 = np.rint((np.asarray(x, dtype=np.float64) + 1.0) * 127.5).astype(np.int64)
    return u8[:, 0, 0, 0] + 256 * u8[:, 0, 1, 0]


def flipped_from_images(x: Any) -> np.ndarray:
    """Whether each :func:`id_image` of the batch was flipped."""
    return np.asarray(x)[:, 0, 2, -1] > 0


def _manifest(kind: str, shards: List[Dict[str, Any]], image_size: int, channels: int,
              class_names: Sequence[str], **extra: Any) -> Dict[str, Any]:
    return {"kind": kind, "shards": shards, "total": sum(s["num_samples"] for s in shards),
            "image_size": image_size, "channels": channels, "class_names": list(class_names),
            "source": "synthetic", "command": "data_pipeline.synthetic", "skipped": [], **extra}


def write_image_shards(out: str | os.PathLike, counts: Sequence[int], *, image_size: int = 8, channels: int = 1,
                       num_classes: int = 10, fmt: str = "png", prefix: str = "train") -> Dict[str, Any]:
    """Write shards with ``counts[k]`` id images each (label = id % num_classes, or unconditional if 0)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for k, n in enumerate(counts):
        name = shard_name(prefix, k)
        with ShardWriter(out / name) as w:
            for _ in range(n):
                img = Image.fromarray(id_image(i, image_size, channels).squeeze(-1) if channels == 1
                                      else id_image(i, image_size, channels), MODES[channels])
                members = {fmt: encode_image(img, fmt)}
                if num_classes:
                    members["cls"] = str(i % num_classes).encode()
                w.write(f"{i:09d}", members)
                i += 1
        shards.append({"name": name, "num_samples": n, "bytes": w.num_bytes})
    m = _manifest("image", shards, image_size, channels, [str(c) for c in range(num_classes)], image_format=fmt)
    atomic_write_json(out / MANIFEST_NAME, m)
    return m


def write_latent_shards(out: str | os.PathLike, counts: Sequence[int], *, shape: Sequence[int] = (4, 2, 2),
                        stored: str = "mean_std", latent_std: float = 0.5, num_classes: int = 10,
                        shift: Optional[Sequence[float]] = None, scale: Optional[Sequence[float]] = None,
                        prefix: str = "train") -> Dict[str, Any]:
    """Write latent shards (float16 .npy per sample, layout of ``stored``) whose sample i has mean ±i."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = shape[0]
    shards, i = [], 0
    for k, n in enumerate(counts):
        name = shard_name(prefix, k)
        with ShardWriter(out / name) as w:
            for _ in range(n):
                mean = np.stack([np.full(shape, i), np.full(shape, -i)]).astype(np.float16)
                if stored == "mean_std":
                    arr = np.stack([mean, np.full_like(mean, latent_std)], axis=1)
                else:
                    arr = mean
                buf = io.BytesIO()
                np.save(buf, arr)
                w.write(f"{i:09d}", {"npy": buf.getvalue(), "cls": str(i % max(num_classes, 1)).encode()})
                i += 1
        shards.append({"name": name, "num_samples": n, "bytes": w.num_bytes})
    latent = {"shape": list(shape), "vae": "synthetic", "stored": stored, "dtype": "float16",
              "shift": list(shift) if shift is not None else [0.0] * c,
              "scale": list(scale) if scale is not None else [1.0] * c,
              "mean": [0.0] * c, "std": [1.0] * c}
    m = _manifest("latent", shards, 8 * shape[1], 3, [str(x) for x in range(num_classes)], latent=latent)
    atomic_write_json(out / MANIFEST_NAME, m)
    return m
