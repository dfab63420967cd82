"""A progress line for ``hdfmgr-rescan`` on a terminal: files, bytes, rate, ETA.

State owned: the rescan's progress line on a terminal (what it last printed, and when).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws one status line at most every ``interval`` seconds; ``finish`` ends it."""

    def __init__(self, stream: TextIO = sys.stderr, *, interval: float = 0.5) -> None:
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def due(self) -> bool:
        """True when the line may be redrawn (callers skip computing figures otherwise)."""
        return time.monotonic() - self._last >= self.interval

    def update(self, *, done: int, done_bytes: int, waiting: int, waiting_bytes: int) -> None:
        now = time.monotonic()
        self._last = now
        self.stream.write("\r\033[K" + render(done, done_bytes, waiting, waiting_bytes, now - self.started))
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()


def render(done: int, done_bytes: int, waiting: int, waiting_bytes: int, elapsed: float) -> str:
    """``rescan: 1200/5000 files, 1.2/5.0 GB, 85.3 MB/s, ETA 45 s`` (pure, for tests)."""
    total, total_bytes = done + waiting, done_bytes + waiting_bytes
    rate = done_bytes / elapsed if elapsed > 0 else 0.0
    files_rate = done / elapsed if elapsed > 0 else 0.0
    if waiting == 0:
        eta = "0 s"
    elif rate > 0 and waiting_bytes:
        eta = f"{waiting_bytes / rate:.0f} s"
    elif files_rate > 0:
        eta = f"{waiting / files_rate:.0f} s"
    else:
        eta = "?"
    return (
        f"rescan: {done}/{total} files, {_size(done_bytes)}/{_size(total_bytes)}, "
        f"{rate / 1e6:.1f} MB/s, ETA {eta}"
    )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
