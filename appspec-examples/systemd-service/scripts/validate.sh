#!/bin/bash
# ValidateService: the service answers on its port within 15 s. Uses python3 (already a
# dependency of the service) rather than curl, which minimal hosts lack.
set -euo pipefail
. "$(dirname "$0")/common.sh"

url="http://127.0.0.1:${PIER_HELLO_PORT}/"
for _ in $(seq 1 30); do
  if body=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end="")' "$url" 2>/dev/null); then
    case "$body" in
      "hello from pier"*) echo "validate: $url answered: $body"; exit 0 ;;
      *) echo "validate: $url answered something else: $body" >&2; exit 1 ;;
    esac
  fi
  sleep 0.5
done
echo "validate: nothing answered on $url after 15 s" >&2
if [ -r "$LOG_FILE" ]; then tail -n 20 "$LOG_FILE" >&2; fi
exit 1
