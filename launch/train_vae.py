"""Train the KL autoencoder (reconstruction + KL + LPIPS + PatchGAN) on image shards, with exact resume.

    python launch/train_vae.py --config configs/vae/mnist_tiny.yaml [--set train.max_steps=600] [--resume auto]
    torchrun --nproc_per_node 8 launch/train_vae.py --config ...     srun python launch/train_vae.py --config ...

It is a `launch.trainer_base.TrainerBase`, like the DiT trainer: the same config schema (`vae` section +
`train`/`data`), distributed setup, checkpoint directories with `latest`, per-rank RNG/data positions, JSONL/wandb
metrics, SIGUSR1/SIGTERM preemption and exit codes. The GAN needs two optimizers stepping on different losses, which does not fit DeepSpeed's one-engine
design, so this trainer uses plain torch: AdamW for the autoencoder and the discriminator, with gradients averaged
over ranks by one flattened all-reduce per model and step (no DDP wrapper: the LDM adaptive weight takes
`autograd.grad` of the last decoder layer, and the discriminator runs in both the generator and its own pass).

Outputs in the run directory: checkpoints/step_%07d/ (meta.json, vae.safetensors — EMA weights when
train.ema_decay > 0, loadable by data_pipeline.vae_io.load_vae —, trainer_state.pt, rank/), grids/step_%07d.png (originals
above reconstructions), log.jsonl (every loss component separately), and vae.safetensors at the end, with the
latent channels, downsampling factor, latent shape and per-channel latent statistics in its metadata.

Exit status: 0 done, 2 bad config / input, 3 checkpointed after SIGUSR1/SIGTERM (requeue me), 1 other failure.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # `python launch/train_vae.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from data_pipeline.devices import autocast
from data_pipeline.dist_env import DistInfo, all_ranks_true
from data_pipeline.vae_io import VAE_FILENAME, LPIPSWeightsMissing, build_perceptual, load_vae, save_vae
from dit.ema import EMA
from dit.vae import AutoencoderKL, PatchDiscriminator
from dit.vae_loss import VAELoss
from eval.checkpoints import CheckpointError, load_tensors_file
from eval.config import Config, ConfigError
from eval.visuals import plot_loss_curve, samples_gif
from launch.reconstruct import evaluate_reconstruction, iter_shard_images, save_comparison_grid
from launch.trainer_base import TrainerBase, exit_now, run_main

log = logging.getLogger("launch.train_vae")

STATE_FILE = "trainer_state.pt"
STATS_IMAGES = 1024  # images encoded for the exported per-channel latent statistics
GRID_IMAGES = 16


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


# ------------------------------------------------------------------------------------------------- trainer
class VAETrainer(TrainerBase):
    """One VAE training run: autoencoder + discriminator, their optimizers, optional EMA, grids and the export."""

    CHECKPOINT_FORMAT = "ditstack-vae-train-1"
    NAME = "train_vae"

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resume: Optional[str]) -> None:
        if cfg.vae.grid_every < 0 or cfg.vae.disc_start < 0:
            raise ConfigError("vae.grid_every and vae.disc_start must be >= 0")
        super().__init__(cfg, info, run_dir, resume)
        manifest = self.stream.manifest
        self.model_kwargs = vae_kwargs(cfg, manifest)
        self.disc_kwargs = disc_kwargs(cfg, self.model_kwargs["in_channels"])
        self.image_size = int(manifest["image_size"])
        p = cfg.vae.perceptual
        # built from its own fixed seed (global RNG untouched), so the initial weights below match on every rank
        perceptual = build_perceptual(p.net, p.pretrained, info.device) if p.weight > 0 else None
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
        # EMA with warm-up (a VAE run is short next to a DiT run); train.ema_decay = 0 turns it off
        self.ema = EMA(self.model, t.ema_decay, warmup=True) if t.ema_decay > 0 else None
        self._last_batch: Optional[torch.Tensor] = None
        self._fixed: Optional[torch.Tensor] = None
        self.finish_setup()
        if cfg.vae.grid_every:
            self._fixed = self._fixed_images()

    # ---------------------------------------------------------------------------------------------- helpers
    def _lr_scale(self, step: int) -> float:
        w = self.cfg.train.warmup_steps
        return min(1.0, (step + 1) / w) if w > 0 else 1.0

    def current_lr(self) -> Optional[float]:
        return self.cfg.train.lr * self._lr_scale(max(self.step - 1, 0))

    def latent_record(self, stats: Optional[dict] = None) -> Dict[str, Any]:
        """What the latent manifest and the DiT checkpoint need to know about this VAE."""
        return {"channels": self.model.latent_channels, "downsample": self.model.downsample,
                "shape": list(self.model.latent_shape(self.image_size)), "stats": stats}

    def export_module(self) -> torch.nn.Module:
        """The weights that get exported: the EMA copy when EMA is on, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    # -------------------------------------------------------------------------------------- checkpointing
    def model_meta(self) -> Dict[str, Any]:
        return {"kind": "vae", "vae": self.model_kwargs, "disc": self.disc_kwargs,
                "latent": self.latent_record(), "ema": self.ema is not None}

    def weights_finite(self) -> bool:
        params = self.g_params + self.d_params + (list(self.ema.module.parameters()) if self.ema else [])
        return all(bool(torch.isfinite(p).all()) for p in params)

    def write_files(self, tmp: Path) -> None:
        state = {"model": self.model.state_dict(), "disc": self.disc.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        torch.save(state, tmp / STATE_FILE)
        save_vae(tmp / VAE_FILENAME, self.model, image_size=self.image_size, step=self.step,
                 state_dict=self.export_module().state_dict(), extra={"ema": self.ema is not None})

    def load_state(self, path: Path, meta: dict) -> None:
        file = path / STATE_FILE
        if not file.is_file():
            raise CheckpointError(f"{path}: no {STATE_FILE}; not a VAE training checkpoint")
        state = load_tensors_file(file)
        try:
            self.model.load_state_dict(state["model"])
            self.disc.load_state_dict(state["disc"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{file}: not a VAE trainer state of this model ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:160]})") from None
        if self.ema is not None:
            if state.get("ema") is None:
                log.warning("%s has no EMA: the EMA starts from the current weights", path)
                self.ema.module.load_state_dict(self.model.state_dict())
            else:
                self.ema.load_state_dict(state["ema"])

    # ------------------------------------------------------------------------------------------- training
    def _set_lr(self, step: int) -> None:
        scale = self._lr_scale(step)
        for group in self.opt_g.param_groups:
            group["lr"] = self.cfg.train.lr * scale
        for group in self.opt_d.param_groups:
            group["lr"] = (self.cfg.vae.disc_lr or self.cfg.train.lr) * scale

    def _micro_step(self, x: torch.Tensor, step: int, active: bool) -> tuple[bool, Dict[str, Any]]:
        """Generator (and, once active, discriminator) losses and backward on one micro batch; (finite on every
        rank, the loss terms)."""
        dev, low = self.info.device, torch.bfloat16 if self.cfg.train.precision == "bf16" else None
        # generator pass: the discriminator is frozen so this loss gives its weights no gradient
        self.disc.requires_grad_(False)
        with autocast(dev, low):
            mean, logvar = self.model.encode_moments(x)
            eps = torch.randn(mean.shape, generator=self.gen, device=dev, dtype=torch.float32)
            recon = self.model.decode(mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype))
            logits_fake = self.disc(recon) if active else None
            g_loss, logs = self.loss_fn.generator_loss(x, recon.float(), mean, logvar, step, logits_fake=logits_fake,
                                                       last_layer=self.model.last_layer_weight())
        ok = all_ranks_true(bool(torch.isfinite(g_loss)), dev)
        if ok:
            (g_loss / self.accum).backward()
        if active:
            self.disc.requires_grad_(True)
            with autocast(dev, low):
                d_loss, d_logs = self.loss_fn.discriminator_objective(self.disc(x), self.disc(recon.detach()))
            logs.update(d_logs)
            finite = all_ranks_true(bool(torch.isfinite(d_loss)), dev)
            if finite:
                (d_loss / self.accum).backward()
            ok = ok and finite
        return ok, logs

    def train_step(self) -> Dict[str, float]:
        """One optimizer step of both models over `accum` micro batches; skips (and counts) non-finite steps."""
        cfg, dev = self.cfg, self.info.device
        step = self.step  # 0-based index of this step: the adversarial terms are on when step >= disc_start
        active = self.loss_fn.disc_active(step)
        self._set_lr(step)
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
            finite, logs = self._micro_step(x, step, active)
            ok &= finite
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accum
        _allreduce_grads(self.g_params, self.info.world_size)
        if active:
            _allreduce_grads(self.d_params, self.info.world_size)
        ok = ok and _grads_finite(self.g_params) and (not active or _grads_finite(self.d_params))
        out: Dict[str, float] = {}
        if all_ranks_true(ok, dev):
            if cfg.train.grad_clip > 0:
                out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.g_params, cfg.train.grad_clip))
                if active:
                    out["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.d_params, cfg.train.grad_clip))
            self.opt_g.step()
            if active:
                self.opt_d.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.good_step()
        else:
            self.bad_step("non-finite loss or gradient, step skipped")
        self.step += 1
        out.update(sums)
        out["disc_active"] = 1.0 if active else 0.0  # averaged over a log window: the fraction of GAN steps
        return out

    # ---------------------------------------------------------------------------------------------- visuals
    def on_step(self) -> None:
        every = self.cfg.vae.grid_every
        if every and self.step % every == 0:
            self.save_grid()

    @torch.no_grad()
    def save_grid(self) -> Optional[Path]:
        """Originals above reconstructions (posterior mean, exported weights) for up to 16 images (rank 0)."""
        x = self._fixed if self._fixed is not None else self._last_batch
        if not self.info.is_main or x is None:
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
        if not self.cfg.data.val_shards or not self.info.is_main:
            return None
        for x in iter_shard_images(self.cfg.data.val_shards, GRID_IMAGES):
            return x.to(self.info.device)
        return None

    @torch.no_grad()
    def latent_stats(self) -> Dict[str, Any]:
        """Per-channel mean/std of posterior samples over up to 1024 images (val shards if set, else train)."""
        module = self.export_module()
        was_training = module.training
        module.eval()
        shards = self.cfg.data.val_shards or self.cfg.data.shards
        gen = torch.Generator(device=self.info.device).manual_seed(12345)
        s1 = s2 = None
        n = hw = 0
        for x in iter_shard_images(shards, 64, max_images=STATS_IMAGES):
            mean, std = module.encode(x.to(self.info.device))
            z = (mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)).double()
            zc = z.transpose(0, 1).reshape(z.shape[1], -1)
            s1 = zc.sum(1) if s1 is None else s1 + zc.sum(1)
            s2 = zc.pow(2).sum(1) if s2 is None else s2 + zc.pow(2).sum(1)
            n, hw = n + x.shape[0], z.shape[2] * z.shape[3]
        module.train(was_training)
        mu = s1 / (n * hw)
        sd = (s2 / (n * hw) - mu.pow(2)).clamp_min(0).sqrt()
        return {"mean": mu.tolist(), "std": sd.tolist(), "of": "posterior samples", "num_images": n,
                "shards": str(shards)}

    def on_finish(self) -> None:
        """Rank 0: final grid, RUN/vae.safetensors with latent statistics, held-out PSNR/SSIM, pictures."""
        if not self.info.is_main:
            return
        every = self.cfg.vae.grid_every
        if every and self.step % every != 0 and self.step > 0:
            self.save_grid()
        self.export()

        plot_loss_curve(self.sink.path, self.run_dir / "loss_curve.png", key="rec")
        samples_gif(sorted((self.run_dir / "grids").glob("step_*.png")), self.run_dir / "grids.gif")

    def export(self) -> Path:
        """Write RUN/vae.safetensors (exported weights + latent statistics) and, with val shards, their PSNR."""
        out = save_vae(self.run_dir / VAE_FILENAME, self.model, image_size=self.image_size, step=self.step,
                       latent_stats=self.latent_stats(), state_dict=self.export_module().state_dict(),
                       extra={"ema": self.ema is not None})
        if self.cfg.data.val_shards:
            res = evaluate_reconstruction(load_vae(out, self.info.device),
                                          iter_shard_images(self.cfg.data.val_shards, 64, max_images=STATS_IMAGES))
            self.sink.log(self.step, {"val_psnr": res["psnr"], "val_ssim": res["ssim"],
                                      "val_images": res["num_images"]})
            log.info("held-out reconstruction: PSNR %.2f dB, SSIM %.4f over %d images", res["psnr"],
                     res["ssim"] or float("nan"), res["num_images"])
        log.info("VAE written: %s (latents %s)", out, self.latent_record()["shape"])
        return out


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Optional[list] = None) -> int:
    """Run the VAE trainer; returns the exit status (2 for a bad config, input or missing LPIPS weights)."""
    return run_main(VAETrainer, __doc__.split("\n")[0], argv, use_deepspeed=False,
                    input_errors=(LPIPSWeightsMissing,))


if __name__ == "__main__":
    exit_now(main())
