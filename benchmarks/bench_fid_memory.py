"""Peak host memory of eval/fid.py's rank-0 merge + scoring (issue 13 item 7), old in-memory merge vs streamed.

Fabricates part files as ``generate_parts`` lays them out (``--world`` ranks, ``--batch`` samples per part; random
uint8 images at ``--size`` px, random float32 Inception pool [N, 2048] and logits [N, 1008]) and a random reference
(mu, sigma), then runs what rank 0 does after the generation barrier, each in a fresh subprocess:

- ``new``: ``eval.fid.merge_parts`` + ``score`` (FID against the reference, IS) + ``grid.png`` (first 64 samples)
  [+ ``samples.npz`` with ``--save-npz`` runs];
- ``old``: the same with the pre-change functions kept in ``tests/fid_legacy.py`` (every part loaded whole).

The figure is the child's peak RSS (``ru_maxrss`` from ``os.wait4``). The old path needs about three times the
images in memory (29 GB at N=50,000 and 256 px), so it is measured at the smaller ``--old-n`` sizes (on their own part
set) and extrapolated linearly; it refuses sizes that would not fit in the available memory. At each ``--old-n`` the
new path runs on the same parts too, and the two must give the same metrics and the same samples.npz (sha256).
The fabricated data is deleted at the end unless ``--keep``.

    python benchmarks/bench_fid_memory.py --size 256 --n 50000 --old-n 4000,8000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL_DIM, LOGITS_DIM = 2048, 1008


def fabricate(parts: Path, n: int, size: int, world: int, batch: int, seed: int = 0) -> float:
    """Part files of ``n`` samples as ``generate_parts`` writes them on ``world`` ranks; returns GB written."""
    from data_pipeline.files import atomic_save_npz

    stamp = parts / "fabricated.json"
    want = {"n": n, "size": size, "world": world, "batch": batch, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return sum(p.stat().st_size for p in parts.glob("part_*.npz")) / 1e9
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    total = 0
    for r in range(world):
        todo = np.arange(r, n, world)
        for k in range(0, len(todo), batch):
            idx = todo[k:k + batch]
            b = len(idx)
            images = np.frombuffer(rng.bytes(b * size * size * 3), np.uint8).reshape(b, size, size, 3)
            p = atomic_save_npz(parts / f"part_{idx[0]:08d}_{idx[-1]:08d}.npz", index=idx.astype(np.int64),
                                labels=(idx % 1000).astype(np.int64), images=images,
                                pool=rng.random((b, POOL_DIM), dtype=np.float32),
                                logits=rng.normal(size=(b, LOGITS_DIM)).astype(np.float32))
            total += p.stat().st_size
    stamp.write_text(json.dumps(want))
    return total / 1e9


def write_reference(path: Path, seed: int = 1) -> None:
    """Random reference statistics: mu [2048], an SPD sigma [2048, 2048] (as ADM's file holds)."""
    from data_pipeline.files import atomic_save_npz

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(POOL_DIM, POOL_DIM)) / np.sqrt(POOL_DIM)
    atomic_save_npz(path, mu=rng.normal(size=POOL_DIM) * 0.1, sigma=a @ a.T * 0.1 + np.eye(POOL_DIM) * 0.01)


def child(path: str, parts: Path, n: int, ref: Path, out: Path, save_npz: bool) -> Dict:
    """Rank 0's work after the barrier (merge, score, grid[, samples.npz]) with the new or the old functions."""
    from eval import fid
    from eval.visuals import save_image_grid

    s = fid.EvalSettings(num_samples=n, metrics=("fid", "is"), ref=str(ref), save_npz=save_npz, grid=64)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if path == "new":
        merged = fid.merge_parts(parts, n)
        t1 = time.perf_counter()
        res = fid.score(merged, s, None, 1000)
        t2 = time.perf_counter()
        save_image_grid(merged.images(0, min(s.grid, n)), out / "grid.png", nrow=8)
        if save_npz:
            fid.save_samples_npz(merged, out / "samples.npz")
    else:
        from tests.fid_legacy import legacy_merge_parts, legacy_outputs, legacy_score

        merged = legacy_merge_parts(parts, n)
        t1 = time.perf_counter()
        res = legacy_score(merged, s, None, 1000)
        t2 = time.perf_counter()
        legacy_outputs(merged, s, out)
    t3 = time.perf_counter()
    return {"fid": res["fid"], "is_mean": res["is_mean"], "is_std": res["is_std"],
            "merge_s": t1 - t0, "score_s": t2 - t1, "outputs_s": t3 - t2}


