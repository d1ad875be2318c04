"""Per-step overhead of launch/train.py's Trainer over the bare model step (issue 4 benchmark).

Bare step: DiT forward + diffusion loss + backward + torch AdamW on a batch already in memory.
Trainer step: the same model through the DeepSpeed engine (ZeRO stage as given), streamed from latent shards,
with the NaN/inf guard, the EMA update and the preemption check — what `Trainer.run` does every step.
Both run in this process, interleaved in rounds, so machine drift hits both alike; the ratio is what counts.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 DS_ACCELERATOR=cpu \
        python benchmarks/bench_trainer_overhead.py --model DiT-S/2 --size 16 --batch 16 --steps 10 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from data_pipeline.synthetic import write_latent_shards  # noqa: E402
from dit.diffusion import create_diffusion  # noqa: E402
from dit.models import DiT  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.distributed import init_distributed  # noqa: E402
from launch.run_utils import PreemptionFlag  # noqa: E402
from launch.train import Trainer  # noqa: E402


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "latents"
        n = args.batch * (args.steps + 2) * (args.rounds + 1)
        write_latent_shards(shards, [n // 4] * 4, shape=(4, args.size, args.size), scale=[1.0 / n] * 4)
        cfg = load_config(None, [f"model.name={args.model}", f"data.shards={shards}", "data.num_workers=1",
                                 f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
                                 f"train.deepspeed.zero_stage={args.zero_stage}", "train.wandb=false",
                                 "train.progress=false", f"train.run_dir={tmp}/run"])
        info = init_distributed()
        trainer = Trainer(cfg, info, Path(tmp) / "run", None)
        preempt = PreemptionFlag()
        bare, full = [], []
        for _ in range(args.rounds):
            bare.append(bare_steps(trainer, args.steps))
            full.append(trainer_steps(trainer, args.steps, preempt))
        b, f = statistics.median(bare), statistics.median(full)
        print(f"model {args.model} latents 4x{args.size}x{args.size} batch {args.batch} {args.precision} "
              f"ZeRO-{args.zero_stage} threads {args.threads}")
        print(f"bare step     {b * 1000:8.1f} ms  (rounds: {', '.join(f'{x * 1000:.0f}' for x in bare)})")
        print(f"trainer step  {f * 1000:8.1f} ms  (rounds: {', '.join(f'{x * 1000:.0f}' for x in full)})")
        print(f"overhead      {100 * (f / b - 1):+.1f} %  (target <= +10 %)")
        trainer.stream.close()


if __name__ == "__main__":
    main()
