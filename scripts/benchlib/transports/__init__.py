"""Transports: how files travel, one small module each.

A module here defines ``TRANSPORTS``, a mapping from names (as ``--transports`` and the report
spell them) to a builder ``(Link) -> Transport``; every module of this package is found by
itself, so adding a transport is adding one file. A builder returns the two seed-format command
templates (``transfer`` and ``remote``) and their parameters, and names the floor it is compared
with (``family``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..site import Transport

#: ssh client options: ignore ~/.ssh/config, pin the sshd's host key, never prompt.
SSH_OPTS = (
    "-F /dev/null -o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null"
    " -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes -o LogLevel=ERROR"
)
#: Connection sharing: every command of a run rides one master connection.
SHARE = " -o ControlMaster=auto -o ControlPath={cpath} -o ControlPersist=120"


@dataclass(frozen=True)
class Link:
    """The way to the endpoint: the sshd as the client reaches it (``None``: local), where the
    shared connections' sockets live, and the emulated round trip (0 on loopback)."""

    server: Any
    ctl_dir: Path
    rtt_ms: float = 0.0

    def params(self, *, share: bool) -> dict[str, Any]:
        """The template parameters that reach this sshd."""
        server = self.server
        params: dict[str, Any] = {
            "user": server.user,
            "host": server.host,
            "port": server.port,
            "key": str(server.key),
            "known_hosts": str(server.known_hosts),
        }
        if share:
            params["cpath"] = str(self.ctl_dir / "cm-%C")
        return params

    def ssh_options(self, *, share: bool) -> str:
        return SSH_OPTS + (SHARE if share else "")

    def remote_template(self, *, share: bool) -> str:
        return "ssh -p {port} -i {key} " + self.ssh_options(share=share) + ' {user}@{host} "{command}"'

    def transport(self, name: str, transfer: str, *, share: bool, family: str) -> Transport:
        params = self.params(share=share)
        return Transport(
            name,
            transfer,
            self.remote_template(share=share),
            params,
            family,
            cpath=params.get("cpath"),
            server=self.server,
            rtt_ms=self.rtt_ms,
            # Without "+share" a transport is measured without any sharing, hdfmgr's included.
            general={} if share else {"share_connections": False},
        )


Builder = Callable[[Link], Transport]


def registry() -> dict[str, Builder]:
    """Every transport of every module in this package."""
    found: dict[str, Builder] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.update(getattr(module, "TRANSPORTS", {}))
    return found


def build(name: str, link: Link) -> Transport:
    builders = registry()
    if name not in builders:
        raise ValueError(f"unknown transport {name!r} (known: {', '.join(sorted(builders))})")
    return builders[name](link)
