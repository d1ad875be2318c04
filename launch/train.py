"""Train a DiT from webdataset shards under DeepSpeed ZeRO, with EMA, exact resume and preemption handling.

    python launch/train.py --config configs/runs/mnist_latent.yaml [--set train.max_steps=2000] [--resume auto]
    torchrun --nproc_per_node 8 launch/train.py --config ...      deepspeed --num_gpus 8 launch/train.py --config ...
    srun python launch/train.py --config ... --resume auto        (one task per GPU; see slurm/)

Exit status: 0 done, 2 bad config / input, 3 checkpointed after SIGUSR1/SIGTERM (requeue me), 1 other failure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `python launch/train.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: silences its accelerator probe

from data_pipeline.loader import NoReadableSamplesError
from data_pipeline.manifest import ManifestError
from launch import checkpoint as ckpt_io
from launch.builders import (batch_layout, data_record, deepspeed_config, diffusion_kwargs, latent_record,
                             model_kwargs)
from launch.config import Config, ConfigError, add_config_args, config_from_args, config_to_dict
from launch.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from launch.engine_ema import EngineEMA
from launch.run_utils import (EXIT_FAILED, EXIT_PREEMPTED, MetricsSink, PreemptionFlag, fault_step, rng_state,
                              seed_everything, set_rng_state, setup_logging, truncate_jsonl)

log = logging.getLogger("launch.train")

EXIT_CONFIG = 2


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says why."""


# ------------------------------------------------------------------------------------------------ helpers
def _versions() -> dict[str, str]:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]}


