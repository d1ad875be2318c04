# Shared plumbing for the sbatch scripts in slurm/ (sourced, not run).
#
#   dit_setup           cd to the repo, pick the python, export MASTER_ADDR/MASTER_PORT, the CPUs of every srun
#                       task (SRUN_CPUS_PER_TASK), thread counts, NCCL error handling and malloc settings
#   dit_master_port J   the rendezvous port of job J (data_pipeline/dist_env.py's slurm_master_port: the same formula)
#   dit_args R ...      build DIT_ARGS from $CONFIG, $OVERRIDES, $RUN_DIR and the script's arguments (R=1: add
#                       --resume ${RESUME:-auto} unless given)
#   dit_require_config  fail early when DIT_ARGS has no --config
#   dit_run_requeueable CMD...
#                       run CMD (an srun line) in the background so signal traps fire, forward USR1/TERM from
#                       the batch shell to it, and requeue the job when the run checkpointed after a preemption
#                       signal (exit status 3, EXIT_PREEMPTED of launch/train.py)

DIT_EXIT_PREEMPTED=3

dit_log() { echo "[slurm $(date -u +%H:%M:%S)] $*"; }
dit_die() { echo "[slurm] error: $*" >&2; exit 2; }

# 15000-29999: below Linux's ephemeral ports (32768+, where an outgoing connection may hold the port), the same on
# every task and across requeues, different for jobs sharing a node. Keep in step with data_pipeline/dist_env.py.
dit_master_port() { echo $((15000 + ${1:-0} % 15000)); }

# The repo: $DIT_REPO, else the submit dir (sbatch copies the script to a spool dir, so $0 does not help).
dit_setup() {
    DIT_REPO=${DIT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f "$DIT_REPO/launch/train.py" ]] ||
        dit_die "$DIT_REPO is not the ditstack repo (no launch/train.py): submit from the repo or set DIT_REPO"
    cd "$DIT_REPO" || dit_die "cannot cd to $DIT_REPO"
    export PYTHONPATH="$DIT_REPO${PYTHONPATH:+:$PYTHONPATH}"

    # Ranks come from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS of each srun task; launch/train.py prefers a
    # torchrun-style RANK/WORLD_SIZE, so drop any that leaked in from the submitting shell.
    unset RANK LOCAL_RANK WORLD_SIZE

    # Python: $VENV, else the repo's .venv, else python3 from PATH.
    if [[ -n "${VENV:-}" ]]; then
        DIT_PY="$VENV/bin/python"
    elif [[ -x "$DIT_REPO/.venv/bin/python" ]]; then
        DIT_PY="$DIT_REPO/.venv/bin/python"
    else
        DIT_PY=$(command -v python3) || dit_die "no python3 found; set VENV=/path/to/venv"
    fi
    [[ -x "$DIT_PY" ]] || dit_die "python $DIT_PY is not executable (VENV=${VENV:-unset})"

    # Rendezvous: the first node of the job. Its NodeAddr is what slurm itself uses to reach it, and resolves
    # even where node names are not in DNS (e.g. emulated nodes). The port is derived from the job id so that
    # jobs sharing a node do not collide, and stays the same across requeues.
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        local first addr
        first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        addr=$(scontrol show node "$first" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
        export MASTER_ADDR=${addr:-$first}
        MASTER_PORT=$(dit_master_port "${SLURM_JOB_ID:-0}")
        export MASTER_PORT
    fi

    # CPUs of each srun task. Since Slurm 22.05 srun no longer takes --cpus-per-task from the allocation
    # (SLURM_CPUS_PER_TASK): without SRUN_CPUS_PER_TASK every task of the step would get one CPU, shared by the
    # trainer and its data-loader workers. --cpus-per-gpu is still inherited by srun.
    local cpus=""
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
        cpus=$SRUN_CPUS_PER_TASK
    elif [[ -n "${SLURM_CPUS_PER_GPU:-}" ]]; then
        cpus=$SLURM_CPUS_PER_GPU   # one GPU per task
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        dit_log "warning: no --cpus-per-task: each task gets 1 CPU for itself and its data-loader workers" \
            "(submit with --cpus-per-task=N, e.g. the node's cores / tasks per node)"
    fi
    # Intra-op threads: the task's own CPUs (1 without --cpus-per-task, which is what the task then holds);
    # torch's default, every core of the node, oversubscribes the node with 8 tasks. The user's value wins.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${cpus:-1}}

    # A failed or timed-out collective tears the process down (srun's --kill-on-bad-exit then ends the step)
    # without first aborting the communicator, which can hang: torch's default since 2.2, set for every launch.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
    # glibc: keep freed memory instead of returning it to the OS every step (the page faults cost about a fifth
    # of a CPU training step; see README). The user's values win.
    export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
    dit_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} nodes ${SLURM_JOB_NODELIST:-?}" \
        "tasks ${SLURM_NTASKS:-?} cpus/task ${cpus:-1} threads $OMP_NUM_THREADS" \
        "master ${MASTER_ADDR:-?}:${MASTER_PORT:-?} python $DIT_PY"
}

