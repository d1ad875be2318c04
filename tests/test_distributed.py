"""data_pipeline/dist_env.py and devices.py: device choice for every GPU layout SLURM and torchrun produce (the GPU
patching torch.cuda's queries), the rendezvous port shared with slurm/lib.sh, and the process-group timeout."""
from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from data_pipeline import dist_env as distributed
from data_pipeline.devices import DeviceLayoutError, select_device
from data_pipeline.dist_env import local_world_size, resolve_env, slurm_master_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture()
def clean_env(monkeypatch):
    """No launcher or SLURM variables, and os.environ restored afterwards (init_distributed exports variables)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in LAUNCH_KEYS or key.startswith("SLURM_") or key in ("CUDA_VISIBLE_DEVICES",
                                                                     "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
            monkeypatch.delenv(key)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def fake_gpus(monkeypatch, count: int) -> list:
    """Make torch.cuda report `count` visible GPUs; returns the list set_device calls are recorded in."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    return calls


# ----------------------------------------------------------------------------------------------- select_device
@pytest.mark.parametrize("local_rank", range(8))
def test_all_node_gpus_visible_uses_local_rank(monkeypatch, local_rank):
    """torchrun, or srun with --gpus-per-node=8 and no binding: every task sees all 8 GPUs."""
    fake_gpus(monkeypatch, 8)
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert select_device(local_rank, 8, env) == torch.device("cuda", local_rank)
    assert select_device(local_rank, None, env) == torch.device("cuda", local_rank)


@pytest.mark.parametrize("local_rank", [0, 3, 7])
def test_one_gpu_per_task_uses_cuda0(monkeypatch, local_rank):
    """srun --gpus-per-task=1 / --gpu-bind=single:1: CUDA_VISIBLE_DEVICES lists one device per task."""
    fake_gpus(monkeypatch, 1)
    env = {"CUDA_VISIBLE_DEVICES": str(local_rank), "SLURM_GPUS_PER_TASK": "1",
           "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7"}
    assert select_device(local_rank, 8, env) == torch.device("cuda", 0)
    # the count alone is enough: one visible GPU cannot be shared by design
    assert select_device(local_rank, 8, {"CUDA_VISIBLE_DEVICES": "0"}) == torch.device("cuda", 0)
    assert select_device(local_rank, None, {}) == torch.device("cuda", 0)


@pytest.mark.parametrize("local_rank,expected", [(0, 0), (1, 1), (2, 0), (3, 1)])
def test_k_gpus_per_task(monkeypatch, local_rank, expected):
    """srun --gpus-per-task=2 with 4 tasks on an 8-GPU node: each task sees its own 2 GPUs (local_rank mod 2)."""
    fake_gpus(monkeypatch, 2)
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_PER_TASK": "2"}
    assert select_device(local_rank, 4, env) == torch.device("cuda", expected)


@pytest.mark.parametrize("local_rank", range(8))
def test_gpus_bound_per_socket(monkeypatch, local_rank):
    """--gpu-bind=closest on a 2-socket node: tasks 0-3 see GPUs 0-3, tasks 4-7 see 4-7 (each as 0-3)."""
    fake_gpus(monkeypatch, 4)
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3" if local_rank < 4 else "4,5,6,7", "SLURM_STEP_GPUS": "0-7"}
    assert select_device(local_rank, 8, env) == torch.device("cuda", local_rank % 4)


@pytest.mark.parametrize("local_rank", [0, 3, 5])
def test_more_ranks_than_shared_gpus_is_an_error_on_every_rank(monkeypatch, local_rank):
    """8 tasks on a node where all of them see the same 4 GPUs (e.g. --gpus-per-node=4 --ntasks-per-node=8)."""
    fake_gpus(monkeypatch, 4)
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_STEP_GPUS": "0,1,2,3"}
    with pytest.raises(DeviceLayoutError) as err:
        select_device(local_rank, 8, env)
    message = str(err.value)
    assert "\n" not in message
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in message and f"local rank {local_rank}" in message
    assert "8 local ranks" in message and "4 visible GPU" in message


def test_unknown_local_world_size_errors_for_the_rank_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert select_device(1, None, {}) == torch.device("cuda", 1)
    with pytest.raises(DeviceLayoutError, match=r"CUDA_VISIBLE_DEVICES=<unset>, local rank 2\)"):
        select_device(2, None, {})


def test_no_cuda_is_cpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert select_device(5, 8, {"CUDA_VISIBLE_DEVICES": ""}) == torch.device("cpu")


