#!/usr/bin/env bash
# Stop what tests/cluster/up.sh started in STATE_DIR: jobs, slurmd, slurmctld, the mlflow server, munged.
#
#     tests/cluster/down.sh /tmp/ttc-cluster
#
# Safe to run after a partial start or twice: only the processes named in the state dir's pid files
# are signalled (the mlflow server by its process group, which holds its workers).
set -uo pipefail

dir=${1:?usage: down.sh STATE_DIR}
[[ -d $dir ]] || exit 0

stop() {  # stop PIDFILE [group]
    local file=$dir/$1 pid target
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    target=$pid; [[ ${2:-} == group ]] && target=-$pid
    kill -TERM -- "$target" 2>/dev/null || { rm -f "$file"; return 0; }
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "$target" 2>/dev/null
    rm -f "$file"
}

if [[ -s $dir/slurmctld.pid ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF=$dir/slurm.conf
    scancel --full --quiet --user=root 2>/dev/null || true  # jobs of this test cluster only (its SLURM_CONF)
    for _ in $(seq 60); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
fi
stop slurmd.pid
stop slurmctld.pid
stop mlflow.pid group
stop munged.pid
[[ -s $dir/munge_dir ]] && rm -rf -- "$(<"$dir/munge_dir")" && rm -f "$dir/munge_dir"
echo "down.sh: stopped the test cluster in $dir"
