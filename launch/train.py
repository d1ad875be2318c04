"""Train a DiT from webdataset shards under DeepSpeed ZeRO, with EMA, exact resume and preemption handling.

    python launch/train.py --config configs/runs/mnist_latent.yaml [--set train.max_steps=2000] [--resume auto]
    torchrun --nproc_per_node 8 launch/train.py --config ...      deepspeed --num_gpus 8 launch/train.py --config ...
    srun python launch/train.py --config ... --resume auto        (one task per GPU; see slurm/)

Exit status: 0 done, 2 bad config / input, 3 checkpointed after SIGUSR1/SIGTERM (requeue me), 1 other failure.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `python launch/train.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: silences its accelerator probe

from launch import checkpoint as ckpt_io
from launch.builders import deepspeed_config, diffusion_kwargs, latent_record, model_kwargs
from launch.config import Config, ConfigError
from launch.distributed import DistInfo
from launch.engine_ema import EngineEMA
from launch.run_utils import fault_step
from launch.trainer_base import TrainerBase, exit_now, run_main

log = logging.getLogger("launch.train")


# ------------------------------------------------------------------------------------------------ helpers
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


def _params_finite(module: torch.nn.Module) -> bool:
    """True when every parameter this rank holds (its partition under ZeRO-3) is finite."""
    return all(bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
               for p in module.parameters())


def _grad_sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every gradient value, in fp32, in one pass over the gradients.

    CPU: one BLAS dot per tensor (half the time of `torch._foreach_norm` there, measured on DiT-S/2's 33 M
    values: 6-9 ms against 12-16 ms with 2 threads). GPU: `_foreach_norm`'s fused multi-tensor kernels. A NaN or
    inf anywhere makes the sum NaN or inf.
    """
    if grads[0].device.type == "cpu":
        flat = [g.reshape(-1).float() for g in grads]
        return torch.stack([torch.dot(v, v) for v in flat]).sum()
    return torch.stack(torch._foreach_norm(grads)).float().pow(2.0).sum()


def clip_and_check_grads(grads: list[torch.Tensor], max_norm: float) -> tuple[float, bool]:
    """One pass over full gradients: their global L2 norm, whether they are all finite, and clipping.

    This replaces two passes at ZeRO stage 0 (a non-finite check, then DeepSpeed's `clip_grad_norm_`). The norm
    is the root of the summed squares, as DeepSpeed computes it (up to fp32 summation order); it is non-finite
    exactly when a gradient is (or when the sum of squares overflows fp32, which no trainable step survives
    either). When `max_norm > 0` and the norm is finite, the gradients are scaled in place by
    min(1, max_norm / (norm + 1e-6)) — DeepSpeed's coefficient, applied only when it is below 1 (a factor of 1
    changes nothing). Non-finite gradients are left as they are. Returns (norm, finite).
    """
    if not grads:
        return 0.0, True
    total = _grad_sum_of_squares(grads).sqrt()
    norm = float(total)  # the step's one host sync
    finite = math.isfinite(norm)
    if finite and max_norm > 0:
        coef = torch.clamp(torch.tensor(float(max_norm), dtype=total.dtype, device=total.device) / (total + 1e-6),
                           max=1.0)
        if float(coef) < 1.0:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm, finite


