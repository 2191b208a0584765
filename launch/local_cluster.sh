#!/usr/bin/env bash
# A single-node Ray cluster on 127.0.0.1, token authentication on.
#
#   launch/local_cluster.sh start      # then: launch/submit.sh configs/test.yaml
#   launch/local_cluster.sh status
#   launch/local_cluster.sh stop
#
# Environment (all optional):
#   NUM_CPUS=2  NUM_GPUS=      resources the node declares
#   RAY_PORT=6390              GCS port
#   DASHBOARD_PORT=8265        dashboard / job API port (bound to 127.0.0.1 only)
#   RAY_TEMP_DIR=              a private temp dir; with it, `stop` ends only this cluster's processes
#                              and ray.init() elsewhere will not attach to this cluster
#   RAY_AUTH_TOKEN_PATH=       token file (default ~/.ray/auth_token, generated if missing)
# Extra arguments after `start` go to `ray start` unchanged.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
NUM_CPUS="${NUM_CPUS:-2}"

# Keep every address on loopback: without this Ray advertises the machine's interface address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Token authentication for the cluster and for every client this script runs.
export RAY_AUTH_MODE=token

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

ensure_token() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        return
    fi
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
        return
    fi
    # Creates ~/.ray/auth_token if it does not exist; the token itself is printed, so discard it.
    ray get-auth-token --generate >/dev/null 2>&1 || die "could not create ~/.ray/auth_token"
}

start() {
    ensure_token
    local args=(--head --port="$RAY_PORT" --num-cpus="$NUM_CPUS"
                --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT")
    [[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus="$NUM_GPUS")
    [[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$RAY_TEMP_DIR")
    ray start "${args[@]}" "$@"
    cat <<EOF

Ray is up on 127.0.0.1 (token authentication on).
  GCS address:   127.0.0.1:$RAY_PORT
  Dashboard/API: http://127.0.0.1:$DASHBOARD_PORT   (open it with the token: ray get-auth-token)
Submit a job:
  RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT launch/submit.sh configs/test.yaml
EOF
}

# The pids of this cluster's processes: the daemons name RAY_TEMP_DIR's session directory or the
# GCS address on their command line; agents, dashboard modules and workers are their descendants.
cluster_pids() {
    local pid cmd roots=()
    for pid in $(pgrep -u "$(id -u)" . || true); do
        cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || continue
        if [[ "$cmd" == *"$RAY_TEMP_DIR/"* || "$cmd" == *"=127.0.0.1:$RAY_PORT "* ]]; then
            roots+=("$pid")
        fi
    done
    descendants "${roots[@]}"
}

descendants() {
    local pid
    for pid in "$@"; do
        echo "$pid"
        # shellcheck disable=SC2046
        descendants $(pgrep -P "$pid" || true)
    done
}

# Alive = exists and is not a zombie (a container's pid 1 may never reap them).
alive() {
    local pid
    for pid in "$@"; do
        if [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == [^Z]* ]]; then echo "$pid"; fi
    done
}

# SIGTERM, up to 10 s to exit, then SIGKILL.
terminate() {
    local pids i
    pids=$(alive "$@")
    [[ -z "$pids" ]] && return
    kill $pids 2>/dev/null || true
    for i in $(seq 50); do
        pids=$(alive $pids)
        [[ -z "$pids" ]] && return
        sleep 0.2
    done
    kill -9 $pids 2>/dev/null || true
}

stop() {
    if [[ -z "${RAY_TEMP_DIR:-}" ]]; then
        # `ray stop` ends every Ray process of this user on this machine.
        ray stop
        return
    fi
    # The order of `ray stop`: the raylet first, the GCS last (it hangs if its clients go after it).
    local pids raylet=() gcs=() rest=() pid
    pids=$(cluster_pids)
    [[ -z "$pids" ]] && { echo "no Ray cluster under $RAY_TEMP_DIR"; return; }
    for pid in $pids; do
        case "$(ps -o comm= -p "$pid" 2>/dev/null)" in
            raylet) raylet+=("$pid") ;;
            gcs_server) gcs+=("$pid") ;;
            *) rest+=("$pid") ;;
        esac
    done
    terminate "${raylet[@]}"
    terminate "${rest[@]}"
    terminate "${gcs[@]}"
    echo "stopped the Ray cluster under $RAY_TEMP_DIR"
}

status() {
    ray status --address "127.0.0.1:$RAY_PORT"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
