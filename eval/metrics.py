"""FID / IS / KID / precision-recall from Inception features, through torch-fidelity's own metric functions.

Every metric here is computed by the function torch-fidelity's ``calculate_metrics`` uses, on features extracted by
the same network, so the numbers agree with torch-fidelity's. Reference statistics are ``.npz`` files: ours (written by
``eval/reference.py``: ``mu``, ``sigma``, ``pool``, ``info``) or ADM's reference batches (``mu``, ``sigma`` and/or
``arr_0`` uint8 NHWC images), accepted as they are.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from data_pipeline.files import atomic_save_npz
from eval.npzio import NpyMember

log = logging.getLogger(__name__)

REFERENCE_CHUNK_BYTES = 256 << 20  # reference images featurized per call: about this many bytes

__all__ = ["Reference", "fid_statistics", "frechet_distance", "inception_score", "kid", "precision_recall",
           "load_reference", "save_reference"]


@dataclass
class Reference:
    """Reference statistics (float64 ``mu`` [D], ``sigma`` [D, D]); ``pool``: features [N, D] when available."""

    mu: np.ndarray
    sigma: np.ndarray
    pool: Optional[np.ndarray] = None
    info: Dict[str, Any] = field(default_factory=dict)


def fid_statistics(features: Union[torch.Tensor, np.ndarray]) -> Dict[str, np.ndarray]:
    """(mu, sigma) of features [N, D] as torch-fidelity computes them, returned as float64."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    f = torch.as_tensor(features).float().cpu()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D] for statistics, got {tuple(f.shape)}")
    st = fid_features_to_statistics(f)
    return {"mu": np.asarray(st["mu"], dtype=np.float64), "sigma": np.asarray(st["sigma"], dtype=np.float64)}


def frechet_distance(stats_a: Dict[str, np.ndarray], stats_b: Dict[str, np.ndarray]) -> float:
    """Fréchet distance between two Gaussians {mu, sigma} via torch-fidelity's ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(stats_a[k], dtype=np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(stats_b[k], dtype=np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise ValueError(f"statistics do not match: mu {a['mu'].shape} vs {b['mu'].shape}, "
                         f"sigma {a['sigma'].shape} vs {b['sigma'].shape}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> Dict[str, float]:
    """Inception Score (mean, std over ``splits``) from 'logits_unbiased' features, as torch-fidelity computes it."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = max(1, min(splits, logits.shape[0]))
    out = isc_features_to_metric(torch.as_tensor(logits).float().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {"is_mean": out["inception_score_mean"], "is_std": out["inception_score_std"], "is_splits": splits}


def kid(features_gen: Union[torch.Tensor, np.ndarray], features_ref: Union[torch.Tensor, np.ndarray],
        subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> Dict[str, float]:
    """Kernel Inception Distance (torch-fidelity's polynomial-kernel MMD over random subsets)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    f1, f2 = torch.as_tensor(features_gen).float().cpu(), torch.as_tensor(features_ref).float().cpu()
    size = min(subset_size, f1.shape[0], f2.shape[0])
    out = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid_mean": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"],
            "kid_subset_size": size, "kid_subsets": subsets}


def precision_recall(features_gen: Union[torch.Tensor, np.ndarray], features_ref: Union[torch.Tensor, np.ndarray],
                     neighborhood: int = 3, batch_size: int = 10000) -> Dict[str, float]:
    """Improved precision/recall (k-NN balls, torch-fidelity's implementation) on the given features.

    We pass Inception pool features (as ADM's evaluator does) instead of torch-fidelity's default VGG16, whose
    weights would be a second download.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    f1, f2 = torch.as_tensor(features_gen).float().cpu(), torch.as_tensor(features_ref).float().cpu()
    out = prc_features_to_metric(f1, f2, prc_neighborhood=neighborhood, prc_batch_size=batch_size,
                                 save_cpu_ram=True, verbose=False)
    return {"precision": out["precision"], "recall": out["recall"], "pr_f_score": out["f_score"],
            "pr_neighborhood": neighborhood}


def save_reference(path: Union[str, os.PathLike], pool: Union[torch.Tensor, np.ndarray], info: Dict[str, Any],
                   keep_features: bool = True) -> Reference:
    """Write reference statistics (and the features, for KID/PR) of pool features [N, D] to ``path`` (.npz)."""
    feats = torch.as_tensor(pool).float().cpu()
    st = fid_statistics(feats)
    info = dict(info, num_images=int(feats.shape[0]))
    arrays = {"mu": st["mu"], "sigma": st["sigma"], "info": np.array(json.dumps(info))}
    if keep_features:
        arrays["pool"] = feats.numpy()
    atomic_save_npz(path, **arrays)
    return Reference(st["mu"], st["sigma"], feats.numpy() if keep_features else None, info)


def load_reference(path: Union[str, os.PathLike], need_features: bool = False,
                   featurize: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                   batch_size: int = 64) -> Reference:
    """Read a reference ``.npz`` (ours or ADM's). ``featurize(arr_0 uint8 NHWC) -> pool features`` is used when
    ``mu``/``sigma`` (or, with ``need_features``, the features) are missing but images are there.

    Members are read only when needed (an ADM file's images are not read for FID). Images are passed to
    ``featurize`` in chunks of a multiple of ``batch_size`` images (about ``REFERENCE_CHUNK_BYTES``), so a
    ``featurize`` that batches by ``batch_size`` sees the batches one call on all images would.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found (make them with eval/reference.py)")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err
    with data:
        info: Dict[str, Any] = {"path": str(path.resolve())}
        if "info" in keys:
            info.update(json.loads(str(data["info"])))
        pool = data["pool"].astype(np.float32, copy=False) if "pool" in keys else None
        if pool is None and "arr_0" in keys and (need_features or not {"mu", "sigma"} <= keys):
            if featurize is None:
                raise ValueError(f"{path}: has images (arr_0) but no statistics, and no Inception network to "
                                 f"featurize them")
            with NpyMember(path, "arr_0") as imgs:
                if imgs.dtype != np.uint8 or len(imgs.shape) != 4 or imgs.shape[-1] not in (1, 3):
                    raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {imgs.dtype} {imgs.shape}")
                chunk = max(1, REFERENCE_CHUNK_BYTES // max(1, imgs.row_bytes) // batch_size) * batch_size
                parts = [np.asarray(featurize(imgs.read(s, s + chunk)), dtype=np.float32)
                         for s in (range(0, len(imgs), chunk) or [0])]
            pool = np.concatenate(parts) if len(parts) != 1 else parts[0]
            del parts
            info["features_from"] = "arr_0"
        if {"mu", "sigma"} <= keys:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        elif pool is not None:
            st = fid_statistics(pool)
            mu, sigma = st["mu"], st["sigma"]
        else:
            raise ValueError(f"{path}: no reference statistics: expected keys mu and sigma (or pool / arr_0), "
                             f"found {sorted(keys)}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a [D] / [D, D] pair")
    if need_features and pool is None:
        raise ValueError(f"{path}: KID / precision-recall need reference features ('pool' or 'arr_0' images), "
                         f"the file has only {sorted(keys)}")
    return Reference(mu, sigma, pool, info)
