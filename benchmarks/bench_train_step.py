"""Training-step benchmark: our DiT against diffusers' `DiTTransformer2DModel` with the same configuration.

One step = forward + loss + backward + AdamW step, batch 32 of 4x32x32 latents, DiT-S/2 by default. Both models
hold the same weights (ours converted to diffusers), use the same loss and the same optimizer, and are timed
alternately in the same process, so that the load of other processes on the machine hits both alike; the reported
ratios come from medians over the repetitions. Also measured: per-block gradient checkpointing (peak memory of live
tensors and step time, against no checkpointing). Peers on request: the official network (`--official`), our model
with the CPU speed-ups of `dit.cpu` (`--cpu`, what the trainer runs on a CPU), torch.compile (`--compile`);
`--demo` times the `make demo` DiT instead of a preset.

Run from the repository root, e.g.
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
        python benchmarks/bench_train_step.py --reps 12 --json /tmp/bench.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.convert import diffusers_config, ours_to_diffusers
from dit.cpu import accelerate
from dit.models import DiT, DiT_models


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as in DiT training (lr 1e-4, no weight decay); the fused kernel when this torch has it on CPU."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)


# The `make demo` DiT (configs/runs/mnist_demo.yaml: custom, hidden 128, depth 6, 4 heads, patch 2) on the demo VAE's
# 8x8x4 latents of 10 digit classes.
DEMO = {"input_size": 8, "in_channels": 4, "num_classes": 10, "hidden_size": 128, "depth": 6, "num_heads": 4,
        "patch_size": 2}
PRESET_DATA = {"input_size": 32, "in_channels": 4, "num_classes": 1000}


def build_models(name: str, batch: int, seed: int, demo: bool = False
                 ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Our model (zero-initialised layers perturbed, like a trained model) and diffusers' copy of it: the preset
    `name` on 4x32x32 latents of 1000 classes, or the demo's DiT."""
    torch.manual_seed(seed)
    ours = DiT(**DEMO, learn_sigma=True) if demo else DiT_models[name](**PRESET_DATA, learn_sigma=True)
    with torch.no_grad():
        for p in ours.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.02)
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:  # diffusers is a dev extra
        return ours, None
    kw = {"hidden_size": ours.hidden_size, "num_heads": ours.num_heads, "in_channels": ours.in_channels,
          "depth": ours.depth, "input_size": ours.input_size, "patch_size": ours.patch_size,
          "num_classes": ours.num_classes, "learn_sigma": True}
    theirs = DiTTransformer2DModel(**diffusers_config(kw))
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()))
    return ours, theirs


def official_copy(ours: torch.nn.Module) -> torch.nn.Module:
    """The official network (benchmarks/official_dit.py) holding our model's weights."""
    from benchmarks.official_dit import OfficialDiT

    official = OfficialDiT(input_size=ours.input_size, patch_size=ours.patch_size, in_channels=ours.in_channels,
                           hidden_size=ours.hidden_size, depth=ours.depth, num_heads=ours.num_heads,
                           num_classes=ours.num_classes)
    official.load_state_dict(ours.state_dict())
    return official


