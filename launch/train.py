"""Train a DiT from webdataset shards under DeepSpeed ZeRO, with EMA, exact resume and preemption handling.

    python launch/train.py --config configs/runs/mnist_demo.yaml [--set train.max_steps=2000] [--resume auto]
    torchrun --nproc_per_node 8 launch/train.py --config ...      deepspeed --num_gpus 8 launch/train.py --config ...
    srun python launch/train.py --config ... --resume auto        (one task per GPU; see slurm/)

Exit status: 0 done, 2 bad config / input, 3 checkpointed after SIGUSR1/SIGTERM (requeue me), 1 other failure.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `python launch/train.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: silences its accelerator probe

from data_pipeline.devices import configure_tf32
from data_pipeline.dist_env import DistInfo
from data_pipeline.files import atomic_save_safetensors
from data_pipeline.loader import STREAM_ERRORS, NoReadableSamplesError, ShardError, build_stream
from dit.cpu import accelerate
from dit.models import DiT
from dit.processes import create_process
from dit.repa import REPAModel
from eval.checkpoints import EMA_FILE, CheckpointError, load_safetensors_file
from eval.config import Config, ConfigError, config_to_dict
from eval.fid import evaluate_checkpoint
from eval.inception import InceptionWeightsMissing, resolve_weights
from eval.inference import Generator, default_sampler, flow_options
from eval.visuals import plot_loss_curve, samples_gif, save_image_grid
from launch import optimizer_state
from launch.builders import deepspeed_config, diffusion_kwargs, latent_record, model_kwargs
from launch.deferred import DeferredReadback
from launch.engine_ema import EngineEMA
from launch.loss import training_loss, with_alignment
from launch.repa import EncoderWeightsMissing, FrozenEncoder, load_encoder
from launch.trainer_base import TrainerBase, TrainingStopped, exit_now, run_main, stream_options

log = logging.getLogger("launch.train")


# ------------------------------------------------------------------------------------------------ helpers
# Dense peak FLOP/s per GPU (no sparsity): (bf16 tensor cores, TF32 tensor cores, fp32), from NVIDIA's datasheets.
# More specific names first: the first key found in the device name wins.
_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12, 51.2e12), "H800 PCIe": (756e12, 378e12, 51.2e12),
    "H200 NVL": (835e12, 418e12, 60e12), "H100 NVL": (835e12, 418e12, 60e12),
    "H100": (989e12, 495e12, 67e12), "H200": (989e12, 495e12, 67e12), "H800": (989e12, 495e12, 67e12),
    "GH200": (989e12, 495e12, 67e12), "B200": (2250e12, 1100e12, 80e12), "B100": (1750e12, 875e12, 60e12),
    "A100": (312e12, 156e12, 19.5e12), "A800": (312e12, 156e12, 19.5e12), "L40S": (362e12, 183e12, 91.6e12),
    "A10": (125e12, 62.5e12, 31.2e12), "4090": (165e12, 82.6e12, 82.6e12), "V100": (125e12, 15.7e12, 15.7e12),
}


def _peak_flops(device: torch.device, precision: str, tf32: bool) -> Optional[float]:
    """Peak dense FLOP/s of one device for this precision, for the MFU estimate (None if unknown).

    The environment variable DIT_PEAK_TFLOPS (TFLOP/s per device) overrides the table, e.g. for GPUs it lacks."""
    if os.environ.get("DIT_PEAK_TFLOPS"):
        return float(os.environ["DIT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32_peak, fp32) in _PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else (tf32_peak if tf32 else fp32)
    return None


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _sample_labels(num_classes: int, cfg: Config) -> list[int]:
    if num_classes == 0:
        return [0] * (cfg.train.sample_per_class * 4)
    classes = list(range(min(num_classes, cfg.train.sample_max_classes)))
    return [c for c in classes for _ in range(cfg.train.sample_per_class)]


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


def clip_and_check_grads(grads: list[torch.Tensor], max_norm: float,
                         host_reads: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over full gradients: their global L2 norm and whether they are all finite (0-dim tensors on the
    gradients' device), clipping them in place when `max_norm > 0`.

    This replaces two passes at ZeRO stage 0 (a non-finite check, then DeepSpeed's `clip_grad_norm_`). The norm
    is the root of the summed squares, as DeepSpeed computes it (up to fp32 summation order); it is non-finite
    exactly when a gradient is (or when the sum of squares overflows fp32, which no trainable step survives
    either). When `max_norm > 0` and the norm is finite, the gradients are scaled by min(1, max_norm / (norm +
    1e-6)), DeepSpeed's coefficient; non-finite gradients are left as they are (the step is skipped).
    `host_reads` (default: on the CPU) lets the host read the coefficient to skip the pass when nothing is
    clipped; otherwise (GPUs) nothing waits for the device: the coefficient is applied there (a factor of 1
    changes nothing).
    """
    if not grads:
        return torch.zeros(()), torch.ones((), dtype=torch.bool)
    total = _grad_sum_of_squares(grads).sqrt()
    finite = torch.isfinite(total)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if total.device.type == "cpu" if host_reads is None else host_reads:
            # the host holds the value already: skip the pass over the gradients when nothing is clipped
            if bool(finite) and float(coef) < 1.0:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        else:
            torch._foreach_mul_(grads, torch.where(finite, coef, torch.ones_like(coef)).to(grads[0].dtype))
    return total, finite


