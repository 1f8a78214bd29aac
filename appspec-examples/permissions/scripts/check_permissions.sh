#!/bin/bash
# ValidateService: every part of the tree has the owner, group and mode the AppSpec asked for.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
root=/opt/pier-examples/permissions
failed=0

# expect PATH OWNER GROUP MODE
expect() {
  local got
  got=$(stat -c '%U %G %a' "$root/$1" 2>/dev/null || echo "missing")
  if [ "$got" != "$2 $3 $4" ]; then
    echo "check_permissions: $root/$1 is '$got', expected '$2 $3 $4'" >&2
    failed=1
  fi
}

expect bin              pierapp  pierapp  750
expect conf             pierapp  pierapp  750
expect data             pierapp  pierapp  750
expect bin/report.sh    root     pierapp  755
expect bin/rotate-data.sh root   pierapp  755
expect conf/app.conf    root     pierapp  640
expect conf/logging.conf root    pierapp  640
expect conf/secret.key  pierapp  pierapp  600
expect public          www-data www-data 755
expect public/index.html www-data www-data 644

# The web server can read the public page but not the secret.
if command -v runuser >/dev/null; then
  # Only meaningful when the directories above public are open to others.
  if runuser -u www-data -- test -x "$root"; then
    runuser -u www-data -- test -r "$root/public/index.html" \
      || { echo "check_permissions: www-data cannot read the public page" >&2; failed=1; }
  fi
  if runuser -u www-data -- test -r "$root/conf/secret.key"; then
    echo "check_permissions: www-data can read the secret" >&2
    failed=1
  fi
fi

[ "$failed" -eq 0 ] && echo "check_permissions: all owners, groups and modes as specified"
exit "$failed"