def run_child(path: str, parts: Path, n: int, ref: Path, out: Path, save_npz: bool, launcher_malloc: bool) -> Dict:
    """One measurement in a fresh process: its result plus peak RSS (GB) and wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    if launcher_malloc:  # what the Makefile / launch/demo.py export for training
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")
    else:
        env.pop("MALLOC_MMAP_MAX_", None)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, __file__, "--child", path, "--parts", str(parts), "--n", str(n), "--ref", str(ref),
           "--out", str(out)] + (["--save-npz"] if save_npz else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{path} child failed with status {proc.returncode} (n={n}, parts={parts})")
    res = json.loads(stdout.strip().splitlines()[-1])
    res.update(path=path, n=n, save_npz=save_npz, launcher_malloc=launcher_malloc, wall_s=wall,
               peak_rss_gb=usage.ru_maxrss * 1024 / 1e9)  # Linux: ru_maxrss in KiB
    if save_npz:
        h = hashlib.sha256()
        with open(out / "samples.npz", "rb") as f:
            for block in iter(lambda: f.read(16 << 20), b""):
                h.update(block)
        res["samples_npz_sha256"] = h.hexdigest()[:16]
        res["samples_npz_gb"] = (out / "samples.npz").stat().st_size / 1e9
    with open(out / "grid.png", "rb") as f:
        res["grid_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    shutil.rmtree(out)
    print(json.dumps(res), flush=True)
    return res


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side (px)")
    ap.add_argument("--n", type=int, default=50_000, help="samples of the new-path runs")
    ap.add_argument("--old-n", default="4000,8000", help="comma list of N for old-vs-new runs ('' : none)")
    ap.add_argument("--save-npz-n", type=int, default=None,
                    help="N of the new-path run that also writes samples.npz (default --n; 0: no such run)")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/bench_fid_memory", help="where the fabricated parts go (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the fabricated parts")
    ap.add_argument("--force", action="store_true", help="run old-path sizes even if they may not fit in memory")
    ap.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    ap.add_argument("--parts", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--save-npz", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.parts), args.n, Path(args.ref), Path(args.out),
                               args.save_npz)), flush=True)
        return 0
    old_ns = [int(x) for x in args.old_n.split(",") if x.strip()]
    img_gb = args.size * args.size * 3 / 1e9
    for n in old_ns:
        need = 3 * n * img_gb + 1.5
        if need > 0.8 * mem_available_gb() and not args.force:
            raise SystemExit(f"--old-n {n}: the old path needs about {need:.1f} GB, {mem_available_gb():.1f} GB "
                             f"available (--force to run it anyway)")
    root = Path(args.dir)
    results: Dict = {"size": args.size, "world": args.world, "batch": args.batch, "runs": []}
    try:
        root.mkdir(parents=True, exist_ok=True)
        ref = root / "ref.npz"
        write_reference(ref)
        runs = results["runs"]
        if old_ns:
            small = root / f"parts_{args.size}_{max(old_ns)}"
            t0 = time.perf_counter()
            gb = fabricate(small, max(old_ns), args.size, args.world, args.batch)
            print(f"fabricated {max(old_ns)} samples at {args.size} px: {gb:.2f} GB in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for n in old_ns:
                pair = [run_child(p, small, n, ref, root / "out", True, False) for p in ("old", "new")]
                same = {k: pair[0][k] == pair[1][k] for k in ("fid", "is_mean", "is_std", "samples_npz_sha256",
                                                            "grid_sha256")}
                if not all(same.values()):
                    raise SystemExit(f"old and new paths disagree at n={n}: {same}")
                runs += pair
            shutil.rmtree(small)
        if args.n:
            big = root / f"parts_{args.size}_{args.n}"
            t0 = time.perf_counter()
            gb = fabricate(big, args.n, args.size, args.world, args.batch)
            print(f"fabricated {args.n} samples at {args.size} px: {gb:.2f} GB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            results["parts_gb"] = gb
            runs.append(run_child("new", big, args.n, ref, root / "out", False, False))
            runs.append(run_child("new", big, args.n, ref, root / "out", False, True))
            npz_n = args.n if args.save_npz_n is None else args.save_npz_n
            if npz_n:
                runs.append(run_child("new", big, npz_n, ref, root / "out", True, False))
        olds = [r for r in runs if r["path"] == "old"]
        if len(olds) >= 2:  # old peak = a + b N (the images are held about three times over)
            b, a = np.polyfit([r["n"] for r in olds], [r["peak_rss_gb"] for r in olds], 1)
            results["old_fit"] = {"base_gb": a, "gb_per_sample": b, "gb_per_sample_in_images": b / img_gb,
                                  "extrapolated_gb_at_n": {str(args.n): a + b * args.n}}
    finally:
        if not args.keep and root.exists():
            shutil.rmtree(root)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
