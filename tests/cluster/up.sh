#!/usr/bin/env bash
# Start a single-node Slurm cluster and an MLflow tracking server, for the cluster tests and CI.
#
#     tests/cluster/up.sh /tmp/ttc-cluster && source /tmp/ttc-cluster/env.sh && sinfo
#     tests/cluster/down.sh /tmp/ttc-cluster
#
# Everything lives in the state directory (slurm.conf, spool, logs, the MLflow store and
# artifacts; the munge key and socket in a /tmp dir it names) on free ports, so neither /etc/slurm nor a cluster or server already
# running here is touched. Needs root (slurmd starts the jobs) and Debian's slurmctld, slurmd,
# slurm-client and munge (.ci/run installs them). There is no systemd: the daemons are started by
# hand, munged as the user munge. env.sh exports SLURM_CONF and MLFLOW_TRACKING_URI for clients.
# If a step fails, run down.sh on the same directory: it stops whatever was started.
set -euo pipefail

dir=${1:?usage: up.sh STATE_DIR}
mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
cpus=${TTC_CLUSTER_CPUS:-8}  # job slots of the node (more than the cores: tasks are mostly I/O here)
host=$(hostname -s)
python=${PYTHON:-python3}

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$((limit * 4))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    echo "up.sh: $what did not come up in ${limit}s; logs in $dir/log" >&2
    return 1
}

for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "up.sh: $tool not on PATH (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "up.sh: must run as root (slurmd starts jobs as their users)" >&2; exit 1; }

mkdir -p "$dir/log" "$dir/state" "$dir/spool" "$dir/mlflow/artifacts"

# munge: a key and a socket of our own, so another munged is left alone. They live in a directory
# the user munge can reach (the state dir may sit under a private one, e.g. pytest's tmp).
munge=$(mktemp -d "${TMPDIR:-/tmp}/ttc-munge.XXXXXX")
echo "$munge" > "$dir/munge_dir"
head -c 1024 /dev/urandom > "$munge/munge.key"
chown -R munge:munge "$munge" && chmod 711 "$munge" && chmod 400 "$munge/munge.key"
runuser -u munge -- munged --socket="$munge/munge.socket" --key-file="$munge/munge.key" \
    --pid-file="$munge/munged.pid" --log-file="$munge/munged.log" --seed-file="$munge/munged.seed" \
    < /dev/null >> "$dir/log/daemons.out" 2>&1  # a daemon holding the caller's stdout would block its reader
wait_for 10 munged test -S "$munge/munge.socket"
cp "$munge/munged.pid" "$dir/munged.pid"

# MLflow server first: it creates and migrates the SQLite store once, before any concurrent writer
mlflow_port=$(free_port)
setsid "$python" -m mlflow server --backend-store-uri "sqlite:///$dir/mlflow/mlflow.db" \
    --artifacts-destination "$dir/mlflow/artifacts" --host 127.0.0.1 --port "$mlflow_port" \
    --workers "${TTC_MLFLOW_WORKERS:-2}" > "$dir/log/mlflow.log" 2>&1 < /dev/null &
echo $! > "$dir/mlflow.pid"
tracking_uri="http://127.0.0.1:$mlflow_port"
wait_for 120 "mlflow server at $tracking_uri" "$python" -c \
    "import sys, urllib.request; sys.exit(urllib.request.urlopen('$tracking_uri/health', timeout=2).status != 200)"

ctld_port=$(free_port)
slurmd_port=$(free_port)
cat > "$dir/slurm.conf" <<CONF
# single-node test cluster written by tests/cluster/up.sh
ClusterName=ttctest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
AuthInfo=socket=$munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=3600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$dir/slurm.conf
slurmctld -c -f "$SLURM_CONF" < /dev/null >> "$dir/log/daemons.out" 2>&1
wait_for 30 slurmctld scontrol ping
slurmd -f "$SLURM_CONF" < /dev/null >> "$dir/log/daemons.out" 2>&1
node_idle() { [[ $(sinfo -h -n "$host" -o %t) == idle ]]; }
wait_for 30 "slurmd (node $host idle)" node_idle

cat > "$dir/env.sh" <<ENV
export SLURM_CONF=$dir/slurm.conf
export MLFLOW_TRACKING_URI=$tracking_uri
ENV
echo "up.sh: cluster ttctest ($host, $cpus slots) and mlflow server $tracking_uri are up in ${SECONDS}s; source $dir/env.sh"
