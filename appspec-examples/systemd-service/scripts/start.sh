#!/bin/bash
# ApplicationStart: start (or restart) the service from the freshly installed files.
set -euo pipefail
. "$(dirname "$0")/common.sh"

export PIER_HELLO_DEPLOYMENT="${DEPLOYMENT_ID:-local}"

if have_systemd; then
  systemctl daemon-reload
  systemctl enable "$UNIT"
  systemctl restart "$UNIT"
  echo "start: $UNIT started (systemd)"
  exit 0
fi

# No systemd: run it in the background in its own session, output to a log file so that no
# pipe of this hook stays open after it exits.
bash "$(dirname "$0")/stop.sh"
set -a
. "$ENV_FILE"
set +a
setsid python3 "$APP" >>"$LOG_FILE" 2>&1 </dev/null &
echo $! >"$PID_FILE"
echo "start: pid $(cat "$PID_FILE") started, log in $LOG_FILE"
