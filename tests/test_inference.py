"""eval/inference.py: checkpoints (file / directory) → generator → uint8 images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dit.models import DiT
from eval.inference import InferenceError, load_checkpoint, read_checkpoint_meta, sample_seed, to_uint8

PIXEL_KW = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True)


def tiny_checkpoint(path: Path, model_kw: dict = PIXEL_KW, latent=None, seed: int = 0,
                    diffusion: dict | None = None) -> Path:
    """A random-weights DiT saved as a consolidated checkpoint (non-zero output layers, so samples vary)."""
    torch.manual_seed(seed)
    model = DiT(**model_kw)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    meta = {"model": model_kw, "diffusion": diffusion or {"diffusion_steps": 1000}, "latent": latent, "step": 3,
            "data": {"kind": "image", "class_names": [str(i) for i in range(model_kw["num_classes"])],
                     "image_size": model_kw["input_size"], "channels": model_kw["in_channels"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"ditstack": json.dumps(meta)})
    return path


def test_file_and_directory_give_the_same_generator(tmp_path):
    f = tiny_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000003" / "ema.safetensors")
    (f.parent / "meta.json").write_text("{}")
    (f.parent.parent / "latest").write_text("step_0000003")
    for path in (f, f.parent, tmp_path / "run"):
        gen, meta = load_checkpoint(path)
        assert meta["weights_file"] == str(f.resolve()) and meta["step"] == 3
        assert gen.num_classes == 10 and gen.sample_shape == (1, 8, 8)
    a = gen.sample_batch(torch.tensor([1, 2]), [5, 6], steps=4)
    assert a.dtype == torch.uint8 and a.shape == (2, 1, 8, 8)


def test_sample_does_not_depend_on_its_batch(tmp_path):
    gen, _ = load_checkpoint(tiny_checkpoint(tmp_path / "m.safetensors"))
    seeds = [sample_seed(0, i) for i in range(4)]
    labels = torch.tensor([3, 1, 4, 1])
    kw = dict(steps=5, cfg_scale=2.0)
    full = gen.sample_batch(labels, seeds, **kw)
    alone = gen.sample_batch(labels[2:3], seeds[2:3], **kw)
    assert torch.equal(full[2:3], alone)
    assert not torch.equal(full[0], full[1])  # different seeds, different samples
    again = gen.sample_batch(labels, seeds, **kw)
    assert torch.equal(full, again)
    # ddim with eta=0 is deterministic given x_T, and also batch-independent
    d = gen.sample_batch(labels, seeds, sampler="ddim", steps=3)
    assert torch.equal(d[1:2], gen.sample_batch(labels[1:2], seeds[1:2], sampler="ddim", steps=3))


def test_sample_seed_streams_are_distinct():
    seeds = {sample_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2 ** 63 for s in seeds)


def test_to_uint8_matches_official_rounding():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0], dtype=torch.float64)
    expected = np.clip(127.5 * x.numpy() + 128.0, 0, 255).astype(np.uint8)
    assert to_uint8(x).numpy().tolist() == expected.tolist() == [0, 0, 128, 255, 255, 255]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    good = tiny_checkpoint(tmp_path / "good.safetensors")
    nometa = tmp_path / "nometa.safetensors"
    save_file({"a": torch.zeros(1)}, str(nometa))
    with pytest.raises(InferenceError, match="no 'ditstack' metadata"):
        read_checkpoint_meta(nometa)
    partial = tmp_path / "partial.safetensors"
    save_file({"a": torch.zeros(1)}, str(partial), metadata={"ditstack": json.dumps({"model": {}})})
    with pytest.raises(InferenceError, match="lacks key 'diffusion'"):
        read_checkpoint_meta(partial)
    # weights of a different architecture than the metadata says
    _, meta = read_checkpoint_meta(good)
    other = DiT(**dict(PIXEL_KW, depth=1))
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong),
              metadata={"ditstack": json.dumps(meta)})
    with pytest.raises(InferenceError, match="do not match"):
        load_checkpoint(wrong)
    with pytest.raises(InferenceError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent")
    with pytest.raises(InferenceError, match="holds no ema.safetensors"):
        load_checkpoint(tmp_path)


def test_guidance_on_unconditional_model_is_an_error(tmp_path):
    gen, _ = load_checkpoint(tiny_checkpoint(tmp_path / "u.safetensors", dict(PIXEL_KW, num_classes=0)))
    out = gen.sample_batch(None, [1, 2], steps=3)
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(InferenceError, match="class-conditional"):
        gen.sample_batch(None, [1], steps=3, cfg_scale=1.5)


def test_latent_checkpoint_decodes_with_denormalisation(tmp_path):
    from data_pipeline.vae_io import save_vae
    from dit.vae import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=2,
                        attn_mid=False, num_groups=4)
    vae_path = save_vae(tmp_path / "vae.safetensors", vae, image_size=16)
    shift, scale = [0.5, -0.25], [2.0, 4.0]
    latent = {"shape": [2, 8, 8], "vae": str(vae_path), "shift": shift, "scale": scale, "mean": [0, 0],
              "std": [1, 1], "stored": "normalised"}
    kw = dict(PIXEL_KW, in_channels=2)
    gen, meta = load_checkpoint(tiny_checkpoint(tmp_path / "lat.safetensors", kw, latent=latent))
    assert meta["latent"]["vae"] == str(vae_path)
    z_norm = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = z_norm / torch.tensor(scale).view(1, 2, 1, 1) + torch.tensor(shift).view(1, 2, 1, 1)
        expected = to_uint8(vae.eval().decode(z))
    got = gen.decode(z_norm)
    assert got.shape == (3, 1, 16, 16) and got.dtype == torch.uint8
    assert (got.int() - expected.int()).abs().max() <= 1  # same maths; conv kernels may round differently
    imgs = gen.generate([0, 1, 2], [7, 8, 9], batch_size=2, steps=3)
    assert imgs.shape == (3, 16, 16, 1) and imgs.dtype == np.uint8

    bad = dict(latent, vae=str(tmp_path / "missing_vae.safetensors"))
    with pytest.raises(InferenceError, match="cannot be loaded"):
        load_checkpoint(tiny_checkpoint(tmp_path / "bad.safetensors", kw, latent=bad))
    gen2, _ = load_checkpoint(tmp_path / "bad.safetensors", vae=vae_path)  # explicit override works
    assert torch.equal(gen2.decode(z_norm), got)


def test_bf16_stored_weights_equal_plain_autocast(tmp_path):
    """The bf16 copy (Linear/Conv weights stored in bf16, fused CPU inference ops) gives the images autocast on the
    fp32 model gives."""
    from dit.samplers import make_cfg_model_fn, sample

    gen, _ = load_checkpoint(tiny_checkpoint(tmp_path / "m.safetensors"))
    labels, seeds = torch.tensor([1, 7, 3]), [4, 5, 6]
    got = gen.sample_batch(labels, seeds, steps=4, cfg_scale=3.0, dtype=torch.bfloat16)
    cfg = make_cfg_model_fn(gen.model, 3.0, 10)

    def fn(x, t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cfg(x, t, y).float()

    x0 = sample(fn, gen.diffusion, (3, 1, 8, 8), steps=4, generator=[torch.Generator().manual_seed(s) for s in seeds],
                model_kwargs={"y": labels})
    assert torch.equal(got, gen.decode(x0))
    assert next(gen.model.parameters()).dtype == torch.float32  # the caller's model is left alone


def test_bf16_samples_follow_new_weights_loaded_into_the_generator(tmp_path):
    """The trainer loads each new EMA snapshot into the same generator: bf16 samples must use the new weights
    (a cached bf16 copy of the first snapshot made every later grid identical)."""
    gen, _ = load_checkpoint(tiny_checkpoint(tmp_path / "a.safetensors", seed=0))
    labels, seeds = torch.tensor([1, 7]), [4, 5]
    kw = dict(steps=3, cfg_scale=2.0)
    first = gen.sample_batch(labels, seeds, dtype=torch.bfloat16, **kw)
    other, _ = load_checkpoint(tiny_checkpoint(tmp_path / "b.safetensors", seed=1))
    gen.model.load_state_dict(other.model.state_dict())
    again = gen.sample_batch(labels, seeds, dtype=torch.bfloat16, **kw)
    assert torch.equal(again, other.sample_batch(labels, seeds, dtype=torch.bfloat16, **kw))
    assert not torch.equal(again, first)
    assert torch.equal(gen.sample_batch(labels, seeds, dtype=torch.bfloat16, **kw), again)  # cache reused


def test_cpu_bf16_sampling_model_gets_the_cpu_speedups_and_the_fp32_model_stays_plain(tmp_path):
    """On a CPU the bf16 sampling copy runs `dit.cpu`'s classes; fp32 sampling and the held model stay plain."""
    gen, _ = load_checkpoint(tiny_checkpoint(tmp_path / "m.safetensors"))
    assert type(gen.model_for(torch.bfloat16).blocks[0]).__name__ == "CPUDiTBlock"
    assert type(gen.model_for(None).blocks[0]).__name__ == "DiTBlock"
    assert type(gen.model.blocks[0]).__name__ == "DiTBlock"
