#!/bin/bash
# ApplicationStop: stop the service if it runs. Succeeds when there is nothing to stop, as on
# a first deployment or after a crash.
set -euo pipefail
. "$(dirname "$0")/common.sh"

if have_systemd; then
  if systemctl cat "$UNIT" >/dev/null 2>&1; then
    systemctl stop "$UNIT" || true
  fi
  echo "stop: $UNIT stopped (systemd)"
  exit 0
fi

if pid=$(running_pid); then
  kill -TERM "$pid"
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "stop: pid $pid ignored SIGTERM for 5 s, killing it" >&2
    kill -KILL "$pid" || true
  fi
  echo "stop: pid $pid stopped"
else
  echo "stop: not running"
fi
rm -f "$PID_FILE"
