#!/usr/bin/env bash
# Start, wait for and stop the Ray cluster that hosts minillm_rl's rollout workers and replay store.
#
#   launch/ray_cluster.sh start-head [RAY_START_ARGS...]          # on the head node
#   launch/ray_cluster.sh start-worker HEAD_ADDRESS [RAY_START_ARGS...]   # on every other node
#   launch/ray_cluster.sh wait N [HEAD_ADDRESS]                   # until N nodes are alive
#   launch/ray_cluster.sh stop                                    # the node started here
#   launch/ray_cluster.sh address                                 # the head's host:port
#   launch/ray_cluster.sh auth-token                              # write the token if there is none
#
# start-head / start-worker run `ray start --block` in the background and record its pid in
# $RAY_PIDFILE (default /tmp/minillm_ray_<host>_<port>.pid); `stop` terminates exactly that process,
# whose Ray subprocesses shut down with it (`ray start --block` owns them). `ray stop` is not used:
# it kills every Ray process on the machine, including other users' and other jobs' clusters.
# With RAY_FOREGROUND=1 they `exec` instead (for `srun ... ray_cluster.sh start-worker ... &`,
# where the Slurm step is the process to stop).
#
# Environment: RAY_PORT (GCS port, default 6379), RAY_HEAD_IP (address the head advertises, default
# this host's first address; a loopback address is replaced by that too, as Ray does), RAY_TMPDIR
# (Ray's --temp-dir), RAY_WAIT_TIMEOUT_S (default 300), RAY_STOP_TIMEOUT_S (default 60), PYTHON
# (interpreter with ray installed, default python3).
# RAY_AUTH_MODE defaults to `token` (Ray's default when a token exists, made explicit because
# `ray start` and the drivers must agree): every node and driver reads the token from
# RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, so put it on a shared path on a real
# cluster. `ray start` refuses to run without one; start-head writes a new one where there is none.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# On SIGTERM Ray first drains the node for up to 30 s (for Ray Serve); nothing here needs that,
# and a Slurm step is killed after KillWait anyway.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

PYTHON=${PYTHON:-python3}
RAY_PORT=${RAY_PORT:-6379}
RAY_PIDFILE=${RAY_PIDFILE:-/tmp/minillm_ray_$(hostname -s)_${RAY_PORT}.pid}

die() { echo "ray_cluster.sh: error: $*" >&2; exit 2; }

head_address() {
    local ip=${RAY_HEAD_IP:-}
    if [[ -z $ip || $ip == localhost || $ip == 127.* ]]; then
        ip=$(hostname -I 2>/dev/null | awk '{print $1}')
    fi
    [[ -n $ip ]] || die "cannot tell this host's address; set RAY_HEAD_IP"
    echo "$ip:$RAY_PORT"
}

# ray start --block in the background (pid in RAY_PIDFILE) or, with RAY_FOREGROUND=1, exec'd.
run_ray_start() {
    local args=(start --block --disable-usage-stats "$@")
    [[ -n ${RAY_TMPDIR:-} ]] && args+=(--temp-dir "$RAY_TMPDIR")
    if [[ ${RAY_FOREGROUND:-0} == 1 ]]; then
        # USR1 is the learners' preemption warning; Slurm may deliver it to every step of the job,
        # and the Ray node must outlive it (ignored dispositions survive exec).
        trap '' USR1
        exec "$PYTHON" -m ray.scripts.scripts "${args[@]}"
    fi
    if [[ -f $RAY_PIDFILE ]] && kill -0 "$(cat "$RAY_PIDFILE")" 2>/dev/null; then
        die "a Ray node started by this script is already running (pid $(cat "$RAY_PIDFILE"), $RAY_PIDFILE)"
    fi
    "$PYTHON" -m ray.scripts.scripts "${args[@]}" </dev/null &
    echo $! >"$RAY_PIDFILE"
}

