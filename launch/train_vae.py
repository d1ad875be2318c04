"""Train the KL autoencoder (reconstruction + KL + LPIPS + PatchGAN) on image shards, with exact resume.

    python launch/train_vae.py --config configs/vae/mnist_tiny.yaml [--set train.max_steps=600] [--resume auto]
    torchrun --nproc_per_node 8 launch/train_vae.py --config ...     srun python launch/train_vae.py --config ...

It shares the DiT trainer's machinery: the config schema (`vae` section + `train`/`data`), distributed setup,
checkpoint directories with `latest`, per-rank RNG/data positions, JSONL/wandb metrics, SIGUSR1/SIGTERM
preemption. The GAN needs two optimizers stepping on different losses, which does not fit DeepSpeed's one-engine
design, so this trainer uses plain torch: AdamW for the autoencoder and the discriminator, with gradients averaged
over ranks by one flattened all-reduce per model and step (no DDP wrapper: the LDM adaptive weight takes
`autograd.grad` of the last decoder layer, and the discriminator runs in both the generator and its own pass).

Outputs in the run directory: checkpoints/step_%07d/ (meta.json, vae.safetensors — EMA weights when
train.ema_decay > 0, loadable by launch.vae_io.load_vae —, trainer_state.pt, rank/), grids/step_%07d.png (originals
above reconstructions), log.jsonl (every loss component separately), and vae.safetensors at the end, with the
latent channels, downsampling factor, latent shape and per-channel latent statistics in its metadata.

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
from typing import Any, Dict, Iterator, List, Optional

if __package__ in (None, ""):  # `python launch/train_vae.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from launch import checkpoint as ckpt_io
from launch.builders import batch_layout, data_record
from launch.config import Config, ConfigError, add_config_args, config_from_args, config_to_dict
from launch.distributed import DistInfo, barrier, cleanup, init_distributed
from launch.run_utils import (EXIT_FAILED, EXIT_PREEMPTED, MetricsSink, PreemptionFlag, rng_state,
                              seed_everything, set_rng_state, setup_logging, truncate_jsonl)

log = logging.getLogger("launch.train_vae")

EXIT_CONFIG = 2
STATE_FILE = "trainer_state.pt"
STATS_IMAGES = 1024  # images encoded for the exported per-channel latent statistics
GRID_IMAGES = 16


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says why."""


# ------------------------------------------------------------------------------------------------ builders
def vae_kwargs(cfg: Config, manifest: dict) -> Dict[str, Any]:
    """AutoencoderKL constructor kwargs from the `vae` section and the image manifest; ConfigError when invalid."""
    v = cfg.vae
    if manifest.get("kind", "image") != "image":
        raise ConfigError(f"data.shards: the VAE trains on image shards, these are {manifest.get('kind')!r}")
    if v.base_channels <= 0 or not v.channel_mult or any(m <= 0 for m in v.channel_mult):
        raise ConfigError(f"vae.base_channels/vae.channel_mult must be positive, got {v.base_channels}, "
                          f"{v.channel_mult}")
    if v.num_res_blocks <= 0 or v.z_channels <= 0:
        raise ConfigError("vae.num_res_blocks and vae.z_channels must be > 0")
    factor = 2 ** (len(v.channel_mult) - 1)
    size = int(manifest["image_size"])
    if size % factor:
        raise ConfigError(f"vae.channel_mult has {len(v.channel_mult)} levels (downsampling {factor}), which does "
                          f"not divide the image size {size}")
    return dict(in_channels=int(manifest["channels"]), base_channels=v.base_channels,
                channel_mult=list(v.channel_mult), num_res_blocks=v.num_res_blocks, z_channels=v.z_channels,
                attn_mid=v.mid_attention, dropout=0.0, num_groups=math.gcd(32, v.base_channels))


