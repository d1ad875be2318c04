"""launch/demo.py: the quick demo end to end (real entry points), its resume/skip logic, and its configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import demo
from tests.conftest import ROOT, run_entry


@pytest.mark.parametrize("name", ["mnist_demo.yaml", "mnist_demo_ddpm.yaml", "mnist_demo_quick.yaml",
                                  "mnist_demo_pixels.yaml"])
def test_demo_configs_load(name):
    from eval.config import load_config

    cfg = load_config(ROOT / "configs" / "runs" / name)
    assert cfg.model.num_classes is None and cfg.model.class_dropout_prob > 0  # conditional, with a null class
    assert cfg.sample.cfg_scale > 1 and cfg.eval.cfg_scale > 1
    assert cfg.train.max_steps % cfg.train.ckpt_every == 0


def test_stages_cover_the_pipeline_and_pixels_skip_the_vae(tmp_path):
    latent = demo.build_stages(tmp_path, quick=True, pixels=False, config=demo.default_config(True, False))
    assert [s.name for s in latent] == ["shards", "shards_val", "vae", "latents", "train", "sample", "eval"]
    scripts = [Path(s.argv[1]).relative_to(ROOT).as_posix() for s in latent]
    assert scripts == ["data_pipeline/make_shards.py", "data_pipeline/make_shards.py", "launch/train_vae.py",
                       "data_pipeline/encode_latents.py", "launch/train.py", "launch/sample.py", "eval/fid.py"]
    train = latent[4].argv
    assert f"data.shards={tmp_path / 'latents'}" in train and "--resume" in train
    pixels = demo.build_stages(tmp_path, quick=False, pixels=True, config=demo.default_config(False, True))
    assert [s.name for s in pixels] == ["shards", "shards_val", "train_pixels", "sample_pixels", "eval_pixels"]
    assert f"data.shards={tmp_path / 'shards' / 'train'}" in pixels[2].argv


def test_rerun_skips_complete_stages_and_refuses_foreign_outputs(tmp_path):
    calls = []
    marker = tmp_path / "made.json"
    st = demo.Stage("x", "test stage", ["python", "-c", "pass"], lambda: marker.is_file())
    marker.write_text("{}")  # complete before the first run, made by nobody we know: no stamp, accepted
    demo.run_stages([st], tmp_path, log=calls.append)
    assert st.status.startswith("skipped")
    demo._write_stamp(tmp_path, st)
    other = demo.Stage("x", "test stage", ["python", "-c", "print(1)"], lambda: marker.is_file())
    with pytest.raises(demo.DemoError, match="another command"):
        demo.run_stages([other], tmp_path, log=calls.append)


def test_complete_stage_after_a_rerun_stage_is_refused(tmp_path):
    marker = tmp_path / "made.json"
    first = demo.Stage("a", "runs", [demo.sys.executable, "-c", f"open({str(marker)!r}, 'w').write('1')"],
                       lambda: marker.is_file())
    second = demo.Stage("b", "already complete", ["python", "-c", "pass"], lambda: True)
    with pytest.raises(demo.DemoError, match="predate the rerun of stage 'a'"):
        demo.run_stages([first, second], tmp_path, log=lambda _: None)
    assert first.status == "done" and marker.is_file()


def test_failed_stage_names_itself(tmp_path):
    st = demo.Stage("boom", "fails", [demo.sys.executable, "-c", "raise SystemExit(3)"], lambda: False)
    with pytest.raises(demo.DemoError, match="'boom' failed with exit status 3"):
        demo.run_stages([st], tmp_path, log=lambda _: None)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_entry(["launch/demo.py", "--quick", "--out", str(out)], timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train shards", "VAE", "latent shards", "EMA weights", "loss curve", "sample grid", "metrics"):
        assert Path(summary["files"][key]).exists(), key
    for digit in range(10):
        assert len(list((out / "samples" / str(digit)).glob("*.png"))) == demo.SAMPLES_PER_CLASS
    assert (out / "dit" / "samples.gif").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["digits_n"] == 100
    assert summary["digits_accuracy"] == metrics["digits_accuracy"]
    assert 0.0 <= metrics["digits_accuracy"] <= 1.0
    # Measured here: the quick recipe (1200 DiT steps of 32) reaches 48 % accuracy, FD-digits 47.5 (chance is 10 %;
    # the full demo 97.8 %, FD 11.7; an untrained model draws noise with FD > 140). Margins cover run-to-run noise.
    assert metrics["digits_accuracy"] > 0.25
    assert metrics["digits_fd"] < 100
    assert "metric:" in proc.stdout and str(out) in proc.stdout
    # a rerun finds every stage complete and only prints the summary again
    proc = run_entry(["launch/demo.py", "--quick", "--out", str(out)], timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("already complete, skipped") == 7
