# pier (rpm %post): $1 is the number of pier packages installed after this step: 1 on a fresh
# install, 2 on an upgrade (the restart on upgrade is in %postun, after the old files go).
# Without a running systemd (containers, chroots, image builds) the unit is only enabled.
install -d -m 0755 -o root -g root /var/lib/pier
if [ "$1" -eq 1 ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl enable pier-agent.service >/dev/null 2>&1 || echo "pier: could not enable pier-agent.service; enable it with: systemctl enable --now pier-agent.service" >&2
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        systemctl start pier-agent.service || echo "pier: pier-agent.service did not start; see: journalctl -u pier-agent" >&2
    fi
fi
exit 0
