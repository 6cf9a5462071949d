#!/usr/bin/env bash
# Self-hosted NDIF server (PyPI `ndif` 0.1.2) on loopback, CPU only, for codi_nnsight's opt-in
# integration tests (tests/test_ndif.py, run by .ci/run) and for `--remote http://127.0.0.1:PORT` by hand.
#
#   scripts/ndif_local.sh install     make the server's venv: newest Python 3.12/3.13 here, ~5.8 GB;
#                                     measured 4.4 min from nothing, 6 s when it is already built
#   scripts/ndif_local.sh start [CODI_JSON...]
#                                     start Redis, S3 (moto), Ray + NDIF controller, NDIF API; deploy
#                                     the tiny CODI model and any CODI_JSON given (float32); prints
#                                     the URL (measured 82-129 s on a 2-core machine)
#   scripts/ndif_local.sh deploy [--dtype DTYPE] CODI_JSON...
#                                     deploy more CODI models (same machine, same paths; float32
#                                     unless --dtype float64|bfloat16|float16; ~10-20 s each)
#   scripts/ndif_local.sh restart CODI_JSON...
#                                     reload deployed models from disk (after their files changed)
#   scripts/ndif_local.sh status | url | check | stop | python (the interpreter `install` would use)
#
# Every command is idempotent: `install` rebuilds only a venv that is missing, half-built or built
# for other pins, `start` skips what is already running, `deploy` skips models already deployed,
# `stop` stops only the processes this script started (by the process groups it recorded) and is a
# no-op when nothing runs.
#
# Environment (defaults in brackets):
#   NDIF_LOCAL_VENV    the server's venv, outside any checkout so clones share it
#                      [${XDG_CACHE_HOME:-$HOME/.cache}/codi-nnsight/ndif-venv]
#   NDIF_LOCAL_PYTHON  interpreter for `install` [the newest Python >= 3.12, < 3.14 found under
#                      /root/.pyenv/versions or on PATH: ndif 0.1.2 requires >=3.12,<3.14]
#   NDIF_LOCAL_PYTHON_CANDIDATES  the interpreters that choice looks at (space-separated)
#   NDIF_LOCAL_HOME    state: pid files, logs, Ray temp dir, the tiny model [/tmp/codi-ndif]
#   NDIF_LOCAL_API_PORT [28001]  NDIF_LOCAL_REDIS_PORT [26379]  NDIF_LOCAL_S3_PORT [29000]
#   NDIF_LOCAL_RAY_PORT [26385]  NDIF_LOCAL_RAY_CLIENT_PORT [20011]
#   NDIF_LOCAL_DASHBOARD_PORT [28265]  NDIF_LOCAL_AGENT_PORT [28266]
#   (Ray hands its worker processes ports 10002-19999: keep these outside that range.)
#
# Notes
# - ndif's stock model actor loads onto CUDA only; this stack names scripts/ndif_cpu_actor.py's
#   CPUModelActor instead, and tells Ray the node has one (pretend) GPU so ndif's controller,
#   which manages GPU nodes only, will place models on it. Weights stay on the CPU; the actor
#   computes on one thread, like a local run with torch.set_num_threads(1).
# - No API keys: ndif checks keys only when NDIF_POSTGRES_URL is set; here it is not, so every
#   request is accepted (and runs "trusted", i.e. without ndif's sandbox).
# - The server imports codi_nnsight from the checkout that runs this script (PYTHONPATH); the venv
#   holds its dependencies. After changing codi_nnsight, `stop` and `start` again (or `restart`
#   the models): a running model actor keeps the code it imported.
# - Every listening socket of the stack is on 127.0.0.1 (checked with `ss -ltnp`): Redis, moto,
#   the API and Ray's dashboard by their flags; Ray's GCS, raylet, workers and agents because Ray
#   runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see server_env).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NDIF_LOCAL_VENV:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/codi-nnsight/ndif-venv}"
HOME_DIR="${NDIF_LOCAL_HOME:-/tmp/codi-ndif}"
API_PORT="${NDIF_LOCAL_API_PORT:-28001}"
REDIS_PORT="${NDIF_LOCAL_REDIS_PORT:-26379}"
S3_PORT="${NDIF_LOCAL_S3_PORT:-29000}"
RAY_PORT="${NDIF_LOCAL_RAY_PORT:-26385}"
RAY_CLIENT_PORT="${NDIF_LOCAL_RAY_CLIENT_PORT:-20011}"
DASHBOARD_PORT="${NDIF_LOCAL_DASHBOARD_PORT:-28265}"
AGENT_PORT="${NDIF_LOCAL_AGENT_PORT:-28266}"
NDIF_VERSION="0.1.2"
RAY_VERSION="2.60.0"
TORCH_VERSION="2.13.0"

