"""The file that is sent is the file that was registered: each is pinned before the transfer.

The transfer tool is an external command given paths. A path in the buffer can be swapped
between the daemon's last check and the tool's ``open`` (a symbolic link to a file only root
may read, another file, a directory link higher up), and the tool would follow it. So a
batch's files are hard-linked into a private directory of its slot and checked there to be
the registered regular file (same filesystem, inode, size and mtime); the tool, the hash and
the checks after the transfer all use these links. ``link(2)`` never follows a symbolic link
(``follow_symlinks=False``), and nobody else can change the private directory (mode 0700), so
what the tool opens is the inode that was registered, whatever happens in the buffer.

Hard links must stay on one filesystem: the private directory is ``holding/.hdfmgr-send``
when holding shares the buffer's filesystem, else ``buffer/.hdfmgr-send``, which detection
skips. Where ``fs.protected_hardlinks`` refuses a link to another user's file that the daemon
may not write, the file is opened once without following links, checked by ``fstat`` to be the
registered one, and copied from that descriptor instead (a local copy: slower, as safe).

State owned: the slots' private directories of hard links (one per slot, emptied before each
batch).
"""

from __future__ import annotations

import errno
import os
import stat

from .settle import Snapshot

#: The private directory's name, in holding or in the buffer.
PIN_DIR = ".hdfmgr-send"


class Unreadable(OSError):
    """The buffer's file itself cannot be opened for reading (the private copy's fallback)."""


class NotRegistered(Exception):
    """The buffer's file is not the registered version any more (or not a regular file)."""


def pin_root(buffer: str, holding: str) -> str:
    """Where the slots' private directories go: on the buffer's filesystem."""
    try:
        same = os.stat(buffer).st_dev == os.stat(holding).st_dev
    except OSError:
        same = False
    return os.path.join(holding if same else buffer, PIN_DIR)


def slot_dir(root: str, slot: int) -> str:
    return os.path.join(root, str(slot))


def clear(root: str) -> None:
    """Remove every pin a killed run left (the files themselves are still in the buffer)."""
    try:
        slots = os.listdir(root)
    except OSError:  # none, or not ours to read: each pin then fails alone, with its reason
        return
    for name in slots:
        release(os.path.join(root, name))


def release(directory: str) -> None:
    """Remove the pins of one slot."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            continue


def pin(src: str, directory: str, expected: Snapshot) -> str:
    """Pin ``src`` (a file of the buffer) as ``directory/<basename>``; return that path.

    Raises :class:`NotRegistered` when ``src`` is not the version ``expected``, OSError when
    the pin cannot be made.
    """
    dst = os.path.join(directory, os.path.basename(src))
    try:
        _link(src, dst, directory)
    except FileNotFoundError:
        raise NotRegistered(src) from None
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
        _make(directory)
        _copy(src, dst, expected, os.stat(directory).st_dev)
        return dst
    st = os.lstat(dst)
    if not stat.S_ISREG(st.st_mode) or Snapshot(st.st_size, st.st_mtime_ns, st.st_ino) != expected:
        os.unlink(dst)
        raise NotRegistered(src)
    return dst


def intact(path: str, expected: Snapshot) -> bool:
    """The pinned file still holds the registered version (nobody wrote to it meanwhile)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_nlink == 1 and st.st_ino != expected.inode:
        # A private copy (protected hard links): same content, its own inode.
        return st.st_size == expected.size and st.st_mtime_ns == expected.mtime_ns
    return Snapshot(st.st_size, st.st_mtime_ns, st.st_ino) == expected


def _link(src: str, dst: str, directory: str) -> None:
    """``link(src, dst)``, making the private directory or replacing a leftover pin only when
    the link says so: a batch of small files pays one system call per pin, not three."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except FileExistsError:
        os.unlink(dst)
    except FileNotFoundError:
        if os.path.isdir(directory) or not os.path.lexists(src):
            raise
        _make(directory)
    os.link(src, dst, follow_symlinks=False)


def _make(directory: str) -> None:
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        os.makedirs(os.path.dirname(directory), mode=0o700, exist_ok=True)
        os.mkdir(directory, 0o700)


def _copy(src: str, dst: str, expected: Snapshot, dev: int) -> None:
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT):  # a link in its place, or gone
            raise NotRegistered(src) from None
        raise Unreadable(exc.errno, exc.strerror, src) from None
    try:
        st = os.fstat(fd)
        if not _is(st, expected, dev):
            raise NotRegistered(src)
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            while offset < st.st_size:
                n = os.sendfile(out, fd, offset, min(st.st_size - offset, 1 << 30))
                if n == 0:
                    break
                offset += n
            if offset != st.st_size or not _is(os.fstat(fd), expected, dev):
                raise NotRegistered(src)
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o777)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            os.close(out)
            os.unlink(dst)
            raise
        os.close(out)
    finally:
        os.close(fd)


def _is(st: os.stat_result, expected: Snapshot, dev: int) -> bool:
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_dev == dev
        and Snapshot(st.st_size, st.st_mtime_ns, st.st_ino) == expected
    )
