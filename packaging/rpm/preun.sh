# pier (rpm %preun): $1 is 0 when the package is being erased (not upgraded): stop the agent
# (it drains first) and disable the unit.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop pier-agent.service || true
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable pier-agent.service >/dev/null 2>&1 || true
    fi
fi
exit 0
