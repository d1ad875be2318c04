"""Bad input through the real entry points (issue 14, items 5-7): exit status 2, ONE line on stderr naming the flag,
config key or file, no traceback, and nothing written. Each case is a row of the README's failure-mode table."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from tests.conftest import run_entry

TINY = "configs/runs/tiny_test.yaml"  # hidden_size 64, 2 heads
# (entry point + arguments, the one line's expected text). Placeholders: {ckpt} a tiny conditional pixel-space DiT
# checkpoint (1 channel, hidden size 32, 1000 diffusion steps), {file} an existing regular file, {out} a path under
# the test's directory that must not exist afterwards (nothing written), {npz} a real .npz file without arr_0, {dir}
# an existing directory.
CASES = [
    # item 7: every number of the schema has a range
    (["launch/train.py", "--config", TINY, "--set", "train.lr=nan"],
     "config error: train.lr: nan is not a finite number; valid range (0, 1]"),
    (["launch/train.py", "--config", TINY, "--set", "train.lr=1e400"],
     "config error: train.lr: inf is not a finite number; valid range (0, 1]"),
    (["launch/train.py", "--config", TINY, "--set", "train.max_steps=99999999999999999999999"],
     "config error: train.max_steps: 99999999999999999999999 is out of range [1, 10^12] (more steps than any run "
     "takes: a typo?)"),
    (["launch/train.py", "--config", TINY, "--set", "model.class_dropout_prob=1.5"],
     "config error: model.class_dropout_prob: 1.5 is out of range [0, 1]"),
    (["launch/train.py", "--config", TINY, "--set", "train.seed=-1"],
     "config error: train.seed: -1 is out of range [0, 2^32-1]"),
    # item 5: the schema resolves the architecture and the sampling settings
    (["launch/train.py", "--config", TINY, "--set", "model.num_heads=3"],
     "config error: model.num_heads: 3 does not divide model.hidden_size=64 (attention splits the hidden size into "
     "equal heads; divisors of 64: 1, 2, 4, 8, 16, 32, 64)"),
    (["launch/train.py", "--config", "configs/models/dit_s2.yaml", "--set", "model.num_heads=7"],
     "config error: model.num_heads: 7 does not divide the DiT-S/2 preset's hidden_size 384"),
    (["launch/train.py", "--config", TINY, "--set", "sample.steps=5000"],
     "config error: sample.steps: 5000 exceeds diffusion.diffusion_steps=1000"),
    # item 5: sample.py against the checkpoint
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--steps", "5000", "--out", "{out}/g.png"],
     "error: --steps 5000: the checkpoint's diffusion has 1000 steps; pass 1..1000"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--guide-channels", "9", "--out", "{out}/g.png"],
     "error: --guide-channels 9: the model has 1 input channel(s); pass 'all' or 1..1"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "-3", "--out", "{out}/g.png"],
     "sample.py: error: argument --num: -3 is out of range [1, 10000]"),
    # item 7: --num is bounded (every image is held in memory for the grid; eval/fid.py streams to disk)
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "100000000", "--out", "{out}/g.png"],
     "sample.py: error: argument --num: 100000000 is out of range [1, 10000] (every image is held in memory for "
     "the grid; for more use eval/fid.py --save-npz)"),
    # item 4: other impossible sample.py flags
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--cfg-scale", "nan", "--out", "{out}/g.png"],
     "sample.py: error: argument --cfg-scale: nan is not a finite number; valid range [0, 100]"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--eta", "inf", "--out", "{out}/g.png"],
     "sample.py: error: argument --eta: inf is not a finite number; valid range [0, 1]"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--batch-size", "0", "--out", "{out}/g.png"],
     "sample.py: error: argument --batch-size: 0 is out of range [1, 65536]"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--nrow", "0", "--out", "{out}/g.png"],
     "sample.py: error: argument --nrow: 0 is out of range [1, 10000]"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--seed", "-1", "--out", "{out}/g.png"],
     "sample.py: error: argument --seed: -1 is out of range [0, 2^32-1]"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--guidance-interval", "500", "100", "--out",
      "{out}/g.png"], "error: --guidance-interval 500 100: T_LO must not exceed T_HI"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--device", "gpu0", "--out", "{out}/g.png"],
     "sample.py: error: argument --device: 'gpu0' is not a device (cpu, cuda, cuda:N, mps)"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--out", "{file}/g.png"],
     "error: --out {file}/g.png: {file} exists and is not a directory"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--images-dir", "{file}", "--out", "{out}/g.png"],
     "error: --images-dir {file}: {file} exists and is not a directory"),
    (["launch/sample.py", "--ckpt", "{ckpt}", "--num", "2", "--vae", "{out}/vae", "--out", "{out}/g.png"],
     "error: --vae {out}/vae: no such file or directory"),
    # item 6: eval/fid.py names the real problem, not the (here absent) Inception weights
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "foo", "--out", "{out}"],
     "error: --metrics foo: unknown metric 'foo'; valid: fid, is, kid, pr, none"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--ref", "{out}/nonexistent.npz", "--out", "{out}"],
     "error: --ref {out}/nonexistent.npz: no such file"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "fid", "--out", "{out}"],
     "error: --metrics fid: FID/KID/PR need reference statistics: pass --ref ref.npz"),
    # item 5 for eval/fid.py (checked before generation.json is written into --out)
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--steps", "5000", "--out", "{out}"],
     "error: --steps 5000: the checkpoint's diffusion has 1000 steps; pass 1..1000"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--guide-channels", "9", "--out", "{out}"],
     "error: --guide-channels 9: the model has 1 input channel(s); pass 'all' or 1..1"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--batch-size", "0", "--out", "{out}"],
     "fid.py: error: argument --batch-size: 0 is out of range [1, 65536]"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--num-samples", "1", "--out", "{out}"],
     "fid.py: error: argument --num-samples: 1 is out of range [2, 10^6]"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--grid", "-1", "--out", "{out}"],
     "fid.py: error: argument --grid: -1 is out of range [0, 10000]"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--cfg-scale", "nan", "--out", "{out}"],
     "fid.py: error: argument --cfg-scale: nan is not a finite number"),
    (["eval/fid.py", "--ckpt", "{ckpt}", "--metrics", "none", "--out", "{file}"],
     "error: --out {file}: {file} exists and is not a directory"),
    # item 4: convert.py
    (["launch/convert.py", "--from", "official", "{ckpt}", "--out", "{out}/x.safetensors", "--num-heads", "0"],
     "convert.py: error: argument --num-heads: 0 is out of range [1, 1024]"),
    (["launch/convert.py", "--from", "official", "{ckpt}", "--out", "{out}/x.safetensors", "--num-heads", "-2"],
     "convert.py: error: argument --num-heads: -2 is out of range [1, 1024]"),
    (["launch/convert.py", "--from", "official", "{ckpt}", "--out", "{out}/x.safetensors", "--num-heads", "3"],
     "convert.py: error: --num-heads 3: does not divide the checkpoint's hidden size 32"),
    (["launch/convert.py", "--from", "diffusers", "{ckpt}", "--out", "{out}/x.safetensors", "--input-size", "0"],
     "convert.py: error: argument --input-size: 0 is out of range [1, 4096]"),
    (["launch/convert.py", "--from", "official", "{ckpt}", "--out", "{out}/x.safetensors", "--num-heads", "2",
      "--vae", "v", "--latent-scale", "nan"], "convert.py: error: argument --latent-scale: nan is not a finite number"),
    (["launch/convert.py", "--from", "official", "{ckpt}", "--out", "{file}/x.safetensors", "--num-heads", "2"],
     "convert.py: error: --out {file}/x.safetensors: {file} exists and is not a directory"),
    # item 4: reconstruct.py
    (["launch/reconstruct.py", "--vae", "{ckpt}", "--shards", "{out}", "--out", "{out}", "--batch-size", "0"],
     "reconstruct.py: error: argument --batch-size: 0 is out of range [1, 65536]"),
    (["launch/reconstruct.py", "--vae", "{ckpt}", "--shards", "{out}", "--out", "{out}", "--num-images", "-5"],
     "reconstruct.py: error: argument --num-images: -5 is out of range [0, 2^63-1]"),
    (["launch/reconstruct.py", "--vae", "{ckpt}", "--shards", "{out}", "--out", "{out}", "--device", "gpu0"],
     "reconstruct.py: error: argument --device: 'gpu0' is not a device"),
    (["launch/reconstruct.py", "--vae", "{ckpt}", "--shards", "{out}", "--out", "{file}"],
     "error: --out {file}: {file} exists and is not a directory"),
    (["launch/reconstruct.py", "--vae", "{out}/vae", "--shards", "{out}", "--out", "{out}"],
     "error: VAE path not found: {out}/vae"),
    # item 4 / item 6: reference.py checks its arguments and source before looking for the Inception weights
    (["eval/reference.py", "--folder", "{out}/images", "--out", "{out}/ref.npz"],
     "error: --folder {out}/images: not a directory"),
    (["eval/reference.py", "--npz", "{out}/samples.npz", "--out", "{out}/ref.npz"],
     "error: --npz {out}/samples.npz: no such file"),
    (["eval/reference.py", "--npz", "{ckpt}", "--out", "{out}/ref.npz"],
     "error: {ckpt}: not a readable .npz file"),
    (["eval/reference.py", "--npz", "{npz}", "--out", "{out}/ref.npz"],
     "error: {npz}: no arr_0 (ADM sample batch) in the file"),
    (["eval/reference.py", "--shards", "{out}/shards", "--out", "{out}/ref.npz"],
     "error: {out}/shards: no such shard directory"),
    (["eval/reference.py", "--npz", "{npz}", "--out", "{out}/ref.npz", "--batch-size", "0"],
     "reference.py: error: argument --batch-size: 0 is out of range [1, 65536]"),
    (["eval/reference.py", "--npz", "{npz}", "--out", "{out}/ref.npz", "--max-images", "1"],
     "reference.py: error: argument --max-images: 1 is out of range [2, 2^63-1]"),
    (["eval/reference.py", "--npz", "{npz}", "--out", "{file}/r.npz"],
     "error: --out {file}/r.npz: {file} exists and is not a directory"),
    (["eval/reference.py", "--npz", "{npz}", "--out", "{dir}"], "error: --out {dir}: is a directory; give the .npz path"),
]


def _case_id(case: tuple[list[str], str]) -> str:
    argv = case[0]
    flags = [a for a in argv[1:] if a.startswith("--") and a not in ("--config", "--ckpt", "--out", "--num")]
    return f"{Path(argv[0]).stem}:{'+'.join(flags[-1:]) or 'args'}:{argv[-1].rsplit('/', 1)[-1]}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint, a regular file, a .npz without arr_0 and a directory (made once for the module)."""
    import numpy as np

    from tests.test_inference import PIXEL_KW, tiny_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    ckpt = tiny_checkpoint(root / "m.safetensors", dict(PIXEL_KW, depth=1))
    afile = root / "afile.txt"
    afile.write_text("not a directory\n")
    npz = root / "other.npz"
    np.savez(npz, x=np.zeros(3))
    return {"ckpt": str(ckpt), "file": str(afile), "npz": str(npz), "dir": str(root)}


