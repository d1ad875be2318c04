"""launch/sample.py end to end: grid + ImageFolder output, labels by name or index, errors, checkpoint paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import sample as sample_cli
from tests.conftest import run_entry

SIDE = 8


def _write_ckpt(path: Path, num_classes: int, class_names: list[str]) -> Path:
    """A tiny pixel-space DiT with random (non-zero) weights saved as a consolidated ditstack checkpoint."""
    from safetensors.torch import save_file

    from dit.models import DiT

    kw = dict(input_size=SIDE, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
              num_classes=num_classes, class_dropout_prob=0.1 if num_classes else 0.0, learn_sigma=True)
    torch.manual_seed(0)
    model = DiT(**kw)
    with torch.no_grad():  # adaLN-zero starts at a constant output; perturb so samples depend on noise and label
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"model": kw, "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
            "data": {"kind": "image", "class_names": class_names, "image_size": SIDE, "channels": 1},
            "latent": None, "step": 2}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"ditstack": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory) -> Path:
    return _write_ckpt(tmp_path_factory.mktemp("ck") / "model_ema.safetensors", 3, ["cat", "dog", "7"])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_labels_by_name_and_index_grid_and_image_folder(cond_ckpt, tmp_path):
    out = tmp_path / "s" / "grid.png"
    rc = sample_cli.main(["--ckpt", str(cond_ckpt), "--labels", "dog", "0", "7", "1", "--steps", "4",
                          "--cfg-scale", "2", "--seed", "3", "--out", str(out), "--nrow", "2", "--no-progress",
                          "--batch-size", "3"])
    assert rc == 0
    # a name wins over an index: "7" is the class named "7" (index 2), "0"/"1" are indices
    expected = [(1, "dog"), (0, "cat"), (2, "7"), (1, "dog")]
    for i, (_, name) in enumerate(expected):
        assert (out.parent / name / f"{i:06d}.png").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.is_dir()) == ["7", "cat", "dog"]
    grid = _png(out)
    assert grid.shape == (2 * (SIDE + 2) + 2, 2 * (SIDE + 2) + 2)  # 2x2 tiles with 2-px padding, grayscale
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["labels"] == [lab for lab, _ in expected]
    assert record["settings"]["cfg_scale"] == 2 and record["step"] == 2

    # the same images straight from the Generator with the documented seed rule (wiring, not a copy of it)
    from eval.inference import load_checkpoint, sample_seed

    gen, _ = load_checkpoint(cond_ckpt)
    ref = gen.generate([lab for lab, _ in expected], [sample_seed(3, i) for i in range(4)], batch_size=4,
                       sampler="ddim", steps=4, eta=0.0, cfg_scale=2.0)
    for i, (_, name) in enumerate(expected):
        np.testing.assert_array_equal(_png(out.parent / name / f"{i:06d}.png"), ref[i, ..., 0])
        tile = grid[2 + (i // 2) * (SIDE + 2):, 2 + (i % 2) * (SIDE + 2):][:SIDE, :SIDE]
        np.testing.assert_array_equal(tile, ref[i, ..., 0])
    assert len({ref[i].tobytes() for i in range(4)}) == 4  # not a constant image


def test_sample_does_not_depend_on_batch(cond_ckpt, tmp_path):
    a, b = tmp_path / "a" / "g.png", tmp_path / "b" / "g.png"
    common = ["--ckpt", str(cond_ckpt), "--labels", "0", "1", "2", "--steps", "3", "--no-progress"]
    assert sample_cli.main(common + ["--out", str(a), "--batch-size", "1"]) == 0
    assert sample_cli.main(common + ["--out", str(b), "--batch-size", "3", "--images-dir", str(tmp_path / "imgs")]) == 0
    for i, name in enumerate(["cat", "dog", "7"]):
        np.testing.assert_array_equal(_png(a.parent / name / f"{i:06d}.png"), _png(tmp_path / "imgs" / name /
                                                                                    f"{i:06d}.png"))
    assert not (b.parent / "cat").exists()  # --images-dir moved the single images


def test_unknown_label_is_one_line_exit_2(cond_ckpt, tmp_path, capsys):
    rc = sample_cli.main(["--ckpt", str(cond_ckpt), "--labels", "cat", "horse", "--out", str(tmp_path / "g.png"),
                          "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'horse'" in err and "cat, dog, 7" in err
    assert sample_cli.main(["--ckpt", str(cond_ckpt), "--labels", "5", "--out", str(tmp_path / "g.png")]) == 2
    assert not (tmp_path / "g.png").exists()


def test_unconditional_num_and_errors(tmp_path, capsys):
    ck = _write_ckpt(tmp_path / "u.safetensors", 0, [])
    out = tmp_path / "u" / "grid.png"
    assert sample_cli.main(["--ckpt", str(ck), "--num", "3", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    files = sorted(p.name for p in (out.parent / "unconditional").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png"]
    assert sample_cli.main(["--ckpt", str(ck), "--labels", "1", "--out", str(out)]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_resolve_labels_cycles_classes_with_num():
    assert sample_cli.resolve_labels(None, 5, 3, ["a", "b", "c"]) == [0, 1, 2, 0, 1]
    with pytest.raises(sample_cli.SampleError, match="does not match"):
        sample_cli.resolve_labels(["a"], 2, 3, ["a", "b", "c"])
    assert sample_cli.class_dir_names(2, ["a/b", ""]) == ["a_b", "1"]


@pytest.mark.slow
def test_cli_on_run_dir_and_bad_path(cond_ckpt, tmp_path):
    """The real entry point on a run directory (newest complete checkpoint) and on a missing path."""
    import shutil

    ck_dir = tmp_path / "run" / "checkpoints" / "step_0000002"
    ck_dir.mkdir(parents=True)
    shutil.copy(cond_ckpt, ck_dir / "ema.safetensors")
    (ck_dir / "meta.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000002")
    out = tmp_path / "cli" / "grid.png"
    proc = run_entry(["launch/sample.py", "--ckpt", str(tmp_path / "run"), "--labels", "cat", "dog", "--steps", "2",
                      "--out", str(out), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out.parent / "cat" / "000000.png").is_file() and (out.parent / "dog" / "000001.png").is_file()
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["checkpoint"].endswith("step_0000002/ema.safetensors")
    proc = run_entry(["launch/sample.py", "--ckpt", str(tmp_path / "nope"), "--labels", "1", "--out", str(out)])
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_settings_come_from_the_checkpoints_config_then_config_set_and_flags(tmp_path):
    """sample.py and fid.py read their defaults from the one schema: the checkpoint's stored training config first,
    then --config / --set, then explicit flags win."""
    ckpt = _write_ckpt(tmp_path / "m.safetensors", 2, ["a", "b"])
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(ckpt), "pt") as fh:
        meta = json.loads(fh.metadata()["ditstack"])
    meta["config"] = {"sample": {"steps": 3, "sampler": "ddim", "cfg_scale": 2.0},
                      "eval": {"num_samples": 4, "steps": 2, "sampler": "ddim", "metrics": [], "batch_size": 4}}
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"ditstack": json.dumps(meta)})

    def settings(*extra: str) -> dict:
        out = tmp_path / f"g{len(list(tmp_path.glob('g*')))}" / "grid.png"
        proc = run_entry(["launch/sample.py", "--ckpt", str(ckpt), "--num", "2", "--no-progress", "--out", str(out),
                          *extra], timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(out.with_suffix(".json").read_text())["settings"]

    assert settings()["steps"] == 3 and settings()["cfg_scale"] == 2.0  # the checkpoint's config
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("sample:\n  steps: 4\n")
    assert settings("--config", str(cfg_file))["steps"] == 4
    assert settings("--config", str(cfg_file), "--set", "sample.steps=5")["steps"] == 5
    assert settings("--set", "sample.steps=5", "--steps", "6")["steps"] == 6  # an explicit flag wins
    proc = run_entry(["launch/sample.py", "--ckpt", str(ckpt), "--set", "sample.steps=0", "--out",
                      str(tmp_path / "x.png")], timeout=120)
    assert proc.returncode == 2 and "sample.steps" in proc.stderr.strip().splitlines()[-1]

    out = tmp_path / "eval"
    proc = run_entry(["eval/fid.py", "--ckpt", str(ckpt), "--out", str(out), "--grid", "0"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["settings"]["num_samples"] == 4 and record["settings"]["steps"] == 2
