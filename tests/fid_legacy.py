"""eval/fid.py's rank-0 merge and scoring as they were before issue 13 item 7 (every part loaded whole, images
included): the oracle the streamed merge is compared with (tests/test_eval.py) and the "old" contender of
benchmarks/bench_fid_memory.py. Kept verbatim apart from names; not used by the library."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from data_pipeline.files import atomic_save_npz
from eval import inception
from eval.fid import PART_RE, EvalSettings
from eval.metrics import fid_statistics, frechet_distance, inception_score, kid, load_reference, precision_recall


def legacy_merge_parts(parts_dir: Path, num_samples: int) -> Dict[str, np.ndarray]:
    """Samples 0..N-1 from the part files, sorted by index; an error names the first missing index."""
    chunks: List[Dict[str, np.ndarray]] = []
    for p in sorted(parts_dir.iterdir()):
        if not PART_RE.match(p.name):
            continue
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        keep = d["index"] < num_samples
        if keep.any():
            chunks.append({k: v[keep] for k, v in d.items()})
    if not chunks:
        raise RuntimeError(f"{parts_dir}: no samples")
    index = np.concatenate([c["index"] for c in chunks])
    order = np.argsort(index, kind="stable")
    index = index[order]
    uniq, first = np.unique(index, return_index=True)
    if len(uniq) < num_samples:
        missing = sorted(set(range(num_samples)) - set(uniq.tolist()))
        raise RuntimeError(f"{parts_dir}: {len(missing)} of {num_samples} samples missing (first: {missing[0]})")
    keys = set.intersection(*(set(c) for c in chunks))
    out = {}
    for k in keys:
        out[k] = np.concatenate([c[k] for c in chunks])[order][first]
    return out


def legacy_score(merged: Dict[str, np.ndarray], settings: EvalSettings, extractor: Optional[torch.nn.Module],
                 num_classes: int) -> Dict[str, Any]:
    """The requested metrics of merged samples (features are computed here for parts that lack them)."""
    res: Dict[str, Any] = {}
    if settings.metrics:
        if "pool" not in merged:
            if extractor is None:
                raise RuntimeError("Inception features are needed but no extractor is loaded")
            imgs = torch.from_numpy(merged["images"]).permute(0, 3, 1, 2)
            feats = inception.extract_features(extractor, imgs, batch_size=settings.batch_size)
            merged["pool"], merged["logits"] = feats[inception.POOL].numpy(), feats[inception.LOGITS].numpy()
        pool = torch.from_numpy(merged["pool"])
        need_feats = any(m in settings.metrics for m in ("kid", "pr"))
        ref = None
        if any(m in settings.metrics for m in ("fid", "kid", "pr")):
            def featurize(arr: np.ndarray) -> np.ndarray:
                t = torch.from_numpy(arr).permute(0, 3, 1, 2)
                return inception.extract_features(extractor, t, settings.batch_size)[inception.POOL].numpy()

            ref = load_reference(settings.ref, need_features=need_feats, featurize=featurize)
            res["reference"] = ref.info
        if "fid" in settings.metrics:
            res["fid"] = frechet_distance(fid_statistics(pool), {"mu": ref.mu, "sigma": ref.sigma})
        if "is" in settings.metrics:
            res.update(inception_score(torch.from_numpy(merged["logits"]), seed=2020))
        if "kid" in settings.metrics:
            res.update(kid(pool, ref.pool))
        if "pr" in settings.metrics:
            res.update(precision_recall(pool, ref.pool))
    return res


def legacy_outputs(merged: Dict[str, np.ndarray], settings: EvalSettings, out: Path) -> None:
    """grid.png and samples.npz as the old ``evaluate`` wrote them."""
    from eval.visuals import save_image_grid

    if settings.grid > 0:
        n = min(settings.grid, len(merged["images"]))
        save_image_grid(merged["images"][:n], out / "grid.png", nrow=int(np.ceil(np.sqrt(n))))
    if settings.save_npz:
        atomic_save_npz(out / "samples.npz", arr_0=merged["images"], arr_1=merged["labels"])
