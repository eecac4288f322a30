#!/usr/bin/env bash
# A real Slurm cluster of N nodes on this one machine, for launch tests and trying `opd launch`:
# slurmctld + N x `slurmd -N nodeK` on 127.0.0.1 (distinct ports), munge for auth, and job accounting
# (slurmdbd over a MariaDB bound to 127.0.0.1) so that `sacct` - and nemo-run's job status - work. Needs root.
#
#   tools/local_slurm.sh up      # install slurm-wlm + munge if missing, write the config, start, wait for idle nodes
#   tools/local_slurm.sh status  # sinfo / squeue
#   tools/local_slurm.sh down    # stop the daemons (by their pid files); the state directory stays
#   tools/local_slurm.sh env     # the line to source so that sbatch / squeue / scancel find this cluster
#
# Everything (config, state, spool, logs, pid files) lives under $OPD_SLURM_DIR (default
# /tmp/opd-slurm); commands find the cluster through SLURM_CONF=$OPD_SLURM_DIR/slurm.conf. Node
# names node1..N resolve to 127.0.0.1 (added to /etc/hosts), so URLs built from Slurm's node lists
# work. `up` and `down` are idempotent.
set -euo pipefail

DIR="${OPD_SLURM_DIR:-/tmp/opd-slurm}"
NODES="${OPD_SLURM_NODES:-3}"
CPUS="${OPD_SLURM_CPUS:-2}"
MEM_MB="${OPD_SLURM_MEM_MB:-8000}"
CTLD_PORT="${OPD_SLURM_PORT:-16817}"
NODE_PORT0=$((CTLD_PORT + 200))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT - 511))  # 16306 by default
export SLURM_CONF="$DIR/slurm.conf"

die() { echo "local_slurm: $*" >&2; exit 1; }

install_if_missing() {
  local pkgs="slurm-wlm munge slurmdbd mariadb-server"
  if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v slurmdbd >/dev/null \
     && command -v mariadbd >/dev/null; then return; fi
  [ "$(id -u)" = 0 ] || die "$pkgs are missing and installing them needs root"
  echo "local_slurm: installing $pkgs (apt-get)"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >/dev/null; }
}

write_config() {
  mkdir -p "$DIR"/{state,log,run,db} && for k in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/node$k"; done
  cat > "$SLURM_CONF" <<EOF
ClusterName=opd-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
ReturnToService=2
SlurmdTimeout=60
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Port=[$NODE_PORT0-$((NODE_PORT0 + NODES - 1))]
PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  # slurmdbd reads slurmdbd.conf next to slurm.conf; it must be private to SlurmUser
  cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=opd-local
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
  local names; names="$(seq -f 'node%g' -s ' ' 1 "$NODES")"
  grep -q "# opd-local-slurm" /etc/hosts 2>/dev/null || echo "127.0.0.1 $names # opd-local-slurm" >> /etc/hosts
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force; else munged --force; fi
}

start_accounting() {  # MariaDB on 127.0.0.1:$DB_PORT (its files under $DIR/db), then slurmdbd
  local sock="$DIR/run/mysqld.sock" sql
  if ! running "$DIR/run/mysqld.pid"; then
    [ -d "$DIR/db/mysql" ] || mariadb-install-db --user=root --datadir="$DIR/db" >"$DIR/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed: see $DIR/log/mariadb-install.log"
    rm -f "$sock"  # a stale socket from a killed server would look ready and refuse connections
    # native AIO off: io_uring / libaio may be refused inside containers, and this database is tiny
    mariadbd --user=root --datadir="$DIR/db" --socket="$sock" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --innodb-use-native-aio=0 --pid-file="$DIR/run/mysqld.pid" --log-error="$DIR/log/mariadb.log" \
      >/dev/null 2>&1 &
    db_pid=$!
    # ready = answers a query (the socket file appears before the server accepts connections)
    for _ in $(seq 1 120); do
      mariadb --socket="$sock" -u root -e "SELECT 1" >/dev/null 2>&1 && break
      kill -0 "$db_pid" 2>/dev/null || { tail -n 20 "$DIR/log/mariadb.log" >&2; die "MariaDB exited: see $DIR/log/mariadb.log"; }
      sleep 0.5
    done
  fi
  sql="CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'opd-local';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  mariadb --socket="$sock" -u root -e "$sql" \
    || { tail -n 20 "$DIR/log/mariadb.log" >&2; die "could not create the accounting database user (MariaDB not answering on $sock)"; }
  running "$DIR/run/slurmdbd.pid" || slurmdbd
  for _ in $(seq 1 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw opd-local \
    || sacctmgr -i add cluster opd-local >/dev/null || die "slurmdbd did not answer: see $DIR/log/slurmdbd.log"
}

up() {
  install_if_missing
  write_config
  start_munge
  start_accounting
  running "$DIR/run/slurmctld.pid" || slurmctld
  for k in $(seq 1 "$NODES"); do running "$DIR/run/slurmd-node$k.pid" || slurmd -N "node$k"; done
  for _ in $(seq 1 60); do  # the nodes register within seconds
    if [ "$(sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l)" -ge "$NODES" ]; then
      echo "local_slurm: $NODES nodes up (SLURM_CONF=$SLURM_CONF)"; return
    fi
    scontrol update nodename="node[1-$NODES]" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  sinfo -N >&2 || true
  die "the nodes did not come up: see $DIR/log/"
}

down() {
  [ -f "$SLURM_CONF" ] && scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid" "$DIR/run/mysqld.pid"; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
  done
  for _ in $(seq 1 20); do
    ok=1; for pidfile in "$DIR"/run/*.pid; do running "$pidfile" && ok=0; done
    [ "$ok" = 1 ] && break; sleep 0.5
  done
  echo "local_slurm: stopped (state kept in $DIR)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) [ -f "$SLURM_CONF" ] || die "no cluster configured in $DIR"; sinfo -N; squeue ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) die "usage: $0 up|down|status|env" ;;
esac
