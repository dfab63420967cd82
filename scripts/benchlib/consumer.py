"""The endpoint's consumer: stamps each arrival and hashes every file the instant it appears.

Every benchmark run's correctness check rests on it (tests/test_bench_consumer.py).
"""

from __future__ import annotations

import ctypes
import os
import queue
import select
import struct
import threading
import time
from pathlib import Path

from .util import b2_file, now

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """A minimal inotify(7) binding: enough to watch a tree for arrivals."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}

    def add(self, path: str, mask: int) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd >= 0:
            self.paths[wd] = path

    def read(self, timeout: float) -> list[tuple[str, int, str]]:
        """Events as ``(directory, mask, name)``; empty after ``timeout`` s without any."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            events.append((self.paths.get(wd, ""), mask, os.fsdecode(raw)))
        return events

    def close(self) -> None:
        os.close(self.fd)


class ArrivalWatcher(threading.Thread):
    """Records when each file appears in the endpoint buffer; optionally ingests each one.

    A file "arrives" when it is renamed into a watched directory (``IN_MOVED_TO``), or when a
    directory holding it is moved in or created (then it is found by a scan of that directory).
    This thread only reads events and stamps them, so that an arrival's time is when the file
    appeared, not when a busy consumer got round to it. With ``ingest``, a second thread then
    reads and hashes every arrived file, like an endpoint manager that treats every file in its
    buffer as complete; a digest that differs from the expected one is a partial (or wrong)
    file seen by the consumer, and a regular file created in place (not renamed in) counts
    against the run whatever its bytes. Names starting with '.' are transfer temporaries
    (rsync's) and never count.
    """

    def __init__(self, root: Path, expected: dict[str, str] | None = None, *, ingest: bool = False) -> None:
        super().__init__(daemon=True, name="arrivals")
        self.root = str(root)
        self.expected = expected
        self.ingest = ingest and expected is not None
        self.arrivals: dict[str, float] = {}
        self.partial: list[str] = []
        self.unexpected: list[str] = []
        self.in_place = 0  # regular files created in the endpoint buffer (not renamed in)
        self.overflow = False
        self.target = 0
        #: CPU time of both threads, once stopped: what the consumer took from the cores.
        self.cpu_seconds = 0.0
        self.complete = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._inotify = Inotify()
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._ingester = threading.Thread(target=self._ingest_loop, daemon=True, name="ingest")
        self._watch(self.root, now(), moved=False)

    # -- internals

    def _watch(self, directory: str, stamp: float, *, moved: bool) -> None:
        """Watch ``directory`` and its subdirectories; record the files already inside."""
        stack = [directory]
        while stack:
            current = stack.pop()
            self._inotify.add(current, IN_MOVED_TO | IN_CREATE | IN_CLOSE_WRITE | IN_Q_OVERFLOW)
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif not entry.name.startswith("."):
                    # Moved in: the files were there at the event. Created: they arrived
                    # between the event and this scan; the scan time is an upper bound.
                    self._arrived(entry.path, stamp if moved else now())

    def _arrived(self, path: str, stamp: float) -> None:
        rel = path[len(self.root) + 1 :]  # every path here is under the root
        if rel in self.arrivals:
            return
        with self._lock:
            self.arrivals[rel] = stamp
            if self.target and len(self.arrivals) >= self.target:
                self.complete.set()
        if self.ingest:
            self._queue.put((rel, path))

    def _ingest_loop(self) -> None:
        assert self.expected is not None
        while (item := self._queue.get()) is not None:
            rel, path = item
            want = self.expected.get(rel)
            try:
                got = b2_file(path)
            except OSError:
                got = None
            if want is None:
                self.unexpected.append(rel)
            elif got != want:
                self.partial.append(rel)
        self._add_cpu()

    def _add_cpu(self) -> None:
        spent = time.thread_time()
        with self._lock:
            self.cpu_seconds += spent

    def start(self) -> None:
        if self.ingest:
            self._ingester.start()
        super().start()

    def run(self) -> None:
        while not self._halt.is_set():
            events = self._inotify.read(0.05)
            stamp = now()
            for directory, mask, name in events:
                if mask & IN_Q_OVERFLOW:
                    self.overflow = True
                    self._watch(self.root, stamp, moved=False)
                    continue
                if not name or name.startswith("."):
                    continue
                path = os.path.join(directory, name)
                if mask & IN_ISDIR:
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        self._watch(path, stamp, moved=bool(mask & IN_MOVED_TO))
                elif mask & IN_MOVED_TO:
                    self._arrived(path, stamp)
                elif mask & IN_CREATE:
                    self.in_place += 1
                elif mask & IN_CLOSE_WRITE:
                    self._arrived(path, stamp)  # written in place: visible before complete
        self._inotify.close()
        self._add_cpu()

    # -- API

    def expect(self, count: int) -> None:
        with self._lock:
            self.target = count
            if len(self.arrivals) >= count:
                self.complete.set()

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def stop(self) -> None:
        """Stop watching, then let the consumer finish every file that arrived."""
        self._halt.set()
        self.join(5)
        if self.ingest:
            self._queue.put(None)
            self._ingester.join(600)
            if self._ingester.is_alive():
                raise RuntimeError("the consumer did not finish hashing the arrived files")


class BacklogSampler(threading.Thread):
    """Every 0.25 s: files closed in the buffer but not yet in the endpoint buffer."""

    def __init__(self, watcher: ArrivalWatcher) -> None:
        super().__init__(daemon=True)
        self.watcher = watcher
        self.samples: list[tuple[float, int]] = []
        self.written = 0
        self._halt = threading.Event()

    def note_close(self, rel: str, stamp: float) -> None:
        self.written += 1

    def run(self) -> None:
        while not self._halt.wait(0.25):
            self.samples.append((now(), self.written - self.watcher.count()))

    def stop(self) -> None:
        self._halt.set()
        self.join(2)
