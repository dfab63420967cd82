"""The seed's own template, ``scp -Bpq {batch} user@host:{dest}``, with and without a shared
connection. scp pays round trips per file (SFTP: open, write, close, setstat)."""

from __future__ import annotations

from ..site import Transport
from . import Builder, Link


def scp(share: bool) -> Builder:
    def build(link: Link) -> Transport:
        transfer = (
            "scp -Bpq -P {port} -i {key} " + link.ssh_options(share=share) + " {batch} {user}@{host}:{dest}"
        )
        return link.transport("scp+share" if share else "scp", transfer, share=share, family="scp")

    return build


TRANSPORTS = {"scp": scp(False), "scp+share": scp(True)}
