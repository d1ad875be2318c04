"""GPU-only checks (`pytest -m cuda`): the entry points on one CUDA device, exact resume there, the flash kernel.

Every test here is skipped, with the reason, where `torch.cuda.is_available()` is false (the module's own marker,
no conftest hook: the rest of the suite is unaffected). benchmarks/gpu_check.py runs them on the GPU machine.
The entry points run in subprocesses like tests/test_train.py's, but with an environment that lets DeepSpeed find
the GPU (tests.conftest.entry_env forces its CPU accelerator).

DIT_CUDA_TESTS_DEVICE=cpu rehearses them on the CPU (slowly): that checks the tests' own code before GPU minutes are
spent on it, not the GPU; the flash-kernel test is skipped then (CPU bf16 training attention is not SDPA by design).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import ROOT, entry_env

DEVICE = os.environ.get("DIT_CUDA_TESTS_DEVICE", "cuda")
REHEARSAL = DEVICE != "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not REHEARSAL and not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); "
                              "benchmarks/gpu_check.py runs these on the GPU machine"),
]

TINY = "configs/runs/tiny_test.yaml"


def cuda_env(**extra: str) -> dict:
    """entry_env without the forced CPU accelerator: the subprocess sees the GPU like a user's run does."""
    env = entry_env(**extra)
    if not REHEARSAL:
        env.pop("DS_ACCELERATOR", None)
    return env