def _run_main(argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """The entry point's own `main(argv)` in this process (what `python SCRIPT ARGS` runs, without paying a fresh
    interpreter and torch import per case): (exit status, stderr)."""
    import importlib
    import sys

    module = importlib.import_module(argv[0][: -len(".py")].replace("/", "."))
    monkeypatch.setattr(sys, "argv", list(argv))  # argparse names the program after argv[0]
    capfd.readouterr()
    try:
        status = module.main(argv[1:])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return status, capfd.readouterr().err


@pytest.mark.parametrize("argv, expected", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, expected, inputs, tmp_path, monkeypatch, capfd):
    out = tmp_path / "out"
    fill = dict(inputs, out=str(out))
    args = [a.format(**fill) for a in argv]
    # TORCH_HOME without weights: a bad argument must be reported as itself, not as missing Inception/LPIPS weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    status, err = _run_main(args, monkeypatch, capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(expected.format(**fill)), lines[0]
    assert not out.exists(), "a refused command wrote something"


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 8, 22, 32, 38, 43])  # one case of each entry point, as a real process
def test_bad_input_through_a_fresh_process(index, inputs, tmp_path):
    argv, expected = CASES[index]
    out = tmp_path / "out"
    fill = dict(inputs, out=str(out))
    proc = run_entry([a.format(**fill) for a in argv], timeout=240, TORCH_HOME=str(tmp_path / "torch_home"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected.format(**fill)), proc.stderr


# ------------------------------------------------------------------------------------------------ in process
def test_device_checks_emulate_a_gpu_machine(monkeypatch):
    """--device on a machine with one CUDA device (torch's queries patched to report what a 1-GPU node reports)."""
    import torch

    from data_pipeline.checks import device_arg, device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_problem("cuda") is None and device_problem("cuda:0") is None and device_problem("cpu") is None
    assert device_problem("cuda:3") == "cuda:3: this machine has 1 CUDA device(s) (cuda:0..cuda:0)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in device_problem("cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="'tpu' is not a device"):
        device_arg("tpu")


