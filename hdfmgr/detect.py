"""Detect files in the buffer: the watchdog observer and the stat-only scanner.

The watchdog handler runs under the observer's lock, so it does nothing but put a tuple on
the dispatcher's queue. Watchdog drops inotify queue overflows silently (watchdog issue #654),
misses files written into a directory before its watch exists, and sees no events for the
contents of a directory moved in: the scanner, run at start, for every new directory and
periodically, is what makes detection complete.

State owned: none: stateless helpers (observer start and stop, stat, scan, the writer and lease
checks); :mod:`hdfmgr.watch` owns the observer and what it reports.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .settle import Evidence, Snapshot

log = logging.getLogger(__name__)

#: Queue items: ("file", Evidence, abs_path) and ("dir", abs_path, moved_in).
Put = Callable[[tuple[Any, ...]], None]


class BufferHandler(FileSystemEventHandler):
    """Turns watchdog events into queue items; never blocks, never touches the disk."""

    def __init__(self, put: Put, *, polling: bool) -> None:
        self._put = put
        self._polling = polling

    def on_closed(self, event: FileSystemEvent) -> None:
        self._put(("file", Evidence.CLOSED, _text(event.src_path)))

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._put(("dir", _text(event.src_path), False))
        else:
            # inotify: a writer has just opened it. Polling: it appeared, nothing more known.
            self._put(("file", Evidence.SEEN if self._polling else Evidence.OPENED, _text(event.src_path)))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(("file", Evidence.SEEN, _text(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        dest = _text(event.dest_path)
        if not dest:
            return  # moved out of the buffer
        if event.is_directory:
            self._put(("dir", dest, True))
        else:
            # A rename brings a complete file, unless the polling observer guessed the move.
            self._put(("file", Evidence.SEEN if self._polling else Evidence.CLOSED, dest))


def _text(path: str | bytes) -> str:
    return os.fsdecode(path)


def start_observer(buffer: str, put: Put, mode: str) -> tuple[BaseObserver, str]:
    """Start watching ``buffer``; return the observer and the kind actually used.

    ``auto`` uses inotify and falls back to polling (with a warning) when inotify cannot
    work, for example when ``fs.inotify.max_user_watches`` is exhausted.
    """
    if mode in ("auto", "inotify"):
        try:
            from watchdog.observers.inotify import InotifyObserver

            observer: BaseObserver = InotifyObserver(generate_full_events=True)
            observer.schedule(
                BufferHandler(put, polling=False),
                buffer,
                recursive=True,
                event_filter=[
                    FileClosedEvent,
                    FileCreatedEvent,
                    FileMovedEvent,
                    DirCreatedEvent,
                    DirMovedEvent,
                ],
            )
            observer.start()
            return observer, "inotify"
        except (OSError, ImportError) as exc:
            if mode == "inotify":
                raise
            log.warning(
                "inotify unavailable for %s (%s); falling back to polling: raise fs.inotify.max_user_watches "
                "or set general.observer: polling",
                buffer,
                exc,
            )
    observer = PollingObserver(timeout=1.0)
    observer.schedule(
        BufferHandler(put, polling=True),
        buffer,
        recursive=True,
        event_filter=[FileCreatedEvent, FileModifiedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent],
    )
    observer.start()
    return observer, "polling"


def stop_observer(observer: BaseObserver) -> None:
    observer.stop()
    observer.join(timeout=5)


def snapshot(path: str) -> Snapshot | None:
    """A stat of a regular file, or None when it is gone, a link or not a regular file."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return Snapshot(st.st_size, st.st_mtime_ns, st.st_ino)


def open_for_writing(path: str) -> bool | None:
    """Whether any process has ``path`` open for writing; None when the kernel cannot say.

    A read lease (``F_SETLEASE``, ``F_RDLCK``) is granted only when no process has the file
    open for writing, and is released at once. The daemon ignores SIGIO, which a lease break
    would otherwise deliver with a fatal default action. Leases need a local filesystem and
    ownership of the file (or CAP_LEASE); anything else answers None.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


#: Capability bit of CAP_LEASE (linux/capability.h).
CAP_LEASE = 28


def lease_problem(buffer: str) -> str | None:
    """Why the writer check cannot work here, or None when it can.

    Probes the buffer's filesystem with a lease on a file of its own (created and removed at
    once, before the observer starts), and the process for CAP_LEASE, without which leases
    on files of other users are refused.
    """
    probe = os.path.join(buffer, f".hdfmgr-lease-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return f"cannot probe the buffer's filesystem: {exc.strerror}"
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError as exc:
            return f"the buffer's filesystem refuses leases ({exc.strerror})"
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass
    if not _has_capability(CAP_LEASE):
        return "no CAP_LEASE: files owned by other users cannot be asked"
    return None


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def is_symlink(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def scan(root: str, start: str = "") -> Iterator[tuple[str, Snapshot | None]]:
    """Yield ``(relpath, snapshot)`` for every entry under ``root/start``, stat only.

    Regular files get a snapshot; symbolic links yield ``None`` so the caller can warn (they
    are never followed out of the buffer). Unreadable directories are logged and skipped.
    """
    stack = [os.path.join(root, start) if start else root]
    prefix = len(root) + 1
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_symlink():
                            yield entry.path[prefix:], None
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            yield entry.path[prefix:], Snapshot(st.st_size, st.st_mtime_ns, st.st_ino)
                    except OSError:
                        continue
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot scan %s: %s", directory, exc.strerror)
