#!/usr/bin/env bash
# Self-hosted NDIF server (PyPI `ndif` 0.1.2) on loopback, CPU only, for codi_nnsight's opt-in
# integration test (tests/test_ndif.py) and for trying `--remote http://127.0.0.1:PORT` by hand.
#
#   scripts/ndif_local.sh install          make the server's venv (Python >= 3.12; ~2 min, ~6.5 GB)
#   scripts/ndif_local.sh start            start Redis, S3 (moto), Ray + NDIF controller, NDIF API,
#                                          and deploy the tiny CODI model; prints the URL
#   scripts/ndif_local.sh deploy CODI_JSON...   deploy more CODI models (same machine, same paths)
#   scripts/ndif_local.sh status | url | check | stop
#
# Every command is idempotent: `start` skips what is already running, `deploy` skips models
# already deployed, `stop` stops only the processes this script started (by the process groups
# it recorded) and is a no-op when nothing runs.
#
# Environment (defaults in brackets):
#   NDIF_LOCAL_VENV    the server's venv [/tmp/ndif-venv]
#   NDIF_LOCAL_PYTHON  interpreter for `install` [newest /root/.pyenv/versions/3.1[23].*/bin/python]
#   NDIF_LOCAL_HOME    state: pid files, logs, Ray temp dir, the tiny model [/tmp/codi-ndif]
#   NDIF_LOCAL_API_PORT [28001]  NDIF_LOCAL_REDIS_PORT [26379]  NDIF_LOCAL_S3_PORT [29000]
#   NDIF_LOCAL_RAY_PORT [26385]  NDIF_LOCAL_RAY_CLIENT_PORT [20011]
#   NDIF_LOCAL_DASHBOARD_PORT [28265]  NDIF_LOCAL_AGENT_PORT [28266]
#   (Ray hands its worker processes ports 10002-19999: keep these outside that range.)
#
# Notes
# - ndif's stock model actor loads onto CUDA only; this stack names scripts/ndif_cpu_actor.py's
#   CPUModelActor instead, and tells Ray the node has one (pretend) GPU so ndif's controller,
#   which manages GPU nodes only, will place models on it. Weights stay on the CPU.
# - No API keys: ndif checks keys only when NDIF_POSTGRES_URL is set; here it is not, so every
#   request is accepted (and runs "trusted", i.e. without ndif's sandbox).
# - The server imports codi_nnsight from the venv (an editable install of this checkout). After
#   changing codi_nnsight, `stop` and `start` again: a running model actor keeps the old code.
# - Redis, moto, the NDIF API and the Ray dashboard bind 127.0.0.1; Ray's GCS and raylet also
#   listen on the machine's other addresses (Ray has no switch for that), as does nothing else.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NDIF_LOCAL_VENV:-/tmp/ndif-venv}"
HOME_DIR="${NDIF_LOCAL_HOME:-/tmp/codi-ndif}"
API_PORT="${NDIF_LOCAL_API_PORT:-28001}"
REDIS_PORT="${NDIF_LOCAL_REDIS_PORT:-26379}"
S3_PORT="${NDIF_LOCAL_S3_PORT:-29000}"
RAY_PORT="${NDIF_LOCAL_RAY_PORT:-26385}"
RAY_CLIENT_PORT="${NDIF_LOCAL_RAY_CLIENT_PORT:-20011}"
DASHBOARD_PORT="${NDIF_LOCAL_DASHBOARD_PORT:-28265}"
AGENT_PORT="${NDIF_LOCAL_AGENT_PORT:-28266}"
NDIF_VERSION="0.1.2"

RUN="$HOME_DIR/run"
LOGS="$HOME_DIR/logs"
TINY="$HOME_DIR/tiny"
URL="http://127.0.0.1:$API_PORT"

# The environment every server process gets (Ray workers inherit it from `ray start`).
server_env() {
    export PATH="$VENV/bin:$PATH"
    export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
    export GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
    export NDIF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$S3_PORT"
    export NDIF_OBJECT_STORE_ACCESS_KEY=codi-ndif NDIF_OBJECT_STORE_SECRET_KEY=codi-ndif
    export NDIF_RAY_ADDRESS="ray://127.0.0.1:$RAY_CLIENT_PORT"
    export NDIF_API_PORT="$API_PORT" NDIF_API_URL="$URL"
    export NDIF_MODEL_IMPORT_PATH=ndif_cpu_actor.CPUModelActor
    export NDIF_DEFAULT_DTYPE=float32
    export PYTHONPATH="$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}"
    unset RAY_ADDRESS NDIF_POSTGRES_URL NDIF_LOKI_URL NDIF_INFLUX_URL || true
}

