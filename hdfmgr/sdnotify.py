"""systemd's readiness protocol (``Type=notify``) without a dependency.

systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET``; a service reports
``READY=1`` once it is ready (for hdfmgr-watch: after the start-up rescan), ``STOPPING=1``
when it begins to stop, and ``STATUS=...`` free text for ``systemctl status``. Outside systemd
the variable is unset and every call is a no-op.

State owned: none: one datagram to systemd's socket per call.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("hdfmgr")


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=watching"``) to systemd.

    Returns True when a message was sent; never raises (a failure is logged at DEBUG).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", address, exc)
        return False
    return True
