"""Per-step overhead of launch/train.py's Trainer over the bare model step (issue 4 benchmark).

Bare step: DiT forward + diffusion loss + backward + torch AdamW on a batch already in memory.
Trainer step: the same model through the DeepSpeed engine (ZeRO stage as given), streamed from latent shards,
with the NaN/inf guard, the EMA update and the preemption check — what `Trainer.run` does every step.
Both run in this process, interleaved in rounds, so machine drift hits both alike; the ratio is what counts.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 DS_ACCELERATOR=cpu \
        python benchmarks/bench_trainer_overhead.py --model DiT-S/2 --size 16 --batch 16 --steps 10 --rounds 3

`--breakdown` then times the pieces of both steps (data, forward, backward and DeepSpeed's reduction inside it,
the guard, the optimizer step and ZeRO's norm/copies, the EMA) by wrapping them; on a busy machine use
`--threads 1 --clock thread --rounds 0` for CPU-time pieces that other processes barely move.
`--set section.key=value` passes config overrides to the trainer (e.g. train.ema_every=4).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

from data_pipeline.dist_env import init_distributed
from data_pipeline.synthetic import write_latent_shards
from dit.diffusion import create_diffusion
from dit.models import DiT
from eval.config import load_config
from launch.run_utils import PreemptionFlag
from launch.train import Trainer

log = logging.getLogger("bench_trainer_overhead")
WARMUP = 3  # untimed steps before a breakdown: the first steps of a fresh model grow the heap (page faults)
CLOCK = time.perf_counter  # --clock thread: CPU time of this thread (with --threads 1: robust to other load)


class PieceTimer:
    """Wall time spent inside chosen methods, per label (nested pieces are counted in their parents too)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[tuple[object, str, object, bool]] = []

    def wrap(self, obj: object, name: str, label: str) -> None:
        """Time every call of `obj.name` under `label` (no-op when the attribute is missing)."""
        if obj is None or not hasattr(obj, name):
            return
        had_own = name in getattr(obj, "__dict__", {})
        original = getattr(obj, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = CLOCK()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + CLOCK() - t0
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(obj, name, timed)
        self._undo.append((obj, name, original, had_own))

    def restore(self) -> None:
        """Put every wrapped attribute back."""
        for obj, name, original, had_own in reversed(self._undo):
            if had_own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)
        self._undo.clear()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class TimedIterator:
    """An iterator wrapper that books the time of `next()` under `label`."""

    def __init__(self, it, timer: PieceTimer, label: str) -> None:
        self.it, self.timer, self.label = it, timer, label

    def __iter__(self):
        return self

    def __next__(self):
        t0 = CLOCK()
        try:
            return next(self.it)
        finally:
            self.timer.seconds[self.label] = self.timer.seconds.get(self.label, 0.0) + CLOCK() - t0


def instrument_trainer(trainer: Trainer, timer: PieceTimer) -> None:
    """Wrap the pieces of `Trainer.train_step` (and DeepSpeed's internals under it) with timers."""
    import launch.train as train_mod

    engine = trainer.engine
    zero_opt = engine.optimizer
    base_opt = getattr(zero_opt, "optimizer", None)
    timer.wrap(engine, "forward", "forward (engine)")
    timer.wrap(trainer.diffusion, "training_losses", "forward+loss")
    timer.wrap(trainer, "agree_finite", "finite-loss (+ preemption) all-reduce")
    timer.wrap(engine, "backward", "backward (engine, incl. grad reduction)")
    timer.wrap(engine, "allreduce_gradients", "  engine.allreduce_gradients")
    for name in ("reduce_independent_p_g_buckets_and_remove_grads", "reduce_ipg_grads", "average_tensor",
                 "copy_grads_in_partition"):
        timer.wrap(zero_opt, name, f"  zero.{name}")
    for name in ("_grads_finite_stage0", "_grad_norm_and_finite", "clip_and_check_grads"):
        timer.wrap(train_mod, name, f"guard {name}")
    timer.wrap(trainer, "_check_and_clip", "guard _check_and_clip")
    timer.wrap(engine, "step", "engine.step")
    timer.wrap(zero_opt, "step", "  optimizer.step (outer)")
    if base_opt is not None and not isinstance(base_opt, dict):
        timer.wrap(base_opt, "step", "    base AdamW.step")
    for name in ("scaled_global_norm", "check_overflow", "unscale_and_clip_grads", "zero_grad",
                 "_update_model_bit16_weights"):
        timer.wrap(zero_opt, name, f"    zero.{name}")
    timer.wrap(trainer.ema, "update", "EMA update")
    trainer.iterator = TimedIterator(trainer.iterator, timer, "data next()")


