#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/pipeline/test_slurm.py (marker `slurm`).
#
# Installs (once) Debian's slurm-wlm and munge, writes a minimal /etc/slurm/slurm.conf (this host is
# the only node; select/cons_tres; no accounting; proctrack/linuxproc and task/none because a
# container has no usable cgroup hierarchy), starts munged, slurmctld and slurmd and waits until
# `sinfo` shows the node idle. Idempotent and quick (well under a second) when the cluster is up.
# Must run as root on Debian 12; needs only the Debian package mirrors.
#
# Exit status: 0 cluster ready; 1 set-up failed (the message says why); 3 not root / no apt.
# Environment: DPBIAS_SLURM_FORCE_RESTART=1 restarts the daemons even when the cluster is up.
set -euo pipefail

log() { echo "[slurm-setup] $*" >&2; }
die() { log "ERROR: $*"; for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do [[ -f $f ]] && { log "--- tail $f"; tail -n 15 "$f" >&2; }; done; exit "${2:-1}"; }

NODE="$(hostname -s 2>/dev/null || cut -d. -f1 /proc/sys/kernel/hostname)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"

# ---------------------------------------------------------------- slurm.conf
CPUS="$(nproc --all)"
MEM_MB="$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
# Leave room for the OS; slurmd refuses a node whose RealMemory exceeds what it sees.
REAL_MEM=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB * 3 / 4 ))
NEW_CONF="$(cat <<CONF
# Written by dp-bias tests/slurm/setup.sh: one node (this host), no accounting, for tests.
ClusterName=dpbias
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=30
SlurmctldTimeout=60
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)"
cluster_ready() {
  command -v sinfo >/dev/null 2>&1 || return 1
  [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$NEW_CONF" ]] || return 1
  local st
  st="$(timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true)"
  [[ "$st" == idle* || "$st" == mix* || "$st" == alloc* ]]
}

if [[ "${DPBIAS_SLURM_FORCE_RESTART:-0}" != 1 ]] && cluster_ready; then
  log "cluster already up: node $NODE $(sinfo -h -N -n "$NODE" -o %t)"
  exit 0
fi

[[ "$(id -u)" == 0 ]] || die "must run as root (installs packages, starts daemons)" 3
command -v apt-get >/dev/null 2>&1 || die "apt-get not found (Debian/Ubuntu only)" 3

# ---------------------------------------------------------------- packages (once)
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  log "installing slurm-wlm and munge with apt"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/dpbias-slurm-apt.log 2>&1; then
    apt-get update -q >>/tmp/dpbias-slurm-apt.log 2>&1 || die "apt-get update failed (see /tmp/dpbias-slurm-apt.log)" 3
    apt-get install -y -q --no-install-recommends slurm-wlm munge >>/tmp/dpbias-slurm-apt.log 2>&1 \
      || die "apt-get install slurm-wlm munge failed (see /tmp/dpbias-slurm-apt.log)" 3
  fi
fi

# ---------------------------------------------------------------- munge
id munge >/dev/null 2>&1 || die "the munge package did not create the 'munge' user"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null 2>&1 || true; fi
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munge credentials do not round-trip"
fi

install -d -m 0755 "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
changed=0
if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
  log "writing $CONF (node $NODE: $CPUS CPUs, $REAL_MEM MB)"
  printf '%s\n' "$NEW_CONF" >"$CONF"
  changed=1
fi
# cons_tres reads a gres.conf if present; none is needed (no GPUs are configured).

# ---------------------------------------------------------------- daemons
running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {  # only the daemon whose pid file we wrote
  local pidf="$1"
  if running "$pidf"; then
    local pid; pid="$(cat "$pidf")"; kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}
if [[ $changed == 1 || "${DPBIAS_SLURM_FORCE_RESTART:-0}" == 1 ]]; then
  stop_daemon /run/slurm/slurmd.pid
  stop_daemon /run/slurm/slurmctld.pid
fi
if ! running /run/slurm/slurmctld.pid; then
  log "starting slurmctld"
  /usr/sbin/slurmctld -i >/dev/null 2>&1 || die "slurmctld did not start"
fi
for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
timeout 5 scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer scontrol ping"
if ! running /run/slurm/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd >/dev/null 2>&1 || die "slurmd did not start"
fi

# ---------------------------------------------------------------- wait for the node
for i in $(seq 120); do
  st="$(timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true)"
  case "$st" in
    idle*|mix*|alloc*) log "cluster ready: node $NODE $st"; exit 0 ;;
    down*|drain*|drng*|fail*)
      (( i % 10 == 1 )) && scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
die "node $NODE did not become idle (state: ${st:-none}; reason: $(sinfo -h -R 2>/dev/null | head -n1))"