def _trained_flops_per_sample(model: torch.nn.Module) -> float:
    """Forward FLOPs per sample of what the optimizer trains, for the MFU: the DiT, and REPA's projector (the
    frozen encoder's forward is not counted)."""
    if isinstance(model, REPAModel):
        return model.dit.model_flops_per_sample() + model.projector_flops_per_sample()
    return model.model_flops_per_sample()


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

    CHECKPOINT_FORMAT = "ditstack-train-2"  # 2: optim/ (any number of ranks) instead of DeepSpeed's ds/
    NAME = "train"
    FORMAT_HINTS = {"ditstack-train-1": ": written by an earlier ditstack (DeepSpeed pickles, same number of ranks "
                                        "only); resume it with that version, or start a new run from its "
                                        "ema.safetensors"}

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resume: Optional[str]) -> None:
        import deepspeed

        super().__init__(cfg, info, run_dir, resume)
        manifest = self.stream.manifest
        self.model_kwargs = model_kwargs(cfg, manifest)
        self.diffusion_kwargs = diffusion_kwargs(cfg)
        self.latent = latent_record(manifest)
        self.num_classes = self.model_kwargs["num_classes"]
        dit = DiT(**self.model_kwargs)
        if info.device.type == "cpu":
            accelerate(dit)  # dit.cpu: bf16 speed-ups on a CPU; the plain model's parameters and results
        self.diffusion = create_process(**self.diffusion_kwargs)
        self.encoder: Optional[FrozenEncoder] = None  # REPA: the frozen encoder, the last forward's projection
        self._projected: Optional[torch.Tensor] = None
        model = self._setup_repa(dit) if cfg.repa.enabled else dit
        # fused: one kernel for all parameters on GPUs (and CPUs), and it can skip a step on the device
        # (`found_inf`, see `_check_and_clip`)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay, fused=True)
        self.optimizer = optimizer
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
        # the EMA, the exports and the samples hold the DiT alone (REPA's projector is not part of the sampler)
        self.ema = EngineEMA(self._dit_module(), cfg.train.ema_decay, cfg.train.ema_every)
        self.flops_per_sample = 3.0 * _trained_flops_per_sample(model)
        self.tf32 = configure_tf32(info.device, cfg.train.tf32)
        self.peak_flops = _peak_flops(info.device, cfg.train.precision, self.tf32)
        self._generator = None  # EMA model + VAE for grids and evaluation, built on first use
        self._data_failure: Optional[tuple[str, str]] = None  # why this rank has no data (see `_next_batch`)
        if cfg.train.eval_every and cfg.eval.metrics:  # fail now, not hours into the run

            if set(cfg.eval.metrics) & {"fid", "kid", "pr"} and not (cfg.eval.ref and Path(cfg.eval.ref).is_file()):
                raise ConfigError(f"eval.ref: {cfg.eval.metrics} need reference statistics, got {cfg.eval.ref!r} "
                                  f"(make them with python eval/reference.py --shards DIR --out ref.npz)")
            resolve_weights(cfg.eval.inception_weights)
        self.finish_setup()
        # the step's bookkeeping lives on the device (see `train_step`, `step_end`)
        dev = info.device
        self.bad_run = torch.tensor(self.bad_in_a_row, dtype=torch.long, device=dev)
        self.nonfinite_count = torch.tensor(self.nonfinite_total, dtype=torch.long, device=dev)
        self._applied = torch.ones((), dtype=torch.bool, device=dev)
        self._signal_flag = torch.zeros((), dtype=torch.float64, device=dev)
        self._data_flag = torch.zeros((), dtype=torch.float64, device=dev)
        self._flags = DeferredReadback()
        # The CPU may read step values on the host where that saves work (they are computed already); on a GPU
        # the step never reads one (tests/support/host_reads.py checks it with this set as on a GPU).
        self.host_reads = dev.type == "cpu"

    # ------------------------------------------------------------------------------------------------ REPA
    def _setup_repa(self, dit: DiT) -> REPAModel:
        """REPA: the trained module (DiT + projector on block repa.depth), the frozen encoder and, for latent
        shards, a stream that also yields the source images (see `_next_batch`)."""
        r, manifest = self.cfg.repa, self.stream.manifest  # (repa.depth <= the model's depth: the config checks)
        if manifest.get("kind") == "latent" and not manifest.get("images"):
            raise ConfigError(f"repa.enabled: the latent shards {self.cfg.data.shards} carry no source images for "
                              f"the encoder; re-encode them with data_pipeline/encode_latents.py --keep-images")
        # timm initialises the encoder randomly before its weights are loaded: with the global RNG put back, the
        # projector's initial weights do not depend on the encoder's size (the DiT's are drawn before it anyway)
        with torch.random.fork_rng(devices=[]):
            encoder = load_encoder(r, self.info.device, bf16=self.cfg.train.precision == "bf16")
        model = REPAModel(dit, r.depth, r.projector_dim, encoder.embed_dim)
        self.encoder = encoder
        if manifest.get("kind") == "latent":
            position = self.stream.position()
            self.stream.close()
            self.stream = build_stream(self.cfg.data.shards, position=position, with_images=True,
                                       **stream_options(self.cfg, self.info, self.micro))
        return model

    def _dit_module(self) -> torch.nn.Module:
        """The DiT inside the engine (REPA wraps it with its projector)."""
        module = self.engine.module
        return module.dit if isinstance(module, REPAModel) else module

    def repa_record(self) -> Optional[dict[str, Any]]:
        """The REPA settings a checkpoint records (a resume with others is refused); None without REPA. The
        weights file's path is left out: the same encoder may live elsewhere on another cluster."""
        r = self.cfg.repa
        if not r.enabled:
            return None
        return {"depth": r.depth, "weight": r.weight, "encoder": r.encoder, "projector_dim": r.projector_dim,
                "encoder_resolution": r.encoder_resolution}

    # -------------------------------------------------------------------------------------- checkpointing
    def run_record(self) -> dict[str, Any]:
        return {"tf32": self.tf32, "device": str(self.info.device),
                "device_name": torch.cuda.get_device_name(self.info.device) if self.info.device.type == "cuda" else "cpu"}

    def model_meta(self) -> dict[str, Any]:
        # the ZeRO stage is not part of it: the optimizer state loads at any stage (launch/optimizer_state.py)
        return {"model": self.model_kwargs, "diffusion": self.diffusion_kwargs, "latent": self.latent,
                "repa": self.repa_record()}

    def _header(self) -> dict[str, Any]:
        """The `ditstack` metadata of a consolidated EMA file (see docs/ARCHITECTURE.md)."""
        # the training config travels with the weights: sample.py and fid.py take their defaults from it
        return {"model": self.model_kwargs, "diffusion": self.diffusion_kwargs, "data": self.data_info,
                "latent": self.latent, "step": self.step, "config": config_to_dict(self.cfg)}

    def weights_finite(self) -> bool:
        return _params_finite(self.engine.module) and self.ema.all_finite()

    def checkpoint_meta(self) -> dict[str, Any]:
        # with train.ema_every > 1 the steps not yet folded into the EMA are training state (exact resume)
        return {**super().checkpoint_meta(), "ema_pending": self.ema.pending,
                "optimizer": optimizer_state.describe(self.engine)}

    def save_state(self, tmp: Path) -> None:
        # the optimizer state in a form any number of ranks can load (launch/optimizer_state.py), not DeepSpeed's
        # pickles, which load only on the number of ranks that wrote them
        optimizer_state.save(self.engine, tmp, self.info.rank)
        # rank 0 alone holds the full EMA in host memory, only until `write_files` has written it
        self._ema_state = self.ema.state_dict_on_main(up_to_date=False)  # collective under ZeRO-3

    def write_files(self, tmp: Path) -> None:
        _save_safetensors(self._ema_state, tmp / EMA_FILE, self._header())
        self._ema_state = None

    def load_state(self, path: Path, meta: dict) -> None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path}: meta.json has no optimizer record")
        try:
            optimizer_state.load(self.engine, path, meta["optimizer"])
        except optimizer_state.StateError as err:
            raise CheckpointError(str(err)) from None
        ema_file = path / EMA_FILE
        try:
            self.ema.load_full_state_dict(load_safetensors_file(ema_file), pending=meta.get("ema_pending", 0))
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{ema_file}: EMA weights do not fit this model ({err})") from None

    def export_ema(self, out: Path) -> None:
        """Write the EMA weights as one consolidated safetensors file (collective)."""
        state = self.ema.state_dict_on_main()
        if state is not None:
            _save_safetensors(state, out, self._header())

    # ------------------------------------------------------------------------------------------- sampling
    def _ema_generator(self, everywhere: bool) -> Any:
        """A `eval.inference.Generator` (built on first use, kept on the device) holding the current EMA weights,
        copied device to device (collective under ZeRO-3). `everywhere=False`: rank 0's only (others: None)."""
        needed = everywhere or self.info.is_main
        if needed and self._generator is None:
            model = DiT(**self.model_kwargs).to(self.info.device).eval().requires_grad_(False)
            self._generator = Generator(model, self.diffusion_kwargs, self.data_info, self.latent, self.info.device)
        self.ema.copy_to(self._generator.model if needed else None, everywhere=everywhere)
        return self._generator if needed else None

    def sample_grid(self) -> Optional[Path]:
        """Save a grid of EMA samples with fixed noise and labels (collective for the EMA gather)."""
        generator = self._ema_generator(everywhere=False)
        if generator is None:
            return None
        s = self.cfg.sample
        labels = _sample_labels(self.num_classes, self.cfg)
        images = generator.generate(
            labels=labels, seeds=list(range(len(labels))), steps=s.steps, eta=s.eta,
            sampler=s.sampler or default_sampler(generator.objective, "sample"),
            cfg_scale=s.cfg_scale if self.num_classes else 1.0, guide_channels=s.guide_channels,
            guidance_interval=s.guidance_interval, batch_size=64, **flow_options(s),
            dtype=torch.bfloat16 if self.cfg.train.precision == "bf16" else None)
        out = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_image_grid(images, out, nrow=self.cfg.train.sample_per_class if self.num_classes else 8,
                        transpose=bool(self.num_classes))
        return out

    def evaluate(self) -> Optional[dict]:
        """Small-N evaluation of the EMA weights with the `eval` settings, on every rank (collective)."""
        e = self.cfg.eval
        gen = self._ema_generator(everywhere=True)
        record = evaluate_checkpoint(
            gen, meta=self._header(), num_samples=self.cfg.train.eval_num_samples,
            out=self.run_dir / "eval" / f"step_{self.step:07d}", device=self.info.device, batch_size=e.batch_size,
            sampler=e.sampler, steps=e.steps, eta=e.eta, cfg_scale=e.cfg_scale if self.num_classes else 1.0,
            guide_channels=e.guide_channels, guidance_interval=e.guidance_interval, seed=e.seed, dtype=e.dtype,
            shift=e.shift, atol=e.atol, rtol=e.rtol, last_step=e.last_step,
            metrics=tuple(e.metrics), ref=e.ref, inception_weights=e.inception_weights, classifier=e.classifier,
            classifier_data=self.cfg.data.shards if e.classifier else None, tf32=self.cfg.train.tf32)
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
            plot_loss_curve(self.sink.path, self.run_dir / "loss_curve.png")
            samples_gif(sorted((self.run_dir / "samples").glob("step_*.png")), self.run_dir / "samples.gif")
            log.info("EMA weights: %s", self.run_dir / "model_ema.safetensors")

    def current_lr(self) -> Optional[float]:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------------------------------- training
    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                  force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # bf16: the engine opens the autocast itself (the `torch_autocast` section of its config)
        out = self.engine(x, t, y, force_drop_ids=force_drop_ids)
        if self.encoder is not None:  # REPA: (prediction, projected tokens of block repa.depth)
            out, self._projected = out
        return out.float()

    def _micro_step(self) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro batch; returns its loss terms ("loss", and "repa_loss" under REPA:
        device scalars the host does not read).

        A non-finite loss is multiplied into its own backward as NaN, so this rank's gradients become NaN, the
        gradient reduction carries that to every rank, and every rank skips the optimizer step."""
        x, y, *images = self._next_batch()
        x = x.to(self.info.device, non_blocking=True)
        y = y.to(self.info.device, non_blocking=True)
        # REPA's targets: the frozen encoder's patch features of the clean images (pixel space: x itself)
        features = self.encoder.features(images[0] if images else x, self.engine.module.grid) \
            if self.encoder is not None else None
        loss = training_loss(self._model_fn, self.diffusion, x, y, num_classes=self.num_classes,
                             class_dropout_prob=self.model_kwargs["class_dropout_prob"], generator=self.gen)
        total, terms = with_alignment(loss, self._projected, features, self.cfg.repa.weight)
        self._projected = None
        if self._data_failure is not None:
            total = total * float("nan")  # this rank has no data: every rank skips the step, then all stop together
        total = total * torch.where(torch.isfinite(total), 1.0, float("nan"))  # x1 when finite: the same gradient
        with contextlib.nullcontext() if self.reduce_grads else self.engine.no_sync():
            self.engine.backward(total)
        return {k: v.detach() for k, v in terms.items()}

    def _next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next micro batch (x, y), or (x, y, images) from latent shards under REPA; on a rank whose data is
        unreadable, a placeholder batch (the failure is carried to every rank through the step flags, see
        `step_end`, instead of this rank dying alone mid-collective)."""
        if self._data_failure is None:
            try:
                return next(self.iterator)
            except STREAM_ERRORS as err:
                if self.info.world_size == 1:
                    raise
                self._data_failure = (type(err).__name__, str(err))
        shape = (self.micro, self.model_kwargs["in_channels"], self.model_kwargs["input_size"],
                 self.model_kwargs["input_size"])
        batch: tuple[torch.Tensor, ...] = (torch.zeros(shape), torch.zeros(self.micro, dtype=torch.long))
        if self.encoder is not None and self.latent is not None:
            size, channels = int(self.data_info["image_size"]), int(self.data_info["channels"])
            batch += (torch.zeros((self.micro, channels, size, size), dtype=torch.uint8),)
        return batch

    def _check_and_clip(self) -> Optional[torch.Tensor]:
        """ZeRO-0, before the optimizer step: the grad norm of the full gradients, clipped in place.

        Non-finite gradients make the fused AdamW skip the step on the device (its `found_inf`, the mechanism of
        torch's GradScaler: no update, no step count). The gradients are all-reduced by now, hence identical on
        every rank, and so is the verdict. ZeRO 1-3 check and clip their partitions inside DeepSpeed: None."""
        if self.cfg.train.deepspeed.zero_stage != 0 or not self.engine.is_gradient_accumulation_boundary():
            return None
        norm, finite = clip_and_check_grads([p.grad for p in self.params if p.grad is not None],
                                            self.cfg.train.grad_clip, host_reads=self.host_reads)
        self.optimizer.found_inf = (~finite).float()
        self._applied = finite
        return norm

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `accum` micro batches, queued without waiting for the device.

        Non-finite values skip the step on every rank: a non-finite loss or gradient (ZeRO-0 here, on the
        device; ZeRO 1-3 inside DeepSpeed). The device counts the run of skipped steps; `step_end` reads it one
        step later and stops the run after `train.max_bad_steps` in a row.
        """
        terms: list[dict[str, torch.Tensor]] = []
        grad_norm: Any = None
        for _ in range(self.accum):
            terms.append(self._micro_step())
            norm = self._check_and_clip()
            grad_norm = norm if norm is not None else grad_norm
            self.engine.step()
        if self.cfg.train.deepspeed.zero_stage != 0:
            self._applied = torch.full((), self.engine.was_step_applied(), dtype=torch.bool, device=self.info.device)
            grad_norm = self.engine.get_global_grad_norm()
        applied = self._applied
        self.bad_run = torch.where(applied, torch.zeros_like(self.bad_run), self.bad_run + 1)
        self.nonfinite_count = self.nonfinite_count + (~applied).long()
        self.step += 1
        self.ema.after_step(self.step, applied)
        metrics: dict[str, Any] = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics

    def step_end(self, signal_received: bool) -> bool:
        """After each step (collective): True when the run must stop for a signal; raises `TrainingStopped` after
        `train.max_bad_steps` non-finite steps in a row.

        The verdict is one step late: the flags of step k (signal on any rank, the run of skipped steps) are
        all-reduced on the device and copied to the host asynchronously, and read after step k+1 is queued."""
        self._signal_flag.fill_(1.0 if signal_received else 0.0)  # a kernel argument: no host-to-device copy
        self._data_flag.fill_(1.0 if self._data_failure is not None else 0.0)
        flags = torch.stack([self._signal_flag, self.bad_run.double(), self._data_flag])
        if self.info.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        previous = self._flags.take()
        self._flags.put(flags)
        return self._decide(previous, self.step - 1)

    def flush_step_flags(self) -> bool:
        """Read the flags of the last step (end of the run); returns the signal verdict like `step_end`."""
        return self._decide(self._flags.take(), self.step)

    def _decide(self, flags: Optional[list], step: int) -> bool:
        if flags is None:
            return False
        signal, bad_run = flags[0] > 0, int(flags[1])
        if flags[2] > 0:  # some rank has no readable data: every rank stops here, with that rank's reason
            reasons: list[Optional[tuple[str, str]]] = [None] * self.info.world_size
            dist.all_gather_object(reasons, self._data_failure)
            failed = [r for r in reasons if r]
            message = "; ".join(text for _, text in failed)
            # a missing or short shard is bad input (exit 2); every sample corrupt stops the run (exit 1)
            raise (ShardError if all(kind == "ShardError" for kind, _ in failed) else NoReadableSamplesError)(message)
        if bad_run:
            log.warning("step %d: non-finite loss or gradient, optimizer step skipped (%d in a row)", step, bad_run)
            if bad_run >= self.cfg.train.max_bad_steps:
                raise TrainingStopped(f"{bad_run} non-finite steps in a row (train.max_bad_steps="
                                      f"{self.cfg.train.max_bad_steps}): lower train.lr, enable train.grad_clip or "
                                      f"model.qk_norm, or resume from an earlier checkpoint")
        return signal

    def sync_counters(self) -> None:
        """Bring the device's step counters to the host (checkpoints and logs read them there)."""
        self.bad_in_a_row = int(self.bad_run)
        self.nonfinite_total = int(self.nonfinite_count)


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, header: dict[str, Any]) -> None:
    """Write EMA weights with the `ditstack` metadata, atomically."""
    atomic_save_safetensors(state, path, metadata={"ditstack": json.dumps(header)})


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Optional[list[str]] = None) -> int:
    """Run the DiT trainer; returns the exit status."""
    return run_main(Trainer, __doc__.split("\n")[0], argv, input_errors=(InceptionWeightsMissing,
                                                                          EncoderWeightsMissing))


if __name__ == "__main__":
    exit_now(main())
