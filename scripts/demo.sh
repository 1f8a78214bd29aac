#!/usr/bin/env bash
# pier's main job on its embedded default, with no cloud: a real deployment through the local
# spool transport.
#
#   1. builds pier-agent and pier;
#   2. starts `pier-agent run` on a private deployment root, taking commands from a spool
#      directory (the default transport when no queue is configured);
#   3. `pier push` archives appspec-examples/static-site into a revision (sha256 recorded);
#   4. `pier deploy --wait` sends the deployment command to the host's spool and follows its
#      status records until the host reports the result;
#   5. `pier status` prints the per-event table; the site is then in /var/www/pier-static-site;
#   6. `pier dashboard` serves the same records on 127.0.0.1, and the last line printed is the
#      address of the deployment's page. On a terminal the demo waits for Enter before it
#      stops the agent and the dashboard; otherwise (CI) it checks the page answers and ends.
#
# Run as root (the example installs under /var/www and sets owners). PIER_DEMO_DIR keeps the
# working directory (default: a new one under /tmp, removed at the end unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run as root: the example bundle installs under /var/www and sets owners" >&2
  exit 1
fi

step() { printf '\n==> %s\n' "$*"; }

step "building pier-agent and pier"
cargo build -q -p pier-agent -p pier-controller --bins
target="${CARGO_TARGET_DIR:-$repo/target}/debug"
agent="$target/pier-agent"
pier="$target/pier"

work="${PIER_DEMO_DIR:-$(mktemp -d /tmp/pier-demo.XXXXXX)}"
mkdir -p "$work"
cat >"$work/agent.yml" <<YML
root_dir: $work/root
host_id: demo-host
transport:
  type: spool
  spool_dir: $work/spool
YML

step "starting pier-agent run (spool transport, root $work/root)"
PIER_LOG_STDERR=1 "$agent" run -c "$work/agent.yml" >"$work/agent.log" 2>&1 &
agent_pid=$!
dashboard_pid=
cleanup() {
  if [ -n "$dashboard_pid" ] && kill -0 "$dashboard_pid" 2>/dev/null; then
    kill -TERM "$dashboard_pid" 2>/dev/null || true
    wait "$dashboard_pid" 2>/dev/null || true
  fi
  if kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  if [ -z "${PIER_DEMO_DIR:-}" ] && [ -z "${KEEP:-}" ]; then
    rm -rf "$work"
  else
    echo "demo files kept in $work"
  fi
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  grep -q "ready" "$work/agent.log" 2>/dev/null && break
  sleep 0.1
done
sed 's/^/    agent: /' "$work/agent.log"

step "pier push: archive appspec-examples/static-site as a revision"
"$pier" push --application static-site --source appspec-examples/static-site \
  --local-location "$work/revisions/static-site.tgz" >"$work/revision.json"
cat "$work/revision.json"

step "pier deploy --wait: send the command to demo-host's spool and follow its status"
set +e
"$pier" deploy --application static-site --deployment-group demo \
  --revision "$work/revisions/static-site.tgz" --hosts demo-host \
  --transport spool --spool-dir "$work/spool" --status-dir "$work/root/status" \
  --wait --timeout 120 | tee "$work/deploy.out"
rc=${PIPESTATUS[0]}
set -e
deployment=$(grep -o 'd-[A-Z0-9]\{9\}' "$work/deploy.out" | head -n 1)

step "pier status $deployment"
"$pier" status "$deployment" --status-dir "$work/root/status"

step "what the agent logged"
sed 's/^/    agent: /' "$work/agent.log"

if [ "$rc" -ne 0 ]; then
  echo "demo.sh: the deployment failed (exit $rc)" >&2
  exit "$rc"
fi
step "deployed: /var/www/pier-static-site"
ls -l /var/www/pier-static-site

step "pier dashboard: the deployments, $deployment's timeline, the host (the agent's own store)"
"$pier" dashboard --status-dir "$work/root/status" --listen 127.0.0.1:0 \
  >"$work/dashboard.url" 2>"$work/dashboard.log" &
dashboard_pid=$!
url=
for _ in $(seq 1 100); do
  url=$(head -n 1 "$work/dashboard.url" 2>/dev/null || true)
  [ -n "$url" ] && break
  sleep 0.1
done
if [ -z "$url" ]; then
  cat "$work/dashboard.log" >&2
  echo "demo.sh: pier dashboard did not start" >&2
  exit 1
fi
page="${url}deployments/$deployment"
code=$(curl -s -o /dev/null -w '%{http_code}' "$page" || true)
if [ "$code" != 200 ]; then
  echo "demo.sh: the dashboard answered $code for $page" >&2
  exit 1
fi
sed 's/^/    dashboard: /' "$work/dashboard.log"
if [ -t 0 ]; then
  echo "dashboard: $page"
  read -r -p "(the dashboard runs until you press Enter) " _
else
  echo "dashboard: $page"
fi
