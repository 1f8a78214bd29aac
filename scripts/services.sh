#!/usr/bin/env bash
# Test services for pier's queue transports: a moto server (SQS + S3 wire protocol) on
# 127.0.0.1, on a free port, installed by this script into a venv of its own.
#
#   scripts/services.sh start [--state-dir DIR] [--watch-pid PID]
#       Installs moto (pinned) if needed, starts it unless it already runs, waits until it
#       answers, writes DIR/endpoint and DIR/env, and prints `export ...` lines for eval:
#         eval "$(scripts/services.sh start)"
#       --watch-pid: stop moto by itself once PID exits (a test process that started it).
#   scripts/services.sh stop [--state-dir DIR]
#       Stops the moto this script started (by its recorded pid) and removes the state.
#   scripts/services.sh env [--state-dir DIR]
#       Prints the `export ...` lines of a running moto again.
#
# Environment: PIER_VENV (default <repo>/.venv/moto) where moto is installed,
# PIER_SERVICES_DIR (default <repo>/target/services) the default state dir.
set -euo pipefail

MOTO_VERSION=5.2.5
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PIER_VENV:-$repo/.venv/moto}"
state="${PIER_SERVICES_DIR:-$repo/target/services}"
watch_pid=""

cmd="${1:-}"
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) state="$2"; shift 2 ;;
    --watch-pid) watch_pid="$2"; shift 2 ;;
    *) echo "services.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

log() { echo "services.sh: $*" >&2; }

# A fresh Debian/Ubuntu lacks python3 or its venv module; install them when we can.
ensure_python() {
  if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
    return
  fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "installing python3 and python3-venv"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
  else
    log "moto needs python3 with the venv module: install python3 and python3-venv"
    exit 1
  fi
}

install_moto() {
  if [ -x "$venv/bin/moto_server" ] && [ "$(cat "$venv/.moto-version" 2>/dev/null)" = "$MOTO_VERSION" ]; then
    return
  fi
  mkdir -p "$(dirname "$venv")"
  # Two test processes may install at once: one does it under a lock, the other waits.
  exec 9>"$(dirname "$venv")/.moto-install.lock"
  flock 9
  if [ ! -x "$venv/bin/moto_server" ] || [ "$(cat "$venv/.moto-version" 2>/dev/null)" != "$MOTO_VERSION" ]; then
    ensure_python
    log "installing moto[server]==$MOTO_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q "moto[server]==$MOTO_VERSION" >&2
    echo "$MOTO_VERSION" >"$venv/.moto-version"
  fi
  exec 9>&-
}

print_env() {
  local endpoint
  endpoint="$(cat "$state/endpoint")"
  # moto accepts any credentials; these only make the AWS SDKs sign their requests.
  cat <<ENV
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-testing}
export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_REGION=\${AWS_REGION:-us-east-1}
export AWS_EC2_METADATA_DISABLED=true
ENV
}

# Asks with the venv's own python, so the host needs no curl.
answers() {
  "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=2)' "$1" 2>/dev/null
}

running() {
  [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null && answers "$(cat "$state/endpoint")"
}

start() {
  install_moto
  mkdir -p "$state"
  if running; then
    print_env
    return
  fi
  local port
  port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local endpoint="http://127.0.0.1:$port"
  # setsid: moto gets its own session, so a Ctrl-C in the shell that started it does not
  # take it down mid-test, and stop can kill its whole group.
  setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$state/moto.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$state/pid"
  echo "$endpoint" >"$state/endpoint"
  for _ in $(seq 1 150); do
    if answers "$endpoint"; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "moto exited at start; its log:"; cat "$state/moto.log" >&2; exit 1
    fi
    sleep 0.2
  done
  answers "$endpoint" || { log "moto did not answer on $endpoint within 30 s"; kill "$pid"; exit 1; }
  if [ -n "$watch_pid" ]; then
    # A watcher that outlives this script: when the test process is gone, so is its moto.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill "$2" 2>/dev/null; rm -rf "$3"' \
      _ "$watch_pid" "$pid" "$state" >/dev/null 2>&1 </dev/null &
  fi
  log "moto $MOTO_VERSION listening on $endpoint (pid $pid)"
  print_env
}

stop() {
  if [ -f "$state/pid" ]; then
    local pid
    pid="$(cat "$state/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "moto (pid $pid) stopped"
  fi
  rm -rf "$state"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  env) [ -f "$state/endpoint" ] || { log "no moto running for $state"; exit 1; }; print_env ;;
  *) echo "usage: scripts/services.sh start|stop|env [--state-dir DIR] [--watch-pid PID]" >&2; exit 2 ;;
esac
