#!/usr/bin/env bash
# The project's test command (README.md, .ci/run): installs what the tests need on a fresh
# machine, starts the test services, runs the whole workspace's tests, and stops the services.
set -euo pipefail
cd "$(dirname "$0")/.."

# Host tools the end-to-end tests use for real: setfacl/getfacl (AppSpec acls), useradd, and
# headless Chromium with its WebDriver for the dashboard's browser tests (Debian's packages;
# tests/e2e/dashboard.rs skips, counted, where they are missing); curl for demo.sh.
need=()
command -v setfacl >/dev/null || need+=(acl)
command -v useradd >/dev/null || need+=(passwd)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing ${need[*]} and not root to install them" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

# One moto server (SQS + S3 wire protocol, pinned, on 127.0.0.1) for the whole run; the tests
# read AWS_ENDPOINT_URL. Stopped however the run ends.
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT

# The end-to-end tests run the real binaries, which live in other packages than the test:
# build them first (the tests find them beside their own binary, in target/debug).
cargo build --workspace --bins

out=$(mktemp)
# A test that cannot run here (no journald helper, no mount namespaces, ...) calls its
# support module's skip(reason), which appends a line `TEST: reason` to this file; cargo
# counts such a test as passed, this script does not.
skips=$(mktemp)
set +e
PIER_TEST_SKIP_LOG="$skips" cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
scripts/services.sh stop >/dev/null 2>&1 || true

# A short soak: consecutive deployments on one agent; fails when a deployment fails, when
# descriptors grow, or when the root outgrows retention (scripts/soak; the long run is manual).
soak_passed=0
soak_failed=0
if scripts/soak -n 30 --warmup 10 --no-build; then
  soak_passed=1
else
  soak_failed=1
  rc=1
fi

# A small fleet, both ways (three agents on SQS/S3 in moto, three on the spool): one rollout
# each, checked for its result and the controller's requests per host, never for time.
fleet_passed=0
fleet_failed=0
if scripts/fleet-bench --quick --sizes 3 --bin-dir "${CARGO_TARGET_DIR:-target}/debug"; then
  fleet_passed=1
else
  fleet_failed=1
  rc=1
fi

# The benchmark's quick mode on the debug binaries (scripts/bench --bin-dir): it checks what it
# measures (each destination equals its bundle, every hook ran, the large .tgz from S3 on moto
# deployed) and fails on a wrong result, never on a time; its figures from debug binaries mean
# nothing and go to a log only.
bench_passed=0
bench_failed=0
bench_log=$(mktemp)
if scripts/bench --quick --reps 1 --cases install,tree --bin-dir "${CARGO_TARGET_DIR:-target}/debug" >"$bench_log" 2>&1; then
  bench_passed=1
else
  tail -n 30 "$bench_log" >&2
  bench_failed=1
  rc=1
fi
rm -f "$bench_log"

# The dashboard with a history (300 deployments, in a status directory and in moto's S3):
# every page answers with what it should, the list's cursor goes on where the page ended;
# checked for results only, never for time (the 10,000-deployment timing is manual,
# scripts/dashboard-bench --write).
dashboard_passed=0
dashboard_failed=0
# (The test services were stopped above: it starts a moto of its own.)
if env -u AWS_ENDPOINT_URL scripts/dashboard-bench --quick --bin-dir "${CARGO_TARGET_DIR:-target}/debug" --no-build; then
  dashboard_passed=1
else
  dashboard_failed=1
  rc=1
fi

# The pipeline examples (docs/pipelines.md): the workflow's schema, cfn-lint on the
# templates, the buildspecs' structure, and every `pier` command in them parsed by the
# real binary (PIER_PARSE_ONLY=1). Needs no AWS and no network once its tools are installed.
examples_passed=0
examples_failed=0
if scripts/check-examples --bin "${CARGO_TARGET_DIR:-target}/debug/pier"; then
  examples_passed=1
else
  examples_failed=1
  rc=1
fi

# The packages, for real: the .deb and .rpm built from the debug binaries above, the .deb
# installed with scripts/install.sh and dpkg (no systemd running), upgraded during a
# deployment, removed and purged; the .rpm inspected (scripts/package-test; needs root).
package_passed=0
package_failed=0
package_skipped=""
if [ "$(id -u)" -ne 0 ]; then
  package_skipped="scripts/package-test: needs root to install the package"
elif ! command -v dpkg >/dev/null; then
  package_skipped="scripts/package-test: this machine has no dpkg"
elif scripts/package-test; then
  package_passed=1
else
  package_failed=1
  rc=1
fi

# One closing line for the whole run, summed over every test binary; a skipped test is
# counted as skipped, never as passed. (--no-fail-fast above: a failing binary does not hide
# how the others fare.)
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$out" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$out" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
skipped=$(wc -l <"$skips")
skipped=$((skipped + 0))
cargo_skipped=$skipped
if [ -n "$package_skipped" ]; then
  echo "$package_skipped" >>"$skips"
  skipped=$((skipped + 1))
fi
if [ "$skipped" -gt 0 ]; then
  echo "skipped:"
  sed 's/^/  /' "$skips"
fi
passed=$((passed > cargo_skipped ? passed - cargo_skipped : 0))
passed=$((passed + soak_passed + fleet_passed + bench_passed + dashboard_passed + examples_passed + package_passed))
failed=$((failed + soak_failed + fleet_failed + bench_failed + dashboard_failed + examples_failed + package_failed))
rm -f "$out" "$skips"
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit "$rc"
