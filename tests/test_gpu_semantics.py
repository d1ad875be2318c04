"""The trainer's GPU behaviour, emulated on the CPU where a query or a device would hide it.

Each test here fails on code that is right on the CPU but wrong on a GPU; the docstrings say what is emulated.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_entry

TINY = "configs/runs/tiny_test.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_training_matmuls_run_in_bf16_with_the_gpu_autocast_query(stage, small_shards, tmp_path):
    """On a GPU the no-argument `torch.is_autocast_enabled()` reads the engine device's autocast state; DeepSpeed
    then turned an autocast opened around `engine(...)` off inside the engine, and bf16 runs trained in fp32.
    Emulated: the query reads the CPU's state (tests/support/gpu_autocast_semantics.py)."""
    out = tmp_path / "matmuls.json"
    proc = run_entry(["tests/support/gpu_autocast_semantics.py", str(out), "--", "--config", TINY,
                      "--run-dir", str(tmp_path / "run"), "--set", f"data.shards={small_shards}",
                      "--set", "train.max_steps=2", "--set", "train.precision=bf16",
                      "--set", f"train.deepspeed.zero_stage={stage}", "--set", "train.sample_every=0"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    training = [r["dtypes"] for r in json.loads(out.read_text()) if r["grad"]]
    assert len(training) == 2
    for counts in training:
        assert counts.get("torch.bfloat16", 0) > 0 and counts.get("torch.float32", 0) == 0, counts


@pytest.mark.slow
def test_fp32_training_matmuls_stay_fp32_with_the_gpu_autocast_query(small_shards, tmp_path):
    """The same emulation with precision fp32: nothing is cast (the autocast section is off)."""
    out = tmp_path / "matmuls.json"
    proc = run_entry(["tests/support/gpu_autocast_semantics.py", str(out), "--", "--config", TINY,
                      "--run-dir", str(tmp_path / "run"), "--set", f"data.shards={small_shards}",
                      "--set", "train.max_steps=1", "--set", "train.precision=fp32",
                      "--set", "train.deepspeed.zero_stage=0", "--set", "train.sample_every=0"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    training = [r["dtypes"] for r in json.loads(out.read_text()) if r["grad"]]
    assert training and all(set(c) == {"torch.float32"} for c in training), training


@pytest.mark.slow
def test_bf16_sample_grids_show_each_new_ema_snapshot(small_shards, tmp_path):
    """bf16 grids come from a bf16 copy of the EMA model; with `ema_decay: 0` every step's EMA is the new weights,
    so the grids of consecutive steps must differ (a stale copy made them byte-identical)."""
    run = tmp_path / "run"
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(run), "--set",
                      f"data.shards={small_shards}", "--set", "train.max_steps=3", "--set", "train.precision=bf16",
                      "--set", "train.deepspeed.zero_stage=0", "--set", "train.sample_every=1",
                      "--set", "train.ema_decay=0.0", "--set", "train.lr=0.05", "--set", "sample.steps=3"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    grids = [(run / "samples" / f"step_{s:07d}.png").read_bytes() for s in (1, 2, 3)]
    assert grids[0] != grids[1] and grids[1] != grids[2]


@pytest.fixture
def restore_tf32_flags():
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_switched_for_cuda_devices_only(restore_tf32_flags):
    """TF32 on by default for fp32 work on GPUs (PyTorch leaves matmuls in full fp32, several times slower on
    Ampere/Hopper), off on request for exactness; a CPU device leaves the flags alone."""
    import torch

    from data_pipeline.devices import configure_tf32

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert configure_tf32(torch.device("cpu"), True) is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert configure_tf32(torch.device("cuda", 3), True) is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert configure_tf32(torch.device("cuda", 0), False) is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("name,precision,tf32,tflops", [
    ("NVIDIA H200", "bf16", True, 989), ("NVIDIA H200", "fp32", True, 495), ("NVIDIA H200", "fp32", False, 67),
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989), ("NVIDIA H100 PCIe", "bf16", True, 756),
    ("NVIDIA H800", "bf16", True, 989), ("NVIDIA B200", "bf16", True, 2250), ("NVIDIA A100-SXM4-80GB", "fp32", True, 156),
    ("Some Future GPU", "bf16", True, None)])
def test_mfu_peak_per_gpu_and_precision(monkeypatch, name, precision, tf32, tflops):
    """MFU divides by the peak the run can reach: bf16 tensor cores, TF32 ones for fp32 with TF32, else fp32."""
    import torch

    from launch.train import _peak_flops

    monkeypatch.delenv("DIT_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = _peak_flops(torch.device("cuda", 0), precision, tf32)
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)
    monkeypatch.setenv("DIT_PEAK_TFLOPS", "123.5")
    assert _peak_flops(torch.device("cuda", 0), precision, tf32) == pytest.approx(123.5e12)


# ------------------------------------------------------------------------------------------------ resize a job
def _torchrun(script: str, args: list[str], nproc: int, timeout: float = 600):
    import subprocess

    from tests.conftest import ROOT, entry_env, torchrun_cmd

    return subprocess.run(torchrun_cmd(script, args, nproc), cwd=ROOT, env=entry_env(), capture_output=True,
                          text=True, timeout=timeout)


def _full_state(folder: Path, shapes: dict) -> dict:
    """Every parameter's full (weight, exp_avg, exp_avg_sq) assembled from an optim/ folder."""
    from contextlib import ExitStack

    from launch.optimizer_state import KEYS, _Index

    out = {}
    with ExitStack() as stack:
        index = _Index(folder, stack)
        for name, shape in shapes.items():
            numel = 1
            for s in shape:
                numel *= s
            for key in KEYS:
                out[(name, key)] = index.read(name, key, 0, numel, folder)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("written,loaded", [((2, 2), (1, 2)), ((1, 3), (2, 3)), ((2, 1), (1, 3)), ((2, 3), (1, 0))])
def test_optimizer_state_loads_on_another_number_of_ranks_and_stage(written, loaded, small_shards, tmp_path):
    """A checkpoint of N ranks at ZeRO stage s loads on M ranks at stage t with the very same fp32 master weights,
    Adam moments, step and LR schedule (DeepSpeed's own checkpoints raise ZeRORuntimeException there)."""
    (n, s), (m, t) = written, loaded
    run = tmp_path / "run"
    common = ["--config", TINY, "--run-dir", str(run), "--set", f"data.shards={small_shards}", "--set",
              "train.precision=fp32", "--set", "train.sample_every=0", "--set", "train.warmup_steps=10"]
    proc = _torchrun("launch/train.py", common + ["--set", "train.max_steps=3", "--set", "train.ckpt_every=3",
                                                  "--set", f"train.deepspeed.zero_stage={s}"], n)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_0000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    out = tmp_path / "resaved"
    proc = _torchrun("tests/support/resave_optimizer_state.py",
                     [str(out), "--", *common, "--set", f"train.deepspeed.zero_stage={t}", "--resume", str(ckpt)], m)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved, again = meta["optimizer"], json.loads((out / "describe.json").read_text())
    for key in ("adam_step", "lr_scheduler", "global_steps", "global_samples", "shapes"):
        assert again[key] == saved[key], key
    assert again["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"] < 1e-3  # mid-warmup lr restored
    before, after = _full_state(ckpt / "optim", saved["shapes"]), _full_state(out / "optim", saved["shapes"])
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(float(v.abs().max()) > 0 for (name, key), v in before.items() if key == "exp_avg_sq")


@pytest.mark.slow
def test_zero2_run_of_two_ranks_resumes_on_one(small_shards, tmp_path):
    """The reproduction of the issue: ZeRO-2 written by 2 ranks, `--resume auto` on 1 rank trains on (exit 0)."""
    run = tmp_path / "run"
    common = ["--config", TINY, "--run-dir", str(run), "--set", f"data.shards={small_shards}",
              "--set", "train.sample_every=0", "--set", "train.deepspeed.zero_stage=2", "--set", "train.log_every=1"]
    proc = _torchrun("launch/train.py", common + ["--set", "train.max_steps=3"], 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run_entry(["launch/train.py", *common, "--set", "train.max_steps=5", "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 2 ranks, this run has 1" in proc.stderr
    meta = json.loads((run / "checkpoints" / "step_0000005" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["optimizer"]["global_steps"] == 5
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]


def test_training_batches_are_pinned_for_a_gpu(monkeypatch, small_shards):
    """Host-to-device copies are asynchronous only from pinned memory: a GPU rank's stream pins its batches (with
    data-loader workers, the DataLoader's pinning thread does; without, the stream itself). Emulated: a CUDA
    device in DistInfo and a pin_memory that records the call."""
    from data_pipeline.dist_env import DistInfo
    from data_pipeline.loader import build_stream
    from eval.config import load_config
    from launch.trainer_base import stream_options

    cfg = load_config(TINY, [f"data.shards={small_shards}", "data.num_workers=0"])
    gpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0), backend="nccl")
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    assert stream_options(cfg, gpu, 8)["pin_memory"] is True and stream_options(cfg, cpu, 8)["pin_memory"] is False
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.shape) or self)
    stream = build_stream(str(small_shards), **stream_options(cfg, gpu, 8))
    x, y = next(iter(stream))
    assert pinned == [x.shape, y.shape]
    stream.close()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_zero0_training_step_never_reads_a_device_value_on_the_host(precision, small_shards, tmp_path):
    """On a GPU every host read of a tensor value (`float(loss)`, `.item()`, `.tolist()`, a tensor in an `if`)
    waits until the device has run everything queued before it. The step (two accumulated micro batches, active
    clipping, the end-of-step flags) must make none: tests/support/host_reads.py records them on the CPU with
    the trainer's host reads switched off as on a GPU. (ZeRO 1-3 read the gradient norm inside DeepSpeed.)
    The trainer runs on a CPU here, so its blocks are `dit.cpu`'s: those add no host read either."""
    out = tmp_path / "reads.json"
    proc = run_entry(["tests/support/host_reads.py", str(out), "3", "--", "--config", TINY,
                      "--run-dir", str(tmp_path / "run"), "--set", f"data.shards={small_shards}",
                      "--set", "train.deepspeed.zero_stage=0", "--set", f"train.precision={precision}",
                      "--set", "train.grad_clip=0.01", "--set", "train.micro_batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["reads"] == [] and record["blocks"] == ["CPUDiTBlock"]


def test_gpu_clipping_applies_the_coefficient_on_the_device():
    """The GPU branch of `clip_and_check_grads` (no host read) clips exactly like the CPU one, and leaves
    non-finite gradients alone (the step is skipped)."""
    from launch.train import clip_and_check_grads

    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    on_host, on_device = [t.clone() for t in grads], [t.clone() for t in grads]
    n1, f1 = clip_and_check_grads(on_host, 0.5, host_reads=True)
    n2, f2 = clip_and_check_grads(on_device, 0.5, host_reads=False)
    assert torch.equal(n1, n2) and bool(f1) and bool(f2)
    assert all(torch.equal(a, b) for a, b in zip(on_host, on_device))
    big = [t.clone() for t in grads]
    clip_and_check_grads(big, 100.0, host_reads=False)
    assert all(torch.equal(a, b) for a, b in zip(big, grads))  # a factor of 1 changes nothing
    grads[0][0, 0] = float("inf")
    kept = [t.clone() for t in grads]
    _, finite = clip_and_check_grads(grads, 0.5, host_reads=False)
    assert not bool(finite) and all(torch.equal(a, b) for a, b in zip(grads, kept))


def test_log_records_peak_gpu_memory_on_cuda_only(monkeypatch):
    from launch.trainer_base import device_memory_record

    assert device_memory_record(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**30)
    assert device_memory_record(torch.device("cuda", 1)) == {"gpu_mem_peak_gb": 3.0, "gpu_mem_reserved_gb": 4.0}


@pytest.mark.parametrize("comm", ["fp32", "bf16"])
def test_gradient_reduction_dtype_reaches_every_zero_stage(comm):
    """Under torch_autocast, ZeRO 1-3 reduce each parameter's gradient in the dtype `lower_precision_safe_modules`
    gives it and ignore `communication_data_type` (which ZeRO-0 uses): both must say the configured dtype."""
    from eval.config import load_config
    from launch.builders import deepspeed_config

    for precision in ("bf16", "fp32"):
        cfg = load_config(TINY, [f"train.deepspeed.grad_comm_dtype={comm}", f"train.precision={precision}"])
        ds = deepspeed_config(cfg, 8)
        assert ds["communication_data_type"] == comm
        assert ds["torch_autocast"]["enabled"] == (precision == "bf16")
        if comm == "fp32":
            assert ds["torch_autocast"]["lower_precision_safe_modules"] == []
        else:  # DeepSpeed's default list (Linear, Conv) in bf16
            assert "lower_precision_safe_modules" not in ds["torch_autocast"]


@pytest.mark.slow
def test_bf16_gradient_reduction_trains_on_two_ranks(small_shards, tmp_path):
    proc = _torchrun("launch/train.py", ["--config", TINY, "--run-dir", str(tmp_path / "run"), "--set",
                                         f"data.shards={small_shards}", "--set", "train.max_steps=2",
                                         "--set", "train.precision=bf16", "--set", "train.sample_every=0",
                                         "--set", "train.deepspeed.grad_comm_dtype=bf16"], 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
