"""End-to-end tests of launch/train_vae.py and launch/reconstruct.py on tiny MNIST shards (16x16, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_entry

# Measured here: the config of the slow test below (200 steps, batch 8, 16x16 -> 4x4x4) gives 14.3 dB held-out PSNR
# (SSIM 0.58); variants of it gave 12.6-14.6 dB after 150 steps; the untrained model gives 6-8 dB.
PSNR_FLOOR_DB = 12.0


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> dict:
    """16x16 MNIST image shards: 512 training and 64 held-out digits."""
    from data_pipeline.make_shards import make_shards

    root = tmp_path_factory.mktemp("vae_mnist")
    make_shards("mnist", root / "train", image_size=16, split="train", max_samples=512, shard_size=256,
                command="test")
    make_shards("mnist", root / "val", image_size=16, split="val", max_samples=64, shard_size=64, command="test")
    return {"train": root / "train", "val": root / "val"}


def write_config(tmp_path: Path, shards: dict, **sections) -> Path:
    """A tiny VAE config (factor 4: 16x16 -> 4x4x4) with per-test overrides, written as YAML."""
    cfg = {
        "data": {"shards": str(shards["train"]), "val_shards": str(shards["val"]), "num_workers": 0,
                 "shuffle_buffer": 64, "flip": False},
        "train": {"run_dir": str(tmp_path / "run"), "seed": 0, "max_steps": 6, "global_batch_size": 8,
                  "lr": 2e-3, "warmup_steps": 0, "betas": [0.5, 0.9], "precision": "fp32", "ema_decay": 0.0,
                  "log_every": 1, "ckpt_every": 100, "keep_last": 10, "wandb": False, "progress": False},
        "vae": {"base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4,
                "perceptual": {"weight": 0.1, "net": "squeeze", "pretrained": False},
                "disc_start": 1000, "disc_channels": 8, "disc_layers": 2, "grid_every": 0},
    }
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                cfg[section].setdefault(key, {}).update(value)
            else:
                cfg[section][key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "vae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, *args: str) -> int:
    from launch.train_vae import main

    return main(["--config", str(config), *args])


def records(run: Path) -> list:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)


def flat(sd) -> dict:
    """Flatten nested state dicts into {path: tensor-or-value}."""
    out = {}

    def rec(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                rec(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                rec(f"{prefix}.{i}", v)
        else:
            out[prefix] = obj

    rec("", sd)
    return out


def assert_states_equal(a: dict, b: dict) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_training_lowers_the_loss_and_reconstructs_held_out_digits(tiny_shards, tmp_path):
    cfg = write_config(tmp_path, tiny_shards, train={"max_steps": 200, "log_every": 10, "ckpt_every": 200,
                                                     "lr": 5e-3},
                       vae={"disc_start": 150, "grid_every": 100})
    assert train(cfg) == 0
    run = tmp_path / "run"
    recs = [r for r in records(run) if "rec" in r]
    assert recs[-1]["rec"] < 0.5 * recs[0]["rec"], [r["rec"] for r in recs]
    assert all("d_loss" not in r for r in recs if r["step"] <= 150)
    assert all("d_loss" in r and "g_adv" in r and "lpips" in r and "kl" in r for r in recs if r["step"] > 150)
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == ["step_0000100.png", "step_0000200.png"]
    # the exported VAE records the latent layout, and reconstructs the held-out shards above the floor
    from data_pipeline.vae_io import load_vae

    vae = load_vae(run / "vae.safetensors")
    meta = vae.metadata
    assert meta["latent"]["channels"] == 4 and meta["latent"]["downsample"] == 4
    assert meta["latent"]["shape"] == [4, 4, 4] and len(meta["latent"]["stats"]["std"]) == 4
    assert meta["step"] == 200 and meta["data"] == {"image_size": 16, "channels": 1}
    out = tmp_path / "recon"
    proc = run_entry(["launch/reconstruct.py", "--vae", str(run), "--shards", str(tiny_shards["val"]),
                      "--out", str(out), "--config", str(cfg), "--batch-size", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "reconstruct.json").read_text())
    print(f"held-out PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}, LPIPS {res['lpips']:.4f}")
    assert res["num_images"] == 64
    assert res["psnr"] > PSNR_FLOOR_DB, res
    assert 0 < res["ssim"] <= 1 and res["lpips"] >= 0
    assert (out / "reconstruct_grid.png").is_file()
    final_val = [r for r in records(run) if "val_psnr" in r][-1]
    assert final_val["val_psnr"] == pytest.approx(res["psnr"], abs=1e-6)


def test_discriminator_enters_at_disc_start(tiny_shards, tmp_path):
    cfg = write_config(tmp_path, tiny_shards, train={"max_steps": 5, "ckpt_every": 1},
                       vae={"disc_start": 3, "perceptual": {"weight": 0.0}})
    assert train(cfg) == 0
    run = tmp_path / "run"
    by_step = {r["step"]: r for r in records(run) if "rec" in r}
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    for s in (1, 2, 3):  # steps 0..2 (logged as 1..3): no adversarial term at all
        assert "d_loss" not in by_step[s] and "g_adv" not in by_step[s] and not by_step[s]["disc_active"]
    for s in (4, 5):
        assert by_step[s]["disc_active"] and by_step[s]["d_weight"] > 0 and by_step[s]["d_loss"] > 0
    ck = {s: state(run / "checkpoints" / f"step_{s:07d}") for s in (1, 3, 4)}
    # the discriminator (and its optimizer) did not move before disc_start, and moved at the first active step
    assert_states_equal(ck[1]["disc"], ck[3]["disc"])
    assert ck[3]["opt_d"]["state"] == {}
    assert any(not torch.equal(ck[3]["disc"][k], ck[4]["disc"][k]) for k in ck[3]["disc"])
    assert ck[4]["opt_d"]["state"] != {}


def test_resume_reproduces_the_run(tiny_shards, tmp_path):
    common = dict(train={"max_steps": 6, "ckpt_every": 3, "ema_decay": 0.9, "global_batch_size": 8,
                         "micro_batch_size": 4},  # gradient accumulation over 2 micro batches
                  vae={"disc_start": 2})
    straight = write_config(tmp_path / "a", tiny_shards, **common)
    assert train(straight) == 0
    halves = write_config(tmp_path / "b", tiny_shards, **common)
    assert train(str(halves), "--set", "train.max_steps=3") == 0
    assert train(str(halves), "--resume", "auto") == 0
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert_states_equal(state(a / "checkpoints" / "step_0000006"), state(b / "checkpoints" / "step_0000006"))
    keys = ("rec", "kl", "lpips", "d_loss", "g_adv", "d_weight")
    ra = [{k: r.get(k) for k in keys} for r in records(a) if "rec" in r]
    rb = [{k: r.get(k) for k in keys} for r in records(b) if "rec" in r]
    assert ra == rb and len(ra) == 6
    from safetensors.torch import load_file
    ea, eb = load_file(str(a / "vae.safetensors")), load_file(str(b / "vae.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_bad_config_is_one_line_and_exit_2(tiny_shards, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"vae": {"bogus": 1}}))
    proc = run_entry(["launch/train_vae.py", "--config", str(bad)], timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "vae.bogus" in lines[0], proc.stderr
    proc = run_entry(["launch/train_vae.py", "--config", str(bad), "--set", "vae.bogus=", "--set",
                      "vae.rec_loss=l3"], timeout=300)
    assert proc.returncode == 2
    # a VAE whose downsampling does not divide the image size: caught once the manifest is read
    cfg = write_config(tmp_path, tiny_shards, vae={"channel_mult": [1, 1, 1, 1, 1, 1]})
    assert train(cfg) == 2


def test_missing_lpips_weights_stop_the_run(tiny_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = write_config(tmp_path, tiny_shards, vae={"perceptual": {"net": "vgg", "pretrained": True}})
    assert train(cfg) == 2
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(expected) in errors[0] and "download.pytorch.org" in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()
