"""Gaussian diffusion (DDPM / ADM / DiT semantics): schedules, forward noising, posterior, losses, respacing.

Schedule constants are computed in float64 numpy arrays and cast to the working dtype when indexed, as in ADM.
A respaced diffusion keeps a ``timestep_map`` so the model is always called with *original* timestep indices.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

PREDICTIONS = ("eps", "v", "x0")
LOSSES = ("mse", "l1")
SCHEDULES = ("linear", "cosine")

ModelFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------------------------
def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas (float64) whose cumulative product follows ``alpha_bar(t)`` for t in [0, 1], capped at ``max_beta``."""
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float64)


def get_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Named beta schedule in float64: "linear" (1e-4..2e-2 at T=1000, scaled by 1000/T) or "cosine"."""
    if num_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_steps}")
    if name == "linear":
        # ADM: scale so that the schedule keeps its shape (and total noise) for any number of steps.
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 2e-2, num_steps, dtype=np.float64)
    if name == "cosine":
        # Nichol & Dhariwal (2021), s = 0.008.
        return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise_schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> Set[int]:
    """Timesteps kept from the original process (ADM semantics).

    ``section_counts`` is "ddimN" (a fixed integer stride giving N steps), a comma-separated string ("10,15,20":
    the process is cut into equal sections and each keeps that many evenly spaced steps), an int or a list of ints.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * k) for k in range(count)]
        start += size
    return set(steps)


