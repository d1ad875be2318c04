"""Ancestral DDPM and DDIM samplers, and classifier-free guidance as a model wrapper.

The sampler state x_t is kept in float64 (float32 on MPS) whatever dtype the model runs in; the model sees x_t
cast to ``dtype``. Noise can come from one generator per sample, so a sample does not depend on its batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .diffusion import GaussianDiffusion

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]
SAMPLERS = ("ddpm", "ddim")


def randn(shape: Sequence[int], generator: Generators = None, device: Union[str, torch.device, None] = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, row i is drawn from generator i alone."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(rows).to(device=device, dtype=dtype)
    gdev = generator.device if generator is not None else device
    z = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


@torch.no_grad()
def sample(model_fn: Callable[..., torch.Tensor], diffusion: GaussianDiffusion, shape: Sequence[int],
           sampler: str = "ddpm", steps: Union[None, int, str] = None, eta: float = 0.0,
           generator: Generators = None, noise: Optional[torch.Tensor] = None, clip_denoised: bool = False,
           progress: bool = False, device: Union[str, torch.device, None] = None,
           dtype: torch.dtype = torch.float32, model_kwargs: Optional[dict] = None) -> torch.Tensor:
    """Draw samples x_0 of ``shape`` (float32) by running the reverse process.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` with t in ORIGINAL timestep units (e.g. a DiT or a CFG wrapper).
        diffusion: the process; ``steps`` (int or ADM spacing string like "250" / "ddim50") respaces it from the
            original timesteps, None uses it as is.
        sampler: "ddpm" (ancestral, the model's variance) or "ddim" (``eta`` = 0 deterministic, 1 ~ DDPM noise).
        generator: a torch.Generator, or a list with one generator per sample.
        noise: the initial x_T (otherwise drawn from ``generator``).
        device: where the state lives; default: the noise's device, else the model's if it is a Module, else CPU.
        clip_denoised: clamp the x_0 prediction to [-1, 1] at every step (pixel space).
        dtype: the dtype the model is fed (e.g. torch.bfloat16); the sampler state stays fp64.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if steps is not None:
        diffusion = diffusion.respace(steps)
    if device is None:
        if noise is not None:
            device = noise.device
        elif isinstance(model_fn, torch.nn.Module):
            device = next(model_fn.parameters()).device
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    state_dtype = torch.float32 if device.type == "mps" else torch.float64
    x = (noise if noise is not None else randn(shape, generator, device)).to(device=device, dtype=state_dtype)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")

    indices = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm
        indices = tqdm(indices, desc=f"{sampler} sampling")
    for i in indices:
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
        out = diffusion.call_model(model_fn, x.to(dtype), t, model_kwargs)
        p = diffusion.p_mean_variance_from_output(out, x, t, clip_denoised=clip_denoised)
        if sampler == "ddpm":
            x = p["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * p["log_variance"]) * randn(x.shape, generator, device, x.dtype)
        else:
            ab, ab_prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
            sigma = eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5
            eps = diffusion.eps_from_x0(x, t, p["pred_x0"])
            x = p["pred_x0"] * ab_prev ** 0.5 + (1 - ab_prev - sigma ** 2) ** 0.5 * eps
            if i > 0 and sigma > 0:
                x = x + sigma * randn(x.shape, generator, device, x.dtype)
    return x.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------
def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, guide_channels: int,
                active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uncond + s (cond - uncond) on the first ``guide_channels`` channels; the rest (incl. sigma) from cond.

    ``active`` (bool per sample) limits guidance to some samples; the others get the conditional output.
    """
    cond = cond.to(torch.promote_types(cond.dtype, torch.float32))
    uncond = uncond.to(cond.dtype)
    g = guide_channels
    guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
    if active is not None:
        guided = torch.where(active.reshape(-1, *([1] * (cond.ndim - 1))), guided, cond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


def make_cfg_model_fn(model: Callable[..., torch.Tensor], cfg_scale: float, null_class: int,
                      guide_channels: Union[str, int] = "all",
                      interval: Optional[Tuple[float, float]] = None) -> Callable[..., torch.Tensor]:
    """A ``model_fn(x, t, y)`` applying classifier-free guidance to ``model(x, t, y)``.

    Conditional and unconditional (label ``null_class``) halves run in ONE batched forward. ``guide_channels``:
    "all" guides all C prediction channels; an int guides only the first ones (3 reproduces the official DiT).
    Learned-sigma channels pass through from the conditional half. ``interval=(t_lo, t_hi)``: guidance only where
    t_lo <= t <= t_hi (original timestep units); outside it the conditional prediction is returned.
    With ``cfg_scale == 1`` this is the conditional model (one forward of the plain batch).
    """
    if guide_channels != "all" and not (isinstance(guide_channels, int) and guide_channels >= 1):
        raise ValueError(f"guide_channels must be 'all' or a positive int, got {guide_channels!r}")
    if interval is not None:
        lo, hi = interval
        if lo > hi:
            raise ValueError(f"guidance interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval}")

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        if cfg_scale == 1.0:
            return model(x, t, y)
        active = None
        if interval is not None:
            active = (t >= interval[0]) & (t <= interval[1])
            if not bool(active.any()):  # saves the unconditional half outside the interval
                return model(x, t, y)
        g = x.shape[1] if guide_channels == "all" else guide_channels
        if g > x.shape[1]:
            raise ValueError(f"guide_channels={g} exceeds the {x.shape[1]} input channels")
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2, dim=0)
        return cfg_combine(cond, uncond, cfg_scale, g, active)

    return model_fn


__all__ = ["sample", "randn", "make_cfg_model_fn", "cfg_combine", "SAMPLERS"]
