"""Flow-matching transport (dit/transport.py) against closed forms: paths, conventions, conversions, losses,
timestep sampling and the timestep shift.

The reference for everything is Gaussian data x1 ~ N(m, s^2) per element, where x_t = alpha x1 + sigma x0 is
Gaussian too, with V_t = Var(x_t) = alpha^2 s^2 + sigma^2, and the conditional expectations are linear:
E[x1 | x_t] = m + alpha s^2 (x_t - alpha m) / V_t and E[x0 | x_t] = sigma (x_t - alpha m) / V_t.
The optimal velocity E[d x_t / dt | x_t] = alpha' E[x1 | x_t] + sigma' E[x0 | x_t] = alpha' m + V'_t / (2 V_t)
(x_t - alpha m), and its flow map from t_a to t_b is x_b = alpha_b m + sqrt(V_b / V_a) (x_a - alpha_a m).
"""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from dit.transport import (LOSS_WEIGHTS, PATHS, PREDICTIONS, TIME_SAMPLINGS, VP_BETA_MAX, VP_BETA_MIN, Transport,
                           create_transport, shift_time)

f64 = torch.float64
M, S = 0.5, 0.5  # the Gaussian data N(M, S^2) of the closed forms


@pytest.fixture
def one_thread():
    """Many small elementwise ops: on a loaded 2-core machine intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# Closed-form references (written from the definitions, not from dit/transport.py)
# ---------------------------------------------------------------------------------------------------------------
def ref_alpha_sigma(path, t):
    """(alpha, sigma) of each path from the module docstring's definitions; VP via the integral of beta."""
    t = np.asarray(t, dtype=np.float64)
    if path == "linear":
        return t, 1.0 - t
    if path == "gvp":
        return np.sin(np.pi * t / 2), np.cos(np.pi * t / 2)
    # alpha_t = exp(-1/2 int_t^1 beta(r) dr) with beta(r) = beta_min + (1 - r)(beta_max - beta_min).
    integral = VP_BETA_MIN * (1 - t) + (VP_BETA_MAX - VP_BETA_MIN) * (1 - t) ** 2 / 2
    alpha = np.exp(-0.5 * integral)
    return alpha, np.sqrt(1.0 - alpha ** 2)


def gaussian_moments(transport, t, m=M, s=S):
    """alpha, sigma, alpha', sigma', V, V' at t (float64 tensor) for data N(m, s^2)."""
    a, sg, da, ds = transport.coefficients(t)
    return a, sg, da, ds, a ** 2 * s ** 2 + sg ** 2, 2 * (a * da * s ** 2 + sg * ds)


def gaussian_posterior(transport, x, t, m=M, s=S):
    """(E[x1 | x_t], E[x0 | x_t], optimal velocity, score) at x (float64) and per-sample times t [B]."""
    t = t.to(f64).reshape(-1, *([1] * (x.ndim - 1)))
    a, sg, da, ds, V, Vp = gaussian_moments(transport, t, m, s)
    r = x.to(f64) - a * m
    e1, e0 = m + a * s ** 2 * r / V, sg * r / V
    return e1, e0, da * m + Vp / (2 * V) * r, -r / V


def gaussian_output(transport, x, t, m=M, s=S, prediction=None):
    """The exact optimal network output of ``transport``'s prediction type for data N(m, s^2)."""
    _, e0, v, score = gaussian_posterior(transport, x, t, m, s)
    return {"velocity": v, "noise": e0, "score": score}[prediction or transport.prediction]


def gaussian_flow_map(transport, x, t_a, t_b, m=M, s=S):
    """Exact solution at t_b of the optimal probability-flow ODE started at x at t_a."""
    a_a, _, _, _, V_a, _ = gaussian_moments(transport, torch.tensor(t_a, dtype=f64), m, s)
    a_b, _, _, _, V_b, _ = gaussian_moments(transport, torch.tensor(t_b, dtype=f64), m, s)
    return a_b * m + torch.sqrt(V_b / V_a) * (x.to(f64) - a_a * m)


