"""One config schema for every entry point: YAML files validated into dataclasses.

A config file may `include:` other YAML files (paths relative to the including file); they are merged in order and
the including file wins. Every entry point also takes `--set section.key=value` overrides, parsed as YAML scalars.
An unknown key, a wrong type or an invalid choice raises `ConfigError` with one line naming the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """A config problem, described in one line that names the offending key or file."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The DiT: a registry name plus optional overrides of its architecture."""

    name: str = "DiT-S/2"  # a preset (DiT-S/2 … DiT-XL/8) or 'custom' (then hidden_size, depth, num_heads, patch_size)
    input_size: Optional[int] = None  # None: taken from the data manifest (image or latent size)
    in_channels: Optional[int] = None  # None: taken from the data manifest
    num_classes: Optional[int] = None  # None: number of classes in the manifest (0 = unconditional)
    hidden_size: Optional[int] = None  # None: the preset's value
    depth: Optional[int] = None  # None: the preset's value
    num_heads: Optional[int] = None  # None: the preset's value
    patch_size: Optional[int] = None  # None: the preset's value
    mlp_ratio: Optional[float] = None  # None: the preset's value (4.0)
    class_dropout_prob: float = 0.1  # label dropout to the null class (enables classifier-free guidance)
    learn_sigma: bool = True  # predict the variance too (hybrid loss with the VLB term, as DiT/ADM)
    conditioning: Literal["adaln_zero", "adaln", "cross_attn", "in_context"] = "adaln_zero"  # how t and y enter the blocks (the paper's four variants)
    qk_norm: bool = False  # LayerNorm on queries and keys (stabilises long bf16 runs)
    grad_checkpointing: bool = False  # recompute activations in backward (~40% of the memory, ~1.3x the time)


@dataclass
class DiffusionConfig:
    """Gaussian diffusion used for training (sampling settings live in `sample` and `eval`)."""

    noise_schedule: Literal["linear", "cosine"] = "linear"  # linear: betas 1e-4..2e-2 (DiT); cosine: Nichol & Dhariwal
    diffusion_steps: int = 1000  # T of the training process
    prediction: Literal["eps", "v", "x0"] = "eps"  # what the network predicts
    loss: Literal["mse", "l1"] = "mse"  # loss on the prediction (plus the VLB term when learn_sigma)


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    shards: str = ""  # a directory with manifest.json, or a brace pattern
    val_shards: Optional[str] = None  # held-out shards (VAE reconstruction, reference statistics)
    mode: Literal["exact", "resampled"] = "exact"  # exact epochs (every sample once) or shards drawn with replacement
    num_workers: int = 2  # DataLoader worker processes per rank (0: decode in the training process)
    shuffle_buffer: int = 1000  # samples mixed across shards within a rank's stream
    flip: bool = True  # random horizontal flips (latents: the stored flipped twin)


@dataclass
class DeepSpeedConfig:
    """Engine settings; `config` (a JSON path) is merged under the values derived from this section."""

    zero_stage: Literal[0, 1, 2, 3] = 2  # ZeRO stage: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters sharded
    config: Optional[str] = None  # extra DeepSpeed JSON (e.g. configs/deepspeed/zero3.json); this section's values win
    grad_comm_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduction dtype; bf16 halves the traffic (multi-node)


