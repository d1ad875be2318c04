#!/bin/bash
# Train a DiT with any config under SLURM: srun starts one task per GPU (launch/train.py reads its rank, local rank
# and world size from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS), the run resumes from its latest checkpoint, and a
# preemption signal makes it checkpoint and requeue itself.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=10 slurm/train.sh \
#       --config configs/runs/dit_xl2_imagenet256.yaml --set train.lr=2e-4
#   sbatch --export=ALL,CONFIG=configs/runs/tiny_test.yaml,OVERRIDES="train.max_steps=20 train.log_every=5" \
#       slurm/train.sh
#
# Arguments are passed to launch/train.py. Environment (all optional): CONFIG, OVERRIDES (whitespace-separated
# key=value, each becomes --set), RUN_DIR (--run-dir), RESUME (default auto), VENV (python = $VENV/bin/python,
# else .venv/bin/python, else python3), DIT_REPO (default: the directory sbatch was run from), SRUN_ARGS (extra
# srun flags). Resources are not fixed here (default: 1 task): pass --nodes/--ntasks-per-node/--gpus-per-node
# (or --ntasks) to sbatch, and --cpus-per-task for the data-loader workers (every srun task gets that many CPUs;
# without it, one). --gpus-per-task=1 instead of --gpus-per-node works too (each task then sees one GPU). On nodes
# shared with other jobs also pass --mem (or --exclusive --mem=0): the default memory per CPU is often too small.
# Submit from the repo root. The log goes to slurm-dit-train-JOBID.out, appended across requeues.
#
#SBATCH --job-name=dit-train
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 to the batch shell 120 s before the time limit: enough for one step plus a checkpoint write.
#SBATCH --signal=B:USR1@120
set -uo pipefail

# shellcheck source=slurm/lib.sh
source "${DIT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh" ||
    { echo "[slurm] error: slurm/lib.sh not found: submit from the repo root or set DIT_REPO" >&2; exit 2; }
dit_setup
dit_args 1 "$@"
dit_require_config

# --kill-on-bad-exit: a crashed rank takes the step down instead of leaving the others hung in a collective.
# shellcheck disable=SC2086  # SRUN_ARGS is a list of flags
dit_run_requeueable srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} "$DIT_PY" launch/train.py "${DIT_ARGS[@]}"
