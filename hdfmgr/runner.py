"""Run one external command: bounded in time, in its own process group, killed whole.

scp and rsync start ssh children of their own; killing only the direct child would leave a
hung ssh holding the pipe open. Every command therefore runs as the leader of a new process
group, and a timeout kills the group.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


def spawn(argv: Sequence[str], *, stdin: int = subprocess.PIPE) -> subprocess.Popen[bytes] | CommandResult:
    """Start ``argv`` as the leader of a new process group, its stdout and stderr piped; the
    failed result (:data:`NOT_STARTED`) when it cannot be started at all."""
    started = time.time()
    try:
        return subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            close_fds=True,
        )
    except OSError as exc:
        message = f"cannot run {argv[0]!r}: {exc.strerror or exc}".encode()
        return CommandResult(tuple(argv), NOT_STARTED, b"", message, started, time.time() - started)


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
    proc = spawn(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    if isinstance(proc, CommandResult):
        return proc
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


@dataclass
class Feed:
    """Standard input produced while the command runs: ``length`` bytes in ``chunks``.

    A batch streamed to the endpoint can be hundreds of megabytes: it is read from the files
    as the pipe takes it, never held in memory. The length is declared before the first byte
    (a warm session's step header carries it), so a source that yields more or less than it
    declared is a bug, and the command is then killed (:class:`FeedMismatch`)."""

    length: int
    chunks: Iterable[bytes]

    def exact(self) -> Iterator[bytes]:
        """The chunks, checked against the declared length as they pass."""
        left = self.length
        for chunk in self.chunks:
            left -= len(chunk)
            if left < 0:
                raise FeedMismatch(f"the input ran past its declared {self.length} bytes")
            if chunk:
                yield chunk
        if left:
            raise FeedMismatch(f"the input ended {left} bytes short of its declared {self.length}")


class FeedMismatch(RuntimeError):
    """A :class:`Feed` did not yield the bytes it declared."""


#: Bytes written to a pipe at a time (a pipe holds 64 KiB unless enlarged).
WRITE_CHUNK = 1 << 20


def grow_pipe(fd: int, size: int = WRITE_CHUNK) -> None:
    """Enlarge a pipe's buffer (Linux), so a stream takes fewer, larger writes."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for this user: the default will do


def run_fed(
    argv: Sequence[str],
    *,
    timeout: float,
    feed: Feed,
    on_start: Callable[[int], None] | None = None,
) -> CommandResult:
    """:func:`run` with standard input produced by ``feed`` while the command runs.

    The same bounds: its own process group, killed whole at ``timeout``. A command that
    exits or closes its input before taking all of it gets no more (the rest is not read)."""
    started = time.time()
    t0 = time.monotonic()
    deadline = t0 + timeout
    proc = spawn(argv)
    if isinstance(proc, CommandResult):
        return proc
    if on_start is not None:
        on_start(proc.pid)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    stdin_fd = proc.stdin.fileno()
    grow_pipe(stdin_fd)
    for fd in (stdin_fd, *sinks):
        os.set_blocking(fd, False)
    source = feed.exact()
    pending = memoryview(b"")
    timed_out = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(stdin_fd, selectors.EVENT_WRITE)
            for fd in sinks:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(left, 1.0)):
                    if key.fd == stdin_fd:
                        if not pending:
                            chunk = next(source, None)
                            if chunk is None:
                                sel.unregister(stdin_fd)
                                proc.stdin.close()
                                continue
                            pending = memoryview(chunk)
                        try:
                            pending = pending[os.write(stdin_fd, pending[:WRITE_CHUNK]) :]
                        except BlockingIOError:
                            pass
                        except OSError:  # it closed its input: it gets no more
                            sel.unregister(stdin_fd)
                            proc.stdin.close()
                        continue
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        sinks[key.fd] += chunk
                    else:
                        sel.unregister(key.fd)
        if not timed_out:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
    if timed_out:
        _kill_group(proc.pid)
        proc.wait()
    returncode = TIMED_OUT if timed_out else proc.returncode
    return CommandResult(
        tuple(argv), returncode, bytes(out), bytes(err), started, time.monotonic() - t0, timed_out
    )


def _kill_group(pgid: int) -> None:
    # Only on timeout: after a normal exit the group may hold an ssh ControlPersist master
    # that the next command is meant to reuse.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
