#!/bin/bash
# BeforeInstall (as root): the system user and group that own the application's files.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if getent passwd pierapp >/dev/null; then
  echo "create_user: pierapp exists"
  exit 0
fi
getent group pierapp >/dev/null || groupadd --system pierapp
useradd --system --gid pierapp --home-dir /opt/pier-examples/permissions --no-create-home \
  --shell /usr/sbin/nologin pierapp
echo "create_user: created system user pierapp"
