"""Pictures a run leaves behind: image grids, a GIF of grids over training, the loss curve."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipeline.files import atomic_save_image, read_jsonl


def image_grid(images: np.ndarray, nrow: int, transpose: bool = False, pad: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [H', W', C] array, `nrow` images per row.

    With `transpose`, consecutive images go down a column instead (e.g. one class per column).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    cols = max(1, nrow)
    rows = math.ceil(n / cols)
    if transpose:
        rows, cols = cols, rows
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = (i % rows, i // rows) if transpose else (i // cols, i % cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def save_image_grid(images: np.ndarray, path: Path, nrow: int, transpose: bool = False) -> Path:
    """Save uint8 images [N, H, W, C] as one PNG grid (written to a temp name, then renamed)."""
    from PIL import Image

    grid = image_grid(images, nrow, transpose)
    return atomic_save_image(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid), path, "PNG")


def samples_gif(frames: Sequence[Path], out: Path, seconds_per_frame: float = 0.5) -> Path | None:
    """A GIF of the sample grids over training (None when there is no frame)."""
    from PIL import Image

    frames = list(frames)
    if not frames:
        return None
    images = [Image.open(f).convert("RGB") for f in frames]
    size = images[-1].size
    images = [im.resize(size) if im.size != size else im for im in images]
    return atomic_save_image(images[0], out, "GIF", save_all=True, append_images=images[1:],
                             duration=int(seconds_per_frame * 1000), loop=0)


def plot_loss_curve(log_path: Path, out: Path, key: str = "loss") -> Path | None:
    """Plot `key` against step from a JSONL training log into a PNG (None when the log has no such values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(log_path) if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r[key] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_save_image(fig, out, "PNG", dpi=100)
    plt.close(fig)
    return Path(out)
