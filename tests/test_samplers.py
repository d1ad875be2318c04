"""DDPM / DDIM samplers and classifier-free guidance, against closed forms and exact recursions."""
import math

import pytest
import torch
from torch import nn

from dit.diffusion import create_diffusion, space_timesteps
from dit.samplers import cfg_combine, make_cfg_model_fn, randn, sample

f64 = torch.float64


class ToyModel(nn.Module):
    """Elementwise stand-in for a DiT: out depends on x, t and y of the SAME sample only (exactly batch-independent).

    Outputs 2C channels with learn_sigma (the last C in [-1, 1]) like dit.models.DiT.
    """

    def __init__(self, channels=4, num_classes=10, learn_sigma=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        out = 2 * channels if learn_sigma else channels
        self.w = nn.Parameter(torch.randn(out, generator=g))
        self.emb = nn.Parameter(torch.randn(num_classes + 1, out, generator=g))
        self.channels, self.calls = channels, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        xx = x.repeat(1, self.w.numel() // x.shape[1], 1, 1)
        h = xx * self.w.view(1, -1, 1, 1) + self.emb[y].view(x.shape[0], -1, 1, 1).to(x.dtype) \
            + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        out = torch.tanh(h)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Determinism and per-sample generators
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.8)])
def test_samplers_deterministic_given_seed(sampler, eta):
    d = create_diffusion(timestep_respacing="8")
    model = ToyModel()
    y = torch.tensor([1, 2, 3])
    kw = dict(sampler=sampler, eta=eta, model_kwargs={"y": y})
    a = sample(model, d, (3, 4, 2, 2), generator=torch.Generator().manual_seed(5), **kw)
    b = sample(model, d, (3, 4, 2, 2), generator=torch.Generator().manual_seed(5), **kw)
    c = sample(model, d, (3, 4, 2, 2), generator=torch.Generator().manual_seed(6), **kw)
    assert a.dtype == torch.float32 and a.shape == (3, 4, 2, 2) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_per_sample_generators_make_samples_batch_independent(sampler, eta):
    d = create_diffusion(timestep_respacing="6")
    model = make_cfg_model_fn(ToyModel(), cfg_scale=3.0, null_class=10)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(sampler=sampler, eta=eta)
    full = sample(model, d, (4, 4, 2, 2), generator=gens([10, 11, 12, 13]),
                  model_kwargs={"y": torch.tensor([0, 1, 2, 3])}, **kw)
    part = sample(model, d, (2, 4, 2, 2), generator=gens([12, 13]), model_kwargs={"y": torch.tensor([2, 3])}, **kw)
    assert torch.equal(full[2:], part)
    assert not torch.equal(full[0], full[1])


def test_randn_per_sample_rows_and_noise_argument():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    z = randn((2, 3, 2), gens)
    torch.testing.assert_close(z[1], torch.randn(3, 2, generator=torch.Generator().manual_seed(2)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 1), gens)
    d = create_diffusion(timestep_respacing="5")
    model = ToyModel()
    y = torch.tensor([4, 5])
    noise = randn((2, 4, 2, 2), [torch.Generator().manual_seed(s) for s in (7, 8)])
    a = sample(model, d, (2, 4, 2, 2), sampler="ddim", noise=noise, model_kwargs={"y": y})
    b = sample(model, d, (2, 4, 2, 2), sampler="ddim",
               generator=[torch.Generator().manual_seed(s) for s in (7, 8)], model_kwargs={"y": y})
    assert torch.equal(a, b)


def test_steps_respace_and_model_sees_original_timesteps():
    d = create_diffusion()  # 1000 steps
    model = ToyModel()
    sample(model, d, (1, 4, 2, 2), steps=10, model_kwargs={"y": torch.tensor([0])})
    seen = [int(t[0]) for _, t, _ in model.calls]
    assert seen == sorted(space_timesteps(1000, 10), reverse=True)
    model.calls.clear()
    sample(model, d, (1, 4, 2, 2), sampler="ddim", steps="ddim5", model_kwargs={"y": torch.tensor([0])})
    assert [int(t[0]) for _, t, _ in model.calls] == [800, 600, 400, 200, 0]
    with pytest.raises(ValueError, match="sampler"):
        sample(model, d, (1, 4, 2, 2), sampler="euler")


