"""diffusion.objective: flow matching beside DDPM, from the config to the trainer, the checkpoint and the samplers.

The flow maths itself is tested in tests/test_transport.py and tests/test_flow_samplers.py; here: the schema, the
process a checkpoint records, the sampler family a checkpoint accepts (the rest refused in one line, exit 2), the
defaults per family, and flow training end to end (2 ranks, exact resume)."""
from __future__ import annotations

import json

import pytest
import torch

from dit.diffusion import GaussianDiffusion
from dit.processes import create_process, objective_of, sampler_objective
from dit.transport import Transport
from eval.config import ConfigError, load_config
from eval.inference import default_sampler, flow_options, load_checkpoint, settings_problem
from launch import sample as sample_cli
from launch.builders import diffusion_kwargs
from tests.conftest import run_entry
from tests.test_inference import PIXEL_KW, tiny_checkpoint
from tests.test_train import assert_same_weights, losses, run_train

FLOW = {"objective": "flow", "path": "linear", "prediction": "velocity", "loss_weight": "none",
        "time_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0}
FLOW_KW = dict(PIXEL_KW, learn_sigma=False)


def test_the_config_selects_the_process_and_ddpm_records_stay_as_before():
    ddpm = diffusion_kwargs(load_config(None))
    assert "objective" not in ddpm and objective_of(ddpm) == "ddpm"  # checkpoints of earlier versions resume
    assert isinstance(create_process(**ddpm), GaussianDiffusion)
    flow = diffusion_kwargs(load_config(None, ["diffusion.objective=flow", "diffusion.time_sampling=logit_normal",
                                               "diffusion.logit_mean=-0.5"]))
    assert flow == dict(FLOW, time_sampling="logit_normal", logit_mean=-0.5)
    assert isinstance(create_process(**flow), Transport)
    with pytest.raises(ValueError, match="unknown objective 'edm'"):
        create_process(objective="edm")


@pytest.mark.parametrize("sets, key", [
    (["diffusion.objective=flow", "sample.sampler=ddim"], "sample.sampler: ddim does not sample"),
    (["diffusion.objective=flow", "eval.sampler=ddpm"], "eval.sampler: ddpm does not sample"),
    (["eval.sampler=heun"], "eval.sampler: heun does not sample diffusion.objective=ddpm"),
    (["diffusion.objective=flow", "sample.guidance_interval=[0.2, 1.5]"], "sample.guidance_interval"),
    (["diffusion.logit_std=0"], "diffusion.logit_std"),
    (["sample.shift=0"], "sample.shift"),
])
def test_config_refuses_a_sampler_of_the_other_family(sets, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config(None, sets)


def test_defaults_per_family_and_the_flow_only_settings():
    assert [default_sampler(o, p) for o in ("ddpm", "flow") for p in ("sample", "eval")] == \
        ["ddim", "ddpm", "heun", "sde"]
    assert [sampler_objective(s) for s in ("ddpm", "ddim", "euler", "heun", "dopri5", "sde")] == \
        ["ddpm"] * 2 + ["flow"] * 4
    cfg = load_config(None, ["diffusion.objective=flow", "eval.sampler=dopri5", "eval.rtol=1e-4"])
    assert flow_options(cfg.eval) == {"shift": 1.0, "atol": 1e-6, "rtol": 1e-4, "last_step": "mean"}
    assert flow_options(load_config(None, ["sample.sampler=ddim"]).sample) == {}


def test_settings_problem_names_the_sampler_of_the_wrong_family():
    flow_meta = {"model": FLOW_KW, "diffusion": FLOW}
    msg = settings_problem(flow_meta, 250, "all", "ddpm")
    assert msg.startswith("--sampler ddpm: the checkpoint was trained with flow matching") and "heun" in msg
    assert settings_problem(flow_meta, 5000, "all", "heun") is None  # flow steps are solver steps, not respacing
    ddpm_meta = {"model": PIXEL_KW, "diffusion": {"diffusion_steps": 1000}}
    assert settings_problem(ddpm_meta, 50, "all", "euler").startswith("--sampler euler: the checkpoint was trained "
                                                                      "with DDPM")


def test_a_flow_checkpoint_samples_with_each_flow_sampler_and_refuses_ddpm(tmp_path):
    gen, _ = load_checkpoint(tiny_checkpoint(tmp_path / "f.safetensors", FLOW_KW, diffusion=FLOW))
    labels, seeds = torch.tensor([1, 2]), [5, 6]
    for sampler, kw in [("euler", {}), ("heun", {"shift": 3.0}), ("dopri5", {"rtol": 1e-2, "atol": 1e-3}),
                        ("sde", {"last_step": "mean"})]:
        out = gen.sample_batch(labels, seeds, sampler=sampler, steps=4, cfg_scale=2.0, **kw)
        assert out.dtype == torch.uint8 and out.shape == (2, 1, 8, 8)
        assert torch.equal(out[1:], gen.sample_batch(labels[1:], seeds[1:], sampler=sampler, steps=4, cfg_scale=2.0,
                                                     **kw))  # a sample does not depend on its batch
    assert torch.equal(gen.sample_batch(labels, seeds, steps=4), gen.sample_batch(labels, seeds, sampler="sde",
                                                                                  steps=4))  # the default
    with pytest.raises(ValueError, match="does not sample a flow matching checkpoint"):
        gen.sample_batch(labels, seeds, sampler="ddim", steps=4)


def test_sample_cli_defaults_to_the_flow_family_and_refuses_ddpm_in_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "f.safetensors", FLOW_KW, diffusion=FLOW)
    out = tmp_path / "grid.png"
    assert sample_cli.main(["--ckpt", str(ckpt), "--labels", "1", "2", "--steps", "3", "--out", str(out),
                            "--shift", "2", "--no-progress"]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["sampler"] == "heun" and settings["shift"] == 2.0
    capsys.readouterr()
    assert sample_cli.main(["--ckpt", str(ckpt), "--labels", "1", "--sampler", "ddpm", "--out",
                            str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sampler ddpm: the checkpoint was trained with flow matching" in err[0]
    assert not (tmp_path / "no.png").exists()


def test_fid_cli_refuses_a_ddpm_sampler_on_a_flow_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "f.safetensors", FLOW_KW, diffusion=FLOW)
    proc = run_entry(["eval/fid.py", "--ckpt", str(ckpt), "--sampler", "ddim", "--metrics", "none",
                      "--num-samples", "4", "--out", str(tmp_path / "ev")])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sampler ddim: the checkpoint was trained with flow matching" in lines[0]


@pytest.mark.slow
def test_flow_training_on_two_ranks_resumes_exactly_and_samples(small_shards, tmp_path):
    """Flow matching (logit-normal t) through the whole trainer: ZeRO-2 on 2 ranks, a split run resumed from its
    checkpoint equals the straight run, the checkpoint records the objective, and its EMA samples with Heun."""
    common = ("diffusion.objective=flow", "diffusion.time_sampling=logit_normal", "model.learn_sigma=false",
              "train.max_steps=6", "train.ckpt_every=3", "train.log_every=1", "train.ema_decay=0.5",
              "train.sample_every=6", "sample.sampler=heun", "sample.steps=3")
    straight = tmp_path / "straight"
    run_train(straight, small_shards, *common)
    split = tmp_path / "split"
    run_train(split, small_shards, *common, "train.max_steps=3")
    run_train(split, small_shards, *common, resume="auto")
    assert_same_weights(straight / "model_ema.safetensors", split / "model_ema.safetensors")
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    meta = json.loads((split / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["diffusion"] == dict(FLOW, time_sampling="logit_normal")
    assert (straight / "samples" / "step_0000006.png").is_file()
    gen, _ = load_checkpoint(straight / "model_ema.safetensors")
    assert gen.objective == "flow" and gen.sample_batch(torch.tensor([3]), [0], steps=3).shape == (1, 1, 32, 32)