def _peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak dense FLOP/s of one device, for the MFU estimate (env DIT_PEAK_TFLOPS overrides; None if unknown)."""
    if os.environ.get("DIT_PEAK_TFLOPS"):
        return float(os.environ["DIT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "V100": (125e12, 15.7e12),
             "L40S": (362e12, 91.6e12), "A10": (125e12, 31.2e12), "4090": (165e12, 82.6e12)}
    for key, (bf16, fp32) in table.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _sample_labels(num_classes: int, cfg: Config) -> list[int]:
    if num_classes == 0:
        return [0] * (cfg.train.sample_per_class * 4)
    classes = list(range(min(num_classes, cfg.train.sample_max_classes)))
    return [c for c in classes for _ in range(cfg.train.sample_per_class)]


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def _params_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """True when every (local) parameter is finite on every rank (collective)."""
    ok = torch.tensor([float(all(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all()
                                 for p in module.parameters()))], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def _grads_finite_stage0(module: torch.nn.Module) -> bool:
    """Stage 0 keeps full, already all-reduced gradients in `.grad`: check them before the optimizer step."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """One DiT training run: engine, EMA, data stream, checkpoints and the metric outputs."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resume: Optional[str]) -> None:
        import deepspeed

        from data_pipeline.loader import build_stream
        from dit.diffusion import create_diffusion
        from dit.models import DiT

        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.ckpt_root = run_dir / "checkpoints"
        self.resume_from = ckpt_io.resolve_resume(resume, self.ckpt_root)
        self.micro, self.accum = batch_layout(cfg, info.world_size)
        if not cfg.data.shards:
            raise ConfigError("data.shards is empty: set it to a shard directory (with manifest.json)")

        meta = ckpt_io.read_meta(self.resume_from) if self.resume_from else None
        positions = None
        if meta is not None:
            if meta.get("world_size") == info.world_size:
                positions = meta.get("positions")
            else:
                log.warning("checkpoint was written by %s ranks, this run has %s: the data stream restarts at the "
                            "beginning of epoch %s (the rest resumes exactly)", meta.get("world_size"),
                            info.world_size, meta.get("epoch"))
                positions = None
        stream_kwargs = dict(batch_size=self.micro, rank=info.rank, world_size=info.world_size,
                             num_workers=cfg.data.num_workers, seed=cfg.train.seed, mode=cfg.data.mode,
                             shuffle_buffer=cfg.data.shuffle_buffer, flip=cfg.data.flip)
        try:
            self.stream = build_stream(cfg.data.shards, position=positions[info.rank] if positions else None,
                                       **stream_kwargs)
        except ValueError as err:
            if isinstance(err, (ManifestError, ConfigError)) or positions is None:
                raise
            raise ckpt_io.CheckpointError(f"{self.resume_from}: {err}") from None
        if meta is not None and positions is None:  # new world size: restart the checkpoint's epoch
            position = dict(self.stream.position(), batches=int(meta.get("epoch", 0)) * self.stream.batches_per_epoch)
            self.stream = build_stream(cfg.data.shards, position=position, **stream_kwargs)
        manifest = self.stream.manifest
        self.model_kwargs = model_kwargs(cfg, manifest)
        self.diffusion_kwargs = diffusion_kwargs(cfg)
        self.data_info = data_record(manifest)
        self.latent = latent_record(manifest)
        if meta is not None and meta.get("model") != self.model_kwargs:
            raise ckpt_io.CheckpointError(f"{self.resume_from}: the checkpoint's model {meta.get('model')} does not "
                                          f"match this config's {self.model_kwargs}")

        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = DiT(**self.model_kwargs)
        self.num_classes = self.model_kwargs["num_classes"]
        self.diffusion = create_diffusion(**self.diffusion_kwargs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.train.warmup_steps))
        self.ds_config = deepspeed_config(cfg, info.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config)
        if cfg.train.compile:
            self.engine.compile()
        self.ema = EngineEMA(self.engine.module, cfg.train.ema_decay)
        self.flops_per_sample = 3.0 * model.model_flops_per_sample() if hasattr(model, "model_flops_per_sample") \
            else None
        self.peak_flops = _peak_flops(info.device, cfg.train.precision)

        self.step, self.nonfinite_total, self.bad_in_a_row = 0, 0, 0
        self.iterator = iter(self.stream)
        # RNG for timesteps, noise and label dropout: private to the trainer and saved per rank, so neither the
        # data loader's workers nor sampling grids can shift the sequence an exact resume must reproduce.
        self.gen = torch.Generator(device=info.device)
        self.gen.manual_seed(cfg.train.seed * 1_000_003 + info.rank)
        if self.resume_from is not None:
            self._load(self.resume_from, meta)
        else:
            seed_everything(cfg.train.seed + info.rank)
        self.sink = MetricsSink(run_dir, info.is_main, config_to_dict(cfg), cfg.train.wandb, cfg.train.wandb_project)
        if info.is_main:
            truncate_jsonl(self.sink.path, self.step)  # a resumed run rewrites what came after its checkpoint
        self._grid_generator = None  # EMA model + VAE for the sample grids, built on first use (rank 0)

    # -------------------------------------------------------------------------------------- checkpointing
    def _meta(self) -> dict[str, Any]:
        positions: list[Any] = [None] * self.info.world_size
        position = self.stream.position()
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_gather_object(positions, position)
        else:
            positions = [position]
        return {
            "format": "ditstack-train-1", "step": self.step, "epoch": position.get("epoch", 0),
            "world_size": self.info.world_size, "positions": positions,
            "config": config_to_dict(self.cfg), "model": self.model_kwargs, "diffusion": self.diffusion_kwargs,
            "data": self.data_info, "latent": self.latent, "nonfinite_steps": self.nonfinite_total,
            "corrupt_samples": int(getattr(self.stream, "corrupt_count", 0)),
            "deepspeed": {"zero_stage": self.cfg.train.deepspeed.zero_stage}, "versions": _versions(),
        }

    def save(self) -> Path:
        """Write a complete checkpoint of the current step (collective); refuses non-finite weights."""
        from safetensors.torch import save_file

        if not (_params_finite(self.engine.module, self.info.device) and self.ema.all_finite()):
            raise TrainingStopped(f"non-finite weights at step {self.step}: refusing to write a checkpoint")
        tmp = ckpt_io.begin_save(self.ckpt_root, self.step, self.info.is_main)
        self.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        ckpt_io.save_rank_state(tmp, self.info.rank, {
            "rng": rng_state(), "gen": self.gen.get_state(), "position": json.dumps(self.stream.position()),
            "step": self.step, "bad_in_a_row": self.bad_in_a_row})
        if fault_step("kill_in_save") == self.step and self.info.is_main:
            os.kill(os.getpid(), 9)  # fault injection for the tests: die half-way through a checkpoint write
        ema_state = self.ema.full_state_dict()
        meta = self._meta()
        header = {k: meta[k] for k in ("model", "diffusion", "data", "latent", "step")}

        def write_ema(tmp_dir: Path) -> None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp_dir / ckpt_io.EMA_FILE),
                      metadata={"ditstack": json.dumps(header)})

        final = ckpt_io.finish_save(self.ckpt_root, tmp, self.step, meta, self.cfg.train.keep_last,
                                    self.info.is_main, write_extra=write_ema)
        log.info("checkpoint written: %s", final)
        return final

    def _load(self, path: Path, meta: dict) -> None:
        from safetensors.torch import load_file

        load_path, _ = self.engine.load_checkpoint(str(path), tag="ds", load_module_strict=True)
        if load_path is None:
            raise ckpt_io.CheckpointError(f"{path}: DeepSpeed engine state could not be loaded (ds/ missing?)")
        self.ema.load_full_state_dict(load_file(str(path / ckpt_io.EMA_FILE)))
        self.step = int(meta["step"])
        self.nonfinite_total = int(meta.get("nonfinite_steps", 0))
        if meta.get("world_size") == self.info.world_size:
            state = ckpt_io.load_rank_state(path, self.info.rank)
            set_rng_state(state["rng"])
            self.gen.set_state(state["gen"])
            self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        else:
            seed_everything(self.cfg.train.seed + self.info.rank + 7919 * self.step)
            self.gen.manual_seed(self.cfg.train.seed * 1_000_003 + self.info.rank + 7919 * self.step)
        log.info("resumed from %s at step %d (epoch %s)", path, self.step, meta.get("epoch"))

    def export_ema(self, out: Path) -> None:
        """Write the EMA weights as one consolidated safetensors file (collective)."""
        from safetensors.torch import save_file

        state = self.ema.full_state_dict()
        if self.info.is_main:
            header = {"model": self.model_kwargs, "diffusion": self.diffusion_kwargs, "data": self.data_info,
                      "latent": self.latent, "step": self.step}
            tmp = out.with_name(out.name + ".tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"ditstack": json.dumps(header)})
            os.replace(tmp, out)

    # ------------------------------------------------------------------------------------------- sampling
    def sample_grid(self) -> Optional[Path]:
        """Save a grid of EMA samples with fixed noise and labels (collective for the EMA gather)."""
        from launch.visuals import save_image_grid
        from launch.inference import Generator

        state = self.ema.full_state_dict()
        if not self.info.is_main:
            return None
        s = self.cfg.sample
        if self._grid_generator is None:
            from dit.models import DiT

            model = DiT(**self.model_kwargs).to(self.info.device).eval()
            self._grid_generator = Generator(model, self.diffusion_kwargs, self.data_info, self.latent,
                                             self.info.device)
        gen = self._grid_generator
        gen.model.load_state_dict(state)
        labels = _sample_labels(self.num_classes, self.cfg)
        images = gen.generate(labels=labels, seeds=list(range(len(labels))), sampler=s.sampler, steps=s.steps,
                              eta=s.eta, cfg_scale=s.cfg_scale if self.num_classes else 1.0,
                              guide_channels=s.guide_channels, guidance_interval=s.guidance_interval,
                              batch_size=64, dtype=torch.bfloat16 if self.cfg.train.precision == "bf16" else None)
        out = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_image_grid(images, out, nrow=self.cfg.train.sample_per_class if self.num_classes else 8,
                        transpose=bool(self.num_classes))
        return out

    # ------------------------------------------------------------------------------------------- training
    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                  force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        with _autocast(self.info.device, self.cfg.train.precision):
            out = self.engine(x, t, y, force_drop_ids=force_drop_ids) if force_drop_ids is not None \
                else self.engine(x, t, y)
        return out.float()

    def _micro_step(self) -> tuple[float, bool]:
        """Forward/backward on one micro batch; returns (loss, finite on every rank)."""
        x, y = next(self.iterator)
        x = x.to(self.info.device, non_blocking=True)
        y = y.to(self.info.device, non_blocking=True)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.info.device, generator=self.gen)
        noise = torch.randn(x.shape, device=self.info.device, generator=self.gen)
        kwargs: dict[str, Any] = {"y": y if self.num_classes else None}
        if self.num_classes and self.model_kwargs["class_dropout_prob"] > 0:
            drop = torch.rand(x.shape[0], device=self.info.device, generator=self.gen)
            kwargs["force_drop_ids"] = (drop < self.model_kwargs["class_dropout_prob"]).long()
        loss = self.diffusion.training_losses(self._model_fn, x, t, model_kwargs=kwargs, noise=noise)["loss"].mean()
        nan_from = fault_step("nan_loss_from")
        if nan_from is not None and self.step + 1 >= nan_from:
            loss = loss * float("nan")  # fault injection for the tests
        finite = torch.tensor([float(torch.isfinite(loss).item())], device=self.info.device)
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        ok = bool(finite.item() > 0)
        if ok:
            self.engine.backward(loss)
        return float(loss.detach().item()), ok

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accum` finite micro batches.

        A micro batch whose loss is non-finite on any rank is dropped on every rank (no backward, no engine step);
        an accumulated gradient that is non-finite makes the optimizer skip the step (ZeRO 1-3 do it themselves,
        stage 0 here). Both count as bad steps; `train.max_bad_steps` in a row stop the run.
        """
        losses: list[float] = []
        grads_ok = True
        while len(losses) < self.accum:
            loss, ok = self._micro_step()
            if not ok:
                self._bad_step("non-finite loss, micro batch dropped")
                continue
            losses.append(loss)
            if (self.engine.is_gradient_accumulation_boundary() and self.cfg.train.deepspeed.zero_stage == 0
                    and not _grads_finite_stage0(self.engine.module)):
                for p in self.engine.module.parameters():
                    p.grad = None  # the optimizer skips parameters without gradients: the step becomes a no-op
                grads_ok = False
            self.engine.step()
        applied = self.engine.was_step_applied() and grads_ok
        if fault_step("nan_weight_at") == self.step + 1:
            with torch.no_grad():  # fault injection for the tests
                next(self.engine.module.parameters()).view(-1)[0] = float("nan")
        if applied:
            self.ema.update()
            self.bad_in_a_row = 0
        else:
            self._bad_step("non-finite gradient, optimizer step skipped")
        self.step += 1
        mean_loss = sum(losses) / len(losses)
        grad_norm = self.engine.get_global_grad_norm()
        return {"loss": mean_loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    def _bad_step(self, what: str) -> None:
        self.nonfinite_total += 1
        self.bad_in_a_row += 1
        log.warning("step %d: %s (%d in a row)", self.step + 1, what, self.bad_in_a_row)
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingStopped(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                                  f"{self.cfg.train.max_bad_steps}): lower train.lr, enable train.grad_clip or "
                                  f"model.qk_norm, or resume from an earlier checkpoint")

    def run(self) -> int:
        """Train to `train.max_steps`; returns the process exit status."""
        cfg, info = self.cfg, self.info
        preempt = PreemptionFlag()
        bar = None
        if info.is_main and cfg.train.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        window: list[float] = []
        window_start, window_steps = time.perf_counter(), 0
        last_saved = self.step if self.resume_from else -1
        status = 0
        try:
            if self.resume_from is None and cfg.train.sample_every and info.is_main:
                pass  # the first grid comes after `sample_every` steps; step 0 would only show noise
            while self.step < cfg.train.max_steps:
                metrics = self.train_step()
                if math.isfinite(metrics["loss"]):
                    window.append(metrics["loss"])
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    self._log(metrics, window, window_steps, time.perf_counter() - window_start, bar)
                    window, window_steps, window_start = [], 0, time.perf_counter()
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    self.sample_grid()
                stop = preempt.should_stop(info.device)
                if self.step % cfg.train.ckpt_every == 0 or stop:
                    self.save()
                    last_saved = self.step
                if stop:
                    log.warning("stopped by signal at step %d after checkpointing; exit %d (requeue)", self.step,
                                EXIT_PREEMPTED)
                    status = EXIT_PREEMPTED
                    break
            if status == 0:
                if last_saved != self.step:
                    self.save()
                if cfg.train.sample_every and self.step % cfg.train.sample_every != 0:
                    self.sample_grid()
                self.export_ema(self.run_dir / "model_ema.safetensors")
                if info.is_main:
                    self._final_visuals()
        finally:
            preempt.restore()
            if bar is not None:
                bar.close()
            self.sink.close()
            self.stream.close()
        return status

    def _log(self, metrics: dict, window: list, steps: int, seconds: float, bar: Any) -> None:
        local = torch.tensor([sum(window), float(len(window))], dtype=torch.float64, device=self.info.device)
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        loss = float(local[0] / local[1]) if local[1] > 0 else float("nan")
        samples_per_s = steps * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        record = {"loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": metrics["grad_norm"],
                  "samples_per_s": samples_per_s, "step_time": seconds / max(steps, 1),
                  "epoch": self.stream.position().get("epoch", 0), "nonfinite_steps": self.nonfinite_total,
                  "corrupt_samples": int(getattr(self.stream, "corrupt_count", 0))}
        if self.flops_per_sample and self.peak_flops:
            record["mfu"] = samples_per_s * self.flops_per_sample / (self.peak_flops * self.info.world_size)
        self.sink.log(self.step, record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.1e}", gn=f"{metrics['grad_norm']:.2f}",
                            sps=f"{samples_per_s:.1f}")

    def _final_visuals(self) -> None:
        from launch.visuals import plot_loss_curve, samples_gif

        plot_loss_curve(self.sink.path, self.run_dir / "loss_curve.png")
        samples_gif(sorted((self.run_dir / "samples").glob("step_*.png")), self.run_dir / "samples.gif")


# ------------------------------------------------------------------------------------------------ entry point
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments of the trainer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of the run, if any) "
                                                       "or a checkpoint directory")
    parser.add_argument("--run-dir", default=None, help="run directory (default: train.run_dir)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the trainer; returns the exit status."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    run_dir = Path(args.run_dir or cfg.train.run_dir)
    info = init_distributed()
    setup_logging(info.rank)
    status = EXIT_FAILED
    try:
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(config_to_dict(cfg), sort_keys=False))
        barrier()
        trainer = Trainer(cfg, info, run_dir, args.resume)
        status = trainer.run()
        if status == 0 and info.is_main:
            log.info("done: %d steps; checkpoints in %s, EMA weights in %s", trainer.step, trainer.ckpt_root,
                     run_dir / "model_ema.safetensors")
    except ConfigError as err:
        log.error("config error: %s", err)
        status = EXIT_CONFIG
    except ckpt_io.CheckpointError as err:
        log.error("checkpoint error: %s", err)
        status = EXIT_CONFIG
    except ManifestError as err:
        log.error("data error: %s", err)
        status = EXIT_CONFIG
    except NoReadableSamplesError as err:
        log.error("data error: %s", err)
        status = EXIT_FAILED
    except TrainingStopped as err:
        log.error("training stopped: %s", err)
        status = EXIT_FAILED
    finally:
        cleanup()
    return status


if __name__ == "__main__":
    code = main()
    # Everything is written and closed by now; the interpreter's shutdown (garbage collection of the engine and
    # the process group) takes 10-20 s for nothing, multiplied by every rank and every requeue.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