def test_bf16_model_keeps_fp32_result():
    d = create_diffusion(timestep_respacing="5")
    seen = []

    def model_fn(x, t):
        seen.append(x.dtype)
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1)

    out = sample(model_fn, d, (2, 3, 2, 2), dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    ref = sample(model_fn, d, (2, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    assert set(seen) == {torch.bfloat16, torch.float32} and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    """DDIM with eta=1 has sigma_t^2 = beta-tilde_t and the DDPM posterior mean (Song et al.), so with the same noise
    stream it equals ancestral sampling with the fixed-small variance; eta=0.5 differs."""
    model = ToyModel(learn_sigma=False)
    y = torch.tensor([1, 2])
    run = lambda d, sampler, eta: sample(model, d, (2, 4, 2, 2), sampler=sampler, eta=eta, dtype=f64,
                                         generator=torch.Generator().manual_seed(3), model_kwargs={"y": y})
    ddpm = run(create_diffusion(timestep_respacing="12", learn_sigma=False, sigma_small=True), "ddpm", 0.0)
    d = create_diffusion(timestep_respacing="12", learn_sigma=False)
    torch.testing.assert_close(run(d, "ddim", 1.0), ddpm, rtol=0, atol=1e-5)
    assert (run(d, "ddim", 0.5) - ddpm).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Correctness on data with known optimal predictors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_single_point_dataset_is_recovered(prediction, sampler):
    """For data = one point x*, the true E[target | x_t] is known in closed form; both samplers must return x*."""
    base = create_diffusion(noise_schedule="cosine", prediction=prediction, learn_sigma=False)
    x_star = torch.linspace(-0.9, 0.8, 3 * 16, dtype=f64).reshape(1, 3, 4, 4)
    ac = torch.as_tensor(base.alphas_cumprod)

    def model_fn(x, t):
        a = ac[t].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x_star) / (1 - a).sqrt()
        return {"eps": eps, "x0": x_star.expand_as(x), "v": a.sqrt() * eps - (1 - a).sqrt() * x_star}[prediction]

    out = sample(model_fn, base, (2, 3, 4, 4), sampler=sampler, steps=20, eta=0.0, dtype=f64,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_star.expand(2, 3, 4, 4).float(), rtol=0, atol=1e-5)


M, S = 0.7, 0.4  # 1-D Gaussian data N(M, S^2)


@pytest.fixture
def one_thread():
    """Many tiny elementwise ops: on a loaded 2-core machine intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _optimal_eps(ac):
    """E[eps | x_t] for data N(M, S^2) under q(x_t | x_0) with alphas_cumprod ``ac`` (original timesteps)."""
    def eps(x, t):
        a = ac[t].reshape(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() / (a * S * S + 1 - a) * (x - a.sqrt() * M)
    return eps


def _exact_ddpm_moments(d):
    """Mean and std of the DDPM chain's output (fixed-large variance) with the optimal eps, propagated exactly:
    each step is affine x -> A x + B + sigma z, written from the paper's formulas in Python floats."""
    mu, var = 0.0, 1.0
    for i in reversed(range(d.num_timesteps)):
        ab, abp, beta = float(d.alphas_cumprod[i]), float(d.alphas_cumprod_prev[i]), float(d.betas[i])
        k = math.sqrt(1 - ab) / (ab * S * S + 1 - ab)  # eps_hat = k (x - sqrt(ab) M)
        a0, b0 = (1 - math.sqrt(1 - ab) * k) / math.sqrt(ab), math.sqrt(1 - ab) * k * M  # x0_hat = a0 x + b0
        c1, c2 = beta * math.sqrt(abp) / (1 - ab), (1 - abp) * math.sqrt(1 - beta) / (1 - ab)
        mu, var = (c1 * a0 + c2) * mu + c1 * b0, (c1 * a0 + c2) ** 2 * var + (beta if i > 0 else 0.0)
    return mu, math.sqrt(var)


def test_ddpm_gaussian_data_fixed_variance(one_thread):
    n = 20_000
    base = create_diffusion(learn_sigma=False)  # DiT's fixed-large variance when sigma is not learned
    d = base.respace("250")
    x = sample(_optimal_eps(torch.as_tensor(base.alphas_cumprod)), d, (n, 1, 1, 1),
               generator=torch.Generator().manual_seed(0)).double().flatten()
    mu, sd = _exact_ddpm_moments(d)
    # The exact chain is within 1% of the data (discretisation of 250 steps); the samples follow the chain.
    assert abs(mu - M) < 1e-4 and abs(sd - S) < 0.01 * S
    assert abs(x.mean().item() - mu) < 5 * sd / math.sqrt(n)
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)


def test_ddpm_gaussian_data_learned_sigma_is_exact_with_few_steps(one_thread):
    """With the optimal mean AND the optimal (learned-range) variance every reverse step is the exact Gaussian
    conditional, so even 40 respaced steps reproduce N(M, S^2)."""
    n = 20_000
    base = create_diffusion(noise_schedule="linear", learn_sigma=True)
    d = base.respace("40")
    ac = torch.as_tensor(base.alphas_cumprod)
    eps_fn = _optimal_eps(ac)
    ac_sp, acp_sp, b_sp = (torch.as_tensor(a) for a in (d.alphas_cumprod, d.alphas_cumprod_prev, d.betas))
    to_step = torch.full((base.num_timesteps,), -1, dtype=torch.long)  # original timestep -> respaced index
    to_step[torch.as_tensor(d.timestep_map)] = torch.arange(d.num_timesteps)

    def model_fn(x, t):
        i = to_step[t]
        ab, abp, beta = ac_sp[i], acp_sp[i], b_sp[i]
        c1 = beta * abp.sqrt() / (1 - ab)
        pv = beta * (1 - abp) / (1 - ab)
        opt = pv + c1 ** 2 * S * S * (1 - ab) / (ab * S * S + 1 - ab)  # Var(x_{t-1} | x_t)
        pv_clip = torch.where(i == 0, torch.as_tensor(d.posterior_variance[1]), pv)
        frac = ((opt.log() - pv_clip.log()) / (beta.log() - pv_clip.log())).clamp(0, 1)
        v = (2 * frac - 1).reshape(-1, 1, 1, 1).expand_as(x).to(x.dtype)
        return torch.cat([eps_fn(x, t), v], 1)

    x = sample(model_fn, d, (n, 1, 1, 1), generator=torch.Generator().manual_seed(1)).double().flatten()
    assert abs(x.mean().item() - M) < 5 * S / math.sqrt(n)
    assert abs(x.std().item() - S) < 5 * S / math.sqrt(2 * n)


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------
def _inputs(b=3, c=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, c, 2, 2, generator=g), torch.tensor([10, 500, 900])[:b], torch.tensor([1, 2, 3])[:b]


def test_cfg_scale_one_is_the_conditional_prediction():
    model = ToyModel()
    x, t, y = _inputs()
    torch.testing.assert_close(make_cfg_model_fn(model, 1.0, null_class=10)(x, t, y), model(x, t, y), rtol=0, atol=0)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0, 4), cond, rtol=0, atol=1e-6)


