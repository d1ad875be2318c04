"""Export to diffusers (`launch/convert.py --to diffusers`) and SiT import (`--from sit`).

The exported directory is read back with diffusers' own classes (DiTTransformer2DModel, DDIMScheduler,
DiTPipeline) and compared with our model, our sampler and our generator on the same inputs and noise.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from dit.convert import diffusers_scheduler_config
from dit.diffusion import create_diffusion
from dit.models import DiT
from dit.samplers import sample
from eval.inference import load_checkpoint
from launch.convert import main, write_safetensors

diffusers = pytest.importorskip("diffusers")

HEADS, HIDDEN, DEPTH, PATCH, SIZE, CH, CLASSES = 2, 32, 2, 2, 8, 4, 10
GAUSSIAN = {"noise_schedule": "linear", "diffusion_steps": 1000, "prediction": "eps", "learn_sigma": True,
            "loss": "mse"}
# what the brief of issue 16 fixes for a SiT checkpoint (dit.transport.create_transport kwargs), written out here
SIT_DIFFUSION = {"objective": "flow", "path": "linear", "prediction": "velocity", "loss_weight": "none",
                 "time_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "train_eps": None,
                 "sample_eps": None}


def dit_kwargs(**over) -> dict:
    """A tiny class-conditional DiT with diffusers' numerics (timestep shift 1, MLP LayerNorm eps 1e-5)."""
    kw = dict(input_size=SIZE, patch_size=PATCH, in_channels=CH, hidden_size=HIDDEN, depth=DEPTH, num_heads=HEADS,
              mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=CLASSES, learn_sigma=True,
              conditioning="adaln_zero", qk_norm=False, grad_checkpointing=False, timestep_freq_shift=1.0,
              mlp_norm_eps=1e-5)
    kw.update(over)
    return kw


def write_ckpt(path: Path, kwargs: dict, diffusion: dict = GAUSSIAN, latent=None, names=None, seed: int = 0):
    """A consolidated checkpoint with random (non-zero) weights; returns (file, the model)."""
    torch.manual_seed(seed)
    model = DiT(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    data = {"kind": "latent" if latent else "image", "class_names": names or [], "image_size": None,
            "channels": None}
    write_safetensors(model.state_dict(), path, {"model": kwargs, "diffusion": diffusion, "data": data,
                                                 "latent": latent, "step": 7})
    return path, model


def as_run_dir(run: Path, weights: Path) -> Path:
    """Lay `weights` out as the newest checkpoint of a run directory (RUN/checkpoints/step_*/ema.safetensors)."""
    step = run / "checkpoints" / "step_0000007"
    step.mkdir(parents=True)
    weights.rename(step / "ema.safetensors")
    (step / "meta.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_0000007")
    return run


def tiny_vae(path: Path) -> Path:
    """A random diffusers AutoencoderKL (downsampling 2, CH latent channels) saved at `path`."""
    torch.manual_seed(3)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                            latent_channels=CH, norm_num_groups=8, sample_size=2 * SIZE).save_pretrained(str(path))
    return path


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n, CH, SIZE, SIZE, generator=g), torch.tensor([0, 250, 999, 42])[:n],
            torch.tensor([0, 3, CLASSES, 9])[:n])  # includes the null class


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "convert.py: error:" in err, err
    return err


