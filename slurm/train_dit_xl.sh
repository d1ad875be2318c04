#!/bin/bash
# DiT-XL/2 on ImageNet 256×256 latent shards: 4 nodes × 8 GPUs (global batch 256 as in the paper, set in the
# config), one srun task per GPU, resumes from the latest checkpoint, requeues itself on preemption / time limit.
#
#   sbatch slurm/train_dit_xl.sh                                  # from the repo root
#   sbatch slurm/train_dit_xl.sh --set train.run_dir=runs/xl2_b   # extra launch/train.py arguments
#
# Same environment knobs as slurm/train.sh (CONFIG replaces the XL config; OVERRIDES, RUN_DIR, RESUME, VENV,
# DIT_REPO, SRUN_ARGS).
# Adapt --partition/--account/--time/--cpus-per-task to your cluster.
#
#SBATCH --job-name=dit-xl2-in256
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 to the batch shell 120 s before the time limit: the run finishes its step, checkpoints, exits 3, and the
# script requeues the job; the next start continues with --resume auto.
#SBATCH --signal=B:USR1@120
set -uo pipefail

CONFIG=${CONFIG:-configs/runs/dit_xl2_imagenet256.yaml}

# NCCL (uncomment what your fabric needs):
# export NCCL_DEBUG=WARN                      # INFO to see the rings/trees and the transport chosen
# export NCCL_SOCKET_IFNAME=ib0               # interface for NCCL bootstrap / socket transport (not lo, docker0)
# export NCCL_IB_HCA=mlx5                     # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3                  # RoCE clusters
# export NCCL_NET_GDR_LEVEL=PHB               # GPUDirect RDMA distance
# slurm/lib.sh sets TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (a failed collective ends the process instead of hanging).
# The collective timeout is train.dist_timeout_minutes (default 60: rank 0 alone writes sample grids and
# finishes checkpoints while the others wait); NCCL itself has no timeout variable.

# shellcheck source=slurm/lib.sh
source "${DIT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh" ||
    { echo "[slurm] error: slurm/lib.sh not found: submit from the repo root or set DIT_REPO" >&2; exit 2; }
dit_setup
dit_args 1 "$@"
dit_require_config

# One task per GPU (the allocation's 8 per node), each with the job's --cpus-per-task (SRUN_CPUS_PER_TASK, set by
# slurm/lib.sh). A task that sees all the node's GPUs uses cuda:$SLURM_LOCALID; with --gpus-per-task=1 (or
# --gpu-bind) it sees only its own and uses cuda:0 (data_pipeline/devices.py select_device).
# --kill-on-bad-exit: a crashed rank takes the step down instead of leaving the others hung in a collective.
# shellcheck disable=SC2086  # SRUN_ARGS is a list of flags
dit_run_requeueable srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} "$DIT_PY" launch/train.py "${DIT_ARGS[@]}"