@pytest.mark.parametrize("guide_channels", ["all", 3])
def test_cfg_single_batched_forward_and_channels(guide_channels):
    model = ToyModel(channels=4, learn_sigma=True)
    x, t, y = _inputs()
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    model.calls.clear()
    out = make_cfg_model_fn(model, 4.0, null_class=10, guide_channels=guide_channels)(x, t, y)
    assert len(model.calls) == 1
    bsz, tt, yy = model.calls[0]
    assert bsz == 6 and tt.tolist() == t.tolist() * 2 and yy.tolist() == [1, 2, 3, 10, 10, 10]
    g = 4 if guide_channels == "all" else 3
    guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out[:, :g], guided[:, :g])
    torch.testing.assert_close(out[:, g:], cond[:, g:], rtol=0, atol=0)  # ch 3 (official) and sigma unguided
    assert out.shape == cond.shape


def test_cfg_interval():
    model = ToyModel(channels=4)
    x, t, y = _inputs()  # t = 10, 500, 900
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    out = make_cfg_model_fn(model, 2.5, null_class=10, interval=(300, 700))(x, t, y)
    torch.testing.assert_close(out[1, :4], (uncond + 2.5 * (cond - uncond))[1, :4])
    torch.testing.assert_close(out[[0, 2]], cond[[0, 2]], rtol=0, atol=0)
    model.calls.clear()
    out = make_cfg_model_fn(model, 2.5, null_class=10, interval=(950, 999))(x, t, y)
    assert len(model.calls) == 1 and model.calls[0][0] == 3  # no unconditional half outside the interval
    torch.testing.assert_close(out, cond, rtol=0, atol=0)


def test_cfg_bad_arguments():
    with pytest.raises(ValueError, match="guide_channels"):
        make_cfg_model_fn(ToyModel(), 2.0, 10, guide_channels="first3")
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        make_cfg_model_fn(ToyModel(), 2.0, 10, interval=(700, 300))
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="labels"):
        make_cfg_model_fn(ToyModel(), 2.0, 10)(x, t, None)


# ---------------------------------------------------------------------------------------------------------------
# Integration with the real model
# ---------------------------------------------------------------------------------------------------------------
def _tiny_dit():
    models = pytest.importorskip("dit.models")
    torch.manual_seed(0)
    model = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       num_classes=5, learn_sigma=True).eval()
    with torch.no_grad():  # a fresh adaLN-Zero DiT outputs zeros: perturb every weight so the test means something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_cfg_wrapper_matches_official_forward_with_cfg():
    model = _tiny_dit()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 999]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        for gc in (3, 4):
            ours = make_cfg_model_fn(model, 2.5, null_class=5, guide_channels=gc if gc == 3 else "all")(x, t, y)
            official = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                              torch.cat([y, torch.full_like(y, 5)]), 2.5, guide_channels=gc)[:3]
            torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_tiny_dit_cfg_sampling(sampler):
    model = _tiny_dit()
    d = create_diffusion(timestep_respacing="")
    fn = make_cfg_model_fn(model, 4.0, null_class=5)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    run = lambda seeds, y: sample(fn, d, (len(seeds), 4, 8, 8), sampler=sampler, steps=5, eta=0.5,
                                  generator=gens(seeds), model_kwargs={"y": torch.tensor(y)})
    a = run([0, 1, 2], [0, 1, 2])
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, run([0, 1, 2], [0, 1, 2]))
    # Batch independence holds up to matmul numerics for a real transformer.
    torch.testing.assert_close(run([2], [2])[0], a[2], rtol=1e-4, atol=1e-4)
