"""Flow matching / stochastic interpolants (SiT): paths, prediction types, training loss, timestep sampling.

Conventions (SiT's; every statement below is asserted in tests/test_transport.py):

* Time ``t`` runs over [0, 1]. ``t = 0`` is pure noise ``x0 ~ N(0, I)``; ``t = 1`` is data ``x1``. Sampling
  integrates FORWARD in t, from noise to data.
* The path is ``x_t = alpha_t * x1 + sigma_t * x0`` with ``alpha_0 = 0, sigma_0 = 1`` and ``alpha_1 = 1,
  sigma_1 = 0`` ("vp" only reaches alpha_0 = exp(-5.025) ~ 0.0066, as SiT's VP path does).

  - "linear": ``alpha_t = t``, ``sigma_t = 1 - t`` (rectified flow / SiT-Linear / LightningDiT).
  - "gvp": ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (generalised variance preserving).
  - "vp": the DDPM-like VP-SDE path with ``beta(t) = beta_min + (1 - t)(beta_max - beta_min)``, beta_min = 0.1,
    beta_max = 20: ``alpha_t = exp(-(1-t)^2 (beta_max - beta_min) / 4 - (1-t) beta_min / 2)``,
    ``sigma_t = sqrt(1 - alpha_t^2)``.

* The velocity is ``d x_t / dt = alpha'_t x1 + sigma'_t x0`` (for "linear": ``x1 - x0``, pointing from noise
  towards data). The probability-flow ODE is ``dx/dt = v(x, t) = E[d x_t / dt | x_t = x]``.
* The network sees ``t`` exactly as given (values in [0, 1], as SiT feeds its DiT; no rescaling to 1000).
* Prediction types (what the network's first C output channels are): "velocity" ``v``, "noise" ``E[x0 | x_t]``,
  "score" ``grad log p_t(x_t) = -E[x0 | x_t] / sigma_t``. A network with 2C output channels for C-channel inputs
  (a DiT built with learn_sigma=True, as SiT's checkpoints are) has its last C channels ignored, as SiT does.
* Conversions go through the noise estimate with the Wronskian ``W_t = alpha'_t sigma_t - alpha_t sigma'_t``
  (1 for "linear", pi/2 for "gvp"), which is never 0, so a velocity is turned into a noise estimate without
  dividing by alpha_t or sigma_t: ``eps = (alpha' x - alpha v) / W``, ``x1 = (sigma v - sigma' x) / W``.
* Loss weights (SiT's): "none" is the plain squared error of the prediction ("score" is compared as
  ``sigma_t * score`` against ``-x0``, as SiT does, so it is the noise error); "velocity" weighs the noise error so
  that it equals the error of the implied velocity, ``(W / alpha)^2``; "likelihood" is the maximum-likelihood
  (score-matching with g^2/2) weight ``W / (alpha sigma)`` on the noise error. For the velocity prediction
  "none" and "velocity" are the same loss; "likelihood" is refused (SiT silently trains it unweighted).
* The SDE used for sampling is ``dx = [v + w_t score] dt + sqrt(2 w_t) dW`` with ``w_t = diffusion_norm *
  sigma_t`` (SiT's default "sigma" diffusion form); it has the same marginals as the ODE for any w_t >= 0.
* ``shift_time`` is the LightningDiT / SD3 timestep shift written in this convention (see its docstring).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .diffusion import mean_flat

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
TIME_SAMPLINGS = ("uniform", "logit_normal")
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0

ModelFn = Callable[..., torch.Tensor]
TimeLike = Union[torch.Tensor, float]
Coefficients = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16) is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand(t: TimeLike, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a number, a 0-d tensor or one value per sample) broadcastable against ``like``, in its dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


def _as_time(t: TimeLike) -> torch.Tensor:
    """``t`` as a floating tensor (numbers, sequences and integer tensors become float64)."""
    if not isinstance(t, torch.Tensor):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float64)


def shift_time(t: TimeLike, shift: float) -> torch.Tensor:
    """The LightningDiT / SD3 timestep shift in flow time (t = 0 noise, t = 1 data).

    With the noise level ``s = 1 - t``: ``s' = shift * s / (1 + (shift - 1) * s)``, returned as ``1 - s'``.
    Equivalently the noise-to-data odds ``s / (1 - s)`` are multiplied by ``shift``. Fixes 0 and 1, is
    increasing in t, ``shift = 1`` is the identity, ``shift > 1`` moves every t towards noise (a uniform grid then
    spends more steps near noise), and ``shift_time(shift_time(t, a), 1 / a) == t``.
    """
    if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    t = _as_time(t)
    s = 1.0 - t
    return 1.0 - shift * s / (1.0 + (shift - 1.0) * s)


def _check_choice(name: str, value: str, valid: Tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _check_eps(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 0.5):
        raise ValueError(f"{name} must be a number in [0, 0.5), got {value!r}")
    return float(value)


def _default_eps(path: str, prediction: str) -> Tuple[float, float]:
    """SiT's (train_eps, sample_eps): the VP path and non-velocity predictions avoid the singular end points."""
    if path == "vp":
        return 1e-5, 1e-3
    if prediction != "velocity":
        return 1e-3, 1e-3
    return 0.0, 0.0  # velocity on linear / GVP paths is finite everywhere


