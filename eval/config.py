"""One config schema for every entry point: YAML files validated into dataclasses.

A config file may `include:` other YAML files (paths relative to the including file); they are merged in order and
the including file wins. Every entry point also takes `--set section.key=value` overrides, parsed as YAML scalars.
An unknown key, a wrong type, an invalid choice or a number outside its range raises `ConfigError` with one line
naming the key. Every numeric key declares its valid range next to it (`bounded(default, lo, hi)`); the range is
checked after every load (NaN and infinities never pass) and shown in the config reference (launch/config_reference.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from data_pipeline.checks import MAX_CHANNELS, Range, number_arg
from dit.models import DiT_models, preset_kwargs  # late import: the config module must stay importable on its own

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2

# `guide_channels`: "all" or a channel count. YAML reads `3` as an int; the schema accepts both and stores the
# string ("all" / "3"), the form the samplers, the CLIs (--guide-channels) and recorded settings use.
GuideChannels = typing.NewType("GuideChannels", str)

# Upper bounds that catch typos (a value above them is a mistake, not a plan), with the reason shown in the error.
MAX_STEPS = 10**12
STEPS_WHY = "more steps than any run takes: a typo?"
MAX_DIFFUSION_STEPS = 100_000
MAX_BATCH = 2**20
MAX_EVAL_SAMPLES = 10**6
EVAL_SAMPLES_WHY = "rank 0 holds 12 KB of Inception features per sample"
MAX_CFG = 100.0
DDPM_SAMPLER_NAMES = ("ddpm", "ddim")
FLOW_SAMPLER_NAMES = ("euler", "heun", "dopri5", "sde")
SEED_WHY = "seeds are 32-bit: a larger one would alias a smaller one"
SIDE_WHY = "a larger side is more tokens than attention holds"
ETA_WHY = "DDIM: 0 deterministic, 1 DDPM-like; above 1 the update takes the root of a negative number"


class ConfigError(ValueError):
    """A config problem, described in one line that names the offending key or file."""


def bounded(default: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
            why: str = "") -> Any:
    """A dataclass field whose value (each element, for a list; None passes) must lie in lo..hi (ends closed unless
    open); checked by the schema with one line naming the key, and shown in the config reference."""
    meta = {"range": Range(lo, hi, lo_open, hi_open, why)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_range(cls: type, name: str) -> Range:
    """The declared range of the numeric field `name` of the section dataclass `cls` (for CLI flags that mirror it)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata["range"]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The DiT: a registry name plus optional overrides of its architecture."""

    name: str = "DiT-S/2"  # a preset (DiT-S/2 … DiT-XL/8) or 'custom' (then hidden_size, depth, num_heads, patch_size)
    input_size: Optional[int] = bounded(None, 1, 4096, why=SIDE_WHY)  # None: taken from the data manifest (image or latent size)
    in_channels: Optional[int] = bounded(None, 1, MAX_CHANNELS)  # None: taken from the data manifest
    num_classes: Optional[int] = bounded(None, 0, 10**6)  # None: number of classes in the manifest (0 = unconditional)
    hidden_size: Optional[int] = bounded(None, 4, 65536)  # None: the preset's value; a multiple of 4 and of num_heads
    depth: Optional[int] = bounded(None, 1, 1024)  # None: the preset's value
    num_heads: Optional[int] = bounded(None, 1, 1024)  # None: the preset's value; must divide hidden_size
    patch_size: Optional[int] = bounded(None, 1, 64)  # None: the preset's value; must divide the input size
    mlp_ratio: Optional[float] = bounded(None, 0.0, 64.0, lo_open=True)  # None: the preset's value (4.0)
    class_dropout_prob: float = bounded(0.1, 0.0, 1.0)  # label dropout to the null class (enables classifier-free guidance)
    learn_sigma: bool = True  # predict the variance too (hybrid loss with the VLB term, as DiT/ADM)
    conditioning: Literal["adaln_zero", "adaln", "cross_attn", "in_context"] = "adaln_zero"  # how t and y enter the blocks (the paper's four variants)
    qk_norm: bool = False  # LayerNorm on queries and keys (stabilises long bf16 runs)
    grad_checkpointing: bool = False  # recompute activations in backward (~40% of the memory, ~1.3x the time)


@dataclass
class DiffusionConfig:
    """The training process: DDPM (DiT's Gaussian diffusion) or flow matching (SiT / LightningDiT); sampling
    settings live in `sample` and `eval`."""

    objective: Literal["ddpm", "flow"] = "ddpm"  # ddpm: DiT's diffusion (the keys up to `loss`); flow: interpolants (the keys from `path`)
    noise_schedule: Literal["linear", "cosine"] = "linear"  # linear: betas 1e-4..2e-2 (DiT); cosine: Nichol & Dhariwal
    diffusion_steps: int = bounded(1000, 1, MAX_DIFFUSION_STEPS)  # T of the training process (linear schedule: more than 20)
    prediction: Literal["eps", "v", "x0"] = "eps"  # what the network predicts
    loss: Literal["mse", "l1"] = "mse"  # loss on the prediction (plus the VLB term when learn_sigma)
    path: Literal["linear", "gvp", "vp"] = "linear"  # flow: x_t = alpha_t x_data + sigma_t noise (linear: rectified flow, SiT's default)
    flow_prediction: Literal["velocity", "noise", "score"] = "velocity"  # flow: what the network predicts
    loss_weight: Literal["none", "velocity", "likelihood"] = "none"  # flow: weighting of the loss over t (SiT's choices)
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"  # flow: training t (logit_normal: LightningDiT / SD3)
    logit_mean: float = bounded(0.0, -10.0, 10.0)  # flow, logit_normal: mean of logit(t)
    logit_std: float = bounded(1.0, 0.0, 10.0, lo_open=True)  # flow, logit_normal: std of logit(t)


@dataclass
class RemoteDataConfig:
    """How shards behind a remote spec (http(s)://, s3://, gs://, pipe:) are read (data_pipeline/remote.py)."""

    timeout: float = bounded(60.0, 0, 86400, lo_open=True)  # seconds a download may go without data before it is abandoned
    retries: int = bounded(3, 0, 100)  # further attempts after a failed download, then the shard is skipped and counted
    retry_backoff: float = bounded(1.0, 0, 3600)  # seconds before the first retry (doubling, at most 30 s)
    cache_dir: Optional[str] = None  # exact mode's local shard cache (None: $TMPDIR/ditstack-shard-cache-<uid>, node-local on most clusters)
    cache_max_gb: float = bounded(100.0, 0, 10**6, lo_open=True)  # exact mode: least recently used shards evicted above this


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    shards: str = ""  # a directory with manifest.json, or a brace pattern
    val_shards: Optional[str] = None  # held-out shards (VAE reconstruction, reference statistics)
    mode: Literal["exact", "resampled"] = "exact"  # exact epochs (every sample once) or shards drawn with replacement
    num_workers: int = bounded(2, 0, 256)  # DataLoader worker processes per rank (0: decode in the training process)
    shuffle_buffer: int = bounded(1000, 0, 10**6, why="samples held in memory per rank")  # samples mixed across shards within a rank's stream
    flip: bool = True  # random horizontal flips (latents: the stored flipped twin)
    remote: RemoteDataConfig = field(default_factory=RemoteDataConfig)  # remote specs: timeouts, retries, exact-mode cache


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
    seed: int = bounded(0, 0, 2**32 - 1, why=SEED_WHY)  # seeds weights, data order, noise; a resumed run continues the same streams
    max_steps: int = bounded(400_000, 1, MAX_STEPS, why=STEPS_WHY)  # optimizer steps to train for
    global_batch_size: int = bounded(256, 1, MAX_BATCH)  # samples per optimizer step over all ranks
    micro_batch_size: Optional[int] = bounded(None, 1, MAX_BATCH)  # per rank, at most global_batch_size; None: global / world (no accumulation)
    lr: float = bounded(1e-4, 0.0, 1.0, lo_open=True)  # AdamW learning rate (constant after warmup)
    warmup_steps: int = bounded(0, 0, MAX_STEPS, why=STEPS_WHY)  # linear warmup steps
    betas: list[float] = bounded([0.9, 0.999], 0.0, 1.0, hi_open=True)  # AdamW betas
    adam_eps: float = bounded(1e-8, 0.0, 1.0, lo_open=True)  # AdamW epsilon
    weight_decay: float = bounded(0.0, 0.0, 100.0)  # AdamW weight decay (DiT: none)
    grad_clip: float = bounded(0.0, 0.0, 1e6)  # 0 disables clipping (the official DiT recipe does not clip)
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16: autocast over fp32 master weights; fp32: exact (resume tests)
    tf32: bool = True  # on GPUs (Ampere+): fp32 matmuls/convolutions in TF32 (fp32 runs, grids, eval); false: exact fp32
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema_decay: float = bounded(0.9999, 0.0, 1.0, hi_open=True)  # EMA of the weights; samples, eval and exports use it
    ema_every: int = bounded(1, 1, 10**6)  # DiT trainer: fold the weights into the EMA every k steps with ema_decay**k (1: the recipe)
    compile: bool = False  # torch.compile the model through DeepSpeed's engine.compile()
    max_bad_steps: int = bounded(20, 1, 10**6)  # consecutive non-finite steps before the run stops
    log_every: int = bounded(50, 1, MAX_STEPS, why=STEPS_WHY)  # log the all-reduced loss, lr, grad norm, throughput every N steps
    ckpt_every: int = bounded(5000, 1, MAX_STEPS, why=STEPS_WHY)  # checkpoint every N steps (and at the end, and on SIGUSR1/SIGTERM)
    keep_last: int = bounded(3, 1, 10**6)  # complete checkpoints kept (older ones are deleted)
    sample_every: int = bounded(5000, 0, MAX_STEPS, why=STEPS_WHY)  # 0 disables the grid of EMA samples
    sample_per_class: int = bounded(4, 1, 1024)  # grid: samples per class (unconditional: 4 x this many)
    sample_max_classes: int = bounded(10, 1, 10**6)  # grid: at most this many classes (the first ones)
    eval_every: int = bounded(0, 0, MAX_STEPS, why=STEPS_WHY)  # 0 disables the in-training small-N evaluation
    eval_num_samples: int = bounded(1000, 2, MAX_EVAL_SAMPLES, why=EVAL_SAMPLES_WHY)  # samples of the in-training evaluation
    wandb: bool = True  # respects WANDB_MODE; offline when no API key is configured
    wandb_project: str = "ditstack"  # wandb project name
    progress: bool = True  # rank 0: tqdm bar on a terminal, else one log line per train.log_every steps
    dist_timeout_minutes: float = bounded(60.0, 0.0, 10080.0, lo_open=True, why="a week")  # collective timeout; rank 0 alone writes grids and finishes checkpoints while the others wait


@dataclass
class SampleConfig:
    """Sampling settings for grids during training and for launch/sample.py."""

    sampler: Optional[Literal["ddpm", "ddim", "euler", "heun", "dopri5", "sde"]] = None  # None: ddim (DDPM) / heun (flow); ddpm, ddim for DDPM; euler, heun, dopri5, sde for flow
    steps: int = bounded(50, 1, MAX_DIFFUSION_STEPS)  # sampling steps (respaced; at most diffusion.diffusion_steps)
    eta: float = bounded(0.0, 0.0, 1.0, why=ETA_WHY)  # DDIM eta (0: deterministic)
    shift: float = bounded(1.0, 0.0, 100.0, lo_open=True)  # flow: timestep shift of the sampling grid (1: none; > 1 more steps near noise)
    atol: float = bounded(1e-6, 0.0, 1.0, lo_open=True)  # flow, dopri5: absolute tolerance
    rtol: float = bounded(1e-3, 0.0, 1.0, lo_open=True)  # flow, dopri5: relative tolerance
    last_step: Literal["mean", "tweedie", "euler", "none"] = "mean"  # flow, sde: the last step (SiT's choices)
    cfg_scale: float = bounded(4.0, 0.0, MAX_CFG)  # classifier-free guidance scale (1: no guidance)
    guide_channels: GuideChannels = "all"  # "all" or N <= the input channels: how many leading channels CFG guides (official DiT: 3)
    guidance_interval: Optional[list[float]] = bounded(None, 0.0, MAX_DIFFUSION_STEPS)  # [t_lo, t_hi] (t_lo <= t_hi): training timesteps (DDPM) or flow time in [0, 1]
    seed: int = bounded(0, 0, 2**32 - 1, why=SEED_WHY)  # seed of the grid's noise
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # launch/sample.py: model dtype (grids: train.precision)


@dataclass
class EvalConfig:
    """FID-style evaluation settings (eval/fid.py)."""

    num_samples: int = bounded(50_000, 2, MAX_EVAL_SAMPLES, why=EVAL_SAMPLES_WHY)  # N of FID-N
    batch_size: int = bounded(64, 1, 65536)  # samples per forward on each rank
    sampler: Optional[Literal["ddpm", "ddim", "euler", "heun", "dopri5", "sde"]] = None  # None: ddpm (DiT's FID-50K, 250 steps) / sde (SiT's FID-50K, 250 steps)
    steps: int = bounded(250, 1, MAX_DIFFUSION_STEPS)  # sampling steps (respaced; at most diffusion.diffusion_steps)
    eta: float = bounded(0.0, 0.0, 1.0, why=ETA_WHY)  # DDIM eta
    shift: float = bounded(1.0, 0.0, 100.0, lo_open=True)  # flow: timestep shift of the sampling grid (1: none; > 1 more steps near noise)
    atol: float = bounded(1e-6, 0.0, 1.0, lo_open=True)  # flow, dopri5: absolute tolerance
    rtol: float = bounded(1e-3, 0.0, 1.0, lo_open=True)  # flow, dopri5: relative tolerance
    last_step: Literal["mean", "tweedie", "euler", "none"] = "mean"  # flow, sde: the last step (SiT's choices)
    cfg_scale: float = bounded(1.5, 0.0, MAX_CFG)  # DiT's FID-50K setting
    guide_channels: GuideChannels = "all"  # "all", or 3 to reproduce the official DiT numbers exactly
    guidance_interval: Optional[list[float]] = bounded(None, 0.0, MAX_DIFFUSION_STEPS)  # [t_lo, t_hi] (t_lo <= t_hi): guide only there (flow: in [0, 1])
    seed: int = bounded(0, 0, 2**32 - 1, why=SEED_WHY)  # sample i is drawn from a seed derived from (seed, i)
    ref: Optional[str] = None  # reference statistics (.npz from eval/reference.py, or ADM's reference batch)
    inception_weights: Optional[str] = None  # local Inception weights file (default: the torch hub cache)
    metrics: list[str] = field(default_factory=lambda: ["fid", "is"])  # of fid, is, kid, pr ([] : no Inception)
    classifier: Optional[Literal["mnist"]] = None  # offline quality metric: accuracy + Frechet distance of a classifier
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # model dtype while sampling (recorded beside the number)


@dataclass
class PerceptualConfig:
    """LPIPS perceptual loss of the VAE."""

    weight: float = bounded(1.0, 0.0, 100.0)  # lambda of the LPIPS term
    net: Literal["vgg", "alex", "squeeze"] = "vgg"  # LPIPS backbone
    pretrained: bool = True  # False: random backbone (tests, offline demo); never a silent fallback


@dataclass
class VAEConfig:
    """The KL autoencoder and its GAN training (launch/train_vae.py)."""

    base_channels: int = bounded(64, 1, 4096)  # channels of the first encoder level
    channel_mult: list[int] = bounded([1, 2, 4], 1, 64)  # per-level multipliers (1 to 8 levels); len-1 downsamplings (factor 2^(len-1))
    num_res_blocks: int = bounded(1, 1, 64)  # ResNet blocks per level
    z_channels: int = bounded(4, 1, MAX_CHANNELS)  # latent channels
    mid_attention: bool = False  # self-attention in the middle block
    rec_loss: Literal["l1", "l2"] = "l1"  # reconstruction loss
    kl_weight: float = bounded(1e-6, 0.0, 10.0)  # beta of the KL term
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    disc_start: int = bounded(10_000, 0, MAX_STEPS, why=STEPS_WHY)  # step at which the PatchGAN loss is switched on
    disc_weight: float = bounded(0.5, 0.0, 100.0)  # scale of the adaptive adversarial weight
    disc_loss: Literal["hinge", "lsgan"] = "hinge"  # adversarial loss
    disc_channels: int = bounded(64, 1, 4096)  # PatchGAN width
    disc_layers: int = bounded(3, 1, 16)  # PatchGAN depth
    disc_lr: Optional[float] = bounded(None, 0.0, 1.0, lo_open=True)  # None: train.lr
    grid_every: int = bounded(500, 0, MAX_STEPS, why=STEPS_WHY)  # save originals vs reconstructions every N steps


@dataclass
class REPAConfig:
    """REPA (launch/train.py): align block `depth`'s tokens with a frozen image encoder's patch features."""

    enabled: bool = False  # add lambda * REPA loss (negative cosine to the encoder's patch features) to the training loss
    depth: int = bounded(8, 1, 1024)  # k: the 1-based DiT block whose output tokens are projected (REPA: 8 for XL); at most the model's depth
    weight: float = bounded(0.5, 0.0, 100.0)  # lambda of the REPA loss (REPA: 0.5)
    encoder: str = "vit_base_patch14_dinov2.lvd142m"  # a timm model name (built without download, weights from encoder_weights)
    encoder_weights: Optional[str] = None  # local weights file of the encoder (.safetensors or torch state dict); required when enabled
    projector_dim: int = bounded(2048, 1, 65536)  # hidden width of the 3-layer SiLU MLP projector (REPA: 2048)
    encoder_resolution: int = bounded(224, 1, 4096, why=SIDE_WHY)  # images are resized to this side for the encoder (REPA: 224 for DINOv2); a multiple of its patch size


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
    repa: REPAConfig = field(default_factory=REPAConfig)


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
    if tp is GuideChannels:
        return "'all' or int"
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
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue  # the next member of the union may accept it
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is GuideChannels:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not (value == "all" or (value.isdigit() and int(value) > 0)):
            raise ConfigError(f"{key}: expected 'all' or a positive int, got {value!r}")
        return str(int(value)) if value != "all" else value
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


def _check_ranges(obj: Any, prefix: str = "") -> None:
    """Every bounded field of a config and its sections (defaults included) against its declared range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        full = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, full)
            continue
        rng = f.metadata.get("range")
        if rng is None or value is None:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            problem = rng.problem(v)
            if problem:
                raise ConfigError(f"{full}{'' if i is None else f'[{i}]'}: {problem}")


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
    _check_ranges(cfg)
    _check_semantics(cfg)
    return cfg


def load_config(path: Optional[str | os.PathLike], overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Read a YAML config (with includes) over `base` (e.g. a checkpoint's stored config), apply `section.key=value`
    overrides and validate it."""
    data = _deep_merge(base or {}, _read_yaml(Path(path)) if path else {})
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(data)


def _divisors(n: int) -> str:
    """The divisors of n, as a short list for an error message."""
    divs = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ", ".join(divs) if len(divs) <= 10 else ", ".join(divs[:9] + ["...", divs[-1]])


def _check_model(m: ModelConfig) -> None:
    """The architecture the config resolves to (preset values under the overrides) must build a DiT."""
    if m.name not in DiT_models and m.name != "custom":
        raise ConfigError(f"model.name: unknown model {m.name!r}; valid choices: {', '.join(DiT_models)}, custom")
    if m.name == "custom":
        missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(m, k) is None]
        if missing:
            raise ConfigError(f"model.name 'custom' needs model.{', model.'.join(missing)}")
        preset: dict = {}
    else:
        preset = preset_kwargs(m.name)

    def resolved(key: str) -> tuple[int, str]:  # (the value, how a message names it when it is the other side)
        own = getattr(m, key)
        return (own, f"model.{key}={own}") if own is not None else (preset[key], f"the {m.name} preset's {key} "
                                                                                 f"{preset[key]}")

    (hidden, hidden_name), (heads, heads_name) = resolved("hidden_size"), resolved("num_heads")
    if hidden % 4:  # only an explicit model.hidden_size can fail this (every preset passes)
        raise ConfigError(f"model.hidden_size: {hidden} is not a multiple of 4 (the 2-D sin-cos position embedding "
                          f"splits it in four)")
    if hidden % heads:
        why = f"attention splits the hidden size into equal heads; divisors of {hidden}: {_divisors(hidden)}"
        if m.num_heads is not None:
            raise ConfigError(f"model.num_heads: {heads} does not divide {hidden_name} ({why})")
        raise ConfigError(f"model.hidden_size: {hidden} is not divisible by {heads_name}; set model.num_heads "
                          f"too ({why})")
    patch, patch_name = resolved("patch_size")
    if m.input_size is not None and m.input_size % patch:
        if m.patch_size is not None:
            raise ConfigError(f"model.patch_size: {patch} does not divide model.input_size={m.input_size}")
        raise ConfigError(f"model.input_size: {m.input_size} is not a multiple of {patch_name}")


def _check_repa(cfg: Config) -> None:
    """The `repa` section against the model: a block that exists, and the encoder's weights named."""
    r = cfg.repa
    if not r.enabled:
        return
    m = cfg.model
    depth = m.depth if m.depth is not None else (preset_kwargs(m.name)["depth"] if m.name in DiT_models else None)
    if depth is not None and r.depth > depth:
        raise ConfigError(f"repa.depth: {r.depth} exceeds the model's {depth} blocks (1-based block index)")
    if not r.encoder_weights:
        raise ConfigError(f"repa.encoder_weights: required when repa.enabled (a local weights file of "
                          f"{r.encoder!r}; nothing is downloaded)")
    if not r.encoder:
        raise ConfigError("repa.encoder: empty; name a timm model (e.g. vit_base_patch14_dinov2.lvd142m)")


def _check_semantics(cfg: Config) -> None:
    """Cross-field checks that a type or a range cannot express."""
    _check_model(cfg.model)
    _check_repa(cfg)
    d = cfg.diffusion
    if d.noise_schedule == "linear" and d.diffusion_steps <= 20:
        raise ConfigError(f"diffusion.diffusion_steps: {d.diffusion_steps} is too few for the linear schedule (its "
                          f"last beta is 20/T, which must stay below 1: use > 20 steps, or the cosine schedule)")
    t = cfg.train
    if t.micro_batch_size is not None and t.micro_batch_size > t.global_batch_size:
        raise ConfigError(f"train.micro_batch_size: {t.micro_batch_size} exceeds train.global_batch_size="
                          f"{t.global_batch_size}")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas: expected two values in [0, 1), got {t.betas}")
    bad = [m for m in cfg.eval.metrics if m not in ("fid", "is", "kid", "pr")]
    if bad:
        raise ConfigError(f"eval.metrics: unknown metric {bad[0]!r}; valid choices: fid, is, kid, pr")
    if not 1 <= len(cfg.vae.channel_mult) <= 8:
        raise ConfigError(f"vae.channel_mult: expected 1 to 8 levels (len - 1 downsamplings), got "
                          f"{cfg.vae.channel_mult}")
    for section in ("sample", "eval"):
        _check_sampling(getattr(cfg, section), section, cfg)


def _check_sampling(sec: Any, section: str, cfg: Config) -> None:
    """The `sample` or `eval` section against the process and the model."""
    d = cfg.diffusion
    family = FLOW_SAMPLER_NAMES if d.objective == "flow" else DDPM_SAMPLER_NAMES
    if sec.sampler is not None and sec.sampler not in family:
        raise ConfigError(f"{section}.sampler: {sec.sampler} does not sample diffusion.objective={d.objective}; "
                          f"use one of {', '.join(family)} (or null for the default)")
    if d.objective == "ddpm":
        if sec.steps > d.diffusion_steps:
            raise ConfigError(f"{section}.steps: {sec.steps} exceeds diffusion.diffusion_steps={d.diffusion_steps} "
                              f"(sampling respaces the trained process: 1..{d.diffusion_steps})")
    gc = sec.guide_channels
    if gc != "all":
        limit, what = (cfg.model.in_channels, f"model.in_channels={cfg.model.in_channels}") \
            if cfg.model.in_channels is not None else (MAX_CHANNELS, f"the limit {MAX_CHANNELS}")
        if int(gc) > limit:
            raise ConfigError(f"{section}.guide_channels: {gc} exceeds {what} (CFG guides the leading channels "
                              f"of the prediction)")
    gi = sec.guidance_interval
    if gi is not None and (len(gi) != 2 or gi[0] > gi[1]):
        raise ConfigError(f"{section}.guidance_interval: expected [t_lo, t_hi] with t_lo <= t_hi, got {gi}")
    if gi is not None and d.objective == "flow" and gi[1] > 1:
        raise ConfigError(f"{section}.guidance_interval: {gi} is in flow time, which runs from 0 (noise) to 1 (data)")


def config_for_checkpoint(path: Optional[str | os.PathLike], overrides: Optional[list[str]],
                          stored: Optional[dict]) -> Config:
    """The config of a tool that works on a checkpoint (sampling, evaluation): the schema's defaults, under the
    training config the checkpoint stored (`stored`; ignored with a warning when this version's schema refuses it),
    under the `--config` file, under the `--set` overrides."""
    if stored is not None:
        try:
            config_from_dict(stored)
        except ConfigError as err:
            log.warning("the checkpoint's stored config does not validate here (%s): using the defaults", err)
            stored = None
    return load_config(path, overrides, base=stored)


def fill_from_config(args: argparse.Namespace, section: Any, names: list[str]) -> None:
    """Give every flag in `names` that was not on the command line (None) the value of `section`'s field."""
    for name in names:
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(section, name))


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------- CLI
def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add `--config` and repeated `--set section.key=value` to an entry point's parser."""
    parser.add_argument("--config", required=required, help="YAML config (may include other YAML files)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable (e.g. --set train.lr=2e-4)")


