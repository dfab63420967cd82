"""``rsync -a -e ssh {batch} user@host:{dest}``, with and without a shared connection."""

from __future__ import annotations

from ..site import Transport
from . import Builder, Link


def rsync(share: bool) -> Builder:
    def build(link: Link) -> Transport:
        ssh = "ssh -p {port} -i {key} " + link.ssh_options(share=share)
        transfer = f'rsync -a -e "{ssh}" {{batch}} {{user}}@{{host}}:{{dest}}'
        return link.transport("rsync+share" if share else "rsync", transfer, share=share, family="rsync-ssh")

    return build


TRANSPORTS = {"rsync": rsync(False), "rsync+share": rsync(True)}
