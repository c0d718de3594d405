#!/usr/bin/env bash
# `minillm-rl train` on several nodes with the deepspeed launcher (pdsh over ssh).
#
#   HOSTFILE=hostfile launch/deepspeed_multinode.sh RECIPE [key=value ...] [--resume auto]
#
# Run it on the first host of the hostfile, from the directory the recipe's relative paths are
# relative to (the ranks `cd` there on every node: a shared file system is assumed).
# - HOSTFILE (default ./hostfile): DeepSpeed's format, one `host slots=N` line per node; the ranks
#   are the sum of the slots, the first host is the master and runs rank 0, the coordinator.
# - MASTER_ADDR (default: the first host's address as resolved here), MASTER_PORT (default 29500).
# - Ray: only rank 0 talks to Ray (runtime.ray_address is set for every rank, the others ignore it).
#   RAY_ADDRESS=host:port joins an existing cluster (e.g. launch/ray_cluster.sh on each node);
#   unset, a Ray head is started here (launch/ray_cluster.sh start-head, RAY_PORT default 6379,
#   RAY_NUM_CPUS / RAY_NUM_GPUS for its resources) and stopped when the run ends.
# - Environment on the other nodes: pdsh gives them a bare ssh environment. DeepSpeed exports the
#   variables listed in a `.deepspeed_env` file (KEY=VALUE lines; it looks in ~ and in the current
#   directory for the name in DS_ENV_FILE, default `.deepspeed_env`). This script writes one for the
#   run (DS_ENV_FILE=<absolute path>, so neither file is overwritten) with PATH, LD_LIBRARY_PATH,
#   DS_ACCELERATOR (`cpu` when there is no GPU), OMP_NUM_THREADS, TOKENIZERS_PARALLELISM and the
#   HF_*, NCCL_*, GLOO_*, TORCH_*, RAY_AUTH_* variables set here, followed by the lines of the
#   user's ~/.deepspeed_env and ./.deepspeed_env (which therefore win). DeepSpeed adds PYTHON*.
# - Extra launcher arguments: DEEPSPEED_ARGS (e.g. "--ssh_port 2222"); pdsh's ssh options:
#   PDSH_SSH_ARGS_APPEND.
# The exit code is the run's (0 done, 2 bad input, 3 preempted: rerun with --resume auto).
set -euo pipefail

die() { echo "deepspeed_multinode.sh: error: $*" >&2; exit 2; }

(($# >= 1)) || die "usage: $0 RECIPE [key=value ...] [--resume auto]"
recipe=$1
shift
[[ -f $recipe ]] || die "recipe $recipe: file not found"
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=$(command -v "${PYTHON:-python3}") || die "python interpreter '${PYTHON:-python3}' not found"
export MINILLM_PYTHON
MINILLM_PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')

HOSTFILE=${HOSTFILE:-hostfile}
[[ -f $HOSTFILE ]] || die "hostfile $HOSTFILE: file not found (set HOSTFILE; lines 'host slots=N')"
hosts=()
line_number=0
while IFS= read -r line || [[ -n $line ]]; do
    line_number=$((line_number + 1))
    line=${line%%#*}
    [[ -z ${line// /} ]] && continue
    [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]] ||
        die "hostfile $HOSTFILE line $line_number: expected 'host slots=N', got '$line'"
    hosts+=("${BASH_REMATCH[1]}")
done <"$HOSTFILE"
((${#hosts[@]} >= 1)) || die "hostfile $HOSTFILE: no 'host slots=N' lines"
master_host=${hosts[0]}
if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$(getent ahostsv4 "$master_host" | awk 'NR == 1 {print $1}')
    [[ -n $MASTER_ADDR ]] || die "cannot resolve the master host '$master_host'; set MASTER_ADDR"
fi
MASTER_PORT=${MASTER_PORT:-29500}
echo "deepspeed_multinode.sh: nodes ${hosts[*]}; master $master_host ($MASTER_ADDR:$MASTER_PORT)"

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/minillm_ds_XXXXXX")
cleanup() {
    if [[ -z ${RAY_ADDRESS:-} ]]; then
        RAY_PIDFILE=$run_dir/ray.pid "$launch_dir/ray_cluster.sh" stop || true
    fi
    rm -rf "$run_dir"
}
trap cleanup EXIT

# Variables the ranks on every node need (see the header); the user's own files come last.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # rank 0's driver must match the cluster (ray_cluster.sh)
export DS_ENV_FILE=$run_dir/.deepspeed_env
if [[ -z ${DS_ACCELERATOR:-} ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    export DS_ACCELERATOR=cpu
fi
{
    for name in PATH LD_LIBRARY_PATH DS_ACCELERATOR OMP_NUM_THREADS TOKENIZERS_PARALLELISM MINILLM_PYTHON; do
        [[ -n ${!name:-} ]] && echo "$name=${!name}"
    done
    compgen -e | grep -E '^(HF_|NCCL_|GLOO_|TORCH_|RAY_AUTH_)' | while read -r name; do echo "$name=${!name}"; done
    for user_file in "$HOME/.deepspeed_env" ./.deepspeed_env; do
        [[ -f $user_file ]] && grep -v '^[[:space:]]*$' "$user_file"
    done
} >"$DS_ENV_FILE" || true

if [[ -z ${RAY_ADDRESS:-} ]]; then
    ray_args=()
    [[ -n ${RAY_NUM_CPUS:-} ]] && ray_args+=(--num-cpus="$RAY_NUM_CPUS")
    [[ -n ${RAY_NUM_GPUS:-} ]] && ray_args+=(--num-gpus="$RAY_NUM_GPUS")
    RAY_PIDFILE=$run_dir/ray.pid RAY_HEAD_IP=$MASTER_ADDR "$launch_dir/ray_cluster.sh" start-head "${ray_args[@]}"
    ray_address=$(RAY_HEAD_IP=$MASTER_ADDR "$launch_dir/ray_cluster.sh" address)
else
    ray_address=$RAY_ADDRESS
fi

# Overrides go before --resume (argparse takes KEY=VALUE positionals up to the first option).
overrides=()
options=()
while (($#)); do
    case $1 in
        --resume) options+=("$1" "${2:?--resume needs a value}"); shift 2 ;;
        --resume=*) options+=("$1"); shift ;;
        *) overrides+=("$1"); shift ;;
    esac
done
set +e
# shellcheck disable=SC2086  # DEEPSPEED_ARGS is a list of options
"$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher pdsh \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${DEEPSPEED_ARGS:-} \
    --no_python --no_local_rank "$launch_dir/deepspeed_rank.sh" \
    train --config "$recipe" "runtime.ray_address=$ray_address" "${overrides[@]}" "${options[@]}"
status=$?
set -e
echo "deepspeed_multinode.sh: run ended with exit code $status"
exit $status