log() { echo "ndif_local: $*" >&2; }
die() { log "$*"; exit 1; }

find_python() {
    if [ -n "${NDIF_LOCAL_PYTHON:-}" ]; then echo "$NDIF_LOCAL_PYTHON"; return; fi
    local p
    for p in $(ls -d /root/.pyenv/versions/3.13.*/bin/python /root/.pyenv/versions/3.12.*/bin/python 2>/dev/null) \
             "$(command -v python3.13 || true)" "$(command -v python3.12 || true)"; do
        [ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return; }
    done
    die "no Python >= 3.12 found (ndif needs it): set NDIF_LOCAL_PYTHON"
}

cmd_install() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import ndif, ray, moto, codi_nnsight" 2>/dev/null; then
        log "venv $VENV is ready"; return
    fi
    local py; py="$(find_python)"
    log "creating $VENV with $py"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch from PyPI is the CUDA build (its nvidia-* wheels come along); it runs on a CPU-only box.
    "$VENV/bin/python" -m pip install --quiet "ndif[api,ray]==$NDIF_VERSION" "moto[server]" -e "$REPO"
    command -v redis-server >/dev/null || log "also needed: redis-server (apt-get install redis-server)"
}

cmd_check() {
    [ -x "$VENV/bin/python" ] || die "no venv at $VENV (run: $0 install)"
    "$VENV/bin/python" -c "import ndif, ray, moto, codi_nnsight" 2>/dev/null \
        || die "$VENV lacks ndif/ray/moto/codi_nnsight (run: $0 install)"
    command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
}

# --- process bookkeeping: each service runs in its own process group, recorded in $RUN/NAME.pgid
alive() { local f="$RUN/$1.pgid"; [ -f "$f" ] && kill -0 -- "-$(cat "$f")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local n="$1" what="$2"; shift 2
    for _ in $(seq "$n"); do "$@" && return 0; sleep 1; done
    die "$what did not come up in ${n}s (logs: $LOGS)"
}

spawn() {  # spawn NAME COMMAND...: run detached in a new session, record its process group
    local name="$1"; shift
    setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$name.pgid"
}

api_connected() {
    "$VENV/bin/python" -c "import urllib.request,sys; sys.exit(0 if b'connected' in urllib.request.urlopen('$URL/connected', timeout=3).read() else 1)" 2>/dev/null
}

start_redis() {
    alive redis && { log "redis: running"; return; }
    port_open "$REDIS_PORT" && die "port $REDIS_PORT is taken by something else"
    spawn redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --daemonize no
    wait_for 20 redis port_open "$REDIS_PORT"
    log "redis: started on 127.0.0.1:$REDIS_PORT"
}

start_s3() {
    alive s3 && { log "s3 (moto): running"; return; }
    port_open "$S3_PORT" && die "port $S3_PORT is taken by something else"
    spawn s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_for 30 "s3 (moto)" port_open "$S3_PORT"
    log "s3 (moto): started on 127.0.0.1:$S3_PORT"
}

start_ray() {
    if alive ray; then log "ray: running"; else
        port_open "$RAY_PORT" && die "port $RAY_PORT is taken by something else"
        local mem; mem=$("$VENV/bin/python" -c "import psutil; print(int(psutil.virtual_memory().total))")
        # One pretend GPU whose "memory" is 4 GiB: ndif's controller only places models on nodes
        # that report GPUs. The CPU actor never touches CUDA.
        spawn ray "$VENV/bin/ray" start --head --block --node-ip-address=127.0.0.1 \
            --port="$RAY_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
            --num-cpus=2 --num-gpus=1 --object-store-memory=200000000 \
            --resources="{\"head\": 10, \"cuda_memory_bytes\": 4294967296, \"cpu_memory_bytes\": $mem}" \
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
            --dashboard-agent-listen-port="$AGENT_PORT" \
            --temp-dir="$HOME_DIR/ray" --disable-usage-stats
        wait_for 90 "ray head" port_open "$RAY_CLIENT_PORT"
        log "ray: head started (gcs 127.0.0.1:$RAY_PORT, client $RAY_CLIENT_PORT)"
    fi
    # The detached NDIF controller actor (get_if_exists: a second launch reuses it).
    RAY_ADDRESS="127.0.0.1:$RAY_PORT" "$VENV/bin/python" -m ndif.services.ray.deployments.controller.controller \
        >>"$LOGS/controller.log" 2>&1 || die "ndif controller failed to launch (see $LOGS/controller.log)"
}