RUN="$HOME_DIR/run"
LOGS="$HOME_DIR/logs"
TINY="$HOME_DIR/tiny"
URL="http://127.0.0.1:$API_PORT"

# The environment every server process gets (Ray workers inherit it from `ray start`).
server_env() {
    export PATH="$VENV/bin:$PATH"
    export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
    export GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
    # Ray replaces a node IP of 127.0.0.1 with the machine's outward address unless multi-node
    # clustering is off (its switch for Windows/macOS, honoured on Linux too); with it off the node
    # IP stays 127.0.0.1, so Ray's processes advertise and connect to loopback only.
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    # A token file in ~/.ray (Ray writes one when any local cluster starts, e.g. the package's
    # `--workers` runs) makes `ray start` turn token authentication on, while the NDIF processes
    # that connect with `address="auto"` do not send it; every port here is loopback-only.
    export RAY_AUTH_MODE=disabled
    export NDIF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$S3_PORT"
    export NDIF_OBJECT_STORE_ACCESS_KEY=codi-ndif NDIF_OBJECT_STORE_SECRET_KEY=codi-ndif
    export NDIF_RAY_ADDRESS="ray://127.0.0.1:$RAY_CLIENT_PORT"
    export NDIF_API_PORT="$API_PORT" NDIF_API_URL="$URL"
    export NDIF_MODEL_IMPORT_PATH=ndif_cpu_actor.CPUModelActor
    export NDIF_DEFAULT_DTYPE=float32
    export PYTHONPATH="$REPO/scripts:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    unset RAY_ADDRESS NDIF_POSTGRES_URL NDIF_LOKI_URL NDIF_INFLUX_URL || true
}

log() { echo "ndif_local: $*" >&2; }
die() { log "$*"; exit 1; }

find_python() {  # the newest Python ndif 0.1.2 accepts (>=3.12,<3.14) found here
    if [ -n "${NDIF_LOCAL_PYTHON:-}" ]; then echo "$NDIF_LOCAL_PYTHON"; return; fi
    local p v best="" best_v=""
    local candidates="${NDIF_LOCAL_PYTHON_CANDIDATES:-$(echo /root/.pyenv/versions/3.*/bin/python) \
$(command -v python3.13 || true) $(command -v python3.12 || true) $(command -v python3 || true)}"
    for p in $candidates; do
        [ -n "$p" ] && [ -x "$p" ] || continue
        v="$("$p" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3] if (3, 12) <= sys.version_info < (3, 14) else "")' 2>/dev/null)" || continue
        [ -n "$v" ] || continue
        # sort -V: 3.12.10 is newer than 3.12.9 (a plain sort, as `ls` gives, says otherwise).
        if [ -z "$best" ] || [ "$(printf '%s\n%s\n' "$best_v" "$v" | sort -V | tail -n1)" != "$best_v" ]; then
            best="$p"; best_v="$v"
        fi
    done
    [ -n "$best" ] || die "no Python >=3.12,<3.14 found (ndif 0.1.2 needs it): set NDIF_LOCAL_PYTHON"
    echo "$best"
}

# What `install` puts in the venv. torch is pinned to the client's version in .ci/run, so local and
# remote runs use the same kernels (the bit-identity checks of tests/test_ndif*.py rely on it); Ray is
# pinned because the loopback binding below depends on its flags and environment variables.
REQUIREMENTS=("ndif[api,ray]==$NDIF_VERSION" "ray==$RAY_VERSION" "torch==$TORCH_VERSION" "moto[server]")
STAMP="$VENV/.codi-ndif-install"

stamp_text() { printf '%s\n' "$("$1" -c 'import sys; print(sys.version.split()[0])')" "${REQUIREMENTS[@]}"; }

venv_ready() {  # the venv is complete (its stamp is written last) and was built for today's pins
    [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_text "$VENV/bin/python")" ] \
        && "$VENV/bin/python" -c "import ndif, ray, moto" 2>/dev/null
}

cmd_install() {
    if venv_ready; then
        log "venv $VENV is ready ($(head -n1 "$STAMP"))"
    else
        local py; py="$(find_python)"
        # No stamp: a missing venv, one an interrupted install left half-built, or other pins. Start over.
        [ -e "$VENV" ] && { log "rebuilding $VENV (incomplete or built for other versions)"; rm -rf "$VENV"; }
        log "creating $VENV with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
        mkdir -p "$(dirname "$VENV")"
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        # torch from PyPI is the CUDA build (its nvidia-* wheels come along); it runs on a CPU-only box.
        "$VENV/bin/python" -m pip install --quiet "${REQUIREMENTS[@]}" -e "$REPO"
        stamp_text "$VENV/bin/python" > "$STAMP"
    fi
    # codi_nnsight's own dependencies, for this checkout (they may change between commits; quick when
    # satisfied). The server imports codi_nnsight from $REPO itself (PYTHONPATH, see server_env), so a
    # venv shared by several clones runs whichever checkout started it.
    "$VENV/bin/python" -m pip install --quiet -e "$REPO"
    command -v redis-server >/dev/null || log "also needed: redis-server (apt-get install redis-server)"
}