def run_cuda(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root with the GPU visible (output captured)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=cuda_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def train(run_dir: Path, shards: Path, *sets: str, resume: str | None = None, **env: str) -> None:
    """launch/train.py on one process (one GPU) with the tiny config and `--set` overrides; asserts exit 0."""
    args = ["launch/train.py", "--config", TINY, "--run-dir", str(run_dir), "--set", f"data.shards={shards}"]
    for s in sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    proc = run_cuda(args, **env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """64 MNIST digits in 4 shards (an epoch is 8 steps of the tiny config's global batch 8)."""
    out = tmp_path_factory.mktemp("cuda_shards")
    proc = run_cuda(["data_pipeline/make_shards.py", "--source", "mnist", "--out", str(out), "--shard-size", "16",
                     "--max-samples", "64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_subprocesses_see_the_gpu():
    """The environment the entry points get here finds the GPU (else the tests below would train on the CPU)."""
    proc = run_cuda(["-c", "import torch, deepspeed; from deepspeed.accelerator import get_accelerator; "
                           "print(torch.cuda.is_available(), get_accelerator().device_name())"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = ["False", "cpu"] if REHEARSAL else ["True", "cuda"]
    assert proc.stdout.split()[-2:] == expected, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_train_end_to_end_on_one_gpu(stage, precision, small_shards, tmp_path):
    run = tmp_path / f"zero{stage}_{precision}"
    train(run, small_shards, f"train.deepspeed.zero_stage={stage}", f"train.precision={precision}",
          "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1", "train.sample_every=4")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_0000002", "step_0000004"]
    log = losses(run)
    assert sorted(log) == [1, 2, 3, 4] and all(np.isfinite(v) for v in log.values()), log
    exported = load_file(str(run / "model_ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert max_weight_diff(run / "model_ema.safetensors", run / "checkpoints" / "step_0000004" / "ema.safetensors") == 0
    assert (run / "samples" / "step_0000004.png").is_file()
    # the consolidated weights run on the GPU through the inference path
    from eval.inference import load_checkpoint

    gen, _ = load_checkpoint(run / "model_ema.safetensors", DEVICE)
    images = gen.sample_batch(torch.tensor([1, 2]), [0, 1], steps=3, cfg_scale=2.0,
                              dtype=torch.bfloat16 if precision == "bf16" else None)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 32, 32)


def test_resume_is_exact_on_gpu(small_shards, tmp_path):
    """N steps in one run equal N/2 + a resumed N/2 on the GPU: same losses, same EMA weights file."""
    common = ("train.max_steps=8", "train.ckpt_every=4", "train.log_every=1", "train.ema_decay=0.5",
              "data.num_workers=1", "train.ema_every=3")  # the checkpoint at 4 holds a step not yet in the EMA
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # one cuBLAS workspace layout in every process
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, small_shards, *common, **env)
    train(split, small_shards, *common[1:], "train.max_steps=4", **env)
    train(split, small_shards, *common, resume="auto", **env)
    a, b = losses(straight), losses(split)
    weight_diff = max_weight_diff(straight / "model_ema.safetensors", split / "model_ema.safetensors")
    loss_diff = max(abs(a[s] - b[s]) for s in a) if sorted(a) == sorted(b) else float("inf")
    if weight_diff > 1e-6 or loss_diff > 1e-6:
        # tell a resume bug from run-to-run nondeterminism of the GPU kernels: repeat the straight run
        again = tmp_path / "straight_again"
        train(again, small_shards, *common, **env)
        noise = max_weight_diff(straight / "model_ema.safetensors", again / "model_ema.safetensors")
        pytest.fail(f"resumed run differs from the straight one: EMA weights by {weight_diff:.3g}, losses by "
                    f"{loss_diff:.3g}; two straight runs differ by {noise:.3g} (0 means the resume is at fault)\n"
                    f"straight {a}\nsplit {b}")
    assert sorted(a) == list(range(1, 9))


def test_sample_cli_on_gpu(tmp_path):
    """launch/sample.py on the GPU in bf16; a sample depends on its seed and label, not on the batch it was in."""
    from tests.test_inference import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    outs = {}
    for bs in (4, 1):
        out = tmp_path / f"bs{bs}" / "grid.png"
        proc = run_cuda(["launch/sample.py", "--ckpt", str(ckpt), "--labels", "1", "2", "3", "4", "--steps", "5",
                         "--sampler", "ddpm", "--cfg-scale", "2", "--dtype", "fp32", "--device", DEVICE,
                         "--batch-size", str(bs), "--out", str(out), "--no-progress"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads(out.with_suffix(".json").read_text())
        outs[bs] = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in record["images"]])
    assert outs[4].std() > 0  # real samples, not a constant
    # different batch sizes may pick different GPU matmul kernels: allow rounding, not other samples
    diff = np.abs(outs[4] - outs[1])
    assert (diff > 1).mean() < 0.01, f"batch 4 vs batch 1: {(diff > 0).mean():.2%} pixels differ, max {diff.max()}"
    proc = run_cuda(["launch/sample.py", "--ckpt", str(ckpt), "--labels", "1", "2", "--steps", "5", "--dtype",
                     "bf16", "--device", DEVICE, "--out", str(tmp_path / "bf16" / "grid.png"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fid_cli_on_gpu(tmp_path):
    """eval/fid.py generates and scores on the GPU (random-weight Inception with the real shapes)."""
    from eval.inception import write_random_weights
    from eval.metrics import save_reference
    from tests.test_inference import tiny_checkpoint

    weights = write_random_weights(tmp_path / "inception-random.pth", seed=0)
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", dict(input_size=8, patch_size=2, in_channels=3,
                                                              hidden_size=32, depth=1, num_heads=2, num_classes=4))
    save_reference(tmp_path / "ref.npz", torch.randn(16, 2048).abs(), {"source": "random"})
    out = tmp_path / "eval"
    proc = run_cuda(["eval/fid.py", "--ckpt", str(ckpt), "--num-samples", "8", "--batch-size", "4", "--steps", "3",
                     "--ref", str(tmp_path / "ref.npz"), "--inception-weights", str(weights), "--out", str(out),
                     "--metrics", "fid,is", "--dtype", "bf16", "--cfg-scale", "1.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["device"].startswith(DEVICE), record["device"]
    assert np.isfinite(record["metrics"]["fid"]) and record["metrics"]["is_mean"] >= 1.0 - 1e-9


def _attention_ops(fn) -> tuple[set[str], set[str]]:
    """(ATen scaled-dot-product ops, GPU kernel names containing 'flash') that `fn()` runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    ops = {n for n in names if n.startswith("aten::_scaled_dot_product") or n.startswith("aten::_flash")
           or n.startswith("aten::_efficient_attention")}
    kernels = {n for n in names if "flash" in n.lower() and not n.startswith("aten::")}
    return ops, kernels


def test_attention_runs_the_flash_kernel_in_bf16():
    """DiT's attention under bf16 autocast (head dim 72, as DiT-XL/2) dispatches to a flash kernel, forward and
    backward, and runs with SDPA restricted to FLASH_ATTENTION (so it is not a silent fallback to math/efficient)."""
    if REHEARSAL:
        pytest.skip("CPU rehearsal: bf16 training attention on the CPU is the explicit path by design")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=144, depth=2, num_heads=2,
                num_classes=10).cuda()
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().square().mean().backward()

    step()  # warm-up (cuBLAS / kernel selection) outside the profile
    ops, kernels = _attention_ops(step)
    flash_ops = {o for o in ops if "flash" in o or "cudnn" in o}
    assert flash_ops and not {o for o in ops if "math" in o or "efficient" in o}, ops
    assert any(o.endswith("_backward") for o in flash_ops), ops
    assert kernels, f"no flash kernel among the profiled GPU kernels; attention ops: {ops}"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        step()
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, t, y)).all()
