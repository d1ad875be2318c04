"""Config + shard manifest → the keyword arguments that build the model, the diffusion and the DeepSpeed engine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dit.models import DiT_models, preset_kwargs
from eval.config import Config, ConfigError


def data_record(manifest: dict) -> dict:
    """What a checkpoint must remember about its training data (kind, classes, sizes)."""
    return {
        "kind": manifest.get("kind", "image"),
        "class_names": list(manifest.get("class_names") or []),
        "image_size": manifest.get("image_size"),
        "channels": manifest.get("channels"),
    }


def latent_record(manifest: dict) -> Optional[dict]:
    """The latent normalisation block of a latent manifest (None for pixel-space data)."""
    if manifest.get("kind", "image") != "latent":
        return None
    latent = manifest.get("latent")
    if not isinstance(latent, dict) or not {"shape", "shift", "scale"} <= set(latent):
        raise ConfigError("data.shards: latent manifest lacks latent.shape/shift/scale; re-run encode_latents.py")
    return dict(latent)


def model_kwargs(cfg: Config, manifest: dict) -> dict[str, Any]:
    """DiT constructor kwargs: the preset, the config's overrides, and sizes/classes from the manifest."""
    m = cfg.model
    if m.name == "custom":
        kw: dict[str, Any] = {}
    else:
        if m.name not in DiT_models:
            raise ConfigError(f"model.name: unknown model {m.name!r}; valid choices: {', '.join(DiT_models)}, custom")
        kw = dict(preset_kwargs(m.name))
    for key in ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio"):
        value = getattr(m, key)
        if value is not None:
            kw[key] = value
    latent = latent_record(manifest)
    if latent is not None:
        channels, size = int(latent["shape"][0]), int(latent["shape"][1])
    else:
        channels, size = int(manifest["channels"]), int(manifest["image_size"])
    for section in ("sample", "eval"):
        gc = getattr(cfg, section).guide_channels
        if gc != "all" and int(gc) > channels:
            raise ConfigError(f"{section}.guide_channels: {gc} exceeds the {channels} channels of the shards")
    if m.in_channels is not None and m.in_channels != channels:
        raise ConfigError(f"model.in_channels={m.in_channels} but the shards hold {channels} channels")
    if m.input_size is not None and m.input_size != size:
        raise ConfigError(f"model.input_size={m.input_size} but the shards hold {size}x{size} inputs")
    num_classes = len(manifest.get("class_names") or [])
    if m.num_classes is not None:
        if m.num_classes not in (0, num_classes):
            raise ConfigError(f"model.num_classes={m.num_classes} but the shards have {num_classes} classes "
                              f"(use 0 for an unconditional model)")
        num_classes = m.num_classes
    if size % kw["patch_size"]:
        raise ConfigError(f"model.patch_size={kw['patch_size']} does not divide the input size {size}")
    kw.update(input_size=size, in_channels=channels, num_classes=num_classes,
              class_dropout_prob=m.class_dropout_prob if num_classes > 0 else 0.0, learn_sigma=m.learn_sigma,
              conditioning=m.conditioning, qk_norm=m.qk_norm, grad_checkpointing=m.grad_checkpointing)
    return kw


def diffusion_kwargs(cfg: Config) -> dict[str, Any]:
    """The training process as `dit.processes.create_process` kwargs (stored in checkpoints): DDPM without
    respacing (no "objective" key, as checkpoints have always stored it), or flow matching."""
    d = cfg.diffusion
    if d.objective == "flow":
        return {"objective": "flow", "path": d.path, "prediction": d.flow_prediction, "loss_weight": d.loss_weight,
                "time_sampling": d.time_sampling, "logit_mean": d.logit_mean, "logit_std": d.logit_std}
    return {"noise_schedule": d.noise_schedule, "diffusion_steps": d.diffusion_steps,
            "prediction": d.prediction, "learn_sigma": cfg.model.learn_sigma, "loss": d.loss}


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for the global batch on `world_size` ranks."""
    global_bs = cfg.train.global_batch_size
    micro = cfg.train.micro_batch_size or global_bs // world_size
    if micro <= 0 or global_bs % (micro * world_size):
        raise ConfigError(f"train.global_batch_size={global_bs} is not a multiple of micro_batch_size ({micro}) "
                          f"x world size ({world_size})")
    return micro, global_bs // (micro * world_size)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the JSON file of `train.deepspeed.config` under the values this config fixes."""
    base: dict[str, Any] = {}
    if cfg.train.deepspeed.config:
        path = Path(cfg.train.deepspeed.config)
        try:
            base = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"train.deepspeed.config: file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"train.deepspeed.config: {path} is not valid JSON ({err})") from None
    micro, accum = batch_layout(cfg, world_size)
    bf16_comm = cfg.train.deepspeed.grad_comm_dtype == "bf16"
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = cfg.train.deepspeed.zero_stage
    base.update({
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # bf16 runs as autocast over fp32 master weights: the EMA and the optimizer see full precision.
        # DeepSpeed's own `torch_autocast` opens the autocast inside the engine's forward. An autocast around
        # `engine(...)` instead is switched *off* by DeepSpeed on GPUs (its `autocast_if_enabled` sees it through
        # the no-argument `torch.is_autocast_enabled()`, which reads CUDA's state, and, with this section absent,
        # disables autocast inside the engine), so bf16 runs would silently train in fp32 there.
        # Gradients are reduced in `train.deepspeed.grad_comm_dtype`: fp32 by default (as the official DiT's DDP);
        # bf16 halves the bytes per step, which is what bounds a multi-node step (benchmarks/RESULTS.md). Under
        # torch_autocast, ZeRO 1-3 take the dtype per parameter from `lower_precision_safe_modules` (absent:
        # DeepSpeed's Linear/Conv list in bf16; []: none) and ignore `communication_data_type`, which ZeRO-0 uses.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16",
                           **({} if bf16_comm else {"lower_precision_safe_modules": []})},
        "communication_data_type": "bf16" if bf16_comm else "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": base.get("steps_per_print", 10**9),
    })
    return base
