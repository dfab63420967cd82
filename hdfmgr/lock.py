"""One pipeline per buffer: an advisory lock that a kill -9 releases by itself.

Where the lock lives. Not in holding (operators purge holding by age, and a purge that
deletes the lock file lets a second watcher start beside the first) and not in the buffer
(that is the camera's). It lives in a directory of its own on the local host, ``/run/lock/
hdfmgr`` (``HDFMGR_LOCK_DIR`` overrides it, for every hdfmgr process on the host alike),
one file per buffer, named after the buffer's real path: two configurations that name one
buffer (even through a symbolic link, or with different holding areas) take the same lock.
``/run`` is a tmpfs that nothing purges by age and that a reboot empties, which is exactly
when every lock is gone anyway.

Beside the lock, the running daemon publishes its state (``<key>.json``, written atomically):
its pid, start time and version, and the state of each transfer slot, for ``hdfmgr status``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from typing import Any

#: The default lock directory (see the module's docstring).
LOCK_DIR = "/run/lock/hdfmgr"


class LockBusy(RuntimeError):
    """Another hdfmgr process runs a pipeline on this buffer; ``pid`` is it (or None)."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(f"{path} is held by process {pid}")
        self.path = path
        self.pid = pid


class LockUnavailable(RuntimeError):
    """The lock file cannot be created (its directory is missing or not writable)."""


def lock_dir() -> str:
    return os.environ.get("HDFMGR_LOCK_DIR") or LOCK_DIR


def buffer_key(buffer: str | os.PathLike[str]) -> str:
    """The name of a buffer's lock: its real path, hashed (the same for every spelling)."""
    real = os.fsencode(os.path.realpath(buffer))
    return "buffer-" + hashlib.sha256(real).hexdigest()[:24]


def lock_path(buffer: str | os.PathLike[str]) -> str:
    return os.path.join(lock_dir(), buffer_key(buffer) + ".lock")


def state_path(buffer: str | os.PathLike[str]) -> str:
    """The running daemon's published state (see :func:`publish`)."""
    return os.path.join(lock_dir(), buffer_key(buffer) + ".json")


class InstanceLock:
    """``flock`` on the buffer's lock file; the holder's pid is written into it for signalling.

    With ``directory`` (the buffer), the directory itself is locked too: every process that
    opens it locks the same inode, whatever lock directory its environment names (a service
    given ``HDFMGR_LOCK_DIR`` and an operator's shell without it), so no second pipeline ever
    runs on a buffer; the lock file only adds the holder's pid and a place for its state.
    """

    def __init__(self, path: str, directory: str | os.PathLike[str] | None = None) -> None:
        self.path = path
        self.directory = directory
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                # Shared by every account that runs an hdfmgr, like /run/lock itself.
                os.chmod(directory, 0o1777)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise LockUnavailable(
                f"cannot create the buffer's lock {self.path}: {exc.strerror or exc} "
                "(set HDFMGR_LOCK_DIR to a local directory every hdfmgr on this host can write)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_pid(fd)
            os.close(fd)
            raise LockBusy(self.path, pid) from None
        if self.directory is not None:
            try:
                self._dir_fd = _lock_directory(self.directory)
            except BlockingIOError:
                os.close(fd)
                raise LockBusy(self.path, published_pid(self.directory)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        for fd in (self._fd, self._dir_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = self._dir_fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_directory(directory: str | os.PathLike[str]) -> int:
    """An exclusive ``flock`` on the directory itself; BlockingIOError when another holds it.
    A buffer that cannot be opened is left to the pipeline, which reports it by name."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def published_pid(buffer: str | os.PathLike[str]) -> int | None:
    """The holder's pid from its lock file, when it is in this environment's lock directory."""
    return holder(buffer)


def read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def holder(buffer: str | os.PathLike[str]) -> int | None:
    """The pid of the hdfmgr process holding this buffer's lock, or None when none runs."""
    try:
        fd = os.open(lock_path(buffer), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def publish(path: str, state: dict[str, Any]) -> None:
    """Write the daemon's state atomically (a reader sees the old or the new file whole)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, separators=(",", ":"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def published(buffer: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The running daemon's state, or None when no daemon holds the buffer's lock."""
    pid = holder(buffer)
    if pid is None:
        return None
    try:
        with open(state_path(buffer), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    if state.get("pid") != pid:
        state = {}  # written by an earlier daemon: only the pid is known
    state["pid"] = pid
    return state
