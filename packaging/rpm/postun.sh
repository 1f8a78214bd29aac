# pier (rpm %postun): $1 is 1 or more after an upgrade: restart a running agent on the new
# binaries (it drains first). On erase ($1 = 0) the deployment root /var/lib/pier is kept, as
# rpm keeps a changed configuration (.rpmsave): rpm has no purge; remove it by hand.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ "$1" -ge 1 ]; then
        systemctl try-restart pier-agent.service || echo "pier: pier-agent.service did not restart; see: journalctl -u pier-agent" >&2
    fi
fi
exit 0