def bare_breakdown(trainer: Trainer, n: int) -> dict[str, float]:
    """Mean ms per step of the pieces of the bare step (forward+loss, backward, AdamW, zero_grad)."""
    torch.manual_seed(0)
    model = DiT(**trainer.model_kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    diffusion = create_diffusion(**trainer.diffusion_kwargs)
    x, y = next(trainer.iterator)
    precision = trainer.cfg.train.precision

    def fn(xt, t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(xt, t, y).float()

    acc: dict[str, float] = {}
    for i in range(-WARMUP, n):
        marks = [CLOCK()]
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        loss = diffusion.training_losses(fn, x, t, model_kwargs={"y": y})["loss"].mean()
        marks.append(CLOCK())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(CLOCK())
        opt.step()
        marks.append(CLOCK())
        if i >= 0:
            for label, a, b in zip(("forward+loss", "backward", "AdamW.step"), marks, marks[1:]):
                acc[label] = acc.get(label, 0.0) + b - a
            acc["total"] = acc.get("total", 0.0) + marks[-1] - marks[0]
    return {k: 1000 * v / n for k, v in acc.items()}


def trainer_breakdown(trainer: Trainer, n: int, preempt: PreemptionFlag) -> dict[str, float]:
    """Mean ms per step of the pieces of `Trainer.train_step` plus the preemption check."""
    timer = PieceTimer()
    instrument_trainer(trainer, timer)
    timer.wrap(preempt, "should_stop", "preemption check")
    total = 0.0
    try:
        trainer_steps(trainer, WARMUP, preempt)
        timer.reset()
        for _ in range(n):
            t0 = CLOCK()
            trainer.train_step()
            preempt.should_stop(trainer.info.device)
            total += CLOCK() - t0
    finally:
        timer.restore()
        trainer.iterator = trainer.iterator.it
    out = {k: 1000 * v / n for k, v in timer.seconds.items()}
    out["total"] = 1000 * total / n
    return out


def print_breakdown(title: str, pieces: dict[str, float]) -> None:
    """One line per piece, in ms per step."""
    print(title)
    for label, ms in pieces.items():
        print(f"  {label:48s} {ms:8.1f} ms")


def bare_steps(trainer: Trainer, n: int) -> float:
    """Seconds per step of the plain PyTorch loop on the trainer's model configuration."""
    torch.manual_seed(0)
    model = DiT(**trainer.model_kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    diffusion = create_diffusion(**trainer.diffusion_kwargs)
    x, y = next(trainer.iterator)  # one batch of the same stream, kept in memory
    precision = trainer.cfg.train.precision

    def fn(xt, t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(xt, t, y).float()

    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        loss = diffusion.training_losses(fn, x, t, model_kwargs={"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocations
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trainer_steps(trainer: Trainer, n: int, preempt: PreemptionFlag) -> float:
    """Seconds per step of the Trainer's per-step work (data, engine, guard, EMA, signal check)."""
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        preempt.should_stop(trainer.info.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--size", type=int, default=16, help="latent side (4 x size x size)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (0: only --breakdown)")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the pieces of both steps (ms per step, mean over --steps)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="clock of --breakdown: wall time, or this thread's CPU time (use with --threads 1 on a "
                             "busy machine; time spent waiting, e.g. for the data loader, then counts as zero)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config override for the trainer (e.g. train.ema_every=4); repeatable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "latents"
        n = args.batch * (args.steps + 2) * (args.rounds + 1)
        write_latent_shards(shards, [n // 4] * 4, shape=(4, args.size, args.size), scale=[1.0 / n] * 4)
        cfg = load_config(None, [f"model.name={args.model}", f"data.shards={shards}", "data.num_workers=1",
                                 f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
                                 f"train.deepspeed.zero_stage={args.zero_stage}", "train.wandb=false",
                                 "train.progress=false", f"train.run_dir={tmp}/run", *args.overrides])
        info = init_distributed()
        trainer = Trainer(cfg, info, Path(tmp) / "run", None)
        preempt = PreemptionFlag()
        bare, full = [], []
        for _ in range(args.rounds):
            bare.append(bare_steps(trainer, args.steps))
            full.append(trainer_steps(trainer, args.steps, preempt))
        print(f"model {args.model} latents 4x{args.size}x{args.size} batch {args.batch} {args.precision} "
              f"ZeRO-{args.zero_stage} threads {args.threads} {' '.join(args.overrides)}")
        if args.rounds:
            b, f = statistics.median(bare), statistics.median(full)
            print(f"bare step     {b * 1000:8.1f} ms  (rounds: {', '.join(f'{x * 1000:.0f}' for x in bare)})")
            print(f"trainer step  {f * 1000:8.1f} ms  (rounds: {', '.join(f'{x * 1000:.0f}' for x in full)})")
            print(f"overhead      {100 * (f / b - 1):+.1f} %  (target <= +10 %)")
        if args.breakdown:
            print_breakdown("bare step pieces", bare_breakdown(trainer, args.steps))
            print_breakdown("trainer step pieces", trainer_breakdown(trainer, args.steps, preempt))
        trainer.stream.close()


if __name__ == "__main__":
    main()
