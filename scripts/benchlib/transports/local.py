"""``cp`` into the local staging slot; the "remote" commands run through a local ``sh``."""

from __future__ import annotations

from ..site import Transport
from . import Link


def local(link: Link) -> Transport:
    return Transport("local", "cp {batch} {dest}", 'sh -c "{command}"')


TRANSPORTS = {"local": local}