cmd_check() {
    [ -x "$VENV/bin/python" ] || die "no venv at $VENV (run: $0 install)"
    venv_ready || die "$VENV is incomplete or built for other versions (run: $0 install)"
    PYTHONPATH="$REPO" "$VENV/bin/python" -c "import codi_nnsight" 2>/dev/null \
        || die "$VENV cannot import this checkout's codi_nnsight (run: $0 install)"
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

cmd_deploy() {  # deploy [--dtype DTYPE] CODI_JSON...
    local dtype=float32
    if [ "${1:-}" = --dtype ]; then
        [ $# -ge 2 ] || die "usage: $0 deploy [--dtype float32|float64|bfloat16|float16] CODI_JSON..."
        dtype="$2"; shift 2
    fi
    case "$dtype" in float32 | float64 | bfloat16 | float16) ;; *) die "deploy: unknown dtype $dtype" ;; esac
    [ $# -gt 0 ] || die "usage: $0 deploy [--dtype float32|float64|bfloat16|float16] CODI_JSON..."
    server_env
    mkdir -p "$RUN/deployed"
    local spec key mark yaml
    for spec in "$@"; do
        key="$(model_key "$spec")" || die "cannot read CODI model $spec"
        mark="$RUN/deployed/$(printf '%s' "$key" | sha256sum | cut -c1-16)"
        if [ -f "$mark" ]; then
            # One deployment per key: ndif addresses a model by its key alone, not by key and dtype.
            [ "$(sed -n 2p "$mark")" = "$dtype" ] || die "deploy: $spec is deployed in $(sed -n 2p "$mark"), not $dtype (stop and start again to change it)"
            log "deploy: $spec already deployed ($dtype)"; continue
        fi
        yaml="$RUN/deploy-$$.yaml"
        "$VENV/bin/python" - "$key" "$dtype" > "$yaml" <<'PY'
import sys, yaml
# size_bytes: place without asking the Hub for a size (a CODI key is no Hub checkpoint).
print(yaml.safe_dump({"models": [{"checkpoint": "codi", "model_key": sys.argv[1], "dtype": sys.argv[2],
                                  "size_bytes": 100_000_000, "padding_bias": 0, "pinned": True}]}))
PY
        (cd "$RUN" && "$VENV/bin/ndif" deploy -f "$yaml") >>"$LOGS/deploy.log" 2>&1 \
            || { rm -f "$yaml"; die "deploy of $spec failed (see $LOGS/deploy.log)"; }
        rm -f "$yaml"
        printf '%s\n%s\n' "$key" "$dtype" > "$mark"
        log "deploy: $spec ready ($dtype)"
    done
}

cmd_restart() {  # restart CODI_JSON...: reload deployed models from disk (e.g. after their weights changed)
    [ $# -gt 0 ] || die "usage: $0 restart CODI_JSON..."
    server_env
    local spec key
    for spec in "$@"; do
        key="$(model_key "$spec")" || die "cannot read CODI model $spec"
        [ -f "$RUN/deployed/$(printf '%s' "$key" | sha256sum | cut -c1-16)" ] || die "restart: $spec is not deployed"
        # ndif's own restart (kill the replica, wait for its respawn), given the key: its CLI takes
        # only Hub checkpoint names.
        "$VENV/bin/python" - "$key" >>"$LOGS/deploy.log" 2>&1 <<'PY' || die "restart of $spec failed (see $LOGS/deploy.log)"
import sys
from ndif.cli.lib.restart import restart
out = restart(model_key=sys.argv[1], on_message=print)
sys.exit(0 if out["replicas"] and all(r.get("status") == "restarted" for r in out["replicas"]) else 1)
PY
        log "restart: $spec reloaded"
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
    local f
    for f in "$RUN"/deployed/*; do [ -f "$f" ] && echo "deployed ($(sed -n 2p "$f")): $(head -n1 "$f")"; done
    return $any
}

case "${1:-}" in
    install) cmd_install ;;
    check) cmd_check ;;
    start) shift; cmd_start "$@" ;;
    deploy) shift; cmd_deploy "$@" ;;
    restart) shift; cmd_restart "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) echo "$URL" ;;
    python) p="$(find_python)"; echo "$p ($("$p" -c 'import sys; print(sys.version.split()[0])'))" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
