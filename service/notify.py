"""sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET per message.

READY=1 once streams are live, STATUS=<one line> for `systemctl status`, WATCHDOG=1 while
the pipeline really moves, STOPPING=1 at shutdown. Outside systemd, every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ):
        path = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        self.sock = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        owned = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and owned else None

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: draining queues and writing files")
