#!/usr/bin/env python3
"""pier-hello: answers every GET with a one-line greeting and the deployment it came from.

Listens on 127.0.0.1:$PIER_HELLO_PORT (default 18080). Started as root (no systemd), it drops
to the unprivileged $PIER_HELLO_USER (default nobody) once the socket is bound.
"""
import http.server
import os
import pwd
import signal
import sys


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "hello from pier (deployment {})\n".format(
            os.environ.get("PIER_HELLO_DEPLOYMENT", "unknown")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("pier-hello: " + (fmt % args) + "\n")


def drop_privileges():
    if os.getuid() != 0:
        return
    user = pwd.getpwnam(os.environ.get("PIER_HELLO_USER", "nobody"))
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def main():
    port = int(os.environ.get("PIER_HELLO_PORT", "18080"))
    server = http.server.HTTPServer(("127.0.0.1", port), Hello)
    drop_privileges()
    # SIGTERM (systemctl stop, or stop.sh) ends the server cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write("pier-hello: listening on 127.0.0.1:{}\n".format(port))
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
