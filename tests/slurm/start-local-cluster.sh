#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the integration tests.
#
#   tests/slurm/start-local-cluster.sh          # install if needed, start, wait until idle
#   tests/slurm/start-local-cluster.sh stop     # stop what this script started (by PID)
#   tests/slurm/start-local-cluster.sh status   # exit 0 when its daemons all run
#   tests/slurm/start-local-cluster.sh env      # print `export SLURM_CONF=...`
#
# Idempotent: a running cluster started by this script is left alone. Needs root
# (Debian's slurm-wlm and munge run as root here). Everything lives under
# $GSSM_SLURM_DIR (default /tmp/gssm-slurm): config, spool, logs, PID files.
# Exits non-zero, with a message, when the cluster cannot start, having stopped the
# daemons it started; tests then skip. CI calls it (.ci/run, which stops the cluster on
# exit); pytest never does.
set -euo pipefail

STATE_DIR=${GSSM_SLURM_DIR:-/tmp/gssm-slurm}
CONF="$STATE_DIR/slurm.conf"
HOST=$(hostname -s)
# nproc obeys OMP_NUM_THREADS; the node must advertise the real CPUs.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)

log() { echo "[slurm-local] $*" >&2; }

stop_cluster() {
    for name in slurmd slurmctld munged; do
        pidfile="$STATE_DIR/$name.pid"
        if [[ -f $pidfile ]]; then
            pid=$(cat "$pidfile")
            if kill -0 "$pid" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                kill -9 "$pid" 2>/dev/null || true
            fi
            rm -f "$pidfile"
        fi
    done
    log "stopped"
}

running() { [[ -f "$STATE_DIR/$1.pid" ]] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null; }

case "${1:-start}" in
    stop) stop_cluster; exit 0 ;;
    status) running munged && running slurmctld && running slurmd; exit ;;
    env) echo "export SLURM_CONF=$CONF"; exit 0 ;;
    start) ;;
    *) echo "usage: $0 [start|stop|status|env]" >&2; exit 2 ;;
esac

if [[ $(id -u) -ne 0 ]]; then
    log "needs root to run slurmctld/slurmd"; exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } >"/tmp/gssm-slurm-apt.log" 2>&1; then
        log "could not install slurm (see /tmp/gssm-slurm-apt.log)"; exit 1
    fi
fi

mkdir -p "$STATE_DIR"/{spool/ctld,spool/d,log}

# munge: the authentication daemon, run as the munge user with its own socket.
if ! running munged; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || \
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    rm -f "$STATE_DIR/munged.pid"
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
fi

cat >"$CONF.tmp" <<CONF
# Written by tests/slurm/start-local-cluster.sh: a one-node cluster for tests.
ClusterName=gssm-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=30
KillWait=5
MinJobAge=300
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$HOST CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
mv "$CONF.tmp" "$CONF"
export SLURM_CONF=$CONF

if ! running slurmctld; then
    slurmctld -i -f "$CONF"
fi
if ! running slurmd; then
    slurmd -f "$CONF"
fi

# Wait until the node accepts work; a cluster that never does is stopped again.
for _ in $(seq 100); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle*|mixed*|allocated*) log "up: node $HOST ($CPUS CPUs) $state; export SLURM_CONF=$CONF"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
log "the node did not become idle (state: ${state:-unknown}); logs in $STATE_DIR/log"
stop_cluster
exit 1