# ------------------------------------------------------------------------------------------ local world size
@pytest.mark.parametrize("env,expected", [
    ({"LOCAL_WORLD_SIZE": "4", "RANK": "1", "WORLD_SIZE": "8"}, 4),                         # torchrun
    ({"LOCAL_SIZE": "2", "RANK": "1", "WORLD_SIZE": "4"}, 2),                               # deepspeed launcher
    ({"RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}, None),
    ({"SLURM_PROCID": "9", "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_NODEID": "1"}, 8),
    ({"SLURM_PROCID": "4", "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "1",
      "SLURM_JOB_NUM_NODES": "3"}, 2),
    ({"SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "0",
      "SLURM_JOB_NUM_NODES": "3"}, 3),
    ({"SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "4"},
     None),                                                                                   # step on a subset
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2"}, 2),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "garbage"}, None),
    ({}, None),
])
def test_local_world_size(env, expected):
    assert local_world_size(env) == expected


def test_resolve_env_exports_local_world_size():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_ID": "42", "MASTER_ADDR": "n1"}
    out = resolve_env(env)
    assert out["LOCAL_RANK"] == "3" and out["LOCAL_WORLD_SIZE"] == "8" and out["WORLD_SIZE"] == "16"
    assert "LOCAL_WORLD_SIZE" not in resolve_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    assert resolve_env({})["LOCAL_WORLD_SIZE"] == "1"


# ------------------------------------------------------------------------------------ port shared with lib.sh
JOB_IDS = [0, 1, 4242, 14999, 15000, 17767, 17768, 29999, 34999, 1234567, 987654321]


def _lib_sh_ports(job_ids: list[int]) -> list[int]:
    script = f'source "{REPO / "slurm" / "lib.sh"}"; for j in {" ".join(map(str, job_ids))}; do dit_master_port $j; done'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=60).stdout
    return [int(x) for x in out.split()]


def test_master_port_same_in_python_and_lib_sh():
    python_ports = [slurm_master_port(j) for j in JOB_IDS]
    assert _lib_sh_ports(JOB_IDS) == python_ports
    assert [int(resolve_env({"SLURM_JOB_ID": str(j)})["MASTER_PORT"]) for j in JOB_IDS] == python_ports
    # below Linux's ephemeral range (32768+) and above the privileged ports, distinct for neighbouring jobs
    assert all(1024 <= p < 32768 for p in python_ports)
    assert len({slurm_master_port(j) for j in range(1000, 1100)}) == 100


# ------------------------------------------------------------------------------------------- init_distributed
def test_init_distributed_slurm_one_gpu_per_task(monkeypatch, clean_env):
    """srun --gpus-per-task=1, local rank 3 of 8: the process uses cuda:0 (not the invalid cuda:3) with NCCL."""
    calls = fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    seen: dict = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    for key, value in {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
                       "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "77", "MASTER_ADDR": "n1",
                       "CUDA_VISIBLE_DEVICES": "3", "SLURM_GPUS_PER_TASK": "1"}.items():
        monkeypatch.setenv(key, value)
    info = distributed.init_distributed(use_deepspeed=False, timeout=90)
    assert info.device == torch.device("cuda", 0) and calls == [torch.device("cuda", 0)]
    assert (info.rank, info.local_rank, info.world_size, info.backend) == (11, 3, 16, "nccl")
    assert seen == {"backend": "nccl", "rank": 11, "world_size": 16, "timeout": timedelta(minutes=90)}
    assert os.environ["LOCAL_WORLD_SIZE"] == "8" and os.environ["MASTER_PORT"] == str(slurm_master_port(77))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_init_distributed_impossible_layout_fails_before_the_process_group(monkeypatch, clean_env):
    fake_gpus(monkeypatch, 4)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("process group started"))
    for key, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5",
                       "SLURM_STEP_TASKS_PER_NODE": "8", "SLURM_JOB_ID": "77", "MASTER_ADDR": "n1",
                       "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_STEP_GPUS": "0,1,2,3"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DeviceLayoutError, match="CUDA_VISIBLE_DEVICES=0,1,2,3"):
        distributed.init_distributed(use_deepspeed=False)


def test_init_distributed_deepspeed_gets_the_timeout(monkeypatch, clean_env):
    import deepspeed

    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    seen: dict = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    distributed.init_distributed(use_deepspeed=True)
    assert seen["timeout"] == distributed.DEFAULT_DIST_TIMEOUT and seen["dist_backend"] == "gloo"
    distributed.init_distributed(use_deepspeed=True, timeout=timedelta(seconds=30))
    assert seen["timeout"] == timedelta(seconds=30)


def test_default_timeout_is_longer_than_torch_and_deepspeed_defaults():
    from deepspeed.constants import default_pg_timeout as ds_default
    from torch.distributed.constants import default_pg_timeout

    assert distributed.DEFAULT_DIST_TIMEOUT > max(default_pg_timeout, ds_default)


@pytest.mark.parametrize("bad", [0, -5, timedelta(0)])
def test_non_positive_timeout_is_rejected(bad, clean_env):
    with pytest.raises(ValueError, match="timeout must be positive"):
        distributed.init_distributed(use_deepspeed=False, timeout=bad)


def test_init_distributed_single_process_gloo_real(monkeypatch, clean_env):
    """A real single-process gloo group on the CPU, created with the requested timeout."""
    original = dist.init_process_group
    seen: dict = {}

    def spy(**kw):
        seen.update(kw)
        return original(**kw)

    monkeypatch.setattr(dist, "init_process_group", spy)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    try:
        info = distributed.init_distributed(use_deepspeed=False, timeout=2.5)
        assert info.device == torch.device("cpu") and info.backend == "gloo" and dist.is_initialized()
        assert seen["timeout"] == timedelta(minutes=2.5)
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 1.0
    finally:
        distributed.cleanup()
