#!/bin/bash
# AfterInstall: run the freshly installed tool to write the status page.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
/opt/pier-examples/multi/bin/pier-multi-report >/var/www/pier-multi/status.html.tmp
mv /var/www/pier-multi/status.html.tmp /var/www/pier-multi/status.html
echo "write_status: wrote /var/www/pier-multi/status.html"
