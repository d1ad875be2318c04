"""The config schema: includes, overrides, and one-line errors naming the key."""
from __future__ import annotations

import pytest

from eval.config import ConfigError, load_config
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
    ("train.ema_decay=1.5", "train.ema_decay: 1.5 is out of range [0, 1)"),
    ("train.ema_decay=1.0", "train.ema_decay: 1.0 is out of range [0, 1)"),  # the open end
    ("train.ema_every=0", "train.ema_every: 0 is out of range [1, 10^6]"),
    ("model.qk_norm=maybe", "model.qk_norm: expected bool"),
    ("sample.guide_channels=some", "sample.guide_channels: expected 'all' or a positive int"),
    ("eval.guide_channels=0", "eval.guide_channels: expected 'all' or a positive int"),
    # item 7 of issue 14: every number has a range; NaN and infinities never pass
    ("train.lr=nan", "train.lr: nan is not a finite number; valid range (0, 1]"),
    ("train.lr=.nan", "train.lr: nan is not a finite number"),
    ("train.lr=1e400", "train.lr: inf is not a finite number; valid range (0, 1]"),  # YAML: a string, float() -> inf
    ("train.lr=1.0e+400", "train.lr: inf is not a finite number"),  # YAML: a float, already inf
    ("train.lr=-.inf", "train.lr: -inf is not a finite number"),
    ("train.lr=0", "train.lr: 0.0 is out of range (0, 1]"),
    ("train.max_steps=99999999999999999999999",
     "train.max_steps: 99999999999999999999999 is out of range [1, 10^12] (more steps than any run takes"),
    ("train.max_steps=0", "train.max_steps: 0 is out of range [1, 10^12]"),
    ("train.betas=[0.9, 1.5]", "train.betas[1]: 1.5 is out of range [0, 1)"),
    ("train.seed=-1", "train.seed: -1 is out of range [0, 2^32-1]"),
    ("train.seed=4294967296", "train.seed: 4294967296 is out of range [0, 2^32-1] (seeds are 32-bit"),
    ("train.dist_timeout_minutes=inf", "train.dist_timeout_minutes: inf is not a finite number"),
    ("train.micro_batch_size=0", "train.micro_batch_size: 0 is out of range [1, 2^20]"),
    ("train.global_batch_size=-8", "train.global_batch_size: -8 is out of range [1, 2^20]"),
    ("train.max_bad_steps=0", "train.max_bad_steps: 0 is out of range [1, 10^6]"),
    ("train.eval_num_samples=1", "train.eval_num_samples: 1 is out of range [2, 10^6]"),
    ("model.class_dropout_prob=1.5", "model.class_dropout_prob: 1.5 is out of range [0, 1]"),
    ("model.class_dropout_prob=-0.1", "model.class_dropout_prob: -0.1 is out of range [0, 1]"),
    ("model.mlp_ratio=0", "model.mlp_ratio: 0.0 is out of range (0, 64]"),
    ("model.input_size=100000", "model.input_size: 100000 is out of range [1, 4096]"),
    ("data.num_workers=-1", "data.num_workers: -1 is out of range [0, 256]"),
    ("diffusion.diffusion_steps=0", "diffusion.diffusion_steps: 0 is out of range [1, 10^5]"),
    ("sample.eta=1.5", "sample.eta: 1.5 is out of range [0, 1] (DDIM"),
    ("sample.cfg_scale=nan", "sample.cfg_scale: nan is not a finite number; valid range [0, 100]"),
    ("eval.guidance_interval=[-1, 500]", "eval.guidance_interval[0]: -1.0 is out of range [0, 10^5]"),
    ("eval.batch_size=0", "eval.batch_size: 0 is out of range [1, 65536]"),
    ("vae.channel_mult=[1, 0]", "vae.channel_mult[1]: 0 is out of range [1, 64]"),
    ("vae.num_res_blocks=0", "vae.num_res_blocks: 0 is out of range [1, 64]"),
    ("vae.perceptual.weight=-1", "vae.perceptual.weight: -1.0 is out of range [0, 100]"),
    ("vae.disc_lr=nan", "vae.disc_lr: nan is not a finite number"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    # item 5 of issue 14: an architecture that cannot be built is refused by the schema, with the preset resolved
    (["model.num_heads=7"], "model.num_heads: 7 does not divide the DiT-S/2 preset's hidden_size 384 (attention"),
    (["model.name=DiT-B/4", "model.hidden_size=100"],
     "model.hidden_size: 100 is not divisible by the DiT-B/4 preset's num_heads 12; set model.num_heads too"),
    (["model.hidden_size=130", "model.num_heads=1"], "model.hidden_size: 130 is not a multiple of 4"),
    (["model.name=custom", "model.hidden_size=64", "model.depth=2", "model.num_heads=3", "model.patch_size=2"],
     "model.num_heads: 3 does not divide model.hidden_size=64 (attention splits the hidden size into equal heads; "
     "divisors of 64: 1, 2, 4, 8, 16, 32, 64)"),
    (["model.name=DiT-S/4", "model.input_size=30"], "model.input_size: 30 is not a multiple of the DiT-S/4 preset's "
                                                    "patch_size 4"),
    (["model.patch_size=4", "model.input_size=30"], "model.patch_size: 4 does not divide model.input_size=30"),
    (["sample.steps=5000"], "sample.steps: 5000 exceeds diffusion.diffusion_steps=1000 (sampling respaces the "
                            "trained process: 1..1000)"),
    (["diffusion.diffusion_steps=100", "eval.steps=250"], "eval.steps: 250 exceeds diffusion.diffusion_steps=100"),
    (["model.in_channels=4", "sample.guide_channels=9"], "sample.guide_channels: 9 exceeds model.in_channels=4"),
    (["eval.guide_channels=2000"], "eval.guide_channels: 2000 exceeds the limit 1024"),
    (["diffusion.diffusion_steps=20"], "diffusion.diffusion_steps: 20 is too few for the linear schedule"),
    (["train.micro_batch_size=512"], "train.micro_batch_size: 512 exceeds train.global_batch_size=256"),
    (["vae.channel_mult=[]"], "vae.channel_mult: expected 1 to 8 levels"),
])
def test_semantic_checks_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_values_at_the_bounds_and_fixed_semantics_pass():
    cfg = load_config(None, ["train.ema_decay=0", "train.lr=1", "model.class_dropout_prob=1", "train.seed=4294967295",
                             "train.max_steps=1000000000000", "sample.guide_channels=3", "eval.guide_channels=all",
                             "model.num_heads=3", "diffusion.noise_schedule=cosine", "diffusion.diffusion_steps=10",
                             "sample.steps=10", "eval.steps=10"])
    assert cfg.train.max_steps == 10**12 and cfg.train.seed == 2**32 - 1 and cfg.train.lr == 1.0
    assert cfg.sample.guide_channels == "3"  # YAML's int 3 is stored as the string the samplers and CLIs use
    assert cfg.model.num_heads == 3  # 3 divides DiT-S/2's 384


def _numeric(tp) -> bool:
    """Whether an annotation is a number, an optional number or a list of numbers (bool and choices excluded)."""
    import typing

    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return False
    if origin in (typing.Union, list) or str(origin) == "<class 'types.UnionType'>":
        return any(_numeric(a) for a in typing.get_args(tp) if a is not type(None))
    return tp in (int, float)


def test_every_numeric_key_declares_a_range():
    import dataclasses
    import typing

    from eval import config as config_mod

    missing, checked = [], 0

    def walk(cls, prefix):
        nonlocal checked
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif _numeric(tp):
                checked += 1
                if not isinstance(f.metadata.get("range"), config_mod.Range):
                    missing.append(prefix + f.name)

    walk(config_mod.Config, "")
    assert checked > 50 and not missing, missing


def test_config_reference_shows_the_ranges():
    from launch.config_reference import reference

    rows = {line.split("|")[1].strip(" `"): line for line in reference().splitlines() if line.startswith("| `")}
    assert "| [1, 10^12] (more steps than any run takes: a typo?) |" in rows["train.max_steps"]
    assert "| (0, 1] |" in rows["train.lr"] and "| [0, 1) |" in rows["train.ema_decay"]


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