# ----------------------------------------------------------------------------------------------------------------
# Elementwise helpers (closed forms used by the VLB term)
# ----------------------------------------------------------------------------------------------------------------
def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats) of data in [-1, 1] quantised to 256 bins under a Gaussian (ADM's decoder at t=0).

    The outermost bins extend to +-infinity. Uses the exact normal CDF (ADM uses a tanh approximation).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16) is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """A discrete Gaussian diffusion process q(x_t | x_0) with a model parameterisation and training loss.

    Args:
        betas: float64 betas of this (possibly respaced) process.
        prediction: what the model's first C output channels predict: "eps", "v" or "x0".
        learn_sigma: the model outputs 2C channels; the last C interpolate log variance between beta-tilde and beta
            (ADM "learned range") and are trained by the VLB term. Otherwise the variance is fixed to beta
            ("fixed large", DiT's choice) or beta-tilde when ``sigma_small``.
        loss: "mse" or "l1" on the prediction target.
        timestep_map: original timestep index of each step of this process (identity when not respaced).
        base_betas: betas of the original process (for respacing again); defaults to ``betas``.
    """

    def __init__(self, betas: np.ndarray, *, prediction: str = "eps", learn_sigma: bool = True, loss: str = "mse",
                 sigma_small: bool = False, timestep_map: Optional[Sequence[int]] = None,
                 base_betas: Optional[np.ndarray] = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.prediction, self.learn_sigma, self.loss_type, self.sigma_small = prediction, learn_sigma, loss, sigma_small
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(self.num_timesteps),
                                       dtype=np.int64)
        self.base_betas = np.asarray(base_betas if base_betas is not None else betas, dtype=np.float64)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t=0: clip its log to the value at t=1 (ADM).
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        # Fixed log variances: "small" = beta-tilde (clipped); "large" = beta_t, except beta-tilde_1 at t=0 for a
        # better decoder likelihood (ADM).
        self.fixed_log_variance = (self.posterior_log_variance_clipped if sigma_small
                                   else np.log(np.append(pv1, betas[1:])))
        self._device_tables: Dict[Tuple[str, str], torch.Tensor] = {}

    # -- indexing ------------------------------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """The schedule array `name` as a tensor on `device`, made once per device and kept.

        Indexing a fresh `torch.as_tensor(numpy_array, device=cuda)` would copy the array from host memory at
        every call: a blocking host-to-device copy per schedule lookup (about 15 per training step and 10 per
        sampling step), which stops the host from queueing work ahead of the GPU."""
        key = (name, str(device))
        table = self._device_tables.get(key)
        if table is None:
            arr = getattr(self, name)
            if device.type == "mps":  # no float64 there
                table = torch.as_tensor(arr, dtype=torch.float32 if arr.dtype.kind == "f" else None).to(device)
            else:
                table = torch.as_tensor(arr).to(device)
            self._device_tables[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The schedule array `name` at steps t, broadcastable against ``like``, in ``like``'s working dtype."""
        out = self._table(name, t.device)[t].to(device=like.device, dtype=_work_dtype(like))
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original-process timestep indices the model is conditioned on, for indices ``t`` of this process."""
        return self._table("timestep_map", t.device)[t]

    def sample_timesteps(self, batch_size: int, device: Union[str, torch.device] = "cpu",
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform training timesteps in [0, num_timesteps)."""
        gdev = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gdev).to(device)

    def respace(self, timestep_respacing: Union[str, int, Sequence[int]]) -> "GaussianDiffusion":
        """A process on a subset of the ORIGINAL timesteps (see ``space_timesteps``) with the same parameterisation."""
        return _spaced(self.base_betas, timestep_respacing, prediction=self.prediction,
                       learn_sigma=self.learn_sigma, loss=self.loss_type, sigma_small=self.sigma_small)

    # -- forward process and posterior ---------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the given noise if any."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        e = self._extract
        mean = e("posterior_mean_coef1", t, x_t) * x0 + e("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self._extract("posterior_variance", t, x_t),
                self._extract("posterior_log_variance_clipped", t, x_t))

    # -- conversions between parameterisations -------------------------------------------------------------------
    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        e = self._extract
        return e("sqrt_recip_alphas_cumprod", t, x_t) * x_t - e("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
        e = self._extract
        return (e("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / e("sqrt_recipm1_alphas_cumprod", t, x_t)

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        e = self._extract
        return e("sqrt_alphas_cumprod", t, x_t) * x_t - e("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho)."""
        e = self._extract
        return e("sqrt_alphas_cumprod", t, x0) * eps - e("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of this process's prediction type."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.v_target(x0, t, noise)

    def x0_from_prediction(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """x_0 implied by the model's mean-channel output."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, pred)
        if self.prediction == "x0":
            return pred
        return self.x0_from_v(x_t, t, pred)

    # -- the model's reverse step --------------------------------------------------------------------------------
    def call_model(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor,
                   model_kwargs: Optional[dict] = None) -> torch.Tensor:
        """Run the model on x_t at this process's step t (mapped to original timesteps)."""
        return model_fn(x_t, self.model_timesteps(t), **(model_kwargs or {}))

    def split_output(self, out: torch.Tensor, channels: int):
        """(mean-target prediction, variance values or None) from a raw model output, in fp32 or wider."""
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != expected:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {expected} "
                             f"(learn_sigma={self.learn_sigma}, input channels={channels})")
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if self.learn_sigma:
            return out[:, :channels], out[:, channels:]
        return out, None

    def p_mean_variance_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = False) -> Dict[str, torch.Tensor]:
        """Mean, variance, log variance and x_0 prediction of p(x_{t-1} | x_t) given a raw model output."""
        pred, var_values = self.split_output(out, x_t.shape[1])
        pred = pred.to(_work_dtype(x_t))
        if var_values is not None:
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (var_values.to(min_log.dtype) + 1.0) / 2.0  # model outputs [-1, 1]
            log_var = frac * max_log + (1.0 - frac) * min_log
        else:
            log_var = self._extract("fixed_log_variance", t, x_t).expand_as(x_t)
        x0 = self.x0_from_prediction(x_t, t, pred)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var, "pred_x0": x0}

    def p_mean_variance(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                        model_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """Run the model and return mean, variance, log variance, x_0 prediction (and the raw output)."""
        out = self.call_model(model_fn, x_t, t, model_kwargs)
        res = self.p_mean_variance_from_output(out, x_t, t, clip_denoised)
        res["model_output"] = out
        return res

    # -- losses --------------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p) for t>0, decoder NLL at t=0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-sample losses: {"loss", <loss type>} and, with learned sigma, "vb" (hybrid loss = base + vb).

        The VLB term sees the mean prediction detached, so it only trains the variance channels (ADM/DiT).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self.call_model(model_fn, x_t, t, model_kwargs)
        pred, var_values = self.split_output(out, x0.shape[1])
        target = self.target(x0, t, noise).to(pred.dtype)
        diff = pred - target
        base = mean_flat(diff ** 2) if self.loss_type == "mse" else mean_flat(diff.abs())
        terms = {self.loss_type: base, "loss": base}
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0.to(pred.dtype), x_t.to(pred.dtype), t)
            terms["loss"] = base + terms["vb"]
        return terms


def _spaced(base_betas: np.ndarray, spacing, **kw) -> GaussianDiffusion:
    """Respaced process keeping ``space_timesteps(len(base_betas), spacing)`` of the original steps."""
    T = len(base_betas)
    keep = space_timesteps(T, spacing)
    ac = np.cumprod(1.0 - base_betas)
    last, betas, tmap = 1.0, [], []
    for i in range(T):
        if i in keep:
            # New betas reproduce the original alphas_cumprod exactly at the kept steps.
            betas.append(1.0 - ac[i] / last)
            last = ac[i]
            tmap.append(i)
    return GaussianDiffusion(np.asarray(betas), timestep_map=tmap, base_betas=base_betas, **kw)


def create_diffusion(noise_schedule: str = "linear", diffusion_steps: int = 1000,
                     timestep_respacing: Union[str, int, Sequence[int], None] = "", prediction: str = "eps",
                     learn_sigma: bool = True, loss: str = "mse", sigma_small: bool = False) -> GaussianDiffusion:
    """Build a diffusion process (DiT defaults: linear betas, 1000 steps, eps prediction, learned sigma, MSE).

    ``timestep_respacing``: "" / None for all steps, "250", "ddim50", "10,20,30" or an int.
    """
    betas = get_beta_schedule(noise_schedule, diffusion_steps)
    kw = dict(prediction=prediction, learn_sigma=learn_sigma, loss=loss, sigma_small=sigma_small)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, **kw)
    return _spaced(betas, timestep_respacing, **kw)


__all__ = ["GaussianDiffusion", "create_diffusion", "get_beta_schedule", "betas_for_alpha_bar", "space_timesteps",
           "normal_kl", "discretized_gaussian_log_likelihood", "mean_flat"]
