"""Move delivered files from the buffer to holding, never overwriting; prune the buffer.

:func:`hold_delivered` is the one way a delivered file leaves the buffer, for the worker that
just delivered it and for the dispatcher alike (a restart, a scan, a file that waited for its
writer). It moves a file only when it is still the version that was sent and nothing says a
writer is still at it: a writer that keeps its file open (or reopens it) must never see it
moved away, and a file that changed since it was sent is a new version that goes again.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from enum import Enum

from .detect import open_for_writing, snapshot
from .settle import Snapshot

log = logging.getLogger(__name__)


#: Names tried in holding for one file: its own, then ``.1`` ... up to this many.
MAX_SUFFIX = 10000

#: Directory in holding for copies on their way in from another filesystem. A copy is named
#: after the source's identity, so that a run killed in the middle of a move finds it again.
TMP_DIR = ".hdfmgr-tmp"


def _suffixed(rel: str, n: int) -> str:
    """The n-th name a file may get in holding: ``rel`` itself, then ``rel.1``, ``rel.2``, ..."""
    return rel if n == 0 else f"{rel}.{n}"


class HoldError(OSError):
    """The file could not be moved to holding; it stays in the buffer, already delivered."""


class NotTheVersion(Exception):
    """The file in the buffer is not the one expected (changed, replaced, not a regular file)."""


class Outcome(Enum):
    HELD = "held"  # in holding (moved now, or found there, moved by a run that was killed)
    CHANGED = "changed"  # not the version that was sent, or gone and not in holding
    WRITING = "writing"  # some process has it open for writing: left alone
    UNPROVEN = "unproven"  # the kernel cannot say whether a writer has it: left alone


@dataclass(frozen=True, slots=True)
class HoldResult:
    outcome: Outcome
    name: str | None = None  # where it is in holding (relative), for HELD


def hold_delivered(buffer: str, holding: str, rel: str, sent: Snapshot, *, proven: bool) -> HoldResult:
    """Move the delivered ``rel`` to holding if it is still exactly the version ``sent``.

    ``proven``: the caller has just seen evidence that no writer is at it (a settle verdict).
    Otherwise the kernel is asked (a read lease); without an answer the file is left for the
    caller to settle first (UNPROVEN). Raises :class:`HoldError` when holding fails.
    """
    src = os.path.join(buffer, rel)
    snap = snapshot(src)
    if snap is None:
        found = find_held(holding, rel, sent, buffer_dev=_dev(buffer))
        return HoldResult(Outcome.HELD, found) if found is not None else HoldResult(Outcome.CHANGED)
    if snap != sent:
        return HoldResult(Outcome.CHANGED)
    if not proven:
        writing = open_for_writing(src)
        if writing:
            return HoldResult(Outcome.WRITING)
        if writing is None:
            return HoldResult(Outcome.UNPROVEN)
    try:
        return HoldResult(Outcome.HELD, hold(buffer, holding, rel, sent))
    except NotTheVersion:
        return HoldResult(Outcome.CHANGED)


def hold(buffer: str, holding: str, rel: str, expected: Snapshot | None = None) -> str:
    """Move ``buffer/rel`` to ``holding/rel`` and return the relative path it got there.

    An existing file in holding is kept: the newcomer gets a ``.1``, ``.2``, ... suffix. The
    move uses ``link`` + ``unlink`` so that an existing name can never be replaced, even by a
    race; across filesystems it copies into ``holding/.hdfmgr-tmp`` first, under a name made
    of the source's identity, and links that. A move that a kill interrupted is recognised
    and finished, never made twice: the name in holding is the same inode as the source (one
    filesystem) or as the copy (two). With ``expected``, a source that is not that version
    (even one swapped in during the move) raises :class:`NotTheVersion` and is not moved.
    """
    src = os.path.join(buffer, rel)
    directory = os.path.dirname(rel)
    try:
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise HoldError(errno.ENOENT, f"cannot move to holding: {rel!r} is gone") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotTheVersion(rel)
        if expected is not None and Snapshot(st.st_size, st.st_mtime_ns, st.st_ino) != expected:
            raise NotTheVersion(rel)
        tmp = os.path.join(
            holding, TMP_DIR, identity(st.st_dev, Snapshot(st.st_size, st.st_mtime_ns, st.st_ino))
        )
        source = src
        n = 0
        while n < MAX_SUFFIX:
            candidate = _suffixed(rel, n)
            dst = os.path.join(holding, candidate)
            try:
                _link(source, dst, os.path.join(holding, directory))
            except FileExistsError:
                if _is(dst, st) or _same_inode(dst, tmp):
                    # A previous run linked it here and was killed before the unlink.
                    _finish(src, st, tmp)
                    return candidate
                n += 1
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV or source != src:
                    raise
                found = _linked_copy(holding, rel, tmp)
                if found is not None:
                    _finish(src, st, tmp)
                    return found
                _copy_into(src, st, tmp)
                source = tmp
                continue  # the same name again, now from the copy
            if source == src and not _is(dst, st):
                # The source was replaced between its stat and the link: not ours to move.
                os.unlink(dst)
                raise NotTheVersion(rel)
            if n:
                log.warning("holding already has %r; kept both, the new one is %r", rel, candidate)
            # Linked from the buffer itself: one filesystem, so no copy was ever made of it
            # (clean_copies removes one an earlier layout of the directories left).
            _finish(src, st, tmp if source != src else None)
            return candidate
        raise HoldError(errno.EEXIST, f"no free name in holding for {rel!r}")
    except (HoldError, NotTheVersion):
        raise
    except OSError as exc:
        raise HoldError(exc.errno, f"cannot move to holding: {exc.strerror}") from None


def _is(path: str, st: os.stat_result) -> bool:
    """``path`` is the file ``st`` describes (same filesystem, same inode)."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _link(source: str, dst: str, directory: str) -> None:
    # follow_symlinks=False: a link swapped in for the source is never followed out of the
    # buffer (the check after the link then sees that it is not the version sent).
    try:
        os.link(source, dst, follow_symlinks=False)
    except FileNotFoundError:
        # The holding directory is missing (the source was checked just before): create it
        # and try again, instead of a makedirs for every file.
        _make_holding_dir(directory)
        os.link(source, dst, follow_symlinks=False)


