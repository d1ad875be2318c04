"""torch-fidelity's FID-compatible Inception-v3 ('inception-v3-compat'): weights lookup and feature extraction.

The network, its resize (TF1-compatible bilinear to 299) and its input scaling are torch-fidelity's own, so our
numbers are the numbers torch-fidelity reports. Weights are never downloaded here: they come from an explicit path or
from the torch hub cache (where torch-fidelity itself would put them); when absent we fail with one line saying where
to put the file and where to get it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Sequence, Union

import torch

from data_pipeline.files import atomic_save

log = logging.getLogger(__name__)

EXTRACTOR_NAME = "inception-v3-compat"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILENAME = WEIGHTS_URL.rsplit("/", 1)[1]
POOL = "2048"               # FID / KID / precision-recall features (pool3)
LOGITS = "logits_unbiased"  # Inception Score features (as torch-fidelity's ISC)
FEATURES = (POOL, LOGITS)

__all__ = ["InceptionWeightsMissing", "default_weights_path", "resolve_weights", "load_extractor",
           "extract_features", "weights_fingerprint", "write_random_weights", "EXTRACTOR_NAME", "POOL", "LOGITS"]


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is not where we looked (we never download it at run time)."""


def default_weights_path() -> Path:
    """Where torch-fidelity looks for its Inception weights: ``<torch hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def resolve_weights(path: Union[str, os.PathLike, None] = None) -> Path:
    """The weights file to use: ``path`` if given, else the torch hub cache; a clear error when it is absent."""
    p = Path(path) if path is not None else default_weights_path()
    if not p.is_file():
        where = f"--inception-weights {p} does not exist" if path is not None else f"{p} does not exist"
        raise InceptionWeightsMissing(
            f"Inception weights not found ({where}): download {WEIGHTS_URL} and put it at {default_weights_path()} "
            f"(or pass --inception-weights PATH); no substitute network is used")
    return p


def weights_fingerprint(path: Union[str, os.PathLike]) -> str:
    """sha256 prefix of the weights file (recorded beside every number computed with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_extractor(weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                   features: Sequence[str] = FEATURES) -> torch.nn.Module:
    """torch-fidelity's 'inception-v3-compat' extractor on ``device`` in eval mode, returning ``features``.

    The file is first opened with ``torch.load(weights_only=True)`` so a file that would unpickle arbitrary objects
    is refused before torch-fidelity (which loads it with ``weights_only=False``) ever touches it.
    """
    from torch_fidelity.utils import create_feature_extractor

    path = resolve_weights(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain weights file
        raise ValueError(f"{path}: not a loadable Inception state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path}: not an Inception-v3 state dict for torch-fidelity (no 'fc.weight')")
    del state
    ext = create_feature_extractor(EXTRACTOR_NAME, list(features), cuda=False,
                                   feature_extractor_weights_path=str(path), verbose=False)
    return ext.to(torch.device(device)).eval()


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, images: Union[torch.Tensor, Iterable[torch.Tensor]],
                     batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """Features (float32, CPU) of uint8 images ``[N, 3, H, W]`` (or an iterable of such batches), per feature name.

    Grayscale images ``[N, 1, H, W]`` are repeated to 3 channels, as PIL's ``convert("RGB")`` does for image files.
    """
    device = next(extractor.parameters()).device
    names = list(extractor.get_requested_features_list())
    out: Dict[str, list] = {n: [] for n in names}
    batches = images.split(batch_size) if torch.is_tensor(images) else images
    for batch in batches:
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        feats = extractor(batch.to(device, non_blocking=True).contiguous())
        for n, f in zip(names, feats):
            out[n].append(f.float().cpu())
    return {n: (torch.cat(v) if v else torch.empty(0)) for n, v in out.items()}


def write_random_weights(path: Union[str, os.PathLike], seed: int = 0) -> Path:
    """Write an Inception state dict with random weights (same keys/shapes as the real file), for tests/benchmarks.

    The batch-norm statistics are randomised too, so features are not degenerate. Numbers computed with it are
    meaningless as FIDs; the compute is the same as with the real weights.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the default random init
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.name + ".empty.tmp")
    torch.save({}, empty)
    torch.manual_seed(seed)
    try:
        net = _Unloaded("x", [POOL], feature_extractor_weights_path=str(empty))
    finally:
        empty.unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        v = v.clone()
        if k.endswith("conv.weight"):  # He init keeps activations O(1) through the ~90 layers
            v = torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("running_mean"):
            v = torch.randn(v.shape, generator=gen) * 0.1
        elif k.endswith("running_var"):
            v = torch.rand(v.shape, generator=gen) + 0.5
        state[k] = v
    return atomic_save(path, lambda tmp: torch.save(state, tmp))