def disc_kwargs(cfg: Config, channels: int) -> Dict[str, Any]:
    """PatchDiscriminator kwargs. GroupNorm, not LDM's BatchNorm: real and fake batches then do not share batch
    statistics, and the result is independent of the per-rank batch split and of gradient accumulation."""
    if cfg.vae.disc_channels <= 0 or cfg.vae.disc_layers <= 0:
        raise ConfigError("vae.disc_channels and vae.disc_layers must be > 0")
    return dict(in_channels=channels, base_channels=cfg.vae.disc_channels, n_layers=cfg.vae.disc_layers,
                norm="group")


def _versions() -> Dict[str, str]:
    return {"torch": torch.__version__, "python": sys.version.split()[0]}


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def _allreduce_grads(params: List[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of `params` over ranks with one flattened all-reduce (missing grads count as 0)."""
    if world <= 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _grads_finite(params: List[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def _all_true(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


# ------------------------------------------------------------------------------------------------- trainer
class VAETrainer:
    """One VAE training run: autoencoder + discriminator, their optimizers, EMA, data stream and checkpoints."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resume: Optional[str]) -> None:
        from data_pipeline.loader import build_stream
        from dit.ema import EMA
        from dit.vae import AutoencoderKL, PatchDiscriminator
        from dit.vae_loss import VAELoss
        from launch.vae_io import build_perceptual

        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.ckpt_root = run_dir / "checkpoints"
        self.resume_from = ckpt_io.resolve_resume(resume, self.ckpt_root)
        self.micro, self.accum = batch_layout(cfg, info.world_size)
        if not cfg.data.shards:
            raise ConfigError("data.shards is empty: set it to an image shard directory (with manifest.json)")
        if cfg.vae.grid_every < 0 or cfg.vae.disc_start < 0:
            raise ConfigError("vae.grid_every and vae.disc_start must be >= 0")
        meta = ckpt_io.read_meta(self.resume_from) if self.resume_from else None
        if meta is not None and meta.get("format") != "ditstack-vae-train-1":
            raise ckpt_io.CheckpointError(f"{self.resume_from}: not a VAE training checkpoint "
                                          f"(format {meta.get('format')!r})")
        positions = meta.get("positions") if meta and meta.get("world_size") == info.world_size else None
        if meta is not None and positions is None:
            log.warning("checkpoint was written by %s ranks, this run has %s: the data stream restarts at the "
                        "beginning of epoch %s", meta.get("world_size"), info.world_size, meta.get("epoch"))
        self.stream = build_stream(
            cfg.data.shards, batch_size=self.micro, rank=info.rank, world_size=info.world_size,
            num_workers=cfg.data.num_workers, seed=cfg.train.seed, mode=cfg.data.mode,
            shuffle_buffer=cfg.data.shuffle_buffer, flip=cfg.data.flip,
            position=positions[info.rank] if positions else (
                {"epoch": meta.get("epoch", 0), "batch": 0} if meta else None))
        manifest = self.stream.manifest
        self.model_kwargs = vae_kwargs(cfg, manifest)
        self.disc_kwargs = disc_kwargs(cfg, self.model_kwargs["in_channels"])
        self.data_info = data_record(manifest)
        self.image_size = int(manifest["image_size"])
        if meta is not None and (meta.get("vae") != self.model_kwargs or meta.get("disc") != self.disc_kwargs):
            raise ckpt_io.CheckpointError(f"{self.resume_from}: the checkpoint's VAE {meta.get('vae')} / "
                                          f"discriminator {meta.get('disc')} do not match this config's "
                                          f"{self.model_kwargs} / {self.disc_kwargs}")

        p = cfg.vae.perceptual
        perceptual = build_perceptual(p.net, p.pretrained, info.device) if p.weight > 0 else None
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        dev = info.device
        self.model = AutoencoderKL(**self.model_kwargs).to(dev)
        self.disc = PatchDiscriminator(**self.disc_kwargs).to(dev)
        self.loss_fn = VAELoss(perceptual=perceptual, rec_loss=cfg.vae.rec_loss, kl_weight=cfg.vae.kl_weight,
                               perceptual_weight=p.weight, disc_weight=cfg.vae.disc_weight,
                               disc_start=cfg.vae.disc_start, disc_loss=cfg.vae.disc_loss)
        t = cfg.train
        self.g_params = list(self.model.parameters())
        self.d_params = list(self.disc.parameters())
        self.opt_g = torch.optim.AdamW(self.g_params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                                       weight_decay=t.weight_decay)
        self.opt_d = torch.optim.AdamW(self.d_params, lr=cfg.vae.disc_lr or t.lr, betas=tuple(t.betas),
                                       eps=t.adam_eps, weight_decay=t.weight_decay)
        # EMA with warm-up: a VAE run is short next to a DiT run, so early averages must not keep the init
        self.ema = EMA(self.model, t.ema_decay, warmup=True) if t.ema_decay > 0 else None

        self.step, self.nonfinite_total, self.bad_in_a_row = 0, 0, 0
        self.iterator: Iterator = iter(self.stream)
        # private RNG for posterior samples, saved per rank so a resume reproduces the run exactly
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(t.seed * 1_000_003 + info.rank)
        if self.resume_from is not None:
            self._load(self.resume_from, meta)
        else:
            seed_everything(t.seed + info.rank)
        self.sink = MetricsSink(run_dir, info.is_main, config_to_dict(cfg), t.wandb, t.wandb_project)
        if info.is_main:
            truncate_jsonl(self.sink.path, self.step)

    # ---------------------------------------------------------------------------------------------- helpers
    def _lr_scale(self, step: int) -> float:
        w = self.cfg.train.warmup_steps
        return min(1.0, (step + 1) / w) if w > 0 else 1.0

    def latent_record(self, stats: Optional[dict] = None) -> Dict[str, Any]:
        """What the latent manifest and the DiT checkpoint need to know about this VAE."""
        return {"channels": self.model.latent_channels, "downsample": self.model.downsample,
                "shape": list(self.model.latent_shape(self.image_size)), "stats": stats}

    def export_module(self) -> torch.nn.Module:
        """The weights that get exported: the EMA copy when EMA is on, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    # -------------------------------------------------------------------------------------- checkpointing
    def _meta(self) -> Dict[str, Any]:
        positions: List[Any] = [None] * self.info.world_size
        position = self.stream.position()
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_gather_object(positions, position)
        else:
            positions = [position]
        return {
            "format": "ditstack-vae-train-1", "kind": "vae", "step": self.step, "epoch": position.get("epoch", 0),
            "world_size": self.info.world_size, "positions": positions, "config": config_to_dict(self.cfg),
            "vae": self.model_kwargs, "disc": self.disc_kwargs, "data": self.data_info,
            "latent": self.latent_record(), "ema": self.ema is not None, "nonfinite_steps": self.nonfinite_total,
            "corrupt_samples": int(getattr(self.stream, "corrupt_count", 0)), "versions": _versions(),
        }

    def save(self) -> Path:
        """Write a complete checkpoint of the current step (collective); refuses non-finite weights."""
        from launch.vae_io import VAE_FILENAME, save_vae

        finite = all(bool(torch.isfinite(p).all()) for p in self.g_params + self.d_params)
        if not _all_true(finite, self.info.device):
            raise TrainingStopped(f"non-finite weights at step {self.step}: refusing to write a checkpoint")
        tmp = ckpt_io.begin_save(self.ckpt_root, self.step, self.info.is_main)
        ckpt_io.save_rank_state(tmp, self.info.rank, {
            "rng": rng_state(), "gen": self.gen.get_state(), "position": json.dumps(self.stream.position()),
            "step": self.step, "bad_in_a_row": self.bad_in_a_row})
        meta = self._meta()

        def write_state(tmp_dir: Path) -> None:
            state = {"model": self.model.state_dict(), "disc": self.disc.state_dict(),
                     "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                     "ema": self.ema.state_dict() if self.ema is not None else None}
            torch.save(state, tmp_dir / STATE_FILE)
            save_vae(tmp_dir / VAE_FILENAME, self.model, image_size=self.image_size, step=self.step,
                     state_dict=self.export_module().state_dict(), extra={"ema": self.ema is not None})

        final = ckpt_io.finish_save(self.ckpt_root, tmp, self.step, meta, self.cfg.train.keep_last,
                                    self.info.is_main, write_extra=write_state)
        log.info("checkpoint written: %s", final)
        return final

    def _load(self, path: Path, meta: dict) -> None:
        file = path / STATE_FILE
        if not file.is_file():
            raise ckpt_io.CheckpointError(f"{path}: no {STATE_FILE}; not a VAE training checkpoint")
        state = torch.load(file, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            if state.get("ema") is None:
                log.warning("%s has no EMA: the EMA starts from the current weights", path)
                self.ema.module.load_state_dict(self.model.state_dict())
            else:
                self.ema.load_state_dict(state["ema"])
        self.step = int(meta["step"])
        self.nonfinite_total = int(meta.get("nonfinite_steps", 0))
        if meta.get("world_size") == self.info.world_size:
            rank_state = ckpt_io.load_rank_state(path, self.info.rank)
            set_rng_state(rank_state["rng"])
            self.gen.set_state(rank_state["gen"])
            self.bad_in_a_row = int(rank_state.get("bad_in_a_row", 0))
        else:
            seed_everything(self.cfg.train.seed + self.info.rank + 7919 * self.step)
            self.gen.manual_seed(self.cfg.train.seed * 1_000_003 + self.info.rank + 7919 * self.step)
        log.info("resumed from %s at step %d (epoch %s)", path, self.step, meta.get("epoch"))

    # ------------------------------------------------------------------------------------------- training
    def train_step(self) -> Dict[str, float]:
        """One optimizer step of both models over `accum` micro batches; skips (and counts) non-finite steps."""
        cfg, dev = self.cfg, self.info.device
        step = self.step  # 0-based index of this step: the adversarial terms are on when step >= disc_start
        active = self.loss_fn.disc_active(step)
        scale = self._lr_scale(step)
        for group in self.opt_g.param_groups:
            group["lr"] = cfg.train.lr * scale
        for group in self.opt_d.param_groups:
            group["lr"] = (cfg.vae.disc_lr or cfg.train.lr) * scale
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {}
        ok = True
        self._last_batch = None
        for _ in range(self.accum):
            x, _ = next(self.iterator)
            x = x.to(dev, non_blocking=True)
            if self._last_batch is None:
                self._last_batch = x
            # generator pass: the discriminator is frozen so its weights get no gradient from this loss
            self.disc.requires_grad_(False)
            with _autocast(dev, cfg.train.precision):
                mean, logvar = self.model.encode_moments(x)
                z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=self.gen, device=dev,
                                                                 dtype=mean.dtype)
                recon = self.model.decode(z)
                logits_fake = self.disc(recon) if active else None
                g_loss, logs = self.loss_fn.generator_loss(x, recon.float(), mean, logvar, step,
                                                           logits_fake=logits_fake,
                                                           last_layer=self.model.last_layer_weight())
            finite = _all_true(bool(torch.isfinite(g_loss)), dev)
            if finite:
                (g_loss / self.accum).backward()
            ok &= finite
            if active:
                self.disc.requires_grad_(True)
                with _autocast(dev, cfg.train.precision):
                    d_loss, d_logs = self.loss_fn.discriminator_objective(self.disc(x), self.disc(recon.detach()))
                logs.update(d_logs)
                finite = _all_true(bool(torch.isfinite(d_loss)), dev)
                if finite:
                    (d_loss / self.accum).backward()
                ok &= finite
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accum
        _allreduce_grads(self.g_params, self.info.world_size)
        if active:
            _allreduce_grads(self.d_params, self.info.world_size)
        ok = ok and _grads_finite(self.g_params) and (not active or _grads_finite(self.d_params))
        ok = _all_true(ok, dev)
        out = {}
        if ok:
            if cfg.train.grad_clip > 0:
                out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.g_params, cfg.train.grad_clip))
                if active:
                    out["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.d_params, cfg.train.grad_clip))
            self.opt_g.step()
            if active:
                self.opt_d.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.bad_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step + 1,
                        self.bad_in_a_row)
            if self.bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingStopped(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                                      f"{cfg.train.max_bad_steps}): lower train.lr, set train.grad_clip, or resume "
                                      f"from an earlier checkpoint")
        self.step += 1
        out.update(sums)
        out["lr"] = cfg.train.lr * scale
        return out

    # ---------------------------------------------------------------------------------------------- visuals
    @torch.no_grad()
    def save_grid(self, x: torch.Tensor) -> Optional[Path]:
        """Originals above reconstructions (posterior mean, exported weights) for up to 16 images (rank 0)."""
        from launch.reconstruct import save_comparison_grid

        if not self.info.is_main:
            return None
        module = self.export_module()
        was_training = module.training
        module.eval()
        x = x[:GRID_IMAGES]
        rec = module.decode(module.encode(x)[0])
        module.train(was_training)
        return save_comparison_grid(x, rec, self.run_dir / "grids" / f"step_{self.step:07d}.png",
                                    ncol=min(8, x.shape[0]))

    def _fixed_images(self) -> Optional[torch.Tensor]:
        """A fixed held-out batch for the grids (data.val_shards), or None to show the current batch."""
        from launch.reconstruct import iter_shard_images

        if not self.cfg.data.val_shards or not self.info.is_main:
            return None
        for x in iter_shard_images(self.cfg.data.val_shards, GRID_IMAGES):
            return x.to(self.info.device)
        return None

    @torch.no_grad()
    def latent_stats(self) -> Dict[str, Any]:
        """Per-channel mean/std of posterior samples over up to 1024 images (val shards if set, else train)."""
        from launch.reconstruct import iter_shard_images

        module = self.export_module().eval()
        shards = self.cfg.data.val_shards or self.cfg.data.shards
        gen = torch.Generator(device=self.info.device).manual_seed(12345)
        s1 = s2 = None
        n = 0
        for x in iter_shard_images(shards, 64, seed=self.cfg.train.seed):
            x = x[: STATS_IMAGES - n].to(self.info.device)
            mean, std = module.encode(x)
            z = (mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)).double()
            zc = z.transpose(0, 1).reshape(z.shape[1], -1)
            s1 = zc.sum(1) if s1 is None else s1 + zc.sum(1)
            s2 = zc.pow(2).sum(1) if s2 is None else s2 + zc.pow(2).sum(1)
            n += x.shape[0]
            if n >= STATS_IMAGES:
                break
        count = n * z.shape[2] * z.shape[3]
        mu = s1 / count
        sd = (s2 / count - mu.pow(2)).clamp_min(0).sqrt()
        return {"mean": mu.tolist(), "std": sd.tolist(), "of": "posterior samples", "num_images": n,
                "shards": str(shards)}

    def export(self) -> Path:
        """Write RUN/vae.safetensors (exported weights + latent statistics) and, with val shards, their PSNR."""
        from launch.reconstruct import evaluate_reconstruction, iter_shard_images
        from launch.vae_io import VAE_FILENAME, load_vae, save_vae

        stats = self.latent_stats()
        out = save_vae(self.run_dir / VAE_FILENAME, self.model, image_size=self.image_size, step=self.step,
                       latent_stats=stats, state_dict=self.export_module().state_dict(),
                       extra={"ema": self.ema is not None})
        if self.cfg.data.val_shards:
            res = evaluate_reconstruction(load_vae(out, self.info.device),
                                          iter_shard_images(self.cfg.data.val_shards, 64), max_images=STATS_IMAGES)
            self.sink.log(self.step, {"val_psnr": res["psnr"], "val_ssim": res["ssim"],
                                      "val_images": res["num_images"]})
            log.info("held-out reconstruction: PSNR %.2f dB, SSIM %s over %d images", res["psnr"], res["ssim"],
                     res["num_images"])
        return out

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> int:
        """Train to `train.max_steps`; returns the process exit status."""
        cfg, info = self.cfg, self.info
        preempt = PreemptionFlag()
        bar = None
        if info.is_main and cfg.train.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train_vae", dynamic_ncols=True)
        fixed = self._fixed_images() if cfg.vae.grid_every else None
        window: Dict[str, List[float]] = {}
        window_start, window_steps = time.perf_counter(), 0
        last_saved = self.step if self.resume_from else -1
        status = 0
        try:
            while self.step < cfg.train.max_steps:
                metrics = self.train_step()
                for k, v in metrics.items():
                    if math.isfinite(v):
                        window.setdefault(k, []).append(v)
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    self._log(window, window_steps, time.perf_counter() - window_start, bar)
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                if cfg.vae.grid_every and self.step % cfg.vae.grid_every == 0:
                    self.save_grid(fixed if fixed is not None else self._last_batch)
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
                if info.is_main:
                    if cfg.vae.grid_every and self.step % cfg.vae.grid_every != 0 and self.step > 0:
                        self.save_grid(fixed if fixed is not None else self._last_batch)
                    self.export()
                    self._final_visuals()
                barrier()
        finally:
            preempt.restore()
            if bar is not None:
                bar.close()
            self.sink.close()
        return status

    def _log(self, window: Dict[str, List[float]], steps: int, seconds: float, bar: Any) -> None:
        # every rank holds the same keys (the adversarial terms switch on at the same step everywhere)
        keys = sorted(window)
        local = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64,
                             device=self.info.device)
        if dist.is_initialized() and self.info.world_size > 1 and keys:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            local /= self.info.world_size
        record = {k: float(v) for k, v in zip(keys, local.tolist())}
        record.update({"samples_per_s": steps * self.cfg.train.global_batch_size / max(seconds, 1e-9),
                       "step_time": seconds / max(steps, 1), "epoch": self.stream.position().get("epoch", 0),
                       "disc_active": self.loss_fn.disc_active(self.step - 1),
                       "nonfinite_steps": self.nonfinite_total,
                       "corrupt_samples": int(getattr(self.stream, "corrupt_count", 0))})
        self.sink.log(self.step, record)
        if bar is not None:
            shown = {k: f"{record[k]:.4f}" for k in ("rec", "lpips", "kl", "d_loss") if k in record}
            bar.set_postfix(**shown)

    def _final_visuals(self) -> None:
        from launch.visuals import plot_loss_curve, samples_gif

        plot_loss_curve(self.sink.path, self.run_dir / "loss_curve.png", key="rec")
        samples_gif(sorted((self.run_dir / "grids").glob("step_*.png")), self.run_dir / "grids.gif")


# ------------------------------------------------------------------------------------------------ entry point
def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Command-line arguments of the VAE trainer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of the run, if any) "
                                                       "or a checkpoint directory")
    parser.add_argument("--run-dir", default=None, help="run directory (default: train.run_dir)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    """Run the VAE trainer; returns the exit status."""
    from launch.vae_io import LPIPSWeightsMissing

    args = parse_args(argv)
    cfg = config_from_args(args)
    run_dir = Path(args.run_dir or cfg.train.run_dir)
    info = init_distributed(use_deepspeed=False)
    setup_logging(info.rank)
    status = EXIT_FAILED
    try:
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(config_to_dict(cfg), sort_keys=False))
        barrier()
        trainer = VAETrainer(cfg, info, run_dir, args.resume)
        status = trainer.run()
        if status == 0 and info.is_main:
            log.info("done: %d steps; checkpoints in %s, VAE in %s", trainer.step, trainer.ckpt_root,
                     run_dir / "vae.safetensors")
    except ConfigError as err:
        log.error("config error: %s", err)
        status = EXIT_CONFIG
    except (ckpt_io.CheckpointError, LPIPSWeightsMissing) as err:
        log.error("%s", err)
        status = EXIT_CONFIG
    except TrainingStopped as err:
        log.error("training stopped: %s", err)
        status = EXIT_FAILED
    finally:
        cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