# ---------------------------------------------------------------------------------------------------------------
# Paths and conventions
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_coefficients_match_definitions_and_finite_differences(path):
    tr = Transport(path)
    t = torch.linspace(0.01, 0.99, 99, dtype=f64)
    a, sg, da, ds = tr.coefficients(t)
    ra, rs = ref_alpha_sigma(path, t.numpy())
    np.testing.assert_allclose(a.numpy(), ra, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sg.numpy(), rs, rtol=1e-12, atol=1e-14)
    h = 1e-6
    (ap, sp, _, _), (am, sm, _, _) = tr.coefficients(t + h), tr.coefficients(t - h)
    torch.testing.assert_close(da, (ap - am) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(ds, (sp - sm) / (2 * h), rtol=1e-7, atol=1e-8)
    assert a.dtype == f64 and (da > 0).all() and (ds < 0).all()  # data weight grows, noise weight shrinks
    if path != "linear":  # variance preserving
        torch.testing.assert_close(a ** 2 + sg ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_conventions_t0_noise_t1_data_velocity_points_to_data(path):
    tr = Transport(path)
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(3, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64)
    torch.testing.assert_close(tr.interpolate(x1, x0, 1.0), x1, rtol=0, atol=1e-12)  # t = 1 is data
    a0, s0, _, _ = tr.coefficients(torch.tensor(0.0, dtype=f64))
    if path == "vp":  # SiT's VP path only comes close to pure noise
        assert float(a0) == pytest.approx(math.exp(-(VP_BETA_MAX - VP_BETA_MIN) / 4 - VP_BETA_MIN / 2), rel=1e-12)
        assert float(a0) < 0.007 and float(s0) > 0.9999
    else:  # t = 0 is noise
        torch.testing.assert_close(tr.interpolate(x1, x0, 0.0), x0, rtol=0, atol=1e-12)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=f64)
    if path == "linear":
        torch.testing.assert_close(tr.target_velocity(x1, x0, t), x1 - x0, rtol=0, atol=0)
    # the velocity is d x_t / dt (sign included): a finite difference of the interpolation
    h = 1e-6
    fd = (tr.interpolate(x1, x0, t + h) - tr.interpolate(x1, x0, t - h)) / (2 * h)
    torch.testing.assert_close(tr.target_velocity(x1, x0, t), fd, rtol=1e-6, atol=1e-7)


def test_defaults_and_intervals_follow_sit():
    assert Transport().describe() == {"path": "linear", "prediction": "velocity", "loss_weight": "none",
                                      "time_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
                                      "train_eps": 0.0, "sample_eps": 0.0}
    lin_v, lin_n, vp = Transport("linear"), Transport("linear", "noise"), Transport("vp")
    assert lin_v.training_interval() == (0.0, 1.0) and lin_v.sampling_interval() == (0.0, 1.0)
    assert lin_n.training_interval() == (1e-3, 1 - 1e-3) and lin_n.sampling_interval() == (1e-3, 1 - 1e-3)
    assert Transport("gvp", "score").training_interval() == (1e-3, 1 - 1e-3)
    assert vp.training_interval() == (0.0, 1 - 1e-5) and vp.sampling_interval() == (0.0, 1 - 1e-3)
    # SDE: the last step starts at 1 - last_step_size; t0 stays 0 for velocity (SiT's "sigma" diffusion form)
    assert lin_v.sampling_interval(sde=True, last_step_size=0.04) == (0.0, 0.96)
    assert lin_n.sampling_interval(sde=True, last_step_size=0.04) == (1e-3, 0.96)
    assert Transport("linear", train_eps=0.01, sample_eps=0.02).describe()["sample_eps"] == 0.02
    assert Transport("vp", train_eps=0.1, sample_eps=0.2).training_interval() == (0.0, 0.9)


def test_describe_round_trips_through_json():
    tr = Transport("gvp", "noise", "likelihood", "logit_normal", logit_mean=-0.5, logit_std=1.5, train_eps=0.01)
    d = json.loads(json.dumps(tr.describe()))
    again = create_transport(**d)
    assert again.describe() == tr.describe() and again.sample_eps == 1e-3 and again.train_eps == 0.01
    assert set(d) == {"path", "prediction", "loss_weight", "time_sampling", "logit_mean", "logit_std",
                      "train_eps", "sample_eps"}


@pytest.mark.parametrize("kwargs,name", [
    ({"path": "Linear"}, "path"), ({"prediction": "v"}, "prediction"), ({"loss_weight": None}, "loss_weight"),
    ({"time_sampling": "lognorm"}, "time_sampling"), ({"logit_std": 0.0}, "logit_std"),
    ({"logit_mean": float("nan")}, "logit_mean"), ({"train_eps": -0.1}, "train_eps"),
    ({"sample_eps": 0.5}, "sample_eps"), ({"train_eps": "0"}, "train_eps"),
    ({"prediction": "velocity", "loss_weight": "likelihood"}, "loss_weight"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Transport(**kwargs)


def test_lists_of_choices():
    assert PATHS == ("linear", "gvp", "vp") and PREDICTIONS == ("velocity", "noise", "score")
    assert LOSS_WEIGHTS == ("none", "velocity", "likelihood") and TIME_SAMPLINGS == ("uniform", "logit_normal")


# ---------------------------------------------------------------------------------------------------------------
# Timestep shift
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 6.0])
def test_shift_time_closed_form(shift):
    t = torch.linspace(0, 1, 1001, dtype=f64)
    out = shift_time(t, shift)
    assert out.dtype == f64 and float(out[0]) == 0.0 and float(out[-1]) == 1.0
    assert (out[1:] > out[:-1]).all()  # strictly increasing
    s, s_shifted = 1 - t[1:-1], 1 - out[1:-1]
    # the noise-to-data odds are multiplied by the shift
    torch.testing.assert_close(s_shifted / (1 - s_shifted), shift * s / (1 - s), rtol=1e-10, atol=0)
    torch.testing.assert_close(shift_time(out, 1 / shift), t, rtol=0, atol=1e-12)  # 1/shift inverts it
    if shift == 1.0:
        torch.testing.assert_close(out, t, rtol=0, atol=1e-15)
    elif shift > 1:  # every time moves towards noise: a uniform grid spends more steps near t = 0
        assert (out[1:-1] < t[1:-1]).all()
        assert float(shift_time(torch.tensor(0.5, dtype=f64), shift)) == pytest.approx(1 / (1 + shift))


def test_shift_time_composes_and_checks_its_argument():
    t = torch.rand(100, dtype=f64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shift_time(shift_time(t, 2.0), 1.5), shift_time(t, 3.0), rtol=0, atol=1e-12)
    assert shift_time(0.25, 3.0).dtype == f64 and float(shift_time(0.25, 3.0)) == pytest.approx(1 - 2.25 / 2.5)
    for bad in (0.0, -1.0, float("inf"), "3"):
        with pytest.raises(ValueError, match="shift"):
            shift_time(t, bad)


# ---------------------------------------------------------------------------------------------------------------
# Training timesteps
# ---------------------------------------------------------------------------------------------------------------
def _logit_normal_cdf(t, mean, std, t0, t1):
    u = (np.asarray(t) - t0) / (t1 - t0)
    return stats.norm.cdf((np.log(u) - np.log1p(-u) - mean) / std)


@pytest.mark.parametrize("prediction,mean,std", [("velocity", 0.0, 1.0), ("velocity", -0.8, 1.6), ("noise", 0.5, 0.7)])
def test_logit_normal_timesteps_match_their_density(prediction, mean, std):
    tr = Transport("linear", prediction, time_sampling="logit_normal", logit_mean=mean, logit_std=std)
    t0, t1 = tr.training_interval()
    t = tr.sample_timesteps(20000, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and t.shape == (20000,) and t.min() >= t0 and t.max() <= t1
    ks = stats.kstest(t.double().numpy(), lambda v: _logit_normal_cdf(v, mean, std, t0, t1))
    assert ks.pvalue > 1e-3, ks
    # the test can fail: the same draws are far from a logit-normal with another mean, and from a uniform
    assert stats.kstest(t.double().numpy(), lambda v: _logit_normal_cdf(v, mean + 0.1, std, t0, t1)).pvalue < 1e-6
    assert stats.kstest(t.double().numpy(), stats.uniform(t0, t1 - t0).cdf).pvalue < 1e-6


@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("linear", "score"), ("vp", "velocity")])
def test_uniform_timesteps_cover_the_training_interval(path, prediction):
    tr = Transport(path, prediction)
    t0, t1 = tr.training_interval()
    t = tr.sample_timesteps(20000, generator=torch.Generator().manual_seed(2))
    assert t.dtype == torch.float32 and t.min() >= t0 and t.max() <= t1
    assert stats.kstest(t.double().numpy(), stats.uniform(t0, t1 - t0).cdf).pvalue > 1e-3


@pytest.mark.parametrize("time_sampling,draw", [("uniform", torch.rand), ("logit_normal", torch.randn)])
def test_timesteps_are_one_draw_from_the_generator(time_sampling, draw):
    tr = Transport(time_sampling=time_sampling, logit_mean=0.3, logit_std=0.9)
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = tr.sample_timesteps(7, generator=g)
    u = draw(7, generator=ref)
    expected = u if time_sampling == "uniform" else torch.sigmoid(0.3 + 0.9 * u)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-7)
    # the generator advanced by exactly that one draw: the next draws agree
    torch.testing.assert_close(torch.randn(5, generator=g), torch.randn(5, generator=ref), rtol=0, atol=0)


