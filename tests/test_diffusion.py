"""Gaussian diffusion against float64 closed forms (schedules, posterior, q_sample, VLB, respacing, losses)."""
import math

import numpy as np
import pytest
import torch

from dit.diffusion import (create_diffusion, discretized_gaussian_log_likelihood, get_beta_schedule, normal_kl,
                           space_timesteps)

f64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
def test_linear_schedule_endpoints_and_scaling():
    b = get_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, rel=1e-12) and b[-1] == pytest.approx(2e-2, rel=1e-12)
    assert np.all(np.diff(b) > 0)
    b250 = get_beta_schedule("linear", 250)  # ADM: scaled by 1000/T
    assert b250[0] == pytest.approx(4e-4, rel=1e-12) and b250[-1] == pytest.approx(8e-2, rel=1e-12)


def test_alphas_cumprod_is_the_direct_product():
    d = create_diffusion(diffusion_steps=1000)
    prod, ref = 1.0, []
    for beta in d.betas:
        prod *= 1.0 - float(beta)
        ref.append(prod)
    np.testing.assert_allclose(d.alphas_cumprod, ref, rtol=1e-12, atol=0)
    assert d.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], ref[:-1], rtol=1e-12)
    assert d.num_timesteps == 1000


def test_cosine_schedule_formula():
    T, s = 1000, 0.008
    d = create_diffusion(noise_schedule="cosine", diffusion_steps=T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    # The max_beta=0.999 clip only binds at the very end.
    np.testing.assert_allclose(d.alphas_cumprod[:990], expected[:990], rtol=1e-10)
    assert d.betas.max() <= 0.999 and d.betas.min() > 0


def test_bad_names_raise():
    with pytest.raises(ValueError, match="noise_schedule.*linear"):
        create_diffusion(noise_schedule="quadratic")
    with pytest.raises(ValueError, match="prediction.*eps"):
        create_diffusion(prediction="score")
    with pytest.raises(ValueError, match="loss.*mse"):
        create_diffusion(loss="huber")


# ---------------------------------------------------------------------------------------------------------------
# Forward process and posterior
# ---------------------------------------------------------------------------------------------------------------
def test_posterior_matches_gaussian_product():
    d = create_diffusion(noise_schedule="cosine", diffusion_steps=200)
    g = torch.Generator().manual_seed(0)
    for t_val in [1, 2, 57, 150, 199]:
        x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=f64)
        xt = torch.randn(3, 2, 4, 4, generator=g, dtype=f64)
        t = torch.full((3,), t_val)
        mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
        alpha, beta = 1 - d.betas[t_val], d.betas[t_val]
        abp = d.alphas_cumprod[t_val - 1]
        # q(x_t | x_{t-1}) as a function of x_{t-1}: N(x_t / sqrt(alpha), beta / alpha); times q(x_{t-1} | x_0).
        prec = alpha / beta + 1 / (1 - abp)
        ref_mean = (math.sqrt(alpha) / beta * xt + math.sqrt(abp) / (1 - abp) * x0) / prec
        torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
        assert var.flatten()[0].item() == pytest.approx(1 / prec, rel=1e-10)
        assert logvar.flatten()[0].item() == pytest.approx(math.log(1 / prec), rel=1e-10)
    # t = 0: the posterior is a point mass at x_0; its log variance is clipped to the t=1 value.
    x0, xt = torch.randn(2, 1, 3, 3, dtype=f64), torch.randn(2, 1, 3, 3, dtype=f64)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-12)
    assert float(var.abs().max()) == 0.0
    assert logvar.flatten()[0].item() == pytest.approx(math.log(d.posterior_variance[1]), rel=1e-12)


@pytest.mark.parametrize("t_val", [0, 100, 500, 999])
def test_q_sample_moments(t_val):
    d = create_diffusion()
    n = 200_000
    g = torch.Generator().manual_seed(t_val)
    x0 = torch.tensor([-0.8, 0.3, 1.0], dtype=f64).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    xt = d.q_sample(x0, torch.full((n,), t_val), torch.randn(n, 3, 1, 1, generator=g, dtype=f64))
    ab = d.alphas_cumprod[t_val]
    mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
    exp_mean, exp_var = math.sqrt(ab) * x0[0].flatten(), 1 - ab
    sd_mean, sd_var = math.sqrt(exp_var / n), exp_var * math.sqrt(2 / (n - 1))
    assert torch.all((mean - exp_mean).abs() < 5 * sd_mean), (mean, exp_mean)
    assert torch.all((var - exp_var).abs() < 5 * sd_var), (var, exp_var)