class Transport:
    """A flow-matching path with a network parameterisation, loss weighting and training-time distribution.

    Args:
        path: "linear", "gvp" or "vp" (see the module docstring).
        prediction: what the network predicts: "velocity", "noise" or "score".
        loss_weight: "none", "velocity" or "likelihood" (SiT's weightings; "likelihood" needs noise or score).
        time_sampling: training times "uniform" or "logit_normal" (t = sigmoid(N(logit_mean, logit_std^2))),
            either mapped onto the training interval.
        train_eps / sample_eps: distance kept from the singular end points in training / sampling; None chooses
            SiT's defaults (VP: 1e-5 / 1e-3; linear and GVP: 1e-3 / 1e-3 for noise and score, 0 / 0 for velocity).
    """

    def __init__(self, path: str = "linear", prediction: str = "velocity", loss_weight: str = "none",
                 time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 train_eps: Optional[float] = None, sample_eps: Optional[float] = None):
        _check_choice("path", path, PATHS)
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("loss_weight", loss_weight, LOSS_WEIGHTS)
        _check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        if prediction == "velocity" and loss_weight == "likelihood":
            raise ValueError("loss_weight 'likelihood' needs prediction 'noise' or 'score' (its weight on the "
                             "velocity error is unbounded near t = 1)")
        if isinstance(logit_mean, bool) or not (isinstance(logit_mean, (int, float)) and math.isfinite(logit_mean)):
            raise ValueError(f"logit_mean must be a finite number, got {logit_mean!r}")
        if isinstance(logit_std, bool) or not (isinstance(logit_std, (int, float)) and math.isfinite(logit_std)
                                               and logit_std > 0):
            raise ValueError(f"logit_std must be a finite number > 0, got {logit_std!r}")
        default_train, default_sample = _default_eps(path, prediction)
        self.train_eps = _check_eps("train_eps", default_train if train_eps is None else train_eps)
        self.sample_eps = _check_eps("sample_eps", default_sample if sample_eps is None else sample_eps)
        self.path, self.prediction, self.loss_weight = path, prediction, loss_weight
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)

    def describe(self) -> Dict[str, Union[str, float]]:
        """The constructor arguments (JSON-serialisable, eps resolved): ``create_transport(**describe())``."""
        return {"path": self.path, "prediction": self.prediction, "loss_weight": self.loss_weight,
                "time_sampling": self.time_sampling, "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "train_eps": self.train_eps, "sample_eps": self.sample_eps}

    def __repr__(self) -> str:
        return "Transport(" + ", ".join(f"{k}={v!r}" for k, v in self.describe().items()) + ")"

    # -- the path ------------------------------------------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> Coefficients:
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), elementwise in t's (floating) dtype."""
        if self.path == "linear":
            return t, 1.0 - t, torch.ones_like(t), -torch.ones_like(t)
        if self.path == "gvp":
            half_pi = math.pi / 2
            return (torch.sin(half_pi * t), torch.cos(half_pi * t),
                    half_pi * torch.cos(half_pi * t), -half_pi * torch.sin(half_pi * t))
        s = 1.0 - t
        log_alpha = -0.25 * s ** 2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * s * VP_BETA_MIN
        half_beta = 0.5 * (VP_BETA_MIN + s * (VP_BETA_MAX - VP_BETA_MIN))  # d log(alpha) / dt
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))  # exact near t = 1, where alpha^2 ~ 1
        return alpha, sigma, alpha * half_beta, -alpha ** 2 * half_beta / sigma

    def interpolate(self, x1: torch.Tensor, x0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """x_t = alpha_t x1 + sigma_t x0 (data x1, noise x0)."""
        alpha, sigma, _, _ = self.coefficients(_expand(t, x1))
        return alpha * x1 + sigma * x0

    def target_velocity(self, x1: torch.Tensor, x0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """d x_t / dt = alpha'_t x1 + sigma'_t x0 (x1 - x0 on the linear path)."""
        _, _, d_alpha, d_sigma = self.coefficients(_expand(t, x1))
        return d_alpha * x1 + d_sigma * x0

    def training_interval(self) -> Tuple[float, float]:
        """(t0, t1) that training times are drawn from (SiT: [0, 1] narrowed by train_eps where singular)."""
        eps = self.train_eps
        if self.path == "vp":
            return 0.0, 1.0 - eps
        if self.prediction != "velocity":
            return eps, 1.0 - eps
        return 0.0, 1.0

    def sampling_interval(self, sde: bool = False, last_step_size: float = 0.0) -> Tuple[float, float]:
        """(t0, t1) that a sampler integrates over (SiT's choice per path and prediction, with sample_eps).

        The velocity prediction on the linear and GVP paths is finite everywhere: its ODE runs over all of [0, 1]
        whatever sample_eps (as in SiT). An SDE sampler with a last step ends at ``1 - last_step_size`` (the last
        step then jumps to t = 1).
        """
        eps = self.sample_eps
        t1 = 1.0 - last_step_size if (sde and last_step_size > 0) else 1.0 - eps
        if self.path == "vp":
            return 0.0, t1
        if self.prediction != "velocity":
            return eps, t1
        return 0.0, (t1 if sde else 1.0)

    # -- training ------------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device: Union[str, torch.device] = "cpu",
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training times [batch_size] (float32, on ``device``) in the training interval, by ``time_sampling``.

        Exactly one random draw from ``generator`` (made on the generator's device, then moved to ``device``).
        """
        gdev = generator.device if generator is not None else torch.device(device)
        if self.time_sampling == "uniform":
            u = torch.rand((batch_size,), generator=generator, device=gdev, dtype=torch.float32)
        else:
            z = torch.randn((batch_size,), generator=generator, device=gdev, dtype=torch.float32)
            u = torch.sigmoid(self.logit_mean + self.logit_std * z)
        t0, t1 = self.training_interval()
        return (t0 + (t1 - t0) * u).to(device)

    def _prediction(self, output: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """The prediction channels of a raw network output (the first C of 2C), in ``dtype``."""
        if output.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"model output has {output.shape[1]} channels, expected {channels} or "
                             f"{2 * channels} (learn_sigma) for {channels} input channels")
        return output[:, :channels].to(dtype)

    def loss_weight_at(self, t: torch.Tensor) -> torch.Tensor:
        """The loss weight at times t (1 for "none" and for the velocity prediction)."""
        if self.loss_weight == "none" or self.prediction == "velocity":
            return torch.ones_like(t)
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        wronskian = d_alpha * sigma - alpha * d_sigma
        if self.loss_weight == "velocity":
            return (wronskian / alpha) ** 2
        return wronskian / (alpha * sigma)

    def training_losses(self, model_fn: ModelFn, x1: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-sample losses [B]: {"loss": weighted, "mse": unweighted} for data x1 at flow times t.

        ``model_fn(x_t, t, **model_kwargs)`` sees t as given; the noise x0 is ``noise`` or ``randn_like(x1)``.
        The loss is the mean over non-batch dims of the weighted squared error of the prediction target
        (velocity: alpha' x1 + sigma' x0; noise: x0; score: sigma_t * output against -x0, as SiT).
        """
        if noise is None:
            noise = torch.randn_like(x1)
        wd = _work_dtype(x1)
        x1w, x0 = x1.to(wd), noise.to(wd)
        tw = _expand(t, x1w)
        alpha, sigma, d_alpha, d_sigma = self.coefficients(tw)
        x_t = alpha * x1w + sigma * x0
        out = model_fn(x_t, t, **(model_kwargs or {}))
        pred = self._prediction(out, x1.shape[1], wd)
        if self.prediction == "velocity":
            err = pred - (d_alpha * x1w + d_sigma * x0)
        elif self.prediction == "noise":
            err = pred - x0
        else:
            err = sigma * pred + x0
        mse = mean_flat(err ** 2)
        return {"loss": self.loss_weight_at(tw).reshape(-1) * mse, "mse": mse}

    # -- from a network output to the sampler's quantities ---------------------------------------------------------
    def noise_and_data(self, output: torch.Tensor, x_t: torch.Tensor,
                       t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x_t], E[x1 | x_t]) implied by a raw network output, in x_t's working dtype."""
        wd = _work_dtype(x_t)
        x = x_t.to(wd)
        pred = self._prediction(output, x.shape[1], wd)
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        if self.prediction == "velocity":
            wronskian = d_alpha * sigma - alpha * d_sigma
            return (d_alpha * x - alpha * pred) / wronskian, (sigma * pred - d_sigma * x) / wronskian
        eps = pred if self.prediction == "noise" else -sigma * pred
        return eps, (x - sigma * eps) / alpha

    def velocity(self, output: torch.Tensor, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """The probability-flow ODE drift dx/dt at (x_t, t) from a raw network output (any prediction type)."""
        wd = _work_dtype(x_t)
        if self.prediction == "velocity":
            return self._prediction(output, x_t.shape[1], wd)
        x = x_t.to(wd)
        eps, _ = self.noise_and_data(output, x, t)
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        # v = alpha' x1 + sigma' x0 with x1 = (x - sigma eps) / alpha.
        return (d_alpha * x - (d_alpha * sigma - alpha * d_sigma) * eps) / alpha

    def score(self, output: torch.Tensor, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """grad log p_t(x_t) from a raw network output (any prediction type): -E[x0 | x_t] / sigma_t."""
        wd = _work_dtype(x_t)
        if self.prediction == "score":
            return self._prediction(output, x_t.shape[1], wd)
        eps, _ = self.noise_and_data(output, x_t, t)
        _, sigma, _, _ = self.coefficients(_expand(t, eps))
        return -eps / sigma

    def sde_diffusion(self, t: TimeLike, diffusion_norm: float = 1.0) -> torch.Tensor:
        """w_t = diffusion_norm * sigma_t: the SDE is dx = [v + w_t score] dt + sqrt(2 w_t) dW."""
        return diffusion_norm * self.coefficients(_as_time(t))[1]

    def sde_drift(self, output: torch.Tensor, x_t: torch.Tensor, t: TimeLike,
                  diffusion_norm: float = 1.0) -> torch.Tensor:
        """v + w_t score = v - diffusion_norm * E[x0 | x_t] (finite wherever v and the noise estimate are)."""
        eps, _ = self.noise_and_data(output, x_t, t)
        return self.velocity(output, x_t, t) - diffusion_norm * eps


def create_transport(**kwargs) -> Transport:
    """A ``Transport`` from keyword arguments (e.g. a config section or ``Transport.describe()``)."""
    return Transport(**kwargs)


__all__ = ["Transport", "create_transport", "shift_time", "PATHS", "PREDICTIONS", "LOSS_WEIGHTS",
           "TIME_SAMPLINGS", "VP_BETA_MIN", "VP_BETA_MAX"]
