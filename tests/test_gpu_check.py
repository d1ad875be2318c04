"""benchmarks/gpu_check.py: its dry run on the CPU (the same code path as on the GPU), the host-sync monitor, the
wheel installation and the input errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, entry_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check


def _planted_sync(x: torch.Tensor) -> float:
    return float(x.sum())  # a tensor → host copy: a device sync on a GPU


def test_monitor_reports_each_sync_with_its_stack():
    """Emulated on the CPU: every host conversion inside the block is one event whose stack ends at the call site;
    nothing outside the block is recorded; a C++-thread report on stderr is counted without a stack."""
    x = torch.ones(3)
    methods = {n: torch.Tensor.__dict__.get(n) for n in gpu_check._EMULATED}
    _planted_sync(x)  # before the block: not recorded
    monitor = gpu_check.HostSyncMonitor(emulate=True)
    with monitor:
        monitor.step = 1
        for _ in range(2):  # one call site, twice
            _planted_sync(x)
        monitor.step = 2
        bool(x.any())
        os.write(2, f"[W] Warning: {gpu_check.SYNC_MESSAGE} (function operator())\n".encode())
    _planted_sync(x)  # after the block: not recorded, and the methods are restored
    assert {n: torch.Tensor.__dict__.get(n) for n in gpu_check._EMULATED} == methods
    rep = monitor.report(steps=2)
    assert rep["syncs"] == 4 and rep["syncs_per_step"] == 2 and not rep["no_host_sync"]
    planted = [s for s in rep["sites"] if s["stack"][-1].endswith("in _planted_sync")]
    assert len(planted) == 1 and planted[0]["count"] == 2 and planted[0]["steps"] == [1]
    assert planted[0]["stack"][-1].startswith("tests/test_gpu_check.py:")
    cpp = [s for s in rep["sites"] if s["stack"][0].startswith("<C++ thread")]
    assert len(cpp) == 1 and cpp[0]["steps"] == [2]


def test_monitor_passes_other_warnings_through(recwarn):
    import warnings

    with gpu_check.HostSyncMonitor(emulate=True) as monitor:
        warnings.warn("unrelated", DeprecationWarning)
    assert monitor.report(1)["syncs"] == 0 and monitor.report(1)["no_host_sync"]


def _fake_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding module `name` (what pip needs: METADATA, WHEEL, RECORD)."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for f, text in files.items():
            zf.writestr(f, text)
    return path


def test_install_wheels_into_a_target_folder(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _fake_wheel(wheels, "ditstack_fake_pkg")
    done = gpu_check.install_wheels(wheels, tmp_path / "site")
    assert done["installed"] == ["ditstack_fake_pkg-1.0-py3-none-any.whl"]
    proc = subprocess.run([sys.executable, "-c", "import ditstack_fake_pkg as m; print(m.VALUE)"],
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), capture_output=True, text=True)
    assert proc.stdout.strip() == "42", proc.stderr
    assert gpu_check.install_wheels(tmp_path / "absent", tmp_path / "site2")["installed"] == []


def test_steady_windows_drop_the_first_and_mfu_uses_three_forwards():
    recs = [{"step": 10, "samples_per_s": 1.0, "step_time": 9.0},
            {"step": 20, "samples_per_s": 100.0, "step_time": 0.5, "mfu": 0.3},
            {"step": 30, "samples_per_s": 120.0, "step_time": 0.4, "mfu": 0.36}]
    row = gpu_check.train_row("r", {"records": recs, "flops_per_sample": 3e9}, peak_flops=1e12)
    assert row["windows"] == 2 and row["img_per_s"] == pytest.approx(110.0) and row["step_ms"] == pytest.approx(450)
    assert row["mfu"] == pytest.approx(110.0 * 3e9 / 1e12) and row["trainer_mfu"] == pytest.approx(0.33)


def test_part_selection_and_no_gpu_without_dry(tmp_path):
    assert [p.name for p in gpu_check.select_parts("tests,official", None)] == ["official", "tests"]
    with pytest.raises(ValueError, match="unknown part 'nope'"):
        gpu_check.select_parts(None, "nope")
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                              env=entry_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--dry" in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "results.json").exists()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--only", "bogus", "--out",
                           str(tmp_path)], cwd=ROOT, env=entry_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bogus" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_dry_run_reports_every_section(tmp_path):
    """The whole check on the CPU with a tiny model: every part runs and lands in results.json and summary.md."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out), "--work",
                           str(tmp_path / "work")], cwd=ROOT, env=entry_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rep = json.loads((out / "results.json").read_text())
    assert rep["parts"].keys() == {p.name for p in gpu_check.PARTS}
    assert {k: v["status"] for k, v in rep["parts"].items()} == {p.name: "ok" for p in gpu_check.PARTS}
    sm = rep["summary"]
    runs = {r["run"]: r for r in sm["train"]}
    assert runs.keys() == {"train_bf16", "train_bf16_ckpt", "train_bf16_compile", "train_bf16_zero0"}
    for r in runs.values():
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["peak_gib"] > 0 and 0 < r["mfu"] < 1
        assert r["trainer_mfu"] == pytest.approx(r["mfu"], rel=1e-6)  # same FLOPs and peak as the trainer's log
    assert runs["train_bf16_zero0"]["zero_stage"] == 0 and runs["train_bf16"]["zero_stage"] == 2
    off = sm["official"]
    assert off["official"]["img_per_s"] > 0 and off["ours_bare"]["img_per_s"] > 0
    assert off["reference_max_abs_diff_fp32"] < 1e-4 and off["step_ratio_official_over_trainer"] > 0
    smp = sm["sampling"]
    assert smp["ours"]["img_per_s_at_250_steps"] > 0 and smp["official"]["img_per_s_at_250_steps"] > 0
    assert sm["flash"]["forward_no_grad"]["flash"]  # the CPU flash kernel without gradients
    assert sm["top_kernels_training_step"]
    for key in ("sync_zero2", "sync_zero0"):
        assert sm["sync"][key]["detector"].startswith("emulated")
        assert rep["parts"][key]["result"]["steps_monitored"] == 2
    tests = rep["parts"]["tests"]["result"]
    assert tests["exit_status"] == 0 and tests["counts"] == {"skipped": len(tests["tests"])} and tests["tests"]
    assert all("CUDA" in t["message"] for t in tests["tests"])
    assert rep["env"]["torch"] == torch.__version__ and rep["env"]["versions"]["deepspeed"]
    md = (out / "summary.md").read_text()
    for heading in ("## Training", "## Official network", "## CFG sampling", "## Attention", "## Host syncs",
                    "## pytest -m cuda"):
        assert heading in md
    assert (out / "junit.xml").is_file() and (out / "log.txt").is_file()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


