"""Unit tests of the VAE model, its losses, the VAE file formats and the reconstruction metrics (CPU, seconds)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dit.vae import AutoencoderKL, PatchDiscriminator
from dit.vae_loss import (VAELoss, adaptive_weight, discriminator_loss, generator_adv_loss, kl_divergence,
                          reconstruction_loss)


def tiny_vae(channels=1, mult=(1, 2, 2), **kw):
    return AutoencoderKL(in_channels=channels, base_channels=8, channel_mult=mult, num_res_blocks=1, z_channels=4,
                         num_groups=4, **kw)


# ------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("mult,factor,size", [((1, 2, 2), 4, 28), ((1, 2, 2), 4, 32), ((1, 2, 2, 2), 8, 32),
                                              ((1, 2, 2, 2), 8, 64)])
@pytest.mark.parametrize("channels", [1, 3])
def test_encode_decode_shapes(mult, factor, size, channels):
    torch.manual_seed(0)
    vae = tiny_vae(channels, mult, attn_mid=True)
    assert vae.downsample == factor
    x = torch.rand(2, channels, size, size) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, size // factor, size // factor)
    assert vae.latent_shape(size) == (4, size // factor, size // factor)
    assert (std > 0).all()
    assert vae.decode(mean).shape == x.shape
    rec, m, logvar = vae(x)
    assert rec.shape == x.shape and torch.allclose(m, mean) and torch.allclose(torch.exp(0.5 * logvar), std)


def test_bad_group_count_is_named():
    with pytest.raises(ValueError, match="num_groups=32"):
        AutoencoderKL(in_channels=1, base_channels=8, num_groups=32)


def test_patch_discriminator_shapes():
    for norm in ("batch", "group", "none"):
        d = PatchDiscriminator(in_channels=1, base_channels=8, n_layers=2, norm=norm)
        assert d(torch.randn(2, 1, 28, 28)).shape == (2, 1, 5, 5)
    assert PatchDiscriminator(3, 8, n_layers=3)(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)


# ------------------------------------------------------------------------------------------------ losses
def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    ours = kl_divergence(mean, logvar)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    # scalar check by hand: mu=1, sigma^2=e -> 0.5 (1 + e - 1 - 1)
    one = kl_divergence(torch.ones(1, 1), torch.ones(1, 1))
    assert math.isclose(one.item(), 0.5 * (math.e - 1), rel_tol=1e-6)
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0


def test_reconstruction_and_adversarial_loss_values():
    x, r = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.equal(reconstruction_loss(x, r, "l1"), torch.tensor([[0.5, 2.0]]))
    assert torch.equal(reconstruction_loss(x, r, "l2"), torch.tensor([[0.25, 4.0]]))
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-3.0, 0.5])
    # hinge: 0.5*(mean(relu(1-real)) + mean(relu(1+fake))) = 0.5*(0.5 + 0.75)
    assert math.isclose(discriminator_loss(real, fake, "hinge").item(), 0.625)
    assert math.isclose(discriminator_loss(real, fake, "lsgan").item(), 0.5 * (1.0 + 4.625))
    assert math.isclose(generator_adv_loss(fake, "hinge").item(), 1.25)
    assert math.isclose(generator_adv_loss(fake, "lsgan").item(), (16 + 0.25) / 2)
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss(real, fake, "wgan")


def test_adaptive_weight_formula():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(3), torch.randn(3)
    nll = (w @ a).pow(2).sum()
    g = (w @ b).sum() * 3.0
    got = adaptive_weight(nll, g, w, disc_weight=0.5)
    dn = torch.autograd.grad(nll, w, retain_graph=True)[0]
    dg = torch.autograd.grad(g, w)[0]
    expected = 0.5 * dn.norm() / (dg.norm() + 1e-4)
    assert torch.allclose(got, expected)
    assert not got.requires_grad
    # clamped at 1e4 * disc_weight when the GAN gradient vanishes
    big = adaptive_weight((w * 1e3).sum(), (w * 0).sum(), w, disc_weight=1.0)
    assert big.item() == pytest.approx(1e4)


def test_generator_loss_disc_enters_at_disc_start():
    torch.manual_seed(0)
    vae = tiny_vae()
    disc = PatchDiscriminator(1, 8, 2, norm="group")
    loss_fn = VAELoss(perceptual=None, kl_weight=1e-2, disc_weight=0.5, disc_start=5)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    rec, mean, logvar = vae(x, sample=False)
    assert not loss_fn.disc_active(4) and loss_fn.disc_active(5)
    before, logs = loss_fn.generator_loss(x, rec, mean, logvar, step=4)
    assert "g_adv" not in logs and "d_weight" not in logs
    rec_l = (x - rec).abs().mean()
    kl = kl_divergence(mean, logvar).mean() / x[0].numel()
    assert torch.allclose(before, rec_l + 1e-2 * kl)
    with pytest.raises(ValueError, match="logits_fake"):
        loss_fn.generator_loss(x, rec, mean, logvar, step=5)
    logits = disc(rec)
    after, logs = loss_fn.generator_loss(x, rec, mean, logvar, step=5, logits_fake=logits,
                                         last_layer=vae.last_layer_weight())
    assert "g_adv" in logs and logs["d_weight"] > 0
    assert torch.allclose(after, before + logs["d_weight"] * (-logits.mean()))


def test_perceptual_term_is_added():
    torch.manual_seed(0)
    x, r = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    mean, logvar = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    fake_lpips = lambda a, b: (a - b).pow(2).flatten(1).mean(1)  # noqa: E731
    loss, logs = VAELoss(perceptual=fake_lpips, perceptual_weight=2.0, disc_weight=0.0).generator_loss(x, r, mean, logvar, step=0)
    assert torch.allclose(loss, (x - r).abs().mean() + 2.0 * (x - r).pow(2).mean())
    assert torch.allclose(logs["lpips"], (x - r).pow(2).mean())


# ------------------------------------------------------------------------------------------- perceptual
def test_missing_lpips_weights_give_a_clear_error(tmp_path, monkeypatch):
    from data_pipeline.vae_io import LPIPSWeightsMissing, build_perceptual, lpips_backbone_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    file, url = lpips_backbone_path("vgg")
    assert file == tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    # torchvision's own lookup agrees on the location
    import torch.hub
    import torchvision.models as tvm
    assert file.parent == __import__("pathlib").Path(torch.hub.get_dir()) / "checkpoints"
    assert file.name == tvm.VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    with pytest.raises(LPIPSWeightsMissing) as err:
        build_perceptual("vgg", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and str(file) in msg and url in msg and "perceptual.pretrained=false" in msg
    m = build_perceptual("squeeze", pretrained=False)  # a random backbone works offline (vgg: same path, slower)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert m(x, x).abs().max() == 0 and (m(x, -x) > 0).all()
    assert not (tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth").exists()


# ---------------------------------------------------------------------------------------------- vae_io
def test_save_load_roundtrip(tmp_path):
    from data_pipeline.vae_io import load_vae, read_vae_metadata, save_vae

    torch.manual_seed(0)
    vae = tiny_vae(mult=(1, 2, 2, 2))
    stats = {"mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 2.0, 3.0, 4.0]}
    path = save_vae(tmp_path / "v.safetensors", vae, image_size=32, step=7, latent_stats=stats)
    meta = read_vae_metadata(path)
    assert meta["latent"] == {"channels": 4, "downsample": 8, "shape": [4, 4, 4], "stats": stats}
    assert meta["step"] == 7 and meta["data"] == {"image_size": 32, "channels": 1}
    h = load_vae(path, "cpu")
    assert (h.kind, h.latent_channels, h.downsample, h.scale_factor, h.latent_stats) == ("ditstack", 4, 8, None,
                                                                                         stats)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    m1, s1 = h.encode(x)
    with torch.no_grad():
        m0, s0 = vae.encode(x)
        assert torch.equal(m1, m0) and torch.equal(s1, s0)
        assert torch.equal(h.decode(m1), vae.decode(m0))
    # a checkpoint-style directory and a run directory with checkpoints/latest resolve to the file
    ck = tmp_path / "run" / "checkpoints" / "step_0000007"
    ck.mkdir(parents=True)
    save_vae(ck / "vae.safetensors", vae, image_size=32)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000007\n")
    assert load_vae(tmp_path / "run").name == str((ck / "vae.safetensors").resolve())
    assert load_vae(ck).downsample == 8


def test_load_vae_errors(tmp_path):
    from safetensors.torch import save_file

    from data_pipeline.vae_io import VAELoadError, load_vae

    with pytest.raises(VAELoadError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(VAELoadError, match="ditstack_vae"):
        load_vae(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(VAELoadError, match="junk.safetensors"):
        load_vae(tmp_path / "junk.safetensors")
    with pytest.raises(VAELoadError, match="neither"):
        load_vae(tmp_path)


def test_diffusers_autoencoder_loads_through_load_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from data_pipeline.vae_io import load_vae

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    ref.save_pretrained(str(tmp_path / "sdvae"))
    assert json.loads((tmp_path / "sdvae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    h = load_vae(tmp_path / "sdvae", "cpu")
    assert (h.kind, h.latent_channels, h.downsample, h.image_channels) == ("diffusers", 4, 4, 3)
    assert h.scale_factor == pytest.approx(0.18215) and h.shift_factor == 0.0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = h.encode(x)
    with torch.no_grad():
        dist = ref.eval().encode(x).latent_dist
        assert torch.allclose(mean, dist.mean, atol=1e-6) and torch.allclose(std, dist.std, atol=1e-6)
        assert torch.allclose(h.decode(mean), ref.decode(dist.mean).sample, atol=1e-6)
    assert mean.shape == (2, 4, 8, 8)
    # a pipeline directory (vae/ subfolder) resolves too
    (tmp_path / "pipe").mkdir()
    (tmp_path / "sdvae").rename(tmp_path / "pipe" / "vae")
    assert load_vae(tmp_path / "pipe").kind == "diffusers"


# --------------------------------------------------------------------------------------------- metrics
def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Independent float64 SSIM (scipy Gaussian filter, as skimage does with gaussian_weights=True), one channel."""
    from scipy.ndimage import gaussian_filter

    f = lambda a: gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731  (11-px window)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_psnr_and_ssim_against_references():
    from launch.reconstruct import psnr, ssim

    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 32, 32))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    mse = ((x - y) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(psnr(tx, ty).numpy(), 10 * np.log10(1 / mse))
    got = ssim(tx, ty).numpy()
    ref = [_ssim_reference(x[i, 0], y[i, 0]) for i in range(2)]
    assert np.allclose(got, ref, atol=1e-10), (got, ref)
    assert torch.allclose(ssim(tx, tx), torch.ones(2, dtype=torch.float64))
    assert (ssim(tx, ty) < 0.99).all()


def test_evaluate_reconstruction_and_grid(tmp_path):
    from PIL import Image

    from launch.reconstruct import evaluate_reconstruction, save_comparison_grid

    class Identity:  # a perfect autoencoder except for a known offset
        def encode(self, x):
            return x, torch.zeros_like(x)

        def decode(self, z):
            return z - 0.2

    x = torch.rand(5, 1, 16, 16) * 1.6 - 0.6  # stays inside [-1, 1] after the offset
    res = evaluate_reconstruction(Identity(), [x[:3], x[3:]], max_images=4)
    assert res["num_images"] == 4
    assert res["psnr"] == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-6)  # error 0.1 in [0,1] units
    path = save_comparison_grid(*res["first"], tmp_path / "g.png", ncol=3)
    img = Image.open(path)
    assert img.size == (3 * 18 + 2, 2 * 18 + 2)


def test_random_lpips_backbone_is_seeded_and_leaves_global_rng_alone():
    from data_pipeline.vae_io import build_perceptual

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_perceptual("squeeze", pretrained=False), build_perceptual("squeeze", pretrained=False)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_perceptual("squeeze", pretrained=False, seed=1).state_dict()
    assert any(not torch.equal(sa[k], c[k]) for k in sa)
