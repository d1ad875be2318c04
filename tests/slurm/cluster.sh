#!/usr/bin/env bash
# A real one-machine SLURM cluster for tests: two emulated nodes (n1, n2, CPUs=2 each) on 127.0.0.1.
#
#   eval "$(tests/slurm/cluster.sh up [DIR])"   # start; prints `export SLURM_CONF=DIR/slurm.conf`
#   tests/slurm/cluster.sh status [DIR]         # sinfo of the cluster
#   tests/slurm/cluster.sh down [DIR]           # stop the daemons this script started (by their pid files)
#
# DIR defaults to a new temp dir for `up`, and to the folder of $SLURM_CONF for `status`/`down`. Everything the
# cluster writes (config, state, spool, logs, pid files) stays inside DIR. Needs root (slurmd launches jobs) and the
# Debian packages slurm-wlm and munge (see .ci/install_slurm.sh). Measured facts behind the settings:
# /work/shared/notes/slurm-in-ci.md.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 2; }
log() { echo "cluster.sh: $*" >&2; }

NODES=(n1 n2)

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# First base port whose ctld port (base) and slurmd ports (base+1, base+2) are all free.
pick_ports() {
    local base=${DIT_SLURM_PORT_BASE:-6817} i
    for ((i = 0; i < 20; i++, base += 10)); do
        if ! port_busy "$base" && ! port_busy $((base + 1)) && ! port_busy $((base + 2)); then
            echo "$base"; return 0
        fi
    done
    die "no free port triple found from ${DIT_SLURM_PORT_BASE:-6817} on"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    local dir=$1
    if munge_ok; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.ours"     # so `down` stops only a munged we started
    local i
    for ((i = 0; i < 50; i++)); do munge_ok && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    local dir=$1 base=$2 host mem
    host=$(hostname -s)
    # RealMemory a bit under what slurmd detects, else the node is drained for "Low RealMemory".
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( ${mem:-2000} * 9 / 10 ))
    cat > "$dir/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a throwaway one-machine cluster with two emulated nodes.
ClusterName=ditci
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${base}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials expire after 5 s instead of 120 s: a requeued job may start again at once.
AuthInfo=cred_expire=5
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool/%n
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd-%n.pid
SlurmctldLogFile=${dir}/slurmctld.log
SlurmdLogFile=${dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every second instead of up to a minute.
SchedulerParameters=sched_interval=1,bf_interval=1
# Finished jobs stay visible to scontrol for 5 minutes (there is no slurmdbd, hence no sacct).
MinJobAge=300
ReturnToService=2
KillWait=10
InactiveLimit=0
JobRequeue=1
NodeName=n1 NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((base + 1)) CPUs=2 RealMemory=${mem} State=UNKNOWN
NodeName=n2 NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((base + 2)) CPUs=2 RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local i states
    for ((i = 0; i < 300; i++)); do
        states=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ "$states" == "idle " ]] && [[ $(sinfo -h -N -o '%N' | wc -l) -eq ${#NODES[@]} ]]; then
            return 0
        fi
        sleep 0.1
    done
    sinfo -N >&2 || true
    die "nodes not idle after 30 s (node states: ${states:-none}); logs in $SLURM_CONF_DIR"
}

cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "needs root (slurmd runs as root to launch jobs); run it as root"
    local bin
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] ||
            die "$bin not found: install slurm-wlm and munge (.ci/install_slurm.sh)"
    done
    local dir=${1:-}
    if [[ -z "$dir" ]]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/dit-slurm.XXXXXX"); fi
    mkdir -p "$dir/state" "$dir/spool"
    dir=$(cd "$dir" && pwd)
    [[ ! -e "$dir/slurmctld.pid" ]] || die "$dir already holds a cluster; run: $0 down $dir"
    start_munge "$dir"
    write_conf "$dir" "$(pick_ports)"
    export SLURM_CONF="$dir/slurm.conf" SLURM_CONF_DIR="$dir"
    local node
    for node in "${NODES[@]}"; do mkdir -p "$dir/spool/$node"; done
    /usr/sbin/slurmctld -f "$SLURM_CONF" || die "slurmctld failed to start; see $dir/slurmctld.log"
    for node in "${NODES[@]}"; do
        /usr/sbin/slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd -N $node failed; see $dir/slurmd-$node.log"
    done
    wait_idle
    log "cluster up in $dir (nodes: ${NODES[*]})"
    echo "export SLURM_CONF=$SLURM_CONF"
}

resolve_dir() {
    local dir=${1:-}
    if [[ -z "$dir" ]]; then
        [[ -n "${SLURM_CONF:-}" ]] || die "give the cluster DIR or export SLURM_CONF"
        dir=$(dirname "$SLURM_CONF")
    fi
    [[ -f "$dir/slurm.conf" ]] || die "$dir/slurm.conf not found: not a cluster made by cluster.sh"
    echo "$dir"
}

# Send TERM to the pids in the given pid files (all at once: each daemon takes seconds to exit), wait up to 10 s,
# then KILL what is left.
stop_pidfiles() {
    local file pid pids=() i
    for file in "$@"; do
        [[ -s "$file" ]] || continue
        pid=$(cat "$file")
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null && pids+=("$pid"); fi
    done
    for ((i = 0; i < 100; i++)); do
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=""; done
        [[ -z "${pid:-}" ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$@"
}

cmd_down() {
    local dir node
    dir=$(resolve_dir "${1:-}")
    export SLURM_CONF="$dir/slurm.conf"
    # Cancel leftover jobs first so no job processes outlive the cluster.
    # (slurmstepd outlives slurmd, so wait until the jobs are gone before stopping the daemons.)
    if [[ -s "$dir/slurmctld.pid" ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local i
        for ((i = 0; i < 150; i++)); do
            [[ -z "$(squeue -h -t R,CG,S -o %i 2>/dev/null)" ]] && break
            sleep 0.1
        done
    fi
    local files=("$dir/slurmctld.pid")
    for node in "${NODES[@]}"; do files+=("$dir/slurmd-$node.pid"); done
    stop_pidfiles "${files[@]}"
    # Stop munged if this cluster started it, unless another cluster (e.g. a concurrent test session) uses it.
    if [[ -e "$dir/munged.ours" ]]; then
        if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
            log "leaving munged running: other SLURM daemons still use it"
        else
            stop_pidfiles /run/munge/munged.pid
        fi
        rm -f "$dir/munged.ours"
    fi
    log "cluster in $dir stopped"
}

cmd_status() {
    local dir
    dir=$(resolve_dir "${1:-}")
    SLURM_CONF="$dir/slurm.conf" sinfo -N
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) echo "usage: $0 up [DIR] | status [DIR] | down [DIR]" >&2; exit 2 ;;
esac