def _engine_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config (`launch.builders.deepspeed_config`) with two per-step savings that compute the same.

    - ZeRO-0: gradient clipping moves from DeepSpeed to the trainer. Stage 0 holds full gradients in `.grad`, so
      the trainer computes the norm once for both the non-finite check and the clipping (`clip_and_check_grads`)
      instead of DeepSpeed clipping in a second pass. ZeRO 1-3 compute the norm over their gradient partitions
      themselves (and skip non-finite steps with it), so they keep DeepSpeed's.
    - ZeRO-2 on one rank: `reduce_scatter: false` unless the JSON sets it. Its reduce-scatter path divides every
      gradient by the world size (1) in an extra pass before "reducing" to the only rank; the all-reduce path skips
      the division when the world size is 1. With several ranks DeepSpeed's default (reduce-scatter) is kept.
    """
    ds_config = deepspeed_config(cfg, world_size)
    stage = cfg.train.deepspeed.zero_stage
    if stage == 0:
        ds_config["gradient_clipping"] = 0.0
    if stage == 2 and world_size == 1:
        ds_config["zero_optimization"].setdefault("reduce_scatter", False)
    return ds_config


# ------------------------------------------------------------------------------------------------ trainer
class Trainer(TrainerBase):
    """One DiT training run: the DeepSpeed engine, its EMA, sample grids and the consolidated export."""

    CHECKPOINT_FORMAT = "ditstack-train-1"
    NAME = "train"

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resume: Optional[str]) -> None:
        import deepspeed

        from dit.diffusion import create_diffusion
        from dit.models import DiT

        super().__init__(cfg, info, run_dir, resume)
        manifest = self.stream.manifest
        self.model_kwargs = model_kwargs(cfg, manifest)
        self.diffusion_kwargs = diffusion_kwargs(cfg)
        self.latent = latent_record(manifest)
        self.num_classes = self.model_kwargs["num_classes"]
        model = DiT(**self.model_kwargs)
        self.diffusion = create_diffusion(**self.diffusion_kwargs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.train.warmup_steps))
        self.ds_config = _engine_config(cfg, info.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config)
        if cfg.train.compile:
            self.engine.compile()
        self.params = list(self.engine.module.parameters())
        # ZeRO-0 with one rank: nothing to average, so backward runs under DeepSpeed's no_sync() and skips its
        # flatten / all-reduce / unflatten of every gradient (bit-identical: a sum over one rank, divided by 1)
        self.reduce_grads = not (cfg.train.deepspeed.zero_stage == 0 and info.world_size == 1)
        if info.world_size == 1 and cfg.train.deepspeed.zero_stage in (1, 2) and info.device.type == "cpu":
            log.info("ZeRO-%d on one rank partitions nothing but still copies every gradient into its flat buffers "
                     "(+25-35 %% per CPU step, benchmarks/RESULTS.md); train.deepspeed.zero_stage=0 computes the "
                     "same", cfg.train.deepspeed.zero_stage)
        self.ema = EngineEMA(self.engine.module, cfg.train.ema_decay, cfg.train.ema_every)
        self.flops_per_sample = 3.0 * model.model_flops_per_sample()
        self.peak_flops = _peak_flops(info.device, cfg.train.precision)
        self._generator = None  # EMA model + VAE for grids and evaluation, built on first use
        self._nan_from, self._nan_weight_at = fault_step("nan_loss_from"), fault_step("nan_weight_at")  # tests
        self._inf_grad_at = fault_step("inf_grad_at")
        if cfg.train.eval_every and cfg.eval.metrics:  # fail now, not hours into the run
            from eval.inception import resolve_weights

            if set(cfg.eval.metrics) & {"fid", "kid", "pr"} and not (cfg.eval.ref and Path(cfg.eval.ref).is_file()):
                raise ConfigError(f"eval.ref: {cfg.eval.metrics} need reference statistics, got {cfg.eval.ref!r} "
                                  f"(make them with python eval/reference.py --shards DIR --out ref.npz)")
            resolve_weights(cfg.eval.inception_weights)
        self.finish_setup()

    # -------------------------------------------------------------------------------------- checkpointing
    def model_meta(self) -> dict[str, Any]:
        return {"model": self.model_kwargs, "diffusion": self.diffusion_kwargs, "latent": self.latent,
                "deepspeed": {"zero_stage": self.cfg.train.deepspeed.zero_stage}}

    def _header(self) -> dict[str, Any]:
        """The `ditstack` metadata of a consolidated EMA file (see docs/ARCHITECTURE.md)."""
        return {"model": self.model_kwargs, "diffusion": self.diffusion_kwargs, "data": self.data_info,
                "latent": self.latent, "step": self.step}

    def weights_finite(self) -> bool:
        return _params_finite(self.engine.module) and self.ema.all_finite()

    def checkpoint_meta(self) -> dict[str, Any]:
        # with train.ema_every > 1 the steps not yet folded into the EMA are training state (exact resume)
        return {**super().checkpoint_meta(), "ema_pending": self.ema.pending}

    def save_state(self, tmp: Path) -> None:
        self.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        if fault_step("kill_in_save") == self.step and self.info.is_main:
            os.kill(os.getpid(), 9)  # fault injection for the tests: die half-way through a checkpoint write
        self._ema_state = self.ema.full_state_dict(up_to_date=False)  # collective under ZeRO-3

    def write_files(self, tmp: Path) -> None:
        _save_safetensors(self._ema_state, tmp / ckpt_io.EMA_FILE, self._header())
        self._ema_state = None

    def load_state(self, path: Path, meta: dict) -> None:
        from safetensors.torch import load_file

        load_path, _ = self.engine.load_checkpoint(str(path), tag="ds", load_module_strict=True)
        if load_path is None:
            raise ckpt_io.CheckpointError(f"{path}: DeepSpeed engine state could not be loaded (ds/ missing?)")
        self.ema.load_full_state_dict(load_file(str(path / ckpt_io.EMA_FILE)), pending=meta.get("ema_pending", 0))

    def export_ema(self, out: Path) -> None:
        """Write the EMA weights as one consolidated safetensors file (collective)."""
        state = self.ema.full_state_dict()
        if self.info.is_main:
            _save_safetensors(state, out, self._header())

    # ------------------------------------------------------------------------------------------- sampling
    def _ema_generator(self, state: dict[str, torch.Tensor]) -> Any:
        """A `launch.inference.Generator` holding the EMA weights `state` (built once, then reloaded)."""
        if self._generator is None:
            from dit.models import DiT
            from launch.inference import Generator

            model = DiT(**self.model_kwargs).to(self.info.device).eval()
            self._generator = Generator(model, self.diffusion_kwargs, self.data_info, self.latent, self.info.device)
        self._generator.model.load_state_dict(state)
        return self._generator

    def sample_grid(self) -> Optional[Path]:
        """Save a grid of EMA samples with fixed noise and labels (collective for the EMA gather)."""
        from launch.visuals import save_image_grid

        state = self.ema.full_state_dict()
        if not self.info.is_main:
            return None
        s = self.cfg.sample
        labels = _sample_labels(self.num_classes, self.cfg)
        images = self._ema_generator(state).generate(
            labels=labels, seeds=list(range(len(labels))), sampler=s.sampler, steps=s.steps, eta=s.eta,
            cfg_scale=s.cfg_scale if self.num_classes else 1.0, guide_channels=s.guide_channels,
            guidance_interval=s.guidance_interval, batch_size=64,
            dtype=torch.bfloat16 if self.cfg.train.precision == "bf16" else None)
        out = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_image_grid(images, out, nrow=self.cfg.train.sample_per_class if self.num_classes else 8,
                        transpose=bool(self.num_classes))
        return out

    def evaluate(self) -> Optional[dict]:
        """Small-N evaluation of the EMA weights with the `eval` settings, on every rank (collective)."""
        from eval.fid import evaluate_checkpoint

        e = self.cfg.eval
        gen = self._ema_generator(self.ema.full_state_dict())
        record = evaluate_checkpoint(
            gen, meta=self._header(), num_samples=self.cfg.train.eval_num_samples,
            out=self.run_dir / "eval" / f"step_{self.step:07d}", device=self.info.device, batch_size=e.batch_size,
            sampler=e.sampler, steps=e.steps, eta=e.eta, cfg_scale=e.cfg_scale if self.num_classes else 1.0,
            guide_channels=e.guide_channels, guidance_interval=e.guidance_interval, seed=e.seed, dtype=e.dtype,
            metrics=tuple(e.metrics), ref=e.ref, inception_weights=e.inception_weights, classifier=e.classifier,
            classifier_data=self.cfg.data.shards if e.classifier else None)
        if record is not None:
            scalars = {f"eval_{k}": float(v) for k, v in record["metrics"].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.sink.log(self.step, scalars)
            log.info("step %d eval (N=%d): %s", self.step, self.cfg.train.eval_num_samples,
                     ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        return record

    def on_step(self) -> None:
        every = self.cfg.train.sample_every
        if every and self.step % every == 0:
            self.sample_grid()
        if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
            self.evaluate()

    def on_finish(self) -> None:
        every = self.cfg.train.sample_every
        if every and self.step % every != 0:
            self.sample_grid()
        self.export_ema(self.run_dir / "model_ema.safetensors")
        if self.info.is_main:
            from launch.visuals import plot_loss_curve, samples_gif

            plot_loss_curve(self.sink.path, self.run_dir / "loss_curve.png")
            samples_gif(sorted((self.run_dir / "samples").glob("step_*.png")), self.run_dir / "samples.gif")
            log.info("EMA weights: %s", self.run_dir / "model_ema.safetensors")

    def current_lr(self) -> Optional[float]:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------------------------------- training
    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                  force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        with _autocast(self.info.device, self.cfg.train.precision):
            out = self.engine(x, t, y, force_drop_ids=force_drop_ids)
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
        if self._nan_from is not None and self.step + 1 >= self._nan_from:
            loss = loss * float("nan")  # fault injection for the tests
        value = float(loss.detach())  # one host sync per micro batch, for the guard and the log
        ok = self.agree_finite(math.isfinite(value))  # the same all-reduce carries the preemption flag
        if ok:
            with contextlib.nullcontext() if self.reduce_grads else self.engine.no_sync():
                self.engine.backward(loss)
        return value, ok

    def _check_and_clip(self) -> tuple[Optional[float], bool]:
        """ZeRO-0, before the optimizer step: (grad norm, finite) of the full gradients, clipped in place.

        A non-finite gradient drops every `.grad` (the optimizer skips parameters without gradients, so the step
        is a no-op). The gradients are already all-reduced, hence identical on every rank, and so is the verdict.
        ZeRO 1-3 check and clip their partitions inside DeepSpeed: (None, True) here."""
        if self.cfg.train.deepspeed.zero_stage != 0 or not self.engine.is_gradient_accumulation_boundary():
            return None, True
        if self._inf_grad_at == self.step + 1:
            with torch.no_grad():  # fault injection for the tests (every rank: gradients are all-reduced by now)
                self.params[0].grad.view(-1)[0] = float("inf")
        norm, finite = clip_and_check_grads([p.grad for p in self.params if p.grad is not None],
                                            self.cfg.train.grad_clip)
        if not finite:
            for p in self.params:
                p.grad = None
        return norm, finite

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accum` finite micro batches.

        A micro batch whose loss is non-finite on any rank is dropped on every rank (no backward, no engine step);
        an accumulated gradient that is non-finite makes the optimizer skip the step (ZeRO 1-3 do it themselves,
        stage 0 here). Both count as bad steps; `train.max_bad_steps` in a row stop the run.
        """
        losses: list[float] = []
        grads_ok, grad_norm = True, None
        while len(losses) < self.accum:
            loss, ok = self._micro_step()
            if not ok:
                self.bad_step("non-finite loss, micro batch dropped")
                continue
            losses.append(loss)
            norm, finite = self._check_and_clip()
            grads_ok = grads_ok and finite
            grad_norm = norm if norm is not None else grad_norm
            self.engine.step()
        applied = self.engine.was_step_applied() and grads_ok
        if self._nan_weight_at == self.step + 1:
            with torch.no_grad():  # fault injection for the tests
                self.params[0].view(-1)[0] = float("nan")
        if applied:
            self.good_step()
        else:
            self.bad_step("non-finite gradient, optimizer step skipped")
        self.step += 1
        self.ema.after_step(self.step, applied)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        metrics = {"loss": sum(losses) / len(losses)}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, header: dict[str, Any]) -> None:
    """Write EMA weights with the `ditstack` metadata, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(".tmp-" + path.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"ditstack": json.dumps(header)})
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Optional[list[str]] = None) -> int:
    """Run the DiT trainer; returns the exit status."""
    from eval.inception import InceptionWeightsMissing

    return run_main(Trainer, __doc__.split("\n")[0], argv, input_errors=(InceptionWeightsMissing,))


if __name__ == "__main__":
    exit_now(main())
