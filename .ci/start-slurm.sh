#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the SLURM end-to-end tests (tests/slurm/): Debian's slurmctld,
# slurmd, the client commands and munge, installed with apt when missing (as root on Debian), then munged, slurmctld
# and slurmd started on localhost with a generated slurm.conf: one node with this machine's CPUs and memory
# (`slurmd -C`), select/cons_tres over cores and memory, processes tracked through /proc (proctrack/linuxproc, no
# task plugin): nothing needs cgroups or systemd, so it runs inside a container. The daemons outlive the script.
#
# Usage (root):  .ci/start-slurm.sh          idempotent: a cluster that already answers is left as it is
#                .ci/start-slurm.sh stop     stops the three daemons this script started
# Logs and state: $SLURM_CI_DIR (default /var/tmp/dmat-slurm). Then: sinfo, sbatch, squeue, scancel, scontrol.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
STATE=${SLURM_CI_DIR:-/var/tmp/dmat-slurm}
CONF_DIR=/etc/slurm
MUNGE_KEY=/etc/munge/munge.key
WAIT_S=60

die() { echo "start-slurm: $*" >&2; exit 1; }

stop() {
    local name
    for name in slurmd slurmctld; do
        [[ -f $STATE/$name.pid ]] && kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
        rm -f "$STATE/$name.pid"
    done
    runuser -u munge -- munged --stop 2>/dev/null || true
    echo "start-slurm: stopped"
}

answers() { timeout 10 sinfo --noheader --responding --format=%T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    [[ $(id -u) == 0 && -f /etc/debian_version ]] && command -v apt-get >/dev/null \
        || die "SLURM is not installed: install ${PACKAGES[*]} (this script does so only as root on Debian)"
    echo "start-slurm: apt-get install ${PACKAGES[*]}"
    apt-get update -qq
    # The packages' init scripts cannot start anything in a container without an init system: policy-rc.d says no.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY" && chmod 0400 "$MUNGE_KEY"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- munged
    fi
    munge -n | unmunge >/dev/null || die "munged does not answer"
}

write_conf() {
    local node memory cpus
    # The node as slurmd sees it (CPUs, sockets, cores, threads, memory), less 1 GiB of memory for the system, so
    # that slurmd never finds less memory than configured and drains its node.
    node=$(slurmd -C | head -n 1)
    memory=$(grep -oE 'RealMemory=[0-9]+' <<<"$node" | cut -d= -f2)
    cpus=$(grep -oE 'CPUs=[0-9]+' <<<"$node" | cut -d= -f2)
    memory=$((memory > 2048 ? memory - 1024 : memory))
    node=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$memory/; s/^NodeName=([^ ]+)/NodeName=\\1 NodeAddr=127.0.0.1/" \
        <<<"$node")
    mkdir -p "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by .ci/start-slurm.sh: a single-node cluster on localhost for the tests.
ClusterName=dmat-ci
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups: processes are tracked through /proc and tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory gets its share per CPU, not the whole node (which would run one job at a time).
DefMemPerCPU=$((memory / cpus))
ReturnToService=2
# Quick turnover for tests: few seconds between SIGTERM and SIGKILL, finished jobs kept an hour for scontrol, and a
# requeued job may start again after 11 s (cred_expire + 1) instead of SLURM's default 121 s.
AuthInfo=cred_expire=10
KillWait=5
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_slurm() {
    install -d -o slurm -g slurm -m 0755 "$STATE/ctld"
    install -d -m 0755 "$STATE/d"
    touch "$STATE/slurmctld.log" && chown slurm:slurm "$STATE/slurmctld.log"
    slurmctld || die "slurmctld did not start: $(tail -n 20 "$STATE/slurmctld.log")"
    slurmd || die "slurmd did not start: $(tail -n 20 "$STATE/slurmd.log")"
    local waited=0
    until answers; do
        ((waited++ < WAIT_S)) || die "the node did not come up in $WAIT_S s: $(sinfo -N -l 2>&1; tail -n 20 \
            "$STATE/slurmctld.log" "$STATE/slurmd.log")"
        sleep 1
    done
}

[[ ${1:-} == stop ]] && { stop; exit 0; }
if command -v sinfo >/dev/null && answers; then
    echo "start-slurm: a cluster answers already: $(sinfo --noheader --format='%P %D node(s) %c CPUs %m MB %T')"
    exit 0
fi
install_packages
mkdir -p "$STATE"
start_munge
write_conf
start_slurm
echo "start-slurm: $(sinfo --version): $(sinfo --noheader --format='partition %P, %D node(s), %c CPUs, %m MB, %T')"
