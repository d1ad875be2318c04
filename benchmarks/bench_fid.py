"""Benchmarks for eval/ (issue 6).

1. ``--part features``: Inception feature extraction + IS of N uint8 images through our path
   (``eval.inception.extract_features``, what eval/fid.py runs per batch) vs ``torch_fidelity.calculate_metrics`` on
   the same images (a Dataset of the same tensors, same batch size, no workers). Target: ours >= 0.9x.
2. ``--part cfg``: time per sampling step of classifier-free guidance in bf16, DiT-S/2 at 256 px (latent 4x32x32),
   16 images, 1000 classes:
   - ``official``: the official DiT network (``benchmarks/official_dit.py``: the official module structure and eager
     ops, checked to give our model's outputs) in the official sampling loop: the sampler state is the doubled
     batch [z, z], every step runs ``forward_with_cfg`` on all 2B rows and the diffusion update on all 2B rows, fp32
     weights under ``torch.autocast(bfloat16)`` (the issue's "official code in bf16").
   - ``official_loop_our_model``: the same loop around our DiT (isolates the network from the loop).
   - ``ours``: ``eval.inference.Generator.sample_batch`` with ``dtype=bf16``: CFG wrapper (2B rows through the
     blocks, B rows of sampler state) on a copy whose Linear/Conv weights are stored in bf16, which on the CPU
     runs oneDNN's fused linear(+GELU) and the flash attention kernel.
   Runs are interleaved, best of ``--reps`` after a warm-up. Target: official / ours >= 1.5x.

Weights are random (Inception: random weights with the real shapes; DiT: random init), which does not change the
compute. Run under the same environment for every contender.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _best(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    times = {k: [] for k in fns}
    for _ in range(reps + 1):  # first round is the warm-up
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: min(v[1:]) for k, v in times.items()}


def bench_features(n: int, size: int, batch: int, reps: int, weights: str) -> dict:
    import torch_fidelity
    from torch.utils.data import Dataset

    from eval import inception
    from eval.metrics import inception_score

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    class DS(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return imgs[i]

    ext = inception.load_extractor(weights)

    def ours():
        f = inception.extract_features(ext, imgs, batch_size=batch)
        inception_score(f[inception.LOGITS])

    def theirs():
        torch_fidelity.calculate_metrics(input1=DS(), isc=True, cuda=False, cache=False, verbose=False,
                                         batch_size=batch, save_cpu_ram=True,
                                         feature_extractor_weights_path=weights)

    best = _best({"ours": ours, "torch-fidelity": theirs}, reps)
    return {"images": n, "size": size, "batch": batch,
            "ours_img_per_s": n / best["ours"], "torch_fidelity_img_per_s": n / best["torch-fidelity"],
            "ratio": best["torch-fidelity"] / best["ours"]}


def bench_cfg(n: int, steps: int, reps: int, model_name: str, clock=time.perf_counter) -> dict:
    from benchmarks.official_dit import OfficialDiT
    from dit.diffusion import create_diffusion
    from dit.models import DiT_models
    from dit.samplers import sample
    from eval.inference import Generator

    torch.manual_seed(0)
    model = DiT_models[model_name](input_size=32, num_classes=1000).eval()
    for p in model.parameters():  # non-zero adaLN / output layers, as in a trained model
        torch.nn.init.normal_(p, std=0.02)
    official_model = OfficialDiT(input_size=32, patch_size=model.patch_size, hidden_size=model.hidden_size,
                                 depth=model.depth, num_heads=model.num_heads).eval()
    official_model.load_state_dict(model.state_dict())
    with torch.no_grad():  # the peer computes the same function
        args = (torch.randn(4, 4, 32, 32), torch.tensor([1, 500, 999, 10]), torch.tensor([3, 1000, 7, 1000]))
        diff = (official_model(*args) - model(*args)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"official reference and our DiT disagree (max abs diff {diff:.2e})")
    gen = Generator(model, {"diffusion_steps": 1000}, {}, None, "cpu")
    labels = torch.arange(n) % 1000
    seeds = list(range(n))
    diffusion = create_diffusion(diffusion_steps=1000)

    def official_loop(net: torch.nn.Module):
        """The official sample.py: the sampler state is the doubled batch [z, z], labels [y, null]."""
        def run():
            z = torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(0))
            z = torch.cat([z, z])
            y = torch.cat([labels, torch.full_like(labels, 1000)])

            def fn(x, t, y, cfg_scale):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net.forward_with_cfg(x, t, y, cfg_scale).float()

            out = sample(fn, diffusion, (2 * n, 4, 32, 32), steps=steps, noise=z,
                         model_kwargs={"y": y, "cfg_scale": 1.5})
            return out[:n]
        return run

    def ours():
        x0 = sample(gen.model_fn(1.5, "all", None, torch.bfloat16), gen.diffusion, (n, 4, 32, 32), steps=steps,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], model_kwargs={"y": labels})
        return x0

    with torch.no_grad():
        best = _best({"official": official_loop(official_model), "official_loop_our_model": official_loop(model),
                      "ours": ours}, reps, clock)
    per_step = {k: v / steps for k, v in best.items()}
    return {"model": model_name, "images": n, "steps_timed": steps, "reference_max_abs_diff": diff,
            "s_per_step": per_step, "s_per_sample_step": {k: v / n for k, v in per_step.items()},
            "speedup_vs_official": {k: per_step["official"] / v for k, v in per_step.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("features", "cfg", "all"), default="all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-features", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-cfg", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per timed run")
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (use with --threads 1): the work itself, robust to other jobs on a "
                         "shared machine, which wall-clock ratios are not")
    ap.add_argument("--inception-weights", default=None,
                    help="default: random weights written to /tmp/bench_fid/inception-random.pth")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    out = {"threads": torch.get_num_threads(), "clock": args.clock, "torch": torch.__version__,
           "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}}
    if args.part in ("features", "all"):
        from eval import inception

        w = args.inception_weights or str(inception.write_random_weights("/tmp/bench_fid/inception-random.pth"))
        out["features"] = bench_features(args.n_features, args.image_size, args.batch, args.reps, w)
        print(json.dumps(out["features"]), flush=True)
    if args.part in ("cfg", "all"):
        out["cfg"] = bench_cfg(args.n_cfg, args.steps, args.reps, args.model, clock)
        print(json.dumps(out["cfg"]), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