def test_timesteps_are_drawn_on_the_generator_device_and_moved():
    tr = Transport(time_sampling="logit_normal")
    g = torch.Generator(device="cpu").manual_seed(0)
    t = tr.sample_timesteps(4, device="meta", generator=g)  # a device the CPU generator cannot draw on
    assert t.device.type == "meta" and t.shape == (4,)
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


# ---------------------------------------------------------------------------------------------------------------
# Conversions between prediction types
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_prediction_gives_the_same_drift_score_and_estimates(path, prediction):
    tr = Transport(path, prediction)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9, 0.97], dtype=f64)
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=f64) + 0.3
    e1, e0, v, score = gaussian_posterior(tr, x, t)
    out = gaussian_output(tr, x, t)
    torch.testing.assert_close(tr.velocity(out, x, t), v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tr.score(out, x, t), score, rtol=1e-10, atol=1e-10)
    noise_hat, data_hat = tr.noise_and_data(out, x, t)
    torch.testing.assert_close(noise_hat, e0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(data_hat, e1, rtol=1e-9, atol=1e-9)
    tb = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(tr.sde_drift(out, x, t, 0.7), v - 0.7 * e0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tr.sde_diffusion(tb, 0.7), 0.7 * tr.coefficients(tb)[1], rtol=0, atol=0)
    # learn_sigma: a 2C-channel output has its last C channels ignored
    wide = torch.cat([out, torch.full_like(out, 1e3)], dim=1)
    torch.testing.assert_close(tr.velocity(wide, x, t), tr.velocity(out, x, t), rtol=0, atol=0)


def test_velocity_of_a_velocity_model_is_its_output_in_the_working_dtype():
    tr = Transport()
    x = torch.randn(2, 4, 2, 2, dtype=f64)
    out = torch.randn(2, 8, 2, 2).to(torch.bfloat16)
    v = tr.velocity(out, x, torch.tensor([0.0, 1.0]))  # finite at both ends
    assert v.dtype == f64 and torch.equal(v, out[:, :4].to(f64))
    with pytest.raises(ValueError, match="channels"):
        tr.velocity(torch.zeros(2, 3, 2, 2), x, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------------------------
def sit_weight(transport, t):
    """SiT's loss weights written with its drift_var = (alpha'/alpha) sigma^2 - sigma sigma'."""
    a, sg, da, ds = transport.coefficients(t)
    drift_var = da / a * sg ** 2 - sg * ds
    if transport.prediction == "velocity" or transport.loss_weight == "none":
        return torch.ones_like(t)
    return (drift_var / sg) ** 2 if transport.loss_weight == "velocity" else drift_var / sg ** 2


def irreducible(transport, t):
    """E[(optimal - target)^2] per element: Var(velocity | x_t), or Var(x0 | x_t) for noise and score."""
    a, sg, da, ds, V, Vp = gaussian_moments(transport, t)
    if transport.prediction == "velocity":
        return da ** 2 * S ** 2 + ds ** 2 - (Vp / 2) ** 2 / V
    return 1 - sg ** 2 / V


CASES = [(p, pred, w) for p in PATHS for pred in PREDICTIONS for w in LOSS_WEIGHTS
         if not (pred == "velocity" and w == "likelihood")]


@pytest.mark.parametrize("path,prediction,weight", CASES)
def test_optimal_output_gives_the_irreducible_loss_and_zero_gradient(path, prediction, weight, one_thread):
    tr = Transport(path, prediction, weight)
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=f64)
    x1 = M + S * torch.randn(5, 2, 100, 100, generator=g, dtype=f64)
    noise = torch.randn(x1.shape, generator=g, dtype=f64)
    theta = torch.zeros((), dtype=f64, requires_grad=True)
    seen = []

    def model(x_t, tt, delta):
        seen.append(tt)
        return gaussian_output(tr, x_t, tt) + delta * (1 + x_t)

    terms = tr.training_losses(model, x1, t, {"delta": theta}, noise)
    assert seen[0] is t and terms["loss"].shape == (5,) and terms["mse"].shape == (5,)
    torch.testing.assert_close(terms["loss"], sit_weight(tr, t) * irreducible(tr, t), rtol=0.03, atol=0)
    torch.testing.assert_close(terms["loss"], tr.loss_weight_at(t) * terms["mse"], rtol=1e-12, atol=0)
    (grad0,) = torch.autograd.grad(terms["loss"].sum(), theta)
    # a perturbed output has a clearly non-zero gradient: the optimum's is zero up to sampling noise
    off = torch.full((), 0.05, dtype=f64, requires_grad=True)
    (grad_off,) = torch.autograd.grad(tr.training_losses(model, x1, t, {"delta": off}, noise)["loss"].sum(), off)
    assert abs(float(grad0)) < 0.05 * abs(float(grad_off)), (float(grad0), float(grad_off))


@pytest.mark.parametrize("path", PATHS)
def test_velocity_weight_makes_the_noise_loss_the_velocity_error(path):
    """For ANY network output: the "velocity"-weighted noise/score loss equals the squared error of the implied
    velocity against the true d x_t / dt, i.e. the plain loss of a velocity model predicting that velocity."""
    g = torch.Generator().manual_seed(6)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=f64)
    x1, noise = torch.randn(3, 4, 5, generator=g, dtype=f64), torch.randn(3, 4, 5, generator=g, dtype=f64)
    wild = torch.randn(3, 4, 5, generator=g, dtype=f64)
    vel = Transport(path, "velocity")
    for prediction in ("noise", "score"):
        tr = Transport(path, prediction, "velocity")
        implied = tr.velocity(wild, tr.interpolate(x1, noise, t), t)
        ours = tr.training_losses(lambda x, tt: wild, x1, t, noise=noise)["loss"]
        theirs = vel.training_losses(lambda x, tt: implied, x1, t, noise=noise)["loss"]
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)


