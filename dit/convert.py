"""State-dict converters between facebookresearch/DiT, diffusers' `DiTTransformer2DModel` and `dit.models.DiT`.

All functions are pure: they take and return `{name: tensor}` dicts (and plain kwargs dicts) and never touch files.

- official → ours: the parameter names are the same (ours keeps them on purpose); the converter checks the keys,
  and `official_kwargs` infers the constructor arguments from the tensor shapes.
- diffusers ↔ ours: diffusers splits the fused QKV projection into `to_q/to_k/to_v`, renames the layers, and keeps
  one copy of the timestep/label embedder in every block (all copies are equal in converted checkpoints; ours keeps
  one). diffusers' DiT also differs numerically from the official one in two places, which our model reproduces with
  `timestep_freq_shift=1` and `mlp_norm_eps=1e-5` (see `diffusers_kwargs`).
- our Gaussian diffusion → a diffusers scheduler config (`diffusers_scheduler_config`).
- willisma/SiT checkpoints are official-format state dicts (same backbone and key names; t in [0, 1]).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import torch

from dit.layers import get_2d_sincos_pos_embed

StateDict = dict[str, torch.Tensor]

# Heads of the presets by hidden size: the only architecture number a state dict does not reveal.
_HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}
_OFFICIAL_DROPOUT = 0.1  # the official and the diffusers DiT always train with label dropout 0.1


class ConversionError(ValueError):
    """The state dict is not of the expected format (missing/unexpected keys, bad shapes)."""


def _depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of blocks `prefix.<i>.` present in the state dict."""
    ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)] if m}
    if not ids:
        raise ConversionError(f"no '{prefix}.<i>.' keys: not a DiT state dict")
    if ids != set(range(len(ids))):
        raise ConversionError(f"'{prefix}' block indices are not contiguous: {sorted(ids)}")
    return len(ids)


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"missing key {key!r}")
    return sd[key]


def pos_embed_for(hidden_size: int, input_size: int, patch_size: int) -> torch.Tensor:
    """The fixed sin-cos position buffer [1, T, D] of a DiT with these sizes."""
    return torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, input_size // patch_size)).float()[None]


# ----------------------------------------------------------------------------------------------- official
def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop wrapper prefixes (`module.` of DDP/DeepSpeed, `_orig_mod.` of torch.compile) from the keys."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def official_kwargs(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> dict[str, Any]:
    """DiT constructor kwargs of an official (or our adaLN-Zero) state dict, inferred from its shapes.

    num_heads cannot be read from the weights: it defaults to the preset's (DiT-S/B/L/XL) for that hidden size.
    """
    sd = strip_prefixes(sd)
    w = _need(sd, "x_embedder.proj.weight")
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    tokens = _need(sd, "pos_embed").shape[1]
    grid = math.isqrt(tokens)
    out_ch = _need(sd, "final_layer.linear.weight").shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ConversionError(f"final_layer.linear gives {out_ch} channels for {in_ch} input channels")
    heads = num_heads if num_heads is not None else _HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise ConversionError(f"hidden size {hidden} is not a preset's: give num_heads")
    table = sd.get("y_embedder.embedding_table.weight")
    mlp_hidden = _need(sd, "blocks.0.mlp.fc1.weight").shape[0]
    return {"input_size": grid * p, "patch_size": p, "in_channels": in_ch, "hidden_size": hidden,
            "depth": _depth(sd, "blocks"), "num_heads": heads, "mlp_ratio": mlp_hidden / hidden,
            "class_dropout_prob": _OFFICIAL_DROPOUT if table is not None else 0.0,
            "num_classes": table.shape[0] - 1 if table is not None else 0, "learn_sigma": out_ch == 2 * in_ch}


