#!/bin/bash
# ValidateService: each destination received its part of the bundle.
set -euo pipefail
failed=0
for f in \
  /opt/pier-examples/multi/bin/pier-multi-report \
  /opt/pier-examples/multi/lib/report.sh \
  /opt/pier-examples/multi/lib/VERSION \
  /etc/pier-examples/multi/multi.conf \
  /etc/pier-examples/multi/logrotate.d/pier-multi \
  /var/www/pier-multi/index.html \
  /var/www/pier-multi/status.html; do
  if [ ! -s "$f" ]; then
    echo "check_destinations: $f is missing or empty" >&2
    failed=1
  fi
done
[ -x /opt/pier-examples/multi/bin/pier-multi-report ] \
  || { echo "check_destinations: pier-multi-report is not executable" >&2; failed=1; }
grep -q '<h1>' /var/www/pier-multi/status.html 2>/dev/null \
  || { echo "check_destinations: status.html has no heading" >&2; failed=1; }
[ "$failed" -eq 0 ] && echo "check_destinations: all five destinations in place"
exit "$failed"