# DIT_ARGS = --config $CONFIG, --set for each whitespace-separated item of $OVERRIDES, --run-dir $RUN_DIR, then
# the script's own arguments (so `sbatch --export=ALL,CONFIG=...` and `sbatch slurm/x.sh --config ...` both work).
# With want_resume=1, appends `--resume ${RESUME:-auto}` unless the arguments already carry --resume.
dit_args() {
    local want_resume=$1; shift
    DIT_ARGS=()
    [[ -n "${CONFIG:-}" ]] && DIT_ARGS+=(--config "$CONFIG")
    local kv ov=()
    read -r -a ov <<< "${OVERRIDES:-}"   # split on whitespace without glob expansion
    for kv in "${ov[@]}"; do DIT_ARGS+=(--set "$kv"); done
    [[ -n "${RUN_DIR:-}" ]] && DIT_ARGS+=(--run-dir "$RUN_DIR")
    DIT_ARGS+=("$@")
    if (( want_resume )) && ! _dit_has_flag --resume; then DIT_ARGS+=(--resume "${RESUME:-auto}"); fi
}

# Fail early (before any srun) when DIT_ARGS carries no --config.
dit_require_config() {
    _dit_has_flag --config ||
        dit_die "no config: pass --config FILE as an argument or CONFIG=FILE in the environment"
}

_dit_has_flag() {
    local a
    for a in "${DIT_ARGS[@]}"; do
        [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0
    done
    return 1
}

_dit_on_signal() {
    _DIT_TRAPPED=1
    _DIT_SIGNAL=$1
    dit_log "batch shell got SIG$1; forwarding it to the job step (pid $_DIT_CHILD)"
    kill -s "$1" "$_DIT_CHILD" 2>/dev/null || true
}

# Run "$@" in the background and wait for it; a bash trap only runs once the foreground command returns, hence
# `& wait`. A trapped signal interrupts `wait` (status > 128) while the step still runs: wait again for its real
# status. USR1 (from `#SBATCH --signal=B:USR1@N` or `scancel --signal=USR1 --batch`) and TERM are forwarded to
# srun, which forwards them to every task. Exit status 3 (or any failure after USR1), unless TERM came, →
# `scontrol requeue` (the run restarts with --resume auto); TERM means cancel / time limit / slurm's own
# preemption, which slurm handles itself.
dit_run_requeueable() {
    _DIT_SIGNAL=""
    trap '_dit_on_signal USR1' USR1
    trap '_dit_on_signal TERM' TERM
    "$@" &
    _DIT_CHILD=$!
    local r rc=0 have=0
    while :; do
        _DIT_TRAPPED=0
        wait "$_DIT_CHILD" && r=0 || r=$?   # (safe under set -e)
        # bash < 5.1 may have already forgotten a collected status: keep the one we have.
        if (( r == 127 && have )) && ! kill -0 "$_DIT_CHILD" 2>/dev/null; then break; fi
        rc=$r; have=1
        (( _DIT_TRAPPED && r > 128 )) || break
    done
    trap - USR1 TERM
    dit_log "job step exited with status $rc"
    # Requeue when the run reports it checkpointed after a preemption signal (3), or when the batch shell got USR1
    # and the step ended non-zero anyway: with --kill-on-bad-exit the first rank to exit 3 makes srun terminate
    # ranks still tearing down, so srun may report 143 instead; --resume auto then picks the newest complete
    # checkpoint.
    if [[ "$_DIT_SIGNAL" != TERM ]] &&
        { (( rc == DIT_EXIT_PREEMPTED )) || { [[ "$_DIT_SIGNAL" == USR1 ]] && (( rc != 0 )); }; }; then
        [[ -n "${SLURM_JOB_ID:-}" ]] || dit_die "run was preempted (status 3) but this is not a SLURM job"
        dit_log "run stopped after a preemption signal (status $rc); requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        dit_log "scontrol requeue failed (job submitted with --no-requeue?); resume later with --resume auto"
    fi
    return "$rc"
}