# ------------------------------------------------------------------------------------------------ scheduler
@pytest.mark.parametrize("diffusion", [
    GAUSSIAN,
    {"noise_schedule": "linear", "diffusion_steps": 400, "prediction": "v", "learn_sigma": False},
    {"noise_schedule": "cosine", "diffusion_steps": 1000, "prediction": "x0", "learn_sigma": True},
], ids=["linear-eps", "linear400-v", "cosine-x0"])
def test_scheduler_config_is_our_process(diffusion):
    ours = create_diffusion(**diffusion)
    config = diffusers_scheduler_config(diffusion)
    want_type = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[diffusion["prediction"]]
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.DPMSolverMultistepScheduler):
        sched = cls.from_config(config)
        assert sched.config.prediction_type == want_type and sched.config.num_train_timesteps == len(ours.betas)
        torch.testing.assert_close(sched.alphas_cumprod.double(), torch.from_numpy(ours.alphas_cumprod),
                                   rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ transformer
@pytest.mark.parametrize("shift", [1.0, 0.0], ids=["diffusers-numerics", "official-numerics"])
def test_exported_transformer_gives_our_outputs(tmp_path, shift, caplog):
    kwargs = dit_kwargs(timestep_freq_shift=shift)
    weights, ours = write_ckpt(tmp_path / "ema.safetensors", kwargs, names=[f"class {i}" for i in range(CLASSES)])
    ckpt = as_run_dir(tmp_path / "run", weights) if shift == 0.0 else weights  # a run directory resolves too
    out = tmp_path / "pipe"
    with caplog.at_level(logging.WARNING, logger="launch.convert"):
        assert main(["--to", "diffusers", str(ckpt), "--out", str(out)]) == 0
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    x, t, y = inputs()
    with torch.no_grad():
        got = theirs(x, timestep=t, class_labels=y).sample
        want = ours(x, t, y)
        assert want.abs().mean() > 0.1  # a real signal
        if shift != 1.0:  # diffusers always uses shift 1: our model with that shift is what diffusers computes
            assert "shift 0.0" in caplog.text
            assert (got - want).abs().max() > 1e-3
            want = DiT(**dict(kwargs, timestep_freq_shift=1.0)).eval()
            want.load_state_dict(ours.state_dict())
            want = want(x, t, y)
    assert (got - want).abs().max() <= 1e-5
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["vae"] == [None, None]  # pixel space: no VAE
    assert index["id2label"] == {str(i): f"class {i}" for i in range(CLASSES)}
    assert "pixel-space" in caplog.text and "null class" in caplog.text  # 10 classes: DiTPipeline's label 1000
    left = ["pipe", "run"] if shift == 0.0 else ["ema.safetensors", "pipe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left  # no temporary directory left behind


@pytest.mark.parametrize("diffusion", [GAUSSIAN, {"noise_schedule": "cosine", "diffusion_steps": 1000,
                                                  "prediction": "v", "learn_sigma": False}],
                         ids=["linear-eps-learned-sigma", "cosine-v-fixed-sigma"])
def test_ddim_loop_in_diffusers_matches_our_sampler(tmp_path, diffusion):
    kwargs = dit_kwargs(learn_sigma=diffusion["learn_sigma"])
    weights, ours = write_ckpt(tmp_path / "ema.safetensors", kwargs, diffusion)
    out = tmp_path / "pipe"
    assert main(["--to", "diffusers", str(weights), "--out", str(out)]) == 0
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    sched = diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler"))
    noise = torch.randn(3, CH, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 5, 9])
    want = sample(ours, create_diffusion(**diffusion), noise.shape, sampler="ddim", steps="ddim50", noise=noise,
                  model_kwargs={"y": y})
    sched.set_timesteps(50)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out_t = theirs(x, timestep=t.expand(len(x)), class_labels=y).sample
            x = sched.step(out_t[:, :CH], t, x).prev_sample
    assert want.abs().max() > 0.5
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.mark.slow
def test_dit_pipeline_samples_what_our_generator_samples(tmp_path):
    """End to end: DiTPipeline (transformer, DDIM scheduler, VAE with our latent scale, guidance) vs ours."""
    classes = 1000  # DiTPipeline's null label is always 1000
    latent = {"shape": [CH, SIZE, SIZE], "vae": str(tiny_vae(tmp_path / "vae")), "shift": [0.0] * CH,
              "scale": [0.5] * CH, "mean": None, "std": None, "stored": "mean"}
    weights, _ = write_ckpt(tmp_path / "ema.safetensors", dit_kwargs(num_classes=classes), latent=latent,
                            names=[f"c{i}, alias{i}" for i in range(classes)])
    out = tmp_path / "pipe"
    assert main(["--to", "diffusers", str(weights), "--out", str(out)]) == 0
    pipe = diffusers.DiTPipeline.from_pretrained(str(out))
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.get_label_ids(["c3", "alias7"]) == [3, 7]
    seeds = [11, 12]
    got = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=5, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    gen, _ = load_checkpoint(weights)
    want = gen.sample_batch(torch.tensor([3, 7]), seeds, sampler="ddim", steps="ddim5", cfg_scale=4.0)
    assert got.shape == want.shape == (2, 3, 2 * SIZE, 2 * SIZE)
    assert want.float().std() > 5  # not a flat image
    assert (got * 255 - want.float()).abs().max() <= 1.5  # ours truncates 127.5 x + 128, diffusers keeps floats
    # the schedulers DiTPipeline users swap in run on the exported config (with variance_type "learned_range"
    # DDPMScheduler fails there and DPMSolverMultistepScheduler cuts the latents to 3 channels)
    for cls in (diffusers.DDPMScheduler, diffusers.DPMSolverMultistepScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        images = pipe(class_labels=[3], guidance_scale=4.0, num_inference_steps=4, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 3, 2 * SIZE, 2 * SIZE) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------------ refusals
def test_export_refusals_one_line_exit_2(tmp_path, capsys):
    cases = {
        "flow": write_ckpt(tmp_path / "flow.safetensors", dit_kwargs(), diffusion=SIT_DIFFUSION)[0],
        "unconditional": write_ckpt(tmp_path / "uncond.safetensors",
                                    dit_kwargs(num_classes=0, class_dropout_prob=0.0))[0],
        "in_context": write_ckpt(tmp_path / "incontext.safetensors", dit_kwargs(conditioning="in_context"))[0],
        "qk_norm": write_ckpt(tmp_path / "qknorm.safetensors", dit_kwargs(qk_norm=True))[0],
    }
    want = {"flow": "flow-matching checkpoint", "unconditional": "unconditional model",
            "in_context": "model.conditioning 'in_context'", "qk_norm": "QK-norm"}
    for name, ckpt in cases.items():
        capsys.readouterr()
        assert main(["--to", "diffusers", str(ckpt), "--out", str(tmp_path / "out")]) == 2, name
        assert want[name] in one_error_line(capsys), name
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    latent = {"shape": [CH, SIZE, SIZE], "vae": "stabilityai/sd-vae-ft-ema", "shift": [0.0] * CH,
              "scale": [0.18215] * CH, "mean": None, "std": None}
    good = write_ckpt(tmp_path / "good.safetensors", dit_kwargs(), latent=latent)[0]
    for args, msg in ((["--model", "DiT-S/2"], "--model: only with --from"),
                      (["--latent-scale", "0.5"], "--latent-scale: only with --from"),
                      (["--vae", str(tmp_path / "missing")], "--vae"),
                      (["--vae", str(good)], "ditstack VAE")):
        capsys.readouterr()
        assert main(["--to", "diffusers", str(good), "--out", str(tmp_path / "out"), *args]) == 2, args
        assert msg in one_error_line(capsys), args
    assert main(["--to", "diffusers", str(good), "--out", str(tmp_path), "--force"]) == 2
    assert "holds the checkpoint being exported" in one_error_line(capsys)
    assert good.is_file()
    assert main(["--from", "official", str(good), "--out", str(tmp_path / "x.safetensors"), "--force"]) == 2
    assert "--force: only with --to" in one_error_line(capsys)
    assert main(["--to", "diffusers", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "no such checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, capsys):
    weights = write_ckpt(tmp_path / "ema.safetensors", dit_kwargs())[0]
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    assert main(["--to", "diffusers", str(weights), "--out", str(out)]) == 2
    assert "--force" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["stale.txt"]  # untouched
    assert main(["--to", "diffusers", str(weights), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "pipe"]  # no tmp/old left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--to", "diffusers", str(weights), "--out", str(empty)]) == 0  # an empty directory is fine


def test_vae_that_diffusers_cannot_load_is_left_out_with_a_note(tmp_path, caplog):
    base = {"shape": [CH, SIZE, SIZE], "shift": [0.0] * CH, "scale": [0.18215] * CH, "mean": None, "std": None}
    for vae, note in (("stabilityai/sd-vae-ft-ema", "hub model 'stabilityai/sd-vae-ft-ema'"),
                      (str(tmp_path / "gone"), "not on this machine"),
                      (str(tmp_path / "vae"), "normalised per channel")):
        latent = dict(base, vae=vae)
        if note.startswith("normalised"):
            latent["shift"] = [0.1] * CH
            tiny_vae(tmp_path / "vae")
        weights = write_ckpt(tmp_path / "ema.safetensors", dit_kwargs(), latent=latent)[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="launch.convert"):
            assert main(["--to", "diffusers", str(weights), "--out", str(tmp_path / "pipe"), "--force"]) == 0
        assert note in caplog.text
        assert not (tmp_path / "pipe" / "vae").exists()
        assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["vae"] == [None, None]
    # --vae names a local copy of the checkpoint's hub VAE: written as vae/ with the checkpoint's latent scale
    weights = write_ckpt(tmp_path / "ema.safetensors", dit_kwargs(), latent=dict(base, vae="org/vae"))[0]
    assert main(["--to", "diffusers", str(weights), "--out", str(tmp_path / "pipe"), "--force",
                 "--vae", str(tiny_vae(tmp_path / "vae"))]) == 0
    assert json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]


def test_model_without_null_class_gets_a_zero_row(tmp_path, caplog):
    weights, ours = write_ckpt(tmp_path / "ema.safetensors", dit_kwargs(class_dropout_prob=0.0))
    assert ours.y_embedder.embedding_table.num_embeddings == CLASSES
    with caplog.at_level(logging.WARNING, logger="launch.convert"):
        assert main(["--to", "diffusers", str(weights), "--out", str(tmp_path / "pipe")]) == 0
    assert "without a null class" in caplog.text
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "pipe" / "transformer")).eval()
    x, t, _ = inputs(3)
    y = torch.tensor([0, 3, CLASSES - 1])  # this model has no null class
    with torch.no_grad():
        assert (theirs(x, timestep=t, class_labels=y).sample - ours(x, t, y)).abs().max() <= 1e-5


def test_flow_refusal_from_a_fresh_process(tmp_path):
    from tests.conftest import run_entry

    ckpt = write_ckpt(tmp_path / "flow.safetensors", dit_kwargs(), diffusion=SIT_DIFFUSION)[0]
    proc = run_entry(["launch/convert.py", "--to", "diffusers", str(ckpt), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "flow-matching" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ SiT
def sit_checkpoint(path: Path, args) -> dict:
    """A SiT train.py-style checkpoint of random tiny weights (official key names); returns the EMA weights."""
    from tests.test_convert import official_state_dict

    ema = official_state_dict(seed=4)
    obj = {"model": {k: v * 0 for k, v in ema.items()}, "ema": ema}
    if args is not None:
        obj.update(opt={"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}, args=args)
    torch.save(obj, path)
    return ema


def test_sit_checkpoint_imports_as_flow_model(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tests.test_convert import reference_forward

    ckpt = tmp_path / "0050000.pt"
    args = argparse.Namespace(model="SiT-XL/2", path_type="Linear", prediction="velocity", loss_weight=None,
                              sample_eps=1e-3, train_eps=1e-5, image_size=256)
    ema = sit_checkpoint(ckpt, args)
    out = tmp_path / "sit.safetensors"
    assert main(["--from", "sit", str(ckpt), "--out", str(out), "--num-heads", "2"]) == 0
    with safe_open(str(out), "pt") as fh:
        meta = json.loads(fh.metadata()["ditstack"])
    assert meta["diffusion"] == SIT_DIFFUSION
    assert meta["model"]["learn_sigma"] is True and meta["model"].get("timestep_freq_shift", 0.0) == 0.0
    assert meta["source"]["format"] == "sit"
    model = DiT(**meta["model"]).double().eval()
    model.load_state_dict(load_file(str(out)))  # the EMA weights, not the zeroed "model"
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 0.37, 1.0])  # SiT feeds t in [0, 1] to the timestep embedder as is
    y = torch.tensor([1, 4, 10])
    # SiT's forward keeps the first C channels (the velocity); the rest are the unused sigma channels
    torch.testing.assert_close(model(x, t, y)[:, :4], reference_forward(ema, x, t, y)[:, :4], rtol=1e-9, atol=1e-10)

    # a non-default SiT transport is refused; a bare state dict (the released SiT-XL-2-256.pt) converts
    bad = tmp_path / "gvp.pt"
    sit_checkpoint(bad, argparse.Namespace(path_type="GVP", prediction="velocity", loss_weight=None))
    capsys.readouterr()
    assert main(["--from", "sit", str(bad), "--out", str(tmp_path / "gvp.safetensors"), "--num-heads", "2"]) == 2
    assert "path_type='GVP'" in one_error_line(capsys)
    released = tmp_path / "SiT-XL-2-256.pt"
    torch.save(ema, released)
    assert main(["--from", "sit", str(released), "--out", str(tmp_path / "r.safetensors"), "--num-heads", "2"]) == 0
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["ditstack"])["diffusion"] == SIT_DIFFUSION

    # and the flow model does not export to diffusers
    capsys.readouterr()
    assert main(["--to", "diffusers", str(out), "--out", str(tmp_path / "pipe")]) == 2
    assert "flow-matching" in one_error_line(capsys)


def test_a_converted_sit_model_samples_as_sits_own_euler_ode(tmp_path):
    """The same noise through our Euler flow sampler and through SiT's ODE step written out in float64 (its
    `odeint(..., method="euler")` on t = linspace(0, 1, num_steps): x += dt * v(x, t), v the network's first C
    output channels, t fed as is) on the float64 reference network (tests/test_convert.py) give the same sample."""
    from dit.flow_samplers import flow_sample
    from eval.inference import load_checkpoint
    from tests.test_convert import reference_forward

    ema = sit_checkpoint(tmp_path / "SiT.pt", None)
    out = tmp_path / "sit.safetensors"
    assert main(["--from", "sit", str(tmp_path / "SiT.pt"), "--out", str(out), "--num-heads", "2"]) == 0
    gen, _ = load_checkpoint(out)
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    y, steps = torch.tensor([1, 4]), 6
    got = flow_sample(gen.model_fn(), gen.diffusion, noise.shape, sampler="euler", steps=steps, noise=noise.float(),
                      model_kwargs={"y": y})
    x, ts = noise.clone(), torch.linspace(0, 1, steps + 1, dtype=torch.float64)  # SiT's num_steps = steps + 1
    for k in range(steps):
        x = x + (ts[k + 1] - ts[k]) * reference_forward(ema, x, ts[k].expand(2), y)[:, :4]
    assert x.abs().max() > 1.0 and not torch.allclose(x, noise, atol=0.1)  # the network moved the noise
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)