def test_range_ends_nan_and_formatting():
    from data_pipeline.checks import Range, number_arg

    r = Range(0.0, 1.0, hi_open=True, why="because")
    assert 0.0 in r and 0.999 in r and 1.0 not in r and -0.0 in r
    assert r.problem(1.0) == "1.0 is out of range [0, 1) (because)"
    assert r.problem(-1.0) == "-1.0 is out of range [0, 1)"  # the why explains the upper bound only
    assert r.problem(math.nan) == "nan is not a finite number; valid range [0, 1)"
    assert str(Range(1, 10**12)) == "[1, 10^12]" and str(Range(0, 2**32 - 1)) == "[0, 2^32-1]"
    assert str(Range(0, 1, lo_open=True)) == "(0, 1]"
    parse = number_arg(int, Range(1, 5))
    assert parse("5") == 5
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '2.5'"):
        parse("2.5")
    with pytest.raises(argparse.ArgumentTypeError, match="6 is out of range"):
        parse("6")


def test_one_line_parser_usage_errors(capsys):
    from data_pipeline.checks import OneLineParser

    ap = OneLineParser(prog="x.py")
    ap.add_argument("--need", required=True)
    with pytest.raises(SystemExit) as exc:
        ap.parse_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "x.py: error: the following arguments are required: --need (see x.py --help)\n"


def test_resolve_labels_names_a_bad_num():
    from launch.sample import SampleError, resolve_labels

    with pytest.raises(SampleError, match=r"^--num -3: must be a positive number of samples$"):
        resolve_labels(None, -3, 10, [])
    with pytest.raises(SampleError, match=r"^--num 0: must be a positive"):
        resolve_labels(None, 0, 0, [])


@pytest.mark.slow
def test_trainer_usage_errors_and_guide_channels_beyond_the_shards_are_one_line(small_shards, tmp_path):
    """launch/train.py's own argparse errors are one line; a guide_channels the shards cannot have stops before
    training (not at the first sample grid)."""
    proc = run_entry(["launch/train.py"], timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--config" in proc.stderr
    proc = run_entry(["launch/train.py", "--config", "configs/runs/tiny_test.yaml", "--run-dir", str(tmp_path / "r"),
                      "--set", f"data.shards={small_shards}", "--set", "sample.guide_channels=3"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sample.guide_channels: 3 exceeds the 1 channels of the shards" in proc.stderr.strip().splitlines()[-1]