# Token auth: the head makes the cluster's token when there is none yet (as Ray's own local
# `ray.init()` does), at RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; a worker needs the same token.
ensure_auth_token() {
    [[ ${RAY_AUTH_MODE,,} == token && -z ${RAY_AUTH_TOKEN:-} ]] || return 0
    local role=$1 path=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    [[ -s $path ]] && return 0
    [[ $role == head ]] || die "no Ray auth token at $path (RAY_AUTH_MODE=token): copy the head's token" \
        "there, or keep it on a shared path named by RAY_AUTH_TOKEN_PATH on every node"
    mkdir -p "$(dirname "$path")" || die "cannot create the directory of the Ray auth token $path"
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$path.tmp.$$") &&
        mv "$path.tmp.$$" "$path" || die "cannot write a Ray auth token to $path"
    echo "ray_cluster.sh: wrote a new Ray auth token to $path (every node and driver needs it)"
}

# Poll until N nodes are alive, bounded by RAY_WAIT_TIMEOUT_S: first the GCS port (a cheap TCP
# probe; ray.init itself retries for minutes), then ray.nodes() over one driver connection.
# Fails at once when the `ray start` with pid $3 (if given) has died.
wait_for_nodes() {
    local want=$1 address=$2 started_pid=${3:-}
    "$PYTHON" - "$want" "$address" "${RAY_WAIT_TIMEOUT_S:-300}" "$started_pid" <<'EOF'
import os, socket, sys, time
want, address, timeout_s, started_pid = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + timeout_s
host, _, port = address.rpartition(":")

def check(what):
    if started_pid:
        try:
            os.kill(int(started_pid), 0)
        except ProcessLookupError:
            sys.exit(f"ray_cluster.sh: error: `ray start` (pid {started_pid}) exited while waiting for {what}")
    if time.monotonic() > deadline:
        sys.exit(f"ray_cluster.sh: error: {what} at {address} not there after {timeout_s:.0f} s")
    time.sleep(0.5)

while True:
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        break
    except OSError:
        check("the Ray GCS")
import ray
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
while True:
    alive = sum(1 for node in ray.nodes() if node["Alive"])
    if alive >= want:
        print(f"ray_cluster.sh: {alive} Ray node(s) alive at {address}", flush=True)
        break
    check(f"{want} alive Ray nodes (have {alive})")
ray.shutdown()
EOF
}

stop_started_node() {
    [[ -f $RAY_PIDFILE ]] || { echo "ray_cluster.sh: nothing to stop ($RAY_PIDFILE absent)"; return 0; }
    local pid deadline
    pid=$(cat "$RAY_PIDFILE")
    if kill -TERM "$pid" 2>/dev/null; then
        deadline=$((SECONDS + ${RAY_STOP_TIMEOUT_S:-60}))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS > deadline)); then
                echo "ray_cluster.sh: pid $pid ignored SIGTERM; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.5
        done
    fi
    rm -f "$RAY_PIDFILE"
    echo "ray_cluster.sh: stopped Ray node (pid $pid)"
}

command=${1:-}
[[ -n $command ]] || die "usage: $0 start-head|start-worker ADDRESS|wait N [ADDRESS]|stop|address|auth-token"
shift
case $command in
    start-head)
        address=$(head_address)
        ensure_auth_token head
        run_ray_start --head --node-ip-address="${address%:*}" --port="$RAY_PORT" --include-dashboard=false "$@"
        wait_for_nodes 1 "$address" "$(cat "$RAY_PIDFILE")"
        echo "ray_cluster.sh: head at $address (pid $(cat "$RAY_PIDFILE"))"
        ;;
    address)
        head_address
        ;;
    auth-token)
        ensure_auth_token head
        ;;
    start-worker)
        (($# >= 1)) || die "start-worker needs the head's ADDRESS (host:port)"
        address=$1
        shift
        ensure_auth_token worker
        run_ray_start --address="$address" "$@"
        echo "ray_cluster.sh: worker joining $address (pid $(cat "$RAY_PIDFILE"))"
        ;;
    wait)
        (($# >= 1)) && [[ $1 =~ ^[1-9][0-9]*$ ]] || die "wait needs a node count N >= 1, got '${1:-}'"
        wait_for_nodes "$1" "${2:-${RAY_ADDRESS:-$(head_address)}}"
        ;;
    stop)
        stop_started_node
        ;;
    *)
        die "unknown command '$command'; expected start-head, start-worker, wait, stop, address or auth-token"
        ;;
esac
