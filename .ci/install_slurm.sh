#!/usr/bin/env bash
# Install Debian's slurm-wlm and munge for the real-SLURM tests (tests/test_slurm.py, tests/slurm/cluster.sh).
# Nothing to do when both are installed; needs root otherwise (CI runs as root). Starts no daemon: the tests bring
# up their own one-machine cluster.
set -euo pipefail

need=()
{ command -v sbatch >/dev/null && [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd ]]; } || need+=(slurm-wlm)
[[ -x /usr/sbin/munged ]] || need+=(munge)
if (( ${#need[@]} == 0 )); then
    echo "install_slurm: slurm-wlm and munge are installed ($(/usr/sbin/slurmd -V))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm: need root to apt-get install ${need[*]}" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${need[@]}"
# Debian's munge post-install writes the key; make sure it exists even if that step was skipped.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
echo "install_slurm: installed ${need[*]} ($(/usr/sbin/slurmd -V))"
