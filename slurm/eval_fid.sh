#!/bin/bash
# FID-50K (and IS / precision-recall) of a checkpoint with eval/fid.py on every task of the job: sample i of N is
# generated on rank i mod world, so the numbers do not depend on how many GPUs run it.
#
#   sbatch --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8 slurm/eval_fid.sh \
#       --ckpt runs/dit_xl2_imagenet256/checkpoints/step_0400000 --ref VIRTUAL_imagenet256_labeled.npz \
#       --num-samples 50000 --cfg-scale 1.5 --sampler ddpm --steps 250
#   sbatch --ntasks=4 --export=ALL,CKPT=runs/x/model_ema.safetensors,REF=ref.npz slurm/eval_fid.sh
#
# Arguments are passed to eval/fid.py. Environment (all optional): CKPT (--ckpt), REF (--ref), OUT (--out), VENV,
# DIT_REPO (default: the submit dir), SRUN_ARGS (extra srun flags).
# Resources are not fixed here (default: 1 task): pass them to sbatch (--cpus-per-task reaches every srun task;
# --gpus-per-task=1 works as well as --gpus-per-node). When the job is preempted or reaches its
# time limit (USR1 120 s before), it is requeued; eval/fid.py skips the sample batches already written.
#
#SBATCH --job-name=dit-fid
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -uo pipefail

# shellcheck source=slurm/lib.sh
source "${DIT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh" ||
    { echo "[slurm] error: slurm/lib.sh not found: submit from the repo root or set DIT_REPO" >&2; exit 2; }
dit_setup
[[ -f eval/fid.py ]] || dit_die "$DIT_REPO/eval/fid.py not found"
DIT_ARGS=()
[[ -n "${CKPT:-}" ]] && DIT_ARGS+=(--ckpt "$CKPT")
[[ -n "${REF:-}" ]] && DIT_ARGS+=(--ref "$REF")
[[ -n "${OUT:-}" ]] && DIT_ARGS+=(--out "$OUT")
DIT_ARGS+=("$@")

# shellcheck disable=SC2086  # SRUN_ARGS is a list of flags
dit_run_requeueable srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} "$DIT_PY" eval/fid.py "${DIT_ARGS[@]}"