def test_training_losses_contract():
    tr = Transport("linear")
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(3, 4, 2, 2, generator=g)
    noise = torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.5, 1.0])
    out = tr.training_losses(lambda x, tt: torch.zeros_like(x), x1, t, noise=noise)
    torch.testing.assert_close(out["loss"], ((x1 - noise) ** 2).mean(dim=(1, 2, 3)))  # target x1 - x0
    assert out["loss"].dtype == torch.float32
    # learn_sigma: the second half of 2C output channels is ignored (and gets no gradient)
    wide = torch.randn(3, 8, 2, 2, generator=g, requires_grad=True)
    loss = tr.training_losses(lambda x, tt: wide, x1, t, noise=noise)["loss"].sum()
    (grad,) = torch.autograd.grad(loss, wide)
    assert (grad[:, 4:] == 0).all() and (grad[:, :4] != 0).any()
    with pytest.raises(ValueError, match="channels"):
        tr.training_losses(lambda x, tt: torch.zeros(3, 5, 2, 2), x1, t, noise=noise)
    # the noise defaults to the global RNG, like GaussianDiffusion
    torch.manual_seed(0)
    a = tr.training_losses(lambda x, tt: torch.zeros_like(x), x1, t)["loss"]
    torch.manual_seed(0)
    b = tr.training_losses(lambda x, tt: torch.zeros_like(x), x1, t, noise=torch.randn_like(x1))["loss"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