def official_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """facebookresearch/DiT state dict → ours (same names; checked, prefixes stripped, tensors copied)."""
    sd = strip_prefixes(sd)
    depth = _depth(sd, "blocks")
    expected = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
                "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias"}
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    missing = sorted(expected - set(sd))
    if missing:
        raise ConversionError(f"not an official DiT state dict: missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
    allowed = expected | {"y_embedder.embedding_table.weight"}
    unexpected = sorted(set(sd) - allowed)
    if unexpected:
        raise ConversionError(f"unexpected keys for an official DiT: {unexpected[:4]}")
    return {k: v.detach().clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- diffusers
def diffusers_kwargs(config: Mapping[str, Any], sd: Optional[Mapping[str, torch.Tensor]] = None,
                     numerics: str = "diffusers") -> dict[str, Any]:
    """DiT constructor kwargs equivalent to a `DiTTransformer2DModel` config (its config.json).

    numerics="diffusers" reproduces diffusers' outputs exactly (timestep frequencies with shift 1, MLP LayerNorm
    eps = config norm_eps); "official" uses the official DiT's numerics (what the original weights were trained
    with).
    """
    if numerics not in ("diffusers", "official"):
        raise ValueError(f"numerics={numerics!r}; valid choices: diffusers, official")
    for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                      ("attention_bias", True), ("norm_elementwise_affine", False)):
        if config.get(key, want) != want:
            raise ConversionError(f"diffusers config {key}={config[key]!r} has no DiT equivalent (need {want!r})")
    heads = int(config.get("num_attention_heads", 16))
    hidden = heads * int(config.get("attention_head_dim", 72))
    in_ch = int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ConversionError(f"out_channels={out_ch} is neither in_channels={in_ch} nor twice it")
    num_classes = config.get("num_embeds_ada_norm", 1000)
    if num_classes is None:
        raise ConversionError("num_embeds_ada_norm is None: diffusers' DiT is always class-conditional")
    mlp_ratio = 4.0
    if sd is not None:
        mlp_ratio = _need(sd, "transformer_blocks.0.ff.net.0.proj.weight").shape[0] / hidden
    official = numerics == "official"
    return {"input_size": int(config.get("sample_size", 32)), "patch_size": int(config.get("patch_size", 2)),
            "in_channels": in_ch, "hidden_size": hidden, "depth": int(config.get("num_layers", 28)),
            "num_heads": heads, "mlp_ratio": mlp_ratio, "class_dropout_prob": _OFFICIAL_DROPOUT,
            "num_classes": int(num_classes), "learn_sigma": out_ch == 2 * in_ch,
            "timestep_freq_shift": 0.0 if official else 1.0,
            "mlp_norm_eps": 1e-6 if official else float(config.get("norm_eps", 1e-5))}


def diffusers_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`DiTTransformer2DModel` config for a DiT with these constructor kwargs (adaLN-Zero, class-conditional)."""
    if kwargs.get("conditioning", "adaln_zero") != "adaln_zero" or kwargs.get("qk_norm", False):
        raise ConversionError("diffusers' DiT has only adaLN-Zero blocks without QK-norm")
    if not kwargs.get("num_classes", 1000):
        raise ConversionError("diffusers' DiT is always class-conditional (num_classes > 0)")
    if kwargs.get("mlp_ratio", 4.0) != 4.0:
        raise ConversionError("diffusers' DiT has mlp_ratio 4")
    hidden, heads = int(kwargs.get("hidden_size", 1152)), int(kwargs.get("num_heads", 16))
    in_ch = int(kwargs.get("in_channels", 4))
    return {"num_attention_heads": heads, "attention_head_dim": hidden // heads, "in_channels": in_ch,
            "out_channels": 2 * in_ch if kwargs.get("learn_sigma", True) else in_ch,
            "num_layers": int(kwargs.get("depth", 28)), "sample_size": int(kwargs.get("input_size", 32)),
            "patch_size": int(kwargs.get("patch_size", 2)), "num_embeds_ada_norm": int(kwargs.get("num_classes", 1000)),
            "norm_eps": float(kwargs.get("mlp_norm_eps", 1e-6)), "attention_bias": True,
            "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False}


_BLOCK_RENAMES = (("norm1.linear", "adaLN_modulation.1"), ("attn1.to_out.0", "attn.proj"),
                  ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"))
_TOP_RENAMES = (("pos_embed.proj", "x_embedder.proj"), ("proj_out_1", "final_layer.adaLN_modulation.1"),
                ("proj_out_2", "final_layer.linear"))
_EMB = "transformer_blocks.{i}.norm1.emb."
_EMB_RENAMES = (("timestep_embedder.linear_1", "t_embedder.mlp.0"), ("timestep_embedder.linear_2", "t_embedder.mlp.2"),
                ("class_embedder.embedding_table", "y_embedder.embedding_table"))


def diffusers_to_ours(sd: Mapping[str, torch.Tensor], input_size: int) -> StateDict:
    """`DiTTransformer2DModel` state dict → ours (input_size: the config's sample_size, for the position buffer).

    Raises ConversionError if the per-block copies of the timestep/label embedder differ (ours has one).
    """
    sd = dict(sd)
    depth = _depth(sd, "transformer_blocks")
    out: StateDict = {}
    for old, new in _TOP_RENAMES:
        for s in ("weight", "bias"):
            out[f"{new}.{s}"] = _need(sd, f"{old}.{s}").detach().clone()
    for old, new in _EMB_RENAMES:
        for s in (("weight",) if "table" in old else ("weight", "bias")):
            first = _need(sd, _EMB.format(i=0) + f"{old}.{s}")
            for i in range(1, depth):
                if not torch.equal(_need(sd, _EMB.format(i=i) + f"{old}.{s}"), first):
                    raise ConversionError(f"block {i} has its own {old}.{s}; DiT shares one embedder across blocks")
            out[f"{new}.{s}"] = first.detach().clone()
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            out[dst + f"attn.qkv.{s}"] = torch.cat([_need(sd, src + f"attn1.to_{n}.{s}") for n in "qkv"], 0)
            for old, new in _BLOCK_RENAMES:
                out[dst + f"{new}.{s}"] = _need(sd, src + f"{old}.{s}").detach().clone()
    hidden, p = out["x_embedder.proj.weight"].shape[0], out["x_embedder.proj.weight"].shape[2]
    out["pos_embed"] = pos_embed_for(hidden, input_size, p)
    used = set(_diffusers_keys(depth))
    unexpected = sorted(k for k in sd if k not in used and k != "pos_embed.pos_embed")
    if unexpected:
        raise ConversionError(f"unexpected keys for a diffusers DiT: {unexpected[:4]}")
    return out


def _diffusers_keys(depth: int) -> list[str]:
    """All keys of a diffusers DiT state dict with this depth."""
    keys = [f"{old}.{s}" for old, _ in _TOP_RENAMES for s in ("weight", "bias")]
    for i in range(depth):
        src = f"transformer_blocks.{i}."
        keys += [src + f"attn1.to_{n}.{s}" for n in "qkv" for s in ("weight", "bias")]
        keys += [src + f"{old}.{s}" for old, _ in _BLOCK_RENAMES for s in ("weight", "bias")]
        keys += [_EMB.format(i=i) + f"{old}.{s}" for old, _ in _EMB_RENAMES
                 for s in (("weight",) if "table" in old else ("weight", "bias"))]
    return keys


def ours_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our (adaLN-Zero, class-conditional) state dict → `DiTTransformer2DModel` state dict (embedder per block)."""
    sd = strip_prefixes(sd)
    depth = _depth(sd, "blocks")
    if "y_embedder.embedding_table.weight" not in sd:
        raise ConversionError("diffusers' DiT is always class-conditional: no y_embedder in this state dict")
    if any(".q_norm." in k or ".cross_attn." in k for k in sd):
        raise ConversionError("diffusers' DiT has only adaLN-Zero blocks without QK-norm")
    out: StateDict = {}
    for old, new in _TOP_RENAMES:
        for s in ("weight", "bias"):
            out[f"{old}.{s}"] = _need(sd, f"{new}.{s}").detach().clone()
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in _EMB_RENAMES:
            for s in (("weight",) if "table" in old else ("weight", "bias")):
                out[_EMB.format(i=i) + f"{old}.{s}"] = _need(sd, f"{new}.{s}").detach().clone()
        for s in ("weight", "bias"):
            for name, part in zip("qkv", torch.chunk(_need(sd, src + f"attn.qkv.{s}"), 3, dim=0)):
                out[dst + f"attn1.to_{name}.{s}"] = part.clone()
            for old, new in _BLOCK_RENAMES:
                out[dst + f"{old}.{s}"] = _need(sd, src + f"{new}.{s}").detach().clone()
    return out


# ----------------------------------------------------------------------------------------------- schedulers
# Values of a checkpoint's "diffusion.objective" meaning the Gaussian (DDPM) process of dit/diffusion.py; a missing
# key is the same (checkpoints written before flow matching existed).
GAUSSIAN_OBJECTIVES = (None, "diffusion", "gaussian")
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def diffusers_scheduler_config(diffusion: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `DDIMScheduler` config (its keys also configure DDPMScheduler and the other DDPM-family
    schedulers) for the Gaussian diffusion with these `dit.diffusion.create_diffusion` kwargs.

    variance_type (used by DDPMScheduler only) is "fixed_small" for a learned-sigma model: diffusers' DiTPipeline
    drops the variance channels before `scheduler.step`, where "learned_range" makes DDPMScheduler fail and
    DPMSolverMultistepScheduler cut the latents to 3 channels. A fixed-variance model gets its own ("fixed_large",
    our default, or "fixed_small" with sigma_small).
    """
    objective = diffusion.get("objective", "ddpm")  # absent: DDPM (see dit/processes.py)
    if objective != "ddpm":
        raise ConversionError(f"diffusion objective {objective!r} has no diffusers scheduler (DDPM only)")
    schedule = diffusion.get("noise_schedule", "linear")
    prediction = diffusion.get("prediction", "eps")
    if schedule not in _BETA_SCHEDULES:
        raise ConversionError(f"noise_schedule {schedule!r} has no diffusers beta_schedule")
    if prediction not in _PREDICTION_TYPES:
        raise ConversionError(f"prediction {prediction!r} has no diffusers prediction_type")
    steps = int(diffusion.get("diffusion_steps", 1000))
    scale = 1000.0 / steps if schedule == "linear" else 1.0  # ADM scales the linear betas to keep their shape
    fixed = "fixed_small" if diffusion.get("learn_sigma", True) or diffusion.get("sigma_small", False) \
        else "fixed_large"
    return {"num_train_timesteps": steps, "beta_schedule": _BETA_SCHEDULES[schedule], "beta_start": 1e-4 * scale,
            "beta_end": 0.02 * scale, "trained_betas": None, "prediction_type": _PREDICTION_TYPES[prediction],
            "variance_type": fixed, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
            "timestep_spacing": "leading", "thresholding": False, "rescale_betas_zero_snr": False}


# ----------------------------------------------------------------------------------------------- SiT
# willisma/SiT's released models (train.py defaults): a linear path x_t = t x_1 + (1 - t) x_0 (t = 0 noise, t = 1
# data, fed to the timestep embedder as is), velocity prediction, no loss weight, t uniform in [0, 1].
SIT_TRANSPORT = {"objective": "flow", "path": "linear", "prediction": "velocity", "loss_weight": "none",
                 "time_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "train_eps": None, "sample_eps": None}


def sit_transport_kwargs(args: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The flow-matching kwargs (`dit.transport.create_transport`) of a SiT checkpoint, from its training args
    (train.py's argparse namespace as a dict; the released models have none: SiT's defaults)."""
    out = dict(SIT_TRANSPORT)
    if not args:
        return out
    path, prediction = args.get("path_type", "Linear"), args.get("prediction", "velocity")
    if (path, prediction) != ("Linear", "velocity"):
        raise ConversionError(f"SiT checkpoint trained with path_type={path!r}, prediction={prediction!r}; only "
                              "the Linear path with velocity prediction (SiT's default) converts")
    weight = args.get("loss_weight")
    out["loss_weight"] = "none" if weight in (None, "None") else str(weight)
    return out
