"""Run one external command: bounded in time, in its own process group, killed whole.

scp and rsync start ssh children of their own; killing only the direct child would leave a
hung ssh holding the pipe open. Every command therefore runs as the leader of a new process
group, and a timeout kills the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Exit status recorded for a command that could not be started at all.
NOT_STARTED = 127
#: Exit status recorded for a command killed at its timeout (as coreutils' timeout(1)).
TIMED_OUT = 124
#: Bytes of stderr kept: enough for any real diagnostic, bounded for the database.
STDERR_KEEP = 4096


@dataclass(frozen=True)
class CommandResult:
    """What one invocation did. ``returncode`` is negative for a signal, as in subprocess."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    started: float
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def stderr_tail(self, limit: int = STDERR_KEEP) -> str:
        """The end of stderr as text, where the actual error usually is."""
        return self.stderr[-limit:].decode("utf-8", "backslashreplace").strip()

    def describe(self) -> str:
        """One line for logs: how it ended and the last stderr line."""
        if self.timed_out:
            how = f"timed out after {self.duration:.1f} s"
        elif self.returncode < 0:
            how = f"killed by signal {-self.returncode}"
        else:
            how = f"exit status {self.returncode}"
        lines = self.stderr_tail().splitlines()
        return f"{how}: {lines[-1]}" if lines else how


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | None = None,
    on_start: Callable[[int], None] | None = None,
) -> CommandResult:
    """Run ``argv`` to completion or until ``timeout`` seconds, whichever comes first."""
    started = time.time()
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            close_fds=True,
        )
    except OSError as exc:
        message = f"cannot run {argv[0]!r}: {exc.strerror or exc}".encode()
        return CommandResult(tuple(argv), NOT_STARTED, b"", message, started, time.monotonic() - t0)
    if on_start is not None:
        on_start(proc.pid)
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # A grandchild that left the group still holds the pipes; give up on them.
            proc.kill()
            out, err = b"", b"output abandoned: a process outside the group kept the pipes open"
            proc.wait()
    returncode = TIMED_OUT if timed_out else proc.returncode
    return CommandResult(
        tuple(argv), returncode, out or b"", err or b"", started, time.monotonic() - t0, timed_out
    )


def _kill_group(pgid: int) -> None:
    # Only on timeout: after a normal exit the group may hold an ssh ControlPersist master
    # that the next command is meant to reuse.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