@dataclass
class TrainConfig:
    """The optimisation recipe (defaults: the DiT paper) and the run's bookkeeping."""

    run_dir: str = "runs/default"  # checkpoints, logs, sample grids go here (--run-dir overrides)
    seed: int = 0  # seeds weights, data order, noise; a resumed run continues the same streams
    max_steps: int = 400_000  # optimizer steps to train for
    global_batch_size: int = 256  # samples per optimizer step over all ranks
    micro_batch_size: Optional[int] = None  # per rank; None: global / world (no accumulation)
    lr: float = 1e-4  # AdamW learning rate (constant after warmup)
    warmup_steps: int = 0  # linear warmup steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW weight decay (DiT: none)
    grad_clip: float = 0.0  # 0 disables clipping (the official DiT recipe does not clip)
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16: autocast over fp32 master weights; fp32: exact (resume tests)
    tf32: bool = True  # on GPUs (Ampere+): fp32 matmuls/convolutions in TF32 (fp32 runs, grids, eval); false: exact fp32
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema_decay: float = 0.9999  # EMA of the weights; samples, eval and exports use it
    ema_every: int = 1  # DiT trainer: fold the weights into the EMA every k steps with ema_decay**k (1: the recipe)
    compile: bool = False  # torch.compile the model through DeepSpeed's engine.compile()
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    log_every: int = 50  # log the all-reduced loss, lr, grad norm, throughput every N steps
    ckpt_every: int = 5000  # checkpoint every N steps (and at the end, and on SIGUSR1/SIGTERM)
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    sample_every: int = 5000  # 0 disables the grid of EMA samples
    sample_per_class: int = 4  # grid: samples per class (unconditional: 4 x this many)
    sample_max_classes: int = 10  # grid: at most this many classes (the first ones)
    eval_every: int = 0  # 0 disables the in-training small-N evaluation
    eval_num_samples: int = 1000  # samples of the in-training evaluation
    wandb: bool = True  # respects WANDB_MODE; offline when no API key is configured
    wandb_project: str = "ditstack"  # wandb project name
    progress: bool = True  # rank 0: tqdm bar on a terminal, else one log line per train.log_every steps
    dist_timeout_minutes: float = 60.0  # collective timeout; rank 0 alone writes grids and finishes checkpoints while the others wait


@dataclass
class SampleConfig:
    """Sampling settings for grids during training and for launch/sample.py."""

    sampler: Literal["ddpm", "ddim"] = "ddim"  # sampler of the training grids and launch/sample.py
    steps: int = 50  # sampling steps (respaced)
    eta: float = 0.0  # DDIM eta (0: deterministic)
    cfg_scale: float = 4.0  # classifier-free guidance scale (1: no guidance)
    guide_channels: str = "all"  # "all" or an int: how many leading channels CFG guides (official DiT: 3)
    guidance_interval: Optional[list[float]] = None  # [t_lo, t_hi] in training timesteps
    seed: int = 0  # seed of the grid's noise


@dataclass
class EvalConfig:
    """FID-style evaluation settings (eval/fid.py)."""

    num_samples: int = 50_000  # N of FID-N
    batch_size: int = 64  # samples per forward on each rank
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # DiT's FID-50K: DDPM with 250 steps
    steps: int = 250  # sampling steps (respaced)
    eta: float = 0.0  # DDIM eta
    cfg_scale: float = 1.5  # DiT's FID-50K setting
    guide_channels: str = "all"  # "all", or 3 to reproduce the official DiT numbers exactly
    guidance_interval: Optional[list[float]] = None  # [t_lo, t_hi]: guide only there
    seed: int = 0  # sample i is drawn from a seed derived from (seed, i)
    ref: Optional[str] = None  # reference statistics (.npz from eval/reference.py, or ADM's reference batch)
    inception_weights: Optional[str] = None  # local Inception weights file (default: the torch hub cache)
    metrics: list[str] = field(default_factory=lambda: ["fid", "is"])  # of fid, is, kid, pr ([] : no Inception)
    classifier: Optional[Literal["mnist"]] = None  # offline quality metric: accuracy + Frechet distance of a classifier
    dtype: Literal["fp32", "bf16"] = "fp32"  # model dtype while sampling (recorded beside the number)


@dataclass
class PerceptualConfig:
    """LPIPS perceptual loss of the VAE."""

    weight: float = 1.0  # lambda of the LPIPS term
    net: Literal["vgg", "alex", "squeeze"] = "vgg"  # LPIPS backbone
    pretrained: bool = True  # False: random backbone (tests, offline demo); never a silent fallback


