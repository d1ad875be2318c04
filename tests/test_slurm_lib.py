"""slurm/lib.sh's dit_setup without a SLURM cluster: what it exports for the srun steps (CPUs per task, threads,
NCCL error handling, malloc settings). The scripts under a real SLURM are tests/test_slurm.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
EXPORTS = ("SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "MALLOC_MMAP_MAX_",
           "MALLOC_TRIM_THRESHOLD_", "MASTER_PORT")


def dit_setup(**env: str) -> tuple[dict[str, Optional[str]], str]:
    """Source lib.sh and run dit_setup in a clean environment plus `env`; returns (exports, its output)."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DIT_REPO": str(REPO),
            "VENV": sys.prefix}
    script = (f'source "{REPO / "slurm" / "lib.sh"}"; dit_setup; '
              + "; ".join(f'echo "@{k}=${{{k}-<unset>}}"' for k in EXPORTS))
    proc = subprocess.run(["bash", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    values: dict[str, Optional[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@"):
            key, _, value = line[1:].partition("=")
            values[key] = None if value == "<unset>" else value
    return values, proc.stdout


def test_cpus_per_task_reaches_every_srun_step():
    """Slurm >= 22.05: srun ignores SLURM_CPUS_PER_TASK; SRUN_CPUS_PER_TASK carries the job's value to srun."""
    values, out = dit_setup(SLURM_JOB_ID="123", SLURM_CPUS_PER_TASK="12")
    assert values["SRUN_CPUS_PER_TASK"] == "12"
    assert values["OMP_NUM_THREADS"] == "12"
    assert "cpus/task 12 threads 12" in out and "warning" not in out


def test_without_cpus_per_task_one_thread_and_a_warning():
    values, out = dit_setup(SLURM_JOB_ID="123")
    assert values["SRUN_CPUS_PER_TASK"] is None
    assert values["OMP_NUM_THREADS"] == "1"  # what each task holds; not every core of the node per task
    assert "warning: no --cpus-per-task" in out


def test_cpus_per_gpu_sets_threads_without_warning():
    values, out = dit_setup(SLURM_JOB_ID="123", SLURM_CPUS_PER_GPU="6")
    assert values["SRUN_CPUS_PER_TASK"] is None and values["OMP_NUM_THREADS"] == "6" and "warning" not in out


def test_user_values_win():
    values, _ = dit_setup(SLURM_JOB_ID="123", SLURM_CPUS_PER_TASK="12", SRUN_CPUS_PER_TASK="4", OMP_NUM_THREADS="2",
                          TORCH_NCCL_ASYNC_ERROR_HANDLING="1", MALLOC_MMAP_MAX_="65536")
    assert (values["SRUN_CPUS_PER_TASK"], values["OMP_NUM_THREADS"]) == ("4", "2")
    assert values["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and values["MALLOC_MMAP_MAX_"] == "65536"


def test_nccl_and_malloc_defaults():
    """The same NCCL error handling as data_pipeline/dist_env.py sets for other launchers; README's malloc settings."""
    from data_pipeline.dist_env import NCCL_ASYNC_ERROR_HANDLING

    values, _ = dit_setup(SLURM_JOB_ID="123", SLURM_CPUS_PER_TASK="8")
    assert values["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == NCCL_ASYNC_ERROR_HANDLING
    assert (values["MALLOC_MMAP_MAX_"], values["MALLOC_TRIM_THRESHOLD_"]) == ("0", "68719476736")