start_api() {
    alive api && { log "api: running"; } || {
        port_open "$API_PORT" && die "port $API_PORT is taken by something else"
        # ndif's api/start.sh binds 0.0.0.0; --bind on the command line overrides its config.
        NDIF_SERVICE=api spawn api "$VENV/bin/gunicorn" --config python:ndif.services.api.gunicorn_conf \
            --bind "127.0.0.1:$API_PORT" --no-control-socket ndif.services.api.app:app
    }
    wait_for 120 "ndif api (/connected)" api_connected
    log "api: $URL connected"
}

model_key() {  # the key the client will send for CODI_JSON (absolute paths, as resolved there)
    "$VENV/bin/python" -c "import sys
from codi_nnsight.model.config import resolve_model_spec
print('codi_nnsight.model.CODIModel:' + resolve_model_spec(sys.argv[1]).to_json(resolved=True))" "$1" 2>/dev/null
}

cmd_deploy() {
    [ $# -gt 0 ] || die "usage: $0 deploy CODI_JSON..."
    server_env
    mkdir -p "$RUN/deployed"
    local spec key mark yaml
    for spec in "$@"; do
        key="$(model_key "$spec")" || die "cannot read CODI model $spec"
        mark="$RUN/deployed/$(printf '%s' "$key" | sha256sum | cut -c1-16)"
        if [ -f "$mark" ]; then log "deploy: $spec already deployed"; continue; fi
        yaml="$RUN/deploy-$$.yaml"
        "$VENV/bin/python" - "$key" > "$yaml" <<'EOF'
import sys, yaml
# size_bytes: place without asking the Hub for a size (a CODI key is no Hub checkpoint).
print(yaml.safe_dump({"models": [{"checkpoint": "codi", "model_key": sys.argv[1], "dtype": "float32",
                                  "size_bytes": 100_000_000, "padding_bias": 0, "pinned": True}]}))
EOF
        (cd "$RUN" && "$VENV/bin/ndif" deploy -f "$yaml") >>"$LOGS/deploy.log" 2>&1 \
            || { rm -f "$yaml"; die "deploy of $spec failed (see $LOGS/deploy.log)"; }
        rm -f "$yaml"
        printf '%s\n' "$key" > "$mark"
        log "deploy: $spec ready"
    done
}

cmd_start() {
    cmd_check
    mkdir -p "$RUN" "$LOGS"
    server_env
    start_redis
    start_s3
    start_ray
    start_api
    if [ ! -f "$TINY/codi.json" ]; then
        "$VENV/bin/python" -c "from codi_nnsight.testing.tiny import write_tiny_codi; write_tiny_codi('$TINY', family='llama', num_latent=3)" \
            >>"$LOGS/tiny.log" 2>&1 || die "could not write the tiny model (see $LOGS/tiny.log)"
    fi
    cmd_deploy "$TINY/codi.json" "$@"
    echo "CODI_NNSIGHT_NDIF_URL=$URL"
    echo "CODI_NNSIGHT_NDIF_MODEL=$TINY/codi.json"
}

stop_group() {  # stop_group NAME: TERM the recorded process group, then KILL what is left
    local f="$RUN/$1.pgid" pg extra=""
    [ -f "$f" ] || return 0
    pg="$(cat "$f")"
    if [ "$1" = ray ]; then
        # Ray's worker processes (controller, model actors) start their own process groups
        # under the raylet; collect them by parent before the raylet goes.
        local raylet
        for raylet in $(pgrep -g "$pg" -f 'core/src/ray/raylet/raylet' || true); do
            extra="$extra $(pgrep -P "$raylet" || true)"
        done
    fi
    kill -TERM -- "-$pg" 2>/dev/null || true
    # shellcheck disable=SC2086
    [ -n "${extra// /}" ] && kill -TERM $extra 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 -- "-$pg" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pg" 2>/dev/null || true
    # shellcheck disable=SC2086
    [ -n "${extra// /}" ] && kill -KILL $extra 2>/dev/null || true
    rm -f "$f"
    log "$1: stopped"
}

cmd_stop() {
    for name in api ray s3 redis; do stop_group "$name"; done
    rm -rf "$RUN/deployed"
}

cmd_status() {
    local name any=1
    for name in redis s3 ray api; do
        if alive "$name"; then echo "$name: running (pgid $(cat "$RUN/$name.pgid"))"; any=0
        else echo "$name: stopped"; fi
    done
    if alive api && api_connected; then echo "api: $URL connected"; fi
    ls "$RUN/deployed" >/dev/null 2>&1 && cat "$RUN"/deployed/* 2>/dev/null | sed 's/^/deployed: /'
    return $any
}

case "${1:-}" in
    install) cmd_install ;;
    check) cmd_check ;;
    start) shift; cmd_start "$@" ;;
    deploy) shift; cmd_deploy "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) echo "$URL" ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
