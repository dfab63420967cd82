"""Move delivered files from the buffer to holding, never overwriting; prune the buffer."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time

log = logging.getLogger(__name__)


#: Names tried in holding for one file: its own, then ``.1`` ... up to this many.
MAX_SUFFIX = 10000


def _suffixed(rel: str, n: int) -> str:
    """The n-th name a file may get in holding: ``rel`` itself, then ``rel.1``, ``rel.2``, ..."""
    return rel if n == 0 else f"{rel}.{n}"


class HoldError(OSError):
    """The file could not be moved to holding; it stays in the buffer, already delivered."""


def hold(buffer: str, holding: str, rel: str) -> str:
    """Move ``buffer/rel`` to ``holding/rel`` and return the relative path it got there.

    An existing file in holding is kept: the newcomer gets a ``.1``, ``.2``, ... suffix. The
    move uses ``link`` + ``unlink`` so that an existing name can never be replaced, even by a
    race; across filesystems it copies to a temporary name first.
    """
    src = os.path.join(buffer, rel)
    directory = os.path.dirname(rel)
    tmp: str | None = None
    try:
        for n in range(MAX_SUFFIX):
            candidate = _suffixed(rel, n)
            dst = os.path.join(holding, candidate)
            try:
                try:
                    os.link(tmp or src, dst)
                except FileNotFoundError:
                    # The holding directory is missing (the source was checked just before):
                    # create it and try again, instead of a makedirs for every file.
                    _make_holding_dir(os.path.join(holding, directory))
                    os.link(tmp or src, dst)
            except FileExistsError:
                if tmp is None and _same_file(src, dst):
                    # A previous run linked it and was killed before the unlink.
                    os.unlink(src)
                    return candidate
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV or tmp is not None:
                    raise
                tmp = _copy_beside(src, os.path.join(holding, directory))
                try:
                    os.link(tmp, dst)
                except FileExistsError:
                    continue
            if n:
                log.warning("holding already has %r; kept both, the new one is %r", rel, candidate)
            os.unlink(src)
            return candidate
        raise HoldError(errno.EEXIST, f"no free name in holding for {rel!r}")
    except HoldError:
        raise
    except OSError as exc:
        raise HoldError(exc.errno, f"cannot move to holding: {exc.strerror}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _make_holding_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise HoldError(exc.errno, f"cannot create holding directory: {exc.strerror}") from None


def find_held(holding: str, rel: str, inode: int) -> str | None:
    """Where in holding ``rel`` went, if the file with ``inode`` is there; None otherwise.

    A run that moved a delivered file and was killed before recording it left the file in
    holding under ``rel`` or a suffixed name; the inode tells it from other versions.
    """
    for n in range(MAX_SUFFIX):
        candidate = _suffixed(rel, n)
        try:
            st = os.lstat(os.path.join(holding, candidate))
        except OSError:
            return None
        if st.st_ino == inode:
            return candidate
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _copy_beside(src: str, directory: str) -> str:
    tmp = os.path.join(directory, f".hdfmgr-tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except OSError:
        # A full or failing holding filesystem must not keep a partial copy.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return tmp


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
