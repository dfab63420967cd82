"""The built-in stream transfer: one batch as one tar stream, each file read once.

``endpoint.commands.transfer: builtin:stream`` needs no transfer program: the batch travels
through the ``remote`` command (a warm session when there is one) into the receive program
(hdfmgr/remote/receive.sh), which unpacks it into the slot directory with the endpoint's tar.
The cost of a batch is then one round trip plus its bytes, whatever the number of files, and
the BLAKE2b of every file is computed from the very bytes put on the wire, so a file is read
once (scp and rsync read it, and hdfmgr read it again to hash it).

The stream's length is known before its first byte (a warm session's step header declares
it): each member is a GNU tar header (long names in a GNU long-name record, so any byte but
NUL and '/' survives) and the file's registered size of data. A file that turns out shorter
is padded with zeros and reported short, one that grew is cut at its registered size: either
way its staged copy is not what the buffer holds now, and the batch's after-transfer check
(the file's stat against the one registered) keeps it from being committed. A file that
cannot be opened is sent as zeros under its name, which no commit will ask for (the next
commit of the slot removes it as a stray).

State owned: none: one batch's stream, produced as the pipe takes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .replies import StagedFile

log = logging.getLogger("hdfmgr")

BLOCK = tarfile.BLOCKSIZE
#: Two zero blocks end a tar archive.
END = bytes(2 * BLOCK)
#: Bytes read from a file at a time.
READ = 1 << 20
#: Small members are gathered into chunks of about this size before they are written.
GATHER = 256 * 1024


def _header(name: str, size: int, mode: int = 0o644, mtime: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = mtime
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> int:
    return -size % BLOCK


@dataclass
class TarStream:
    """One batch's tar stream. ``files`` have distinct basenames (they share one slot).

    After :meth:`chunks` has run to its end: ``digests`` holds the BLAKE2b of each file that
    had no checksum yet and was sent whole; ``unread`` the files that could not be opened or
    read (with the error); ``short`` those that ended before their registered size."""

    files: Sequence[StagedFile]
    digests: dict[str, str] = field(default_factory=dict)
    unread: dict[str, OSError] = field(default_factory=dict)
    short: set[str] = field(default_factory=set)
    hash_seconds: float = 0.0
    length: int = 0

    def __post_init__(self) -> None:
        names = {f.basename for f in self.files}
        if len(names) != len(self.files):
            raise ValueError("a stream's files must have distinct basenames")
        self._header_sizes = [len(_header(f.basename, f.size)) for f in self.files]
        self.length = sum(
            h + f.size + _padding(f.size) for h, f in zip(self._header_sizes, self.files, strict=True)
        ) + len(END)

    def chunks(self) -> Iterator[bytes]:
        """The stream, in chunks of at most about :data:`READ` bytes."""
        gathered: list[bytes] = []
        gathered_size = 0
        for f, header_size in zip(self.files, self._header_sizes, strict=True):
            for piece in self._member(f, header_size):
                if len(piece) >= GATHER:  # a large file's block: as it is, never copied
                    if gathered:
                        yield b"".join(gathered)
                        gathered, gathered_size = [], 0
                    yield piece
                    continue
                gathered.append(piece)
                gathered_size += len(piece)
                if gathered_size >= GATHER:
                    yield b"".join(gathered)
                    gathered, gathered_size = [], 0
        gathered.append(END)
        yield b"".join(gathered)

    def _member(self, f: StagedFile, header_size: int) -> Iterator[bytes]:
        fd = None
        try:
            fd = os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            st = os.fstat(fd)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            self.unread[f.rel] = exc
            yield _header(f.basename, f.size)
            yield from _zeros(f.size + _padding(f.size))
            return
        try:
            # Owner read and write always: a copy its owner cannot read would fail the whole
            # batch's verification (b2sum) and the endpoint manager.
            mode = (stat.S_IMODE(st.st_mode) & 0o777) | 0o600
            header = _header(f.basename, f.size, mode, int(st.st_mtime))
            if len(header) != header_size:  # never: its size depends on the name only
                raise AssertionError("a tar header changed size")
            yield header
            digest = hashlib.blake2b() if f.checksum is None else None
            left = f.size
            spent = 0.0
            while left:
                try:
                    chunk = os.read(fd, min(READ, left))
                except OSError as exc:
                    self.unread[f.rel] = exc
                    chunk = b""
                if not chunk:
                    if f.rel not in self.unread:
                        self.short.add(f.rel)
                    yield from _zeros(left)
                    digest = None
                    break
                if digest is not None:
                    t0 = time.perf_counter()
                    digest.update(chunk)
                    spent += time.perf_counter() - t0
                left -= len(chunk)
                yield chunk
            self.hash_seconds += spent
            if digest is not None:
                self.digests[f.rel] = digest.hexdigest()
                # One line per hash, as for every hash (scripts/bench counts them).
                log.debug("hashed %r: %d bytes", f.path, f.size)
            pad = _padding(f.size)
            if pad:
                yield bytes(pad)
        finally:
            os.close(fd)


_ZERO_BLOCK = bytes(READ)


def _zeros(count: int) -> Iterator[bytes]:
    """``count`` zero bytes in slices of at most :data:`READ` (a file registered at 100 GiB
    that vanished must not become one 100 GiB object)."""
    view = memoryview(_ZERO_BLOCK)
    while count > 0:
        step = min(count, READ)
        yield view[:step].tobytes() if step < READ else _ZERO_BLOCK
        count -= step
