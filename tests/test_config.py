"""The config schema: includes, overrides, and one-line errors naming the key."""
from __future__ import annotations

import pytest

from launch.config import ConfigError, load_config
from tests.conftest import ROOT, run_entry


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_dit_recipe():
    cfg = load_config(None)
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.0 and cfg.train.ema_decay == 0.9999
    assert cfg.train.global_batch_size == 256 and cfg.model.class_dropout_prob == 0.1
    assert cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.diffusion_steps == 1000


def test_includes_compose_and_the_including_file_wins(tmp_path):
    write(tmp_path, "model.yaml", "model:\n  name: DiT-B/4\n  qk_norm: true\n")
    write(tmp_path, "data.yaml", "data:\n  shards: /data/x\ntrain:\n  lr: 3.0e-4\n")
    run = write(tmp_path, "run.yaml", "include: [model.yaml, data.yaml]\ntrain:\n  lr: 2.0e-4\n")
    cfg = load_config(run)
    assert cfg.model.name == "DiT-B/4" and cfg.model.qk_norm is True
    assert cfg.data.shards == "/data/x" and cfg.train.lr == 2e-4


def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "train.betas=[0.9, 0.95]", "model.qk_norm=true",
                             "train.deepspeed.zero_stage=3", "sample.guidance_interval=[0, 700]"])
    assert cfg.train.lr == 2e-4 and cfg.train.betas == [0.9, 0.95] and cfg.model.qk_norm is True
    assert cfg.train.deepspeed.zero_stage == 3 and cfg.sample.guidance_interval == [0.0, 700.0]


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.lr=fast", "train.lr: expected float"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("model.name=DiT-XXL/2", "model.name: unknown model 'DiT-XXL/2'; valid choices: DiT-XL/2"),
    ("diffusion.noise_schedule=sqrt", "diffusion.noise_schedule: invalid value 'sqrt'; valid choices: linear, cosine"),
    ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage: invalid value 4; valid choices: 0, 1, 2, 3"),
    ("train.ema_decay=1.5", "train.ema_decay: must be in [0, 1)"),
    ("train.ema_every=0", "train.ema_every: must be > 0, got 0"),
    ("model.qk_norm=maybe", "model.qk_norm: expected bool"),
    ("sample.guide_channels=some", "sample.guide_channels: expected 'all' or a positive int"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="include cycle"):
        write(tmp_path, "a.yaml", "include: b.yaml\n")
        load_config(write(tmp_path, "b.yaml", "include: a.yaml\n"))
    with pytest.raises(ConfigError, match="'model.name' 'custom' needs|custom' needs model.hidden_size"):
        load_config(None, ["model.name=custom"])


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(configs) >= 15
    for path in configs:
        if path.parent.name == "vae":
            continue  # VAE configs hold only the vae/train sections; validated by the same schema below
        load_config(path)
    for path in (ROOT / "configs" / "vae").glob("*.yaml"):
        load_config(path)


@pytest.mark.parametrize("script", ["launch/train.py"])
def test_entry_point_exits_2_with_one_line(script, tmp_path):
    bad = write(tmp_path, "bad.yaml", "train:\n  lerning_rate: 1\n")
    proc = run_entry([script, "--config", str(bad)], timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1] == "config error: unknown config key 'train.lerning_rate'; valid keys in train: " + \
        lines[-1].split("valid keys in train: ")[1]
    assert "run_dir" in lines[-1]


def test_readme_config_reference_is_generated_from_the_schema():
    proc = run_entry(["launch/config_reference.py", "--check", "README.md"], timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_config_reference_documents_every_key():
    from launch.config_reference import reference

    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 80
    undocumented = [r.split("|")[1] for r in rows if r.rstrip().endswith("|  |")]
    assert not undocumented, undocumented