def _finish(src: str, st: os.stat_result, tmp: str | None) -> None:
    """The file has its name in holding: take it out of the buffer, drop the copy's name."""
    if _is(src, st):  # else a new version took the name meanwhile: it stays
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
    if tmp is None:
        return
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _same_inode(a: str, b: str) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _linked_copy(holding: str, rel: str, tmp: str) -> str | None:
    """Where a copy left by a killed run got its name in holding; None if it got none.

    A copy that never got a name (the run died while writing it or just after) is removed:
    it is rewritten whole, never truncated in place (its inode might be a held file).
    """
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return None
    if st.st_nlink > 1:
        for n in range(MAX_SUFFIX):
            candidate = _suffixed(rel, n)
            try:
                held = os.lstat(os.path.join(holding, candidate))
            except FileNotFoundError:
                break
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                return candidate
    os.unlink(tmp)
    return None


def _copy_into(src: str, st: os.stat_result, tmp: str) -> None:
    """Copy the file ``st`` describes to ``tmp``, synced, with its mode and times.

    The source is opened without following links and checked to be that file, before and
    after the copy: a file swapped or written meanwhile is not copied (NotTheVersion).
    """
    _make_holding_dir(os.path.dirname(tmp))
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _unchanged(os.fstat(fd), st):
            raise NotTheVersion(src)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                offset = 0
                while offset < st.st_size:
                    sent = os.sendfile(out, fd, offset, min(st.st_size - offset, 1 << 30))
                    if sent == 0:
                        break
                    offset += sent
                if offset != st.st_size or not _unchanged(os.fstat(fd), st):
                    raise NotTheVersion(src)
                os.fchmod(out, stat.S_IMODE(st.st_mode))
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(out)
            finally:
                os.close(out)
        except BaseException:
            # A full or failing holding filesystem must not keep a partial copy.
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(fd)


def _unchanged(now: os.stat_result, st: os.stat_result) -> bool:
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )


def _make_holding_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise HoldError(exc.errno, f"cannot create holding directory: {exc.strerror}") from None


def _dev(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def find_held(holding: str, rel: str, sent: Snapshot, *, buffer_dev: int | None = None) -> str | None:
    """Where in holding the version ``sent`` of ``rel`` went, if it is there; None otherwise.

    A run that moved a delivered file and was killed before recording it left the file in
    holding under ``rel`` or a suffixed name. On the buffer's filesystem it is the same inode;
    from another one it is a copy with the same size and modification time (to the
    nanosecond: the copy keeps it).
    """
    for n in range(MAX_SUFFIX):
        candidate = _suffixed(rel, n)
        try:
            st = os.lstat(os.path.join(holding, candidate))
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (sent.size, sent.mtime_ns) or not stat.S_ISREG(st.st_mode):
            continue
        if st.st_ino == sent.inode or (buffer_dev is not None and st.st_dev != buffer_dev):
            return candidate
    return None


def clean_copies(holding: str, keep: set[str] | frozenset[str] = frozenset()) -> int:
    """Remove copies that killed runs left in ``holding/.hdfmgr-tmp``, except those in ``keep``.

    A copy is never the only place of a file: the original is still in the buffer until the
    copy has its name in holding. ``keep`` are identities of files still being delivered, whose
    copy tells the next hold where a move got to.
    """
    directory = os.path.join(holding, TMP_DIR)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if name in keep:
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            continue
    return removed


def identity(dev: int, snap: Snapshot) -> str:
    """The name a copy of the file ``snap`` (on device ``dev``) gets in ``holding/.hdfmgr-tmp``."""
    return f"{dev}-{snap.inode}-{snap.size}-{snap.mtime_ns}"


def prune_empty_dirs(buffer: str, *, older_than: float, now: float) -> int:
    """Remove empty subdirectories of ``buffer`` unchanged for ``older_than`` seconds.

    Never the buffer itself. A directory a writer is about to use has a recent mtime (it was
    just created or just emptied), so the age rule keeps this from racing the camera.

    One pass removes a whole emptied tree (``night/raw/exposure/``): removing a child sets
    its parent's mtime to now, so the parent is judged by the mtime it had before this pass
    removed anything from it, unless its mtime moved again after our last removal (then
    someone else used it, and it waits like any young directory).
    """
    removed = 0
    #: directory -> (its mtime before this pass removed a child, its mtime_ns just after)
    emptied: dict[str, tuple[float, int]] = {}
    for root, dirs, files, root_fd in os.fwalk(buffer, topdown=False):
        if root == buffer:
            continue
        if files or (dirs and any(_exists(root_fd, d) for d in dirs)):
            continue
        try:
            st = os.stat(root)
            mtime = st.st_mtime
            ours = emptied.get(root)
            if ours is not None and st.st_mtime_ns == ours[1]:
                mtime = ours[0]
            if now - mtime < older_than:
                continue
            parent = os.path.dirname(root)
            before = emptied[parent][0] if parent in emptied else os.stat(parent).st_mtime
            os.rmdir(root)
            removed += 1
            emptied[parent] = (before, os.stat(parent).st_mtime_ns)
        except OSError:
            continue
    return removed


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False
