"""Samplers for flow-matching models (dit.transport): Euler, Heun and dopri5 ODEs, and SiT's Euler-Maruyama SDE.

Time runs forward from noise (t = 0) to data (t = 1), see dit/transport.py. The integrator state is kept in
float64 (float32 on MPS, which has no float64) whatever dtype the model runs in, as in dit/samplers.py: the
model sees x cast to ``dtype``, but the state accumulates hundreds of small increments (and the dopri5 error
estimate compares a 5th- and a 4th-order solution), which float32 and certainly bf16 would round away; the
elementwise float64 work is negligible next to a network forward. The model is fed t in float32 (float64 when
``dtype`` is float64), like the trainer's float32 training times: bf16 would round t = 0.99 to 0.98828.

Noise can come from one generator per sample (``dit.samplers.randn``), so a sample does not depend on its batch
(dopri5 excepted: its adaptive steps are shared by the batch, so a row moves with its batch within the tolerance).
Classifier-free guidance is a model wrapper: ``dit.samplers.make_cfg_model_fn`` with its interval in flow time.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torchdiffeq import odeint
from tqdm.auto import tqdm

from .samplers import Generators, randn
from .transport import Transport, shift_time

log = logging.getLogger(__name__)

FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde")
SDE_LAST_STEPS = ("mean", "tweedie", "euler", "none")

Caller = Callable[[torch.Tensor, Union[float, torch.Tensor]], torch.Tensor]


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


def _check_args(sampler: str, steps: int, shift: float, atol: float, rtol: float, last_step: str,
                last_step_size: float, diffusion_norm: float) -> None:
    """One clear ValueError naming the first bad argument."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(FLOW_SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, value in (("shift", shift), ("atol", atol), ("rtol", rtol)):
        _positive(name, value)
    if last_step not in SDE_LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; valid: {', '.join(SDE_LAST_STEPS)}")
    _positive("last_step_size", last_step_size, allow_zero=last_step == "none")  # unused without a last step
    if last_step_size >= 1:
        raise ValueError(f"last_step_size must be < 1, got {last_step_size!r}")
    _positive("diffusion_norm", diffusion_norm, allow_zero=True)


def flow_time_grid(transport: Transport, steps: int, shift: float = 1.0, sde: bool = False,
                   last_step_size: float = 0.0) -> torch.Tensor:
    """The float64 time grid [steps + 1] of the fixed-step samplers, from t0 to t1 of the sampling interval.

    ``shift_time(linspace(u0, u1, steps + 1), shift)`` with u0, u1 the pre-images of t0, t1 under the shift, so
    the grid keeps the interval's ends exactly (with t0 = 0, t1 = 1 this is ``shift_time(linspace(0, 1))``).
    """
    t0, t1 = transport.sampling_interval(sde=sde, last_step_size=last_step_size)
    if not t0 < t1:
        raise ValueError(f"last_step_size={last_step_size} leaves no time to integrate over [{t0}, 1]")
    ends = shift_time(torch.tensor([t0, t1], dtype=torch.float64), 1.0 / shift)
    grid = shift_time(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64), shift)
    grid[0], grid[-1] = t0, t1  # exact ends despite rounding
    return grid