SAMPLER_FLAGS = ["sampler", "shift", "atol", "rtol", "last_step"]


def add_sampler_args(parser: argparse.ArgumentParser, section: type) -> None:
    """Add `--sampler` and the flow solver flags (`--shift`, `--atol`, `--rtol`, `--last-step`), each checked
    against the range of the `section` key it mirrors (`SampleConfig` or `EvalConfig`); None when left out."""
    def arg(kind: type, key: str) -> Any:
        return number_arg(kind, field_range(section, key))

    parser.add_argument("--sampler", choices=DDPM_SAMPLER_NAMES + FLOW_SAMPLER_NAMES, default=None,
                        help="ddpm, ddim (DDPM checkpoints); euler, heun, dopri5, sde (flow); default: the "
                             "checkpoint's family's default")
    parser.add_argument("--shift", type=arg(float, "shift"), default=None,
                        help="flow: timestep shift of the solver grid (1: none)")
    parser.add_argument("--atol", type=arg(float, "atol"), default=None, help="flow, dopri5: absolute tolerance")
    parser.add_argument("--rtol", type=arg(float, "rtol"), default=None, help="flow, dopri5: relative tolerance")
    parser.add_argument("--last-step", choices=("mean", "tweedie", "euler", "none"), default=None,
                        help="flow, sde: the last step")


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
