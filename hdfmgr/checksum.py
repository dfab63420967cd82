"""BLAKE2b-512 of local files: the digest the endpoint manager stores (``b2sum``'s default).

State owned: none: a digest of a file, computed the way the endpoint manager computes it.
"""

from __future__ import annotations

import hashlib
import logging
import threading

log = logging.getLogger(__name__)

#: Large reads keep the hash at disk speed; hashlib releases the GIL while it digests.
BLOCK = 1024 * 1024

_buffers = threading.local()


def blake2b_file(path: str) -> str:
    """Hex BLAKE2b-512 of the file at ``path``, read in large blocks into a reused buffer.

    The buffer is per thread and allocated once: a fresh megabyte per call cost more than
    hashing a small file.
    """
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    digest = hashlib.blake2b()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    # One line per hash at DEBUG: scripts/bench counts them to prove nothing is hashed twice.
    log.debug("hashed %r: %d bytes", path, size)
    return digest.hexdigest()