@dataclass
class VAEConfig:
    """The KL autoencoder and its GAN training (launch/train_vae.py)."""

    base_channels: int = 64  # channels of the first encoder level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # per-level multipliers; len-1 downsamplings (factor 2^(len-1))
    num_res_blocks: int = 1  # ResNet blocks per level
    z_channels: int = 4  # latent channels
    mid_attention: bool = False  # self-attention in the middle block
    rec_loss: Literal["l1", "l2"] = "l1"  # reconstruction loss
    kl_weight: float = 1e-6  # beta of the KL term
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    disc_start: int = 10_000  # step at which the PatchGAN loss is switched on
    disc_weight: float = 0.5  # scale of the adaptive adversarial weight
    disc_loss: Literal["hinge", "lsgan"] = "hinge"  # adversarial loss
    disc_channels: int = 64  # PatchGAN width
    disc_layers: int = 3  # PatchGAN depth
    disc_lr: Optional[float] = None  # None: train.lr
    grid_every: int = 500  # save originals vs reconstructions every N steps


@dataclass
class Config:
    """The whole run: every entry point reads the sections it needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)


# ------------------------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it (ints widen to floats)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{key}: invalid value {value!r}; valid choices: {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `2e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and the files it includes, merged (the including file wins)."""
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(p.name for p in stack + (path,))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        if not isinstance(inc, str):
            raise ConfigError(f"{path}: 'include' entries must be file paths, got {inc!r}")
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, stack + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. train.lr=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def config_from_dict(data: dict) -> Config:
    """Validate a plain dict (as read from YAML) into a Config."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, data, "")
    _check_semantics(cfg)
    return cfg


def load_config(path: Optional[str | os.PathLike], overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (with includes), apply `section.key=value` overrides and validate it."""
    data = _read_yaml(Path(path)) if path else {}
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(data)


def _check_semantics(cfg: Config) -> None:
    """Cross-field checks that a type cannot express."""
    from dit.models import DiT_models  # late import: the config module must stay importable on its own

    if cfg.model.name not in DiT_models and cfg.model.name != "custom":
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; valid choices: "
                          f"{', '.join(DiT_models)}, custom")
    if cfg.model.name == "custom":
        missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size")
                   if getattr(cfg.model, k) is None]
        if missing:
            raise ConfigError(f"model.name 'custom' needs model.{', model.'.join(missing)}")
    positive = {"train.max_steps": cfg.train.max_steps, "train.global_batch_size": cfg.train.global_batch_size,
                "train.log_every": cfg.train.log_every, "train.ckpt_every": cfg.train.ckpt_every,
                "train.keep_last": cfg.train.keep_last, "train.ema_every": cfg.train.ema_every,
                "diffusion.diffusion_steps": cfg.diffusion.diffusion_steps,
                "sample.steps": cfg.sample.steps, "eval.steps": cfg.eval.steps, "eval.batch_size": cfg.eval.batch_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if not cfg.train.dist_timeout_minutes > 0:
        raise ConfigError(f"train.dist_timeout_minutes: must be > 0, got {cfg.train.dist_timeout_minutes}")
    if cfg.train.micro_batch_size is not None and cfg.train.micro_batch_size <= 0:
        raise ConfigError(f"train.micro_batch_size: must be > 0, got {cfg.train.micro_batch_size}")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: expected two values in [0, 1), got {cfg.train.betas}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    bad = [m for m in cfg.eval.metrics if m not in ("fid", "is", "kid", "pr")]
    if bad:
        raise ConfigError(f"eval.metrics: unknown metric {bad[0]!r}; valid choices: fid, is, kid, pr")
    for section in ("sample", "eval"):
        gc = getattr(cfg, section).guide_channels
        if gc != "all" and not (gc.isdigit() and int(gc) > 0):
            raise ConfigError(f"{section}.guide_channels: expected 'all' or a positive int, got {gc!r}")
        gi = getattr(cfg, section).guidance_interval
        if gi is not None and (len(gi) != 2 or gi[0] > gi[1]):
            raise ConfigError(f"{section}.guidance_interval: expected [t_lo, t_hi] with t_lo <= t_hi, got {gi}")


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------- CLI
def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add `--config` and repeated `--set section.key=value` to an entry point's parser."""
    parser.add_argument("--config", required=required, help="YAML config (may include other YAML files)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable (e.g. --set train.lr=2e-4)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by parsed `--config`/`--set` args; exits with status 2 and one line on error."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(_fail(f"config error: {err}"))


def _fail(message: str) -> int:
    import sys

    sys.stderr.write(message.rstrip() + "\n")
    return EXIT_CONFIG_ERROR
