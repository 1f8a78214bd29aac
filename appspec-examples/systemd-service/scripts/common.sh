# Shared by the hook scripts (sourced, not run). Hooks may start with a minimal PATH.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

UNIT=pier-hello.service
APP=/opt/pier-examples/hello/pier-hello.py
ENV_FILE=/etc/pier-examples/hello/pier-hello.env
PID_FILE=/run/pier-hello.pid
LOG_FILE=/var/log/pier-hello.log
PIER_HELLO_PORT=18080

if [ -r "$ENV_FILE" ]; then
  # shellcheck disable=SC1090
  . "$ENV_FILE"
fi

# systemd manages services only when it is PID 1; /run/systemd/system exists exactly then.
have_systemd() {
  [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

# The pid in PID_FILE, if that process is still our server.
running_pid() {
  local pid
  [ -r "$PID_FILE" ] || return 1
  pid=$(cat "$PID_FILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  grep -q pier-hello "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}
