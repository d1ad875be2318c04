"""Shared fixtures: the repository root, a subprocess environment for entry points, and MNIST shards."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def entry_env(**extra: str) -> dict:
    """Environment for running the project's entry points in a subprocess on the CPU."""
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_LOCALID"):
        env.pop(key, None)
    env.update({"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def run_entry(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root; returns the completed process (output captured)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=entry_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def torchrun_cmd(script: str, args: list[str], nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` of `script` on `nproc` local ranks, on a port of its own."""
    import time

    port = str(20000 + (os.getpid() * 7 + int(time.time() * 1000)) % 20000)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port,
            script, *args]


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """64 MNIST digits in 4 shards: an epoch is 8 steps of global batch 8, so short runs cross epochs."""
    out = tmp_path_factory.mktemp("small_shards")
    proc = run_entry(["data_pipeline/make_shards.py", "--source", "mnist", "--out", str(out),
                      "--shard-size", "16", "--max-samples", "64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> Path:
    """Image shards of the embedded MNIST digits (made once per test session)."""
    out = tmp_path_factory.mktemp("mnist_shards")
    proc = run_entry(["data_pipeline/make_shards.py", "--source", "mnist", "--out", str(out),
                      "--shard-size", "500", "--max-samples", "2000"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """In-process tests use one intra-op thread: on a 2-core machine shared with subprocess ranks, two threads
    oversubscribe the cores (measured up to 30x slower); subprocess entry points set OMP_NUM_THREADS themselves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