def _model_caller(model_fn: Callable[..., torch.Tensor], dtype: torch.dtype,
                  model_kwargs: Optional[dict]) -> Caller:
    """``call(x, t)``: the raw model output at state x (cast to ``dtype``) and time t (a [B] tensor)."""
    t_dtype = torch.promote_types(dtype, torch.float32)
    kwargs = model_kwargs or {}

    def call(x: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
        tb = torch.as_tensor(t, dtype=t_dtype, device=x.device).reshape(1).repeat(x.shape[0])
        return model_fn(x.to(dtype), tb, **kwargs)

    return call


def _solve_fixed_grid(call: Caller, transport: Transport, x: torch.Tensor, grid: torch.Tensor, heun: bool,
                      progress: bool) -> torch.Tensor:
    """Euler, or Heun's 2nd-order method on EVERY step (the grid never reaches a time where the drift is
    undefined, so unlike EDM/SiT-SDE no last Euler step is needed): ``steps`` or ``2 * steps`` model calls."""
    ts = grid.tolist()
    for i in tqdm(range(len(ts) - 1), desc="heun" if heun else "euler", disable=not progress):
        t, t_next = ts[i], ts[i + 1]
        h = t_next - t
        v = transport.velocity(call(x, t), x, t)
        if heun:
            x_euler = x + h * v
            v = 0.5 * (v + transport.velocity(call(x_euler, t_next), x_euler, t_next))
        x = x + h * v
    return x


def _solve_dopri5(call: Caller, transport: Transport, x: torch.Tensor, shift: float, atol: float,
                  rtol: float) -> torch.Tensor:
    """Adaptive dopri5 (torchdiffeq) over the sampling interval, in the shifted time u with t = shift_time(u).

    The change of variables ``dx/du = v(x, t(u)) dt/du`` has the same solution at the end; the shift only moves
    where the solver's first trial steps fall (shift = 1 is the plain ODE in t).
    """
    t0, t1 = transport.sampling_interval()
    ends = shift_time(torch.tensor([t0, t1], dtype=torch.float64), 1.0 / shift).to(x.device, x.dtype)
    calls = [0]

    def drift(u: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        t = shift_time(u, shift).clamp(t0, t1)  # only rounding: the shift maps [u0, u1] onto [t0, t1]
        dt_du = shift / (1.0 + (shift - 1.0) * (1.0 - u)) ** 2
        return transport.velocity(call(state, t), state, t) * dt_du

    # step_t: land ON the end instead of stepping past it and interpolating back (torchdiffeq's default), which
    # would evaluate the model beyond t1 (outside [0, 1] or where the path is singular, e.g. "vp" at t = 1).
    out = odeint(drift, x, ends, method="dopri5", atol=atol, rtol=rtol, options={"step_t": ends[1:]})[-1]
    log.debug("dopri5: %d model calls", calls[0])
    return out


def _last_step(call: Caller, transport: Transport, x: torch.Tensor, t1: float, kind: str,
               diffusion_norm: float) -> torch.Tensor:
    """SiT's last SDE step from t1 to 1, without noise: "mean" (an Euler step of the SDE drift), "euler" (of the
    ODE drift), "tweedie" (the denoised estimate E[x1 | x_t1]) or "none" (x as is)."""
    if kind == "none":
        return x
    out = call(x, t1)
    if kind == "tweedie":
        return transport.noise_and_data(out, x, t1)[1]
    drift = transport.sde_drift(out, x, t1, diffusion_norm) if kind == "mean" else transport.velocity(out, x, t1)
    return x + (1.0 - t1) * drift


def _solve_sde(call: Caller, transport: Transport, x: torch.Tensor, grid: torch.Tensor, last_step: str,
               diffusion_norm: float, generator: Generators, progress: bool) -> torch.Tensor:
    """Euler-Maruyama for dx = [v + w score] dt + sqrt(2 w) dW (w = diffusion_norm sigma_t), then the last step."""
    ts = grid.tolist()
    for i in tqdm(range(len(ts) - 1), desc="sde", disable=not progress):
        t, h = ts[i], ts[i + 1] - ts[i]
        drift = transport.sde_drift(call(x, t), x, t, diffusion_norm)
        w = float(transport.sde_diffusion(t, diffusion_norm))
        x = x + h * drift + math.sqrt(2.0 * w * h) * randn(x.shape, generator, x.device, x.dtype)
    return _last_step(call, transport, x, ts[-1], last_step, diffusion_norm)


def _resolve_device(device: Union[str, torch.device, None], noise: Optional[torch.Tensor],
                    model_fn: Callable[..., torch.Tensor]) -> torch.device:
    """``device``, else the noise's device, else the model's if it is a Module, else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if isinstance(model_fn, torch.nn.Module):
        return next(model_fn.parameters()).device
    return torch.device("cpu")


def _state_dtype(device: torch.device) -> torch.dtype:
    """The integrator state's dtype: float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def flow_sample(model_fn: Callable[..., torch.Tensor], transport: Transport, shape: Sequence[int],
                sampler: str = "euler", steps: int = 50, shift: float = 1.0, atol: float = 1e-6,
                rtol: float = 1e-3, last_step: str = "mean", last_step_size: float = 0.04,
                diffusion_norm: float = 1.0, generator: Generators = None, noise: Optional[torch.Tensor] = None,
                device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32,
                model_kwargs: Optional[dict] = None, progress: bool = False) -> torch.Tensor:
    """Samples at t = 1 (data) of ``shape`` (float32), integrating a flow model from noise at t = 0.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` returning the raw network output (t: [B] flow times).
        transport: the path and prediction type the model was trained with.
        sampler: "euler" / "heun" (fixed grid ``flow_time_grid(transport, steps, shift)``; 1 / 2 model calls a
            step), "dopri5" (adaptive, ``atol``/``rtol``; ``steps`` unused; ``shift`` only changes the variable
            integrated over, not the solution) or "sde" (Euler-Maruyama with ``diffusion_norm``, ``steps`` steps
            over [t0, 1 - last_step_size], then SiT's ``last_step``: "mean", "tweedie", "euler" or "none").
        shift: LightningDiT/SD3 timestep shift (``dit.transport.shift_time``); > 1 spends more steps near noise.
        generator: a torch.Generator, or a list with one per sample (row i's initial and SDE noise from it alone).
        noise: the initial x0 (otherwise drawn from ``generator``).
        device: where the state lives; default: the noise's device, else the model's if a Module, else CPU.
        dtype: the dtype the model is fed x in (e.g. torch.bfloat16); the state stays float64.
    """
    _check_args(sampler, steps, shift, atol, rtol, last_step, last_step_size, diffusion_norm)
    device = _resolve_device(device, noise, model_fn)
    x = (noise if noise is not None else randn(shape, generator, device)).to(device, _state_dtype(device))
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
    call = _model_caller(model_fn, dtype, model_kwargs)
    if sampler == "dopri5":
        x = _solve_dopri5(call, transport, x, shift, atol, rtol)
    elif sampler == "sde":
        lss = 0.0 if last_step == "none" else last_step_size
        grid = flow_time_grid(transport, steps, shift, sde=True, last_step_size=lss)
        x = _solve_sde(call, transport, x, grid, last_step, diffusion_norm, generator, progress)
    else:
        x = _solve_fixed_grid(call, transport, x, flow_time_grid(transport, steps, shift), sampler == "heun",
                              progress)
    return x.to(torch.float32)


__all__ = ["flow_sample", "flow_time_grid", "FLOW_SAMPLERS", "SDE_LAST_STEPS"]
