"""One pipeline per buffer: an advisory lock that a kill -9 releases by itself."""

from __future__ import annotations

import fcntl
import os


class LockBusy(RuntimeError):
    """Another hdfmgr process runs a pipeline on this buffer; ``pid`` is it (or None)."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(f"{path} is held by process {pid}")
        self.pid = pid


class InstanceLock:
    """``flock`` on a file in holding; the holder's pid is written into it for signalling."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_pid(fd)
            os.close(fd)
            raise LockBusy(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def lock_path(holding: str) -> str:
    """The lock lives in holding: local, ours, and one per buffer in any sane layout."""
    return os.path.join(holding, ".hdfmgr.lock")