def test_q_sample_dtype_and_default_noise():
    d = create_diffusion()
    x0 = torch.randn(4, 3, 2, 2)
    xt = d.q_sample(x0, torch.tensor([0, 10, 500, 999]))
    assert xt.dtype == torch.float32 and xt.shape == x0.shape and torch.isfinite(xt).all()


# ---------------------------------------------------------------------------------------------------------------
# Parameterisation conversions
# ---------------------------------------------------------------------------------------------------------------
def test_eps_v_x0_conversions_invert_each_other():
    d = create_diffusion(noise_schedule="cosine")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=f64)
    eps = torch.randn(5, 2, 3, 3, generator=g, dtype=f64)
    t = torch.tensor([0, 1, 400, 900, 999])
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.x0_from_eps(xt, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(d.eps_from_x0(xt, t, x0), eps, rtol=0, atol=1e-9)
    v = d.v_target(x0, t, eps)
    torch.testing.assert_close(d.x0_from_v(xt, t, v), x0, rtol=0, atol=1e-12)
    # v closed form: sqrt(abar) eps - sqrt(1 - abar) x0
    ab = torch.as_tensor(d.alphas_cumprod[t.numpy()]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=0, atol=1e-14)
    for pred, target in [("eps", eps), ("v", v), ("x0", x0)]:
        dp = create_diffusion(noise_schedule="cosine", prediction=pred)
        torch.testing.assert_close(dp.target(x0, t, eps), target)
        torch.testing.assert_close(dp.x0_from_prediction(xt, t, target), x0, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# VLB pieces
# ---------------------------------------------------------------------------------------------------------------
def test_normal_kl_against_numerical_integral():
    x = np.linspace(-30, 30, 600_001)
    for m1, lv1, m2, lv2 in [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.5, 0.4), (2.0, 1.2, 1.5, -0.7)]:
        logp = -0.5 * (np.log(2 * np.pi) + lv1 + (x - m1) ** 2 / np.exp(lv1))
        logq = -0.5 * (np.log(2 * np.pi) + lv2 + (x - m2) ** 2 / np.exp(lv2))
        ref = np.trapezoid(np.exp(logp) * (logp - logq), x) if hasattr(np, "trapezoid") else \
            np.trapz(np.exp(logp) * (logp - logq), x)
        got = normal_kl(*(torch.tensor(v, dtype=f64) for v in (m1, lv1, m2, lv2))).item()
        assert got == pytest.approx(ref, abs=1e-8)


def _bin_loglik(x, mean, std):
    """Probability mass of the 8-bit bin of x under N(mean, std^2), edges at +-infinity."""
    cdf = lambda z: 0.5 * (1 + math.erf((z - mean) / (std * math.sqrt(2))))
    hi = 1.0 if x > 0.999 else cdf(x + 1 / 255)
    lo = 0.0 if x < -0.999 else cdf(x - 1 / 255)
    return math.log(max(hi - lo, 1e-12))  # the implementation clamps probabilities at 1e-12


def test_discretized_gaussian_log_likelihood_closed_form():
    xs = [-1.0, -1 + 2 / 255, -0.2, 0.0, 0.5, 1.0]
    for mean, std in [(0.0, 0.01), (0.1, 0.3), (-0.9, 0.05), (0.8, 1.5)]:
        got = discretized_gaussian_log_likelihood(torch.tensor(xs, dtype=f64), torch.full((6,), mean, dtype=f64),
                                                  torch.full((6,), math.log(std), dtype=f64))
        ref = [_bin_loglik(x, mean, std) for x in xs]
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def _const_model(out):
    return lambda x, t, **kw: out


def test_vb_term_against_closed_form():
    """vb (bits/dim) = KL(posterior || learned-range Gaussian) for t>0, the decoder NLL at t=0."""
    d = create_diffusion(diffusion_steps=100, learn_sigma=True)
    g = torch.Generator().manual_seed(3)
    C = 2
    x0 = (torch.randint(0, 256, (2, C, 2, 2), generator=g).to(f64) / 127.5 - 1)
    eps = torch.randn(2, C, 2, 2, generator=g, dtype=f64)
    for t_val in [0, 1, 37, 99]:
        t = torch.full((2,), t_val)
        xt = d.q_sample(x0, t, eps)
        pred_eps = torch.randn(2, C, 2, 2, generator=g, dtype=f64)
        var_v = torch.rand(2, C, 2, 2, generator=g, dtype=f64) * 2 - 1
        vb = d.vb_terms_bpd(torch.cat([pred_eps, var_v], 1), x0, xt, t)
        # Reference with numpy/math scalars, element by element.
        ab, abp, beta = d.alphas_cumprod[t_val], d.alphas_cumprod_prev[t_val], d.betas[t_val]
        post_var = d.posterior_variance[1] if t_val == 0 else beta * (1 - abp) / (1 - ab)
        c1, c2 = beta * math.sqrt(abp) / (1 - ab), (1 - abp) * math.sqrt(1 - beta) / (1 - ab)
        for b in range(2):
            total = 0.0
            for idx in np.ndindex(C, 2, 2):
                xv, xtv, ev, vv = (float(a[b][idx]) for a in (x0, xt, pred_eps, var_v))
                x0_hat = (xtv - math.sqrt(1 - ab) * ev) / math.sqrt(ab)
                mu_p = c1 * x0_hat + c2 * xtv
                frac = (vv + 1) / 2
                logvar_p = frac * math.log(beta) + (1 - frac) * math.log(post_var)
                if t_val == 0:
                    total += -_bin_loglik(xv, mu_p, math.exp(0.5 * logvar_p))
                else:
                    mu_q = c1 * xv + c2 * xtv
                    total += 0.5 * (-1 + logvar_p - math.log(post_var) + post_var / math.exp(logvar_p)
                                    + (mu_q - mu_p) ** 2 / math.exp(logvar_p))
            assert vb[b].item() == pytest.approx(total / (C * 4) / math.log(2), rel=1e-7, abs=1e-10), t_val


def test_vb_zero_for_the_true_posterior():
    """True eps and v=-1 (variance = beta-tilde) make p equal the posterior: KL = 0 for t >= 1."""
    d = create_diffusion(diffusion_steps=50)
    x0, eps = torch.randn(4, 3, 2, 2, dtype=f64), torch.randn(4, 3, 2, 2, dtype=f64)
    t = torch.tensor([1, 2, 25, 49])
    xt = d.q_sample(x0, t, eps)
    vb = d.vb_terms_bpd(torch.cat([eps, -torch.ones_like(eps)], 1), x0, xt, t)
    torch.testing.assert_close(vb, torch.zeros(4, dtype=f64), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_training_losses_zero_for_the_exact_target(prediction, loss):
    d = create_diffusion(diffusion_steps=100, prediction=prediction, learn_sigma=False, loss=loss)
    x0, noise = torch.randn(3, 2, 4, 4, dtype=f64), torch.randn(3, 2, 4, 4, dtype=f64)
    t = torch.tensor([0, 50, 99])
    target = d.target(x0, t, noise)
    terms = d.training_losses(lambda x, tt: target, x0, t, noise=noise)
    assert set(terms) == {"loss", loss}
    torch.testing.assert_close(terms["loss"], torch.zeros(3, dtype=f64), rtol=0, atol=1e-12)
    off = d.training_losses(lambda x, tt: target + 0.5, x0, t, noise=noise)["loss"]
    torch.testing.assert_close(off, torch.full((3,), 0.25 if loss == "mse" else 0.5, dtype=f64))


def test_hybrid_loss_terms_and_frozen_mean():
    d = create_diffusion(diffusion_steps=100, learn_sigma=True)
    x0, noise = torch.rand(2, 3, 4, 4, dtype=f64) * 2 - 1, torch.randn(2, 3, 4, 4, dtype=f64)
    t = torch.tensor([0, 60])
    out = torch.cat([noise + 0.1 * torch.randn_like(noise), torch.rand_like(noise) * 2 - 1], 1).requires_grad_(True)
    received = {}

    def model_fn(x, tt, y=None):
        received["t"], received["y"] = tt, y
        return out

    terms = d.training_losses(model_fn, x0, t, model_kwargs={"y": torch.tensor([1, 2])}, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (2,)
    assert received["y"].tolist() == [1, 2]
    torch.testing.assert_close(terms["mse"], ((out[:, :3] - noise) ** 2).mean((1, 2, 3)))
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(terms["vb"], d.vb_terms_bpd(out.detach(), x0, xt, t))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # The VLB term trains only the variance channels; the MSE only the mean channels.
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 3:].abs().max() == 0


def test_training_losses_rejects_wrong_channel_count():
    d = create_diffusion(learn_sigma=True)
    with pytest.raises(ValueError, match="expected 6"):
        d.training_losses(lambda x, t: x, torch.randn(2, 3, 2, 2), torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------------------------
def test_space_timesteps_strings():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and min(s) == 0 and max(s) == 999
    assert space_timesteps(1000, 250) == s
    s3 = space_timesteps(300, "10,15,20")
    assert len(s3) == 45 and sum(t < 100 for t in s3) == 10 and sum(t >= 200 for t in s3) == 20
    assert space_timesteps(1000, "1000") == set(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim6")  # strides give 10, 5, 4, ... steps
    with pytest.raises(ValueError):
        space_timesteps(100, "200")


@pytest.mark.parametrize("spacing", ["250", "ddim50", 17, "5,20"])
def test_respaced_process_reproduces_alphas_cumprod(spacing):
    base = create_diffusion(noise_schedule="linear", diffusion_steps=1000)
    sp = create_diffusion(diffusion_steps=1000, timestep_respacing=spacing)
    kept = sorted(space_timesteps(1000, spacing))
    assert sp.num_timesteps == len(kept) and sp.timestep_map.tolist() == kept
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    # respace() from any process works on the ORIGINAL timesteps
    again = sp.respace(spacing)
    np.testing.assert_allclose(again.alphas_cumprod, sp.alphas_cumprod, rtol=1e-12)


def test_respaced_model_sees_original_timesteps():
    sp = create_diffusion(diffusion_steps=1000, timestep_respacing="ddim10", learn_sigma=False)
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 2, 2)
    sp.p_mean_variance(model_fn, x, torch.tensor([0, 9]))
    assert seen[0].tolist() == [0, 900]


# ---------------------------------------------------------------------------------------------------------------
# No host copies per step (on a GPU each would be a blocking host-to-device copy)
# ---------------------------------------------------------------------------------------------------------------
def test_schedule_lookups_copy_nothing_from_host_after_the_first(monkeypatch):
    from dit.samplers import sample

    d = create_diffusion(timestep_respacing="", learn_sigma=True)
    x0 = torch.randn(4, 3, 8, 8)
    t = torch.randint(0, d.num_timesteps, (4,))

    def model(x, t, **kw):
        return torch.zeros(x.shape[0], 6, *x.shape[2:], dtype=x.dtype) + 0.1 * x.repeat(1, 2, 1, 1)

    def run():
        d.training_losses(model, x0, t)
        sample(model, d, (2, 3, 8, 8), sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(0))
        sample(model, d, (2, 3, 8, 8), sampler="ddim", steps=5, generator=torch.Generator().manual_seed(0))

    run()  # builds the device tables (and the respaced processes' own)
    conversions = []
    as_tensor, from_numpy = torch.as_tensor, torch.from_numpy

    def counting_as_tensor(data, *args, **kwargs):
        if isinstance(data, np.ndarray):
            conversions.append(data.shape)
        return as_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", counting_as_tensor)
    monkeypatch.setattr(torch, "from_numpy", lambda a: conversions.append(a.shape) or from_numpy(a))
    d.training_losses(model, x0, t)
    assert conversions == [], f"training step converted {len(conversions)} numpy arrays"
    sp = d.respace(5)
    sp.p_mean_variance(model, x0, torch.full((4,), 3))  # warm up this process's tables
    conversions.clear()
    for i in range(5):
        sp.p_mean_variance(model, x0, torch.full((4,), i))
        sp.eps_from_x0(x0, torch.full((4,), i), x0)
    assert conversions == [], f"sampling steps converted {len(conversions)} numpy arrays"
