"""BLAKE2b-512 of local files: the digest the endpoint manager stores (``b2sum``'s default)."""

from __future__ import annotations

import hashlib

#: Large reads keep the hash at disk speed; hashlib releases the GIL while it digests.
BLOCK = 1024 * 1024


def blake2b_file(path: str) -> str:
    """Hex BLAKE2b-512 of the file at ``path``, read in large blocks into one reused buffer."""
    digest = hashlib.blake2b()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