# ------------------------------------------------------------------ the GPU branches, emulated on the CPU
def test_monitor_on_a_gpu_uses_torch_sync_debug_mode(monkeypatch):
    """GPU mode: the monitor switches torch's sync debug mode to "warn" and back, and records the warnings torch
    raises for synchronizing calls (raised here the way torch's Python warning handler raises them)."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def device_sync():
        warnings.warn(f"{gpu_check.SYNC_MESSAGE} (function operator())", UserWarning)

    monitor = gpu_check.HostSyncMonitor(emulate=False)
    with monitor:
        monitor.step = 5
        device_sync()
        float(torch.ones(1))  # a CPU tensor: not a sync for torch, and not wrapped in GPU mode
    assert modes == ["warn", "default"]
    rep = monitor.report(1)
    assert rep["syncs"] == 1 and rep["detector"].startswith("torch.cuda.set_sync_debug_mode")
    assert rep["sites"][0]["stack"][-1].endswith("in device_sync") and rep["sites"][0]["steps"] == [5]


def test_cuda_event_timing_and_peak_memory_branches(monkeypatch):
    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing: bool) -> None:
            self.t = None

        def record(self) -> None:
            FakeEvent.clock += 1.0
            self.t = FakeEvent.clock

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: "FakeEvent") -> float:
            return 250.0 * (end.t - self.t)  # milliseconds

    monkeypatch.setattr(gpu_check, "is_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4 * 2**30)
    calls = []
    times = gpu_check._time_steps(lambda: calls.append(1), warmup=2, steps=5, rounds=3)
    assert len(calls) == 2 + 15 and times == [pytest.approx(0.05)] * 3  # 250 ms per round of 5 steps
    assert gpu_check._peak_memory() == {"peak_allocated_gib": 3.0, "peak_reserved_gib": 4.0, "kind": "cuda"}


def test_top_kernels_read_device_time_on_a_gpu(monkeypatch):
    class Avg:
        def __init__(self, key, us):
            self.key, self.self_device_time_total, self.count, self.self_cpu_time_total = key, us, 2, 1.0

    class Prof:
        def key_averages(self):
            return [Avg("gemm", 300.0), Avg("flash_fwd", 100.0), Avg("cpu_only", 0.0)]

    monkeypatch.setattr(gpu_check, "is_cuda", lambda: True)
    rows = gpu_check._top_kernels(Prof())
    assert [r["name"] for r in rows] == ["gemm", "flash_fwd"] and rows[0]["share"] == pytest.approx(0.75)


def test_gpu_mode_without_the_wheels_stops_before_any_work(monkeypatch, tmp_path, capsys):
    """On a GPU, an empty wheel folder and no DeepSpeed: one line saying what to do, exit 2, nothing written."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    (tmp_path / "whl").mkdir()
    rc = gpu_check.main(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "whl")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "deepspeed not importable" in err and "gpu_wheels.sh" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
    clock = iter([10.0, 12.0])  # two seconds for the timed products
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(clock))
    assert gpu_check.matmul_tflops(torch.device("cpu"), n=64, reps=4) == pytest.approx(2 * 64**3 * 4 / 2.0 / 1e12)
