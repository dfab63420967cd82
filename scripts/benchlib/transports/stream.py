"""``transfer: builtin:stream``: each batch one tar stream through the remote command (a warm
session), with and without a shared connection under it."""

from __future__ import annotations

from ..site import Transport
from . import Builder, Link


def stream(share: bool) -> Builder:
    def build(link: Link) -> Transport:
        name = "stream+share" if share else "stream"
        return link.transport(name, "builtin:stream", share=share, family="rsync-ssh")

    return build


TRANSPORTS = {"stream": stream(False), "stream+share": stream(True)}