class Stepper:
    """One training step of a model on fixed data; `forward` adapts the call convention."""

    def __init__(self, model: torch.nn.Module, forward: Callable, data: tuple, precision: str):
        self.model, self.forward, self.data, self.precision = model.train(), forward, data, precision
        self.opt = make_optimizer(model)

    def __call__(self) -> float:
        x, t, y, target = self.data
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        with ctx:
            out = self.forward(self.model, x, t, y)
        loss = F.mse_loss(out.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach().item()


def ours_forward(model, x, t, y):
    return model(x, t, y)


def diffusers_forward(model, x, t, y):
    return model(x, t, y).sample


def time_alternating(steppers: dict[str, Stepper], reps: int, warmup: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Step times (s) per stepper, run in turns (the order rotates every repetition)."""
    names = list(steppers)
    for _ in range(warmup):
        for n in names:
            steppers[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = clock()
            steppers[n]()
            times[n].append(clock() - t0)
    return times


def live_tensor_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated during fn() (CPU allocator events recorded by the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(((e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
                     for e in prof.events()), key=lambda ev: ev[0])
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def static_bytes(step: Stepper) -> int:
    """Bytes held between steps: parameters, buffers and optimizer state."""
    total = sum(p.numel() * p.element_size() for p in step.model.parameters())
    total += sum(b.numel() * b.element_size() for b in step.model.buffers())
    for state in step.opt.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def summary(times: dict[str, list[float]], batch: int) -> dict[str, dict]:
    return {n: {"median_s": statistics.median(ts), "min_s": min(ts), "img_per_s": batch / statistics.median(ts),
                "times_s": [round(v, 4) for v in ts]} for n, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="DiT-S/2", choices=list(DiT_models))
    ap.add_argument("--demo", action="store_true",
                    help="the `make demo` DiT (configs/runs/mnist_demo.yaml) on 8x8x4 latents instead of --model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (use with --threads 1): the work itself, robust to other jobs on a "
                         "shared machine, which wall-clock ratios are not")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per model and precision")
    ap.add_argument("--warmup", type=int, default=4,
                    help="untimed steps per model first: the heap keeps growing (page faults) for ~5 steps in one "
                         "process")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--no-ckpt", action="store_true", help="skip the gradient checkpointing measurement")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--official", action="store_true",
                    help="also time the official network (benchmarks/official_dit.py): the plain model, op for op")
    ap.add_argument("--cpu", action="store_true",
                    help="also time ours with the CPU speed-ups (dit.cpu.accelerate), as the trainer runs it on a CPU")
    ap.add_argument("--profile", default="", help="print the top ops of one step of ours in this precision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ours, theirs = build_models(args.model, args.batch, args.seed, args.demo)
    if args.no_diffusers:
        theirs = None
    g = torch.Generator().manual_seed(args.seed)
    c, s, k = ours.in_channels, ours.input_size, ours.num_classes
    data = (torch.randn(args.batch, c, s, s, generator=g), torch.randint(0, 1000, (args.batch,), generator=g),
            torch.randint(0, k, (args.batch,), generator=g), torch.randn(args.batch, 2 * c, s, s, generator=g))
    env = {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}
    results: dict = {"model": "demo" if args.demo else args.model, "batch": args.batch, "threads": args.threads, "reps": args.reps,
                     "clock": args.clock,
                     "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "env": env,
                     "command": " ".join([sys.executable.split("/")[-1], *sys.argv])}

    if args.profile:
        step = Stepper(ours, ours_forward, data, args.profile)
        step()
        step()
        from torch.profiler import profile
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    for precision in [p for p in args.precisions.split(",") if p]:
        steppers = {"ours": Stepper(ours, ours_forward, data, precision)}
        if theirs is not None:
            steppers["diffusers"] = Stepper(theirs, diffusers_forward, data, precision)
        if args.compile:
            steppers["ours_compiled"] = Stepper(torch.compile(ours), ours_forward, data, precision)
        if args.official:
            steppers["official"] = Stepper(official_copy(ours), ours_forward, data, precision)
        if args.cpu:
            steppers["ours_cpu"] = Stepper(accelerate(copy.deepcopy(ours)), ours_forward, data, precision)
        times = time_alternating(steppers, args.reps, args.warmup, clock)
        res = summary(times, args.batch)
        if theirs is not None:
            res["speedup_vs_diffusers"] = res["diffusers"]["median_s"] / res["ours"]["median_s"]
            res["speedup_pairs_median"] = statistics.median(d / o for d, o in zip(times["diffusers"], times["ours"]))
            if args.compile:
                res["compiled_speedup_vs_diffusers"] = res["diffusers"]["median_s"] / res["ours_compiled"]["median_s"]
            if args.official:
                res["official_speedup_vs_diffusers"] = res["diffusers"]["median_s"] / res["official"]["median_s"]
            if args.cpu:
                res["cpu_speedup_vs_diffusers"] = res["diffusers"]["median_s"] / res["ours_cpu"]["median_s"]
                res["cpu_speedup_pairs_median"] = statistics.median(
                    d / o for d, o in zip(times["diffusers"], times["ours_cpu"]))
        results[precision] = res
        print(f"[{precision}] " + ", ".join(f"{n}: {r['img_per_s']:.2f} img/s" for n, r in res.items()
                                           if isinstance(r, dict))
              + (f"; ours/diffusers speedup {res['speedup_vs_diffusers']:.2f}x (pairs {res['speedup_pairs_median']:.2f}x)"
                 if theirs is not None else "")
              + (f"; ours_cpu/diffusers {res['cpu_speedup_vs_diffusers']:.2f}x (pairs {res['cpu_speedup_pairs_median']:.2f}x)"
                 if theirs is not None and args.cpu else ""), flush=True)

    if not args.no_ckpt:
        precision = "bf16" if "bf16" in args.precisions else args.precisions.split(",")[0]
        # with --cpu: both with the CPU speed-ups, as the trainer runs them on a CPU
        speedups = accelerate if args.cpu else (lambda m: m)
        plain = Stepper(speedups(copy.deepcopy(ours)), ours_forward, data, precision)
        ours_ckpt, _ = build_models(args.model, args.batch, args.seed, args.demo)
        ours_ckpt = speedups(ours_ckpt)
        ours_ckpt.set_grad_checkpointing(True)
        ckpt = Stepper(ours_ckpt, ours_forward, data, precision)
        times = time_alternating({"plain": plain, "ckpt": ckpt}, args.reps, args.warmup, clock)
        peaks = {n: live_tensor_peak(s) for n, s in (("plain", plain), ("ckpt", ckpt))}
        static = {n: static_bytes(s) for n, s in (("plain", plain), ("ckpt", ckpt))}
        res = summary(times, args.batch)
        res.update({
            "precision": precision,
            "step_peak_bytes": peaks, "static_bytes": static,
            "time_ratio": res["ckpt"]["median_s"] / res["plain"]["median_s"],
            "time_ratio_pairs_median": statistics.median(c / p for c, p in zip(times["ckpt"], times["plain"])),
            "peak_ratio_total": (peaks["ckpt"] + static["ckpt"]) / (peaks["plain"] + static["plain"]),
            "peak_ratio_step": peaks["ckpt"] / peaks["plain"],
        })
        results["grad_checkpointing"] = res
        print(f"[ckpt {precision}] time x{res['time_ratio']:.2f} (pairs x{res['time_ratio_pairs_median']:.2f}); "
              f"peak memory {res['peak_ratio_total']:.1%} of plain incl. weights+optimizer "
              f"({(peaks['ckpt'] + static['ckpt']) / 2**20:.0f} vs {(peaks['plain'] + static['plain']) / 2**20:.0f} MiB),"
              f" {res['peak_ratio_step']:.1%} of the step's own allocations", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
