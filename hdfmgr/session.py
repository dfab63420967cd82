"""Warm sessions: hdfmgr's own remote steps through long-lived remote shells.

Over a long link a new ssh connection costs about 8 round trips before the first byte (1 s at
100 ms), and every batch needs at least one remote step (the commit). A warm session is one
remote shell started once through the configured ``remote`` template, running the loop
program ``hdfmgr/remote/session.sh`` (started by the same constant bootstrap as every other
program, so a csh-family login shell still parses nothing else). Each step is then written to
its stdin, length-prefixed: the program, its shell-quoted arguments and its data; its reply
comes back on the same channel, ended by a record that carries the exit status and a token
new for every step (see session.sh for the wire format). A step costs one round trip and no
login.

What stays as with one command per step:

* Every step has its timeout. On a timeout, an end of the channel before the step's end
  record, or anything that does not parse, the session's process group is killed and the step
  ends as a failed command would (124 for a timeout, the ssh client's status or 255 for a
  lost channel): the caller treats its outcome as unknown exactly as a lost reply today. The
  next step starts a new session.
* Input cut short does nothing: the loop never runs a step whose program or arguments did not
  arrive whole, and data cut short reaches the program as an early end of file (the commit
  program then moves nothing). When the daemon dies, the ssh client's stdin closes, the loop
  reads end of file and the remote shell exits.
* A step whose session cannot start runs as one command, as without warm sessions: when the
  endpoint cannot be reached, that command fails too (exit 255, counted by the circuit breaker
  as today); a template that does not pass stdin or a shell that cannot run the loop only
  loses the speed. The next start is tried after a backoff, steps running as single commands
  meanwhile; after an outage, as soon as one of them gets through.
* A session idle for longer than :data:`PING_AFTER` is first asked to run an empty step, so
  that a connection that died quietly (an endpoint restart, a NAT timeout) is found before a
  commit is sent into it, not by the commit's timeout.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .runner import NOT_STARTED, TIMED_OUT, WRITE_CHUNK, CommandResult, Feed, grow_pipe, spawn
from .templates import quote_remote

log = logging.getLogger("hdfmgr")

#: What the loop prints when it is ready for steps, on stdout and on stderr.
READY_OUT = b"\0/hdfmgr-ready/\0"
READY_ERR = b"/hdfmgr-ready/\n"
#: Seconds a session may sit idle before it must prove it still answers.
PING_AFTER = 30.0
#: Status given to a step whose session ended before the step's end record (ssh's own
#: "connection lost"), unless the ssh client exited with a more telling status.
LOST = 255
#: Longest a session start may take, whatever the command timeout.
START_TIMEOUT = 60.0
#: How long a closed session's remote shell gets to exit on its own before it is killed.
CLOSE_GRACE = 2.0
#: Most sessions started ahead at once (sshd's MaxStartups drops logins beyond 10 by default).
PREWARM_MAX = 8


def step_request(token: str, program: str, args: Sequence[str], data: bytes) -> bytes:
    """One step as the loop reads it: a header line, the program, its arguments, its data.

    ``args`` starts with the program's ``$0``. The program must be ASCII without a trailing
    newline (the loop's command substitution would drop it and the length would not match)."""
    return step_header(token, program, args, len(data)) + data


def step_header(token: str, program: str, args: Sequence[str], length: int) -> bytes:
    """A step's header line, program and arguments: what precedes its ``length`` bytes of data."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", token):
        raise ValueError("a step token is 8 to 64 lowercase hex digits")
    text = program.encode("ascii")
    if text.endswith(b"\n") or b"\0" in text:
        raise ValueError("a step program cannot end with a newline or contain NUL")
    words = os.fsencode(quote_remote(list(args)))
    header = f"{token} {len(text)} {len(words)} {length}\n".encode("ascii")
    return header + text + words


@dataclass
class Reply:
    """Reads one reply from the two streams until each shows its end record.

    Pure: fed bytes, it says when the reply is complete and what belongs to it. Output
    before the start (a chatty login) is not this class's business: the ready reply swallows
    it. Bytes after the end record on stdout are a protocol doubt (``trailing``)."""

    out_end: re.Pattern[bytes]
    err_end: bytes
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    status: int | None = None
    out_done: bool = False
    err_done: bool = False
    trailing: bool = False
    _out_at: int = 0
    _err_at: int = 0

    @classmethod
    def step(cls, token: str) -> Reply:
        mark = b"/hdfmgr-step/" + token.encode() + b"/"
        return cls(re.compile(b"\0" + re.escape(mark) + rb"(\d{1,3})/\0"), b"\n" + mark + b"\n")

    @classmethod
    def ready(cls) -> Reply:
        return cls(re.compile(re.escape(READY_OUT)), READY_ERR)

    @property
    def done(self) -> bool:
        return self.out_done and self.err_done

    def feed_out(self, chunk: bytes) -> None:
        if self.out_done:
            self.trailing = self.trailing or bool(chunk)
            return
        self.out += chunk
        match = self.out_end.search(self.out, max(0, self._out_at - 80))
        self._out_at = len(self.out)
        if match is None:
            return
        self.out_done = True
        self.status = int(match.group(1)) if match.groups() else 0
        self.trailing = match.end() < len(self.out)
        del self.out[match.start() :]

    def feed_err(self, chunk: bytes) -> None:
        if self.err_done:
            return  # an ssh client's farewell after the end; not the step's
        self.err += chunk
        at = self.err.find(self.err_end, max(0, self._err_at - len(self.err_end)))
        self._err_at = len(self.err)
        if at < 0:
            return
        self.err_done = True
        del self.err[at:]


class Session:
    """One running remote shell (the loop) and its ssh client, leader of its process group."""

    def __init__(self, argv: Sequence[str], proc: subprocess.Popen[bytes]) -> None:
        self.argv = tuple(argv)
        self.proc = proc
        self.broken = False  # killed or in doubt: never used again
        self.last_used = 0.0  # by the pool's clock
        self.steps = 0
        self._sel = selectors.DefaultSelector()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
        grow_pipe(proc.stdin.fileno())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usable(self) -> bool:
        return not self.broken and self.proc.poll() is None

    @classmethod
    def start(cls, argv: Sequence[str], loop: bytes, timeout: float) -> tuple[Session | None, CommandResult]:
        """Start the loop through ``argv`` (the bootstrap reads ``loop`` from stdin first) and
        wait for its ready records. On failure the session is None and the result says why."""
        started = time.time()
        t0 = time.monotonic()
        proc = spawn(argv)
        if isinstance(proc, CommandResult):
            return None, proc
        session = cls(argv, proc)
        reply = Reply.ready()
        how = session._exchange(iter((loop,)), reply, t0 + timeout)
        result = session._result(how, reply, started, t0)
        if how != "done" or reply.trailing:
            session.kill()
            return None, result
        return session, result

    def step(
        self,
        program: str,
        args: Sequence[str],
        data: bytes | Feed,
        *,
        timeout: float,
        describe: Sequence[str] = (),
    ) -> CommandResult:
        """Run one step; afterwards the session is either ready for the next or broken.

        ``data`` is the step's stdin, whole or as a :class:`Feed` produced while it runs."""
        started = time.time()
        t0 = time.monotonic()
        token = secrets.token_hex(16)
        reply = Reply.step(token)
        request: Iterator[bytes]
        if isinstance(data, Feed):
            request = itertools.chain((step_header(token, program, args, data.length),), data.exact())
        else:
            request = iter((step_request(token, program, args, data),))
        try:
            how = self._exchange(request, reply, t0 + timeout)
        except BaseException:
            # The feed failed mid-step: the loop waits for bytes that will never come.
            self.kill()
            raise
        self.steps += 1
        if how != "done" or reply.trailing:
            log.debug("warm session %d: step %s (%s); killed", self.pid, describe[:1], how)
            self.kill()
        return self._result(how, reply, started, t0, describe)

    def _result(
        self, how: str, reply: Reply, started: float, t0: float, describe: Sequence[str] = ()
    ) -> CommandResult:
        argv = (*self.argv[:1], f"[warm session {self.pid}]", *describe) if describe else self.argv
        out, err = bytes(reply.out), bytes(reply.err)
        if how == "done":
            return CommandResult(argv, reply.status or 0, out, err, started, time.monotonic() - t0)
        if how == "timeout":
            return CommandResult(argv, TIMED_OUT, out, err, started, time.monotonic() - t0, True)
        code = self.proc.returncode if self.proc.returncode not in (None, 0) else LOST
        note = b"hdfmgr: the remote session ended before the step's end record\n"
        return CommandResult(argv, code, out, err + note, started, time.monotonic() - t0)

    def _exchange(self, request: Iterable[bytes], reply: Reply, deadline: float) -> str:
        """Write ``request`` and read until ``reply`` is complete: "done", "timeout" or "lost"
        (the channel ended first, or the process could not be written to)."""
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        sel = self._sel
        source = iter(request)
        pending = memoryview(b"")
        feeding = True
        fds = {proc.stdout.fileno(): reply.feed_out, proc.stderr.fileno(): reply.feed_err}
        try:
            for fd in fds:
                sel.register(fd, selectors.EVENT_READ)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            while not reply.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                for key, _ in sel.select(min(left, 1.0)):
                    fd = key.fd
                    if fd in fds:
                        try:
                            chunk = os.read(fd, 65536)
                        except BlockingIOError:
                            continue
                        if chunk:
                            fds[fd](chunk)
                        else:
                            sel.unregister(fd)
                            if not reply.done:
                                self._reap(deadline)
                                return "lost"
                    else:
                        if not pending:
                            chunk = next(source, None)
                            if chunk is None:
                                sel.unregister(fd)
                                feeding = False
                                continue
                            pending = memoryview(chunk)
                        try:
                            written = os.write(fd, pending[:WRITE_CHUNK])
                        except BlockingIOError:
                            continue
                        except (BrokenPipeError, OSError):
                            sel.unregister(fd)
                            pending = memoryview(b"")
                            feeding = False
                            continue
                        pending = pending[written:]
                if reply.done and (pending or (feeding and next(source, None) is not None)):
                    # It answered before taking all its input: never expected.
                    return "lost"
            return "done"
        finally:
            for fd in list(sel.get_map() or {}):
                sel.unregister(fd)

    def _reap(self, deadline: float) -> None:
        """The channel ended: give the ssh client a moment to exit with its status."""
        try:
            self.proc.wait(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """Kill the whole process group (the ssh client and anything it started)."""
        self.broken = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._close_pipes()

    def end_input(self) -> None:
        """End of file to the loop: it exits by itself once its step (if any) is over."""
        self.broken = True
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """End of file to the loop, then kill what is left after ``grace`` seconds."""
        self.end_input()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        self._sel.close()


#: What :meth:`SessionPool._take` returns when a session start failed just now.
FAILED = object()


def transport_failure(result: CommandResult) -> bool:
    """A start that failed because the endpoint could not be reached (or did not answer)."""
    return result.timed_out or result.returncode == LOST


class SessionPool:
    """Warm sessions for one endpoint, shared by the threads that run remote steps.

    A step takes an idle session (or starts one) and gives it back; so there are as many
    sessions as steps ever ran at once: one per transfer slot, one for a listing or a sweep.
    At most ``keep`` idle ones are kept. ``run`` returns None when the step should run as one
    command instead (no session, and none may be started now)."""

    def __init__(
        self,
        argv: Sequence[str],
        loop: str,
        *,
        keep: int,
        backoff_initial: float,
        backoff_max: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.argv = list(argv)
        self.loop = loop.encode("ascii")
        self.keep = keep
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.clock = clock
        self.idle: list[Session] = []
        self.failures = 0  # session starts failed in a row
        self.specific = 0  # ... of them while a plain command reached the endpoint
        self.not_before = 0.0
        self.closed = False
        self.started = 0  # sessions started, for tests and logs
        self.starting = 0  # sessions being started ahead of need (prewarm)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)

    def prewarm(self, count: int | None = None) -> None:
        """Start ``count`` sessions (``keep`` by default, at most :data:`PREWARM_MAX`) at
        once, in the background.

        A daemon starting over a long link would otherwise pay one handshake for its first
        step and then one more, in turn, for each slot's first batch. A step that finds no
        idle session while these start waits for one of them (within its own start budget)
        rather than starting its own."""
        count = min(self.keep if count is None else count, self.keep, PREWARM_MAX)
        with self._lock:
            count -= len(self.idle) + self.starting
            if count <= 0 or self.closed or self.clock() < self.not_before:
                return
            self.starting += count
        for i in range(count):
            try:
                threading.Thread(target=self._start_ahead, name="hdfmgr-session-start", daemon=True).start()
            except RuntimeError:  # no thread to be had: the steps start their own
                with self._lock:
                    self.starting -= count - i
                    self._ready.notify_all()
                return

    def _start_ahead(self) -> None:
        session: Session | None = None
        result: CommandResult | None = None
        try:
            session, result = Session.start(self.argv, self.loop, START_TIMEOUT)
        except Exception:  # the steps start their own; this one is only a head start
            log.exception("starting a warm session ahead failed")
        finally:
            with self._lock:
                self.starting -= 1
                if session is not None and not self.closed:
                    self.started += 1
                    session.last_used = self.clock()
                    self.idle.append(session)
                    log.debug(
                        "warm session %d started ahead (%.2f s)",
                        session.pid,
                        result.duration if result else 0,
                    )
                    session = None
                elif session is None and result is not None:
                    self._failed_start(result)
                self._ready.notify_all()
        if session is not None:
            session.close()

    def _failed_start(self, result: CommandResult) -> float:
        """Count a failed start (the lock held) and set the backoff; the delay in seconds."""
        self.failures += 1
        delay = min(self.backoff_initial * 2 ** (self.failures - 1), self.backoff_max)
        self.not_before = self.clock() + delay
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        log.log(
            level,
            "cannot start a warm session (%s); one command per step for %.0f s",
            result.describe(),
            delay,
        )
        return delay

    def run(
        self,
        program: str,
        args: Sequence[str],
        data: bytes | Feed,
        *,
        timeout: float,
        on_start: Callable[[int], None] | None = None,
    ) -> tuple[CommandResult | None, bool]:
        """The step's result through a session, or None: run it as one command, then say how
        that went with :meth:`fell_back`. The flag: a session start failed just now."""
        session = self._take(min(timeout, START_TIMEOUT))
        if not isinstance(session, Session):
            return None, session is FAILED
        if on_start is not None:
            on_start(session.pid)
        result = session.step(program, args, data, timeout=timeout, describe=args)
        self._give_back(session)
        return result, False

    def fell_back(self, tried: bool, result: CommandResult) -> None:
        """A step ran as one command (``tried``: right after a session failed to start).

        A start that fails while a plain command reaches the endpoint is the session's own
        problem (a template without stdin, a channel limit): its backoff grows. A start that
        failed in an outage is tried again as soon as a plain command gets through."""
        reached = not transport_failure(result) and result.returncode != NOT_STARTED
        with self._lock:
            if tried:
                self.specific = self.specific + 1 if reached else 0
            elif reached and self.failures and not self.specific:
                self.failures = 0
                self.not_before = 0.0

    def _take(self, start_timeout: float) -> Session | object | None:
        budget = start_timeout  # for waiting on starts ahead and for a start of its own
        while True:
            with self._lock:
                if self.closed:
                    return None
                if not self.idle and self.starting:
                    t0 = time.monotonic()
                    self._ready.wait_for(
                        lambda: self.idle or not self.starting or self.closed, timeout=max(0.0, budget)
                    )
                    budget -= time.monotonic() - t0
                    if not self.idle and self.starting:
                        return None  # its start budget spent waiting: one command this time
                if self.closed:
                    return None
                session = self.idle.pop() if self.idle else None
            if session is None:
                break
            if not session.usable():
                session.kill()
                continue
            if self.clock() - session.last_used > PING_AFTER:
                ping = session.step(":", ["hdfmgr-ping"], b"", timeout=min(start_timeout, PING_AFTER))
                if not ping.ok or not session.usable():
                    log.info("warm session %d did not answer (%s); a new one", session.pid, ping.describe())
                    session.kill()
                    continue
            return session
        with self._lock:
            if self.clock() < self.not_before:
                return None
        if budget <= 0:
            return None
        session, result = Session.start(self.argv, self.loop, budget)
        with self._lock:
            if session is None:
                self._failed_start(result)
                return FAILED
            self.failures = self.specific = 0
            self.started += 1
            log.debug("warm session %d started (%.2f s)", session.pid, result.duration)
            if self.closed:
                session.close()
                return None
        return session

    def _give_back(self, session: Session) -> None:
        session.last_used = self.clock()
        with self._lock:
            if session.usable() and not self.closed and len(self.idle) < self.keep:
                self.idle.append(session)
                self._ready.notify()  # a step waiting for a session started ahead takes this one
                return
        if session.usable():
            # Not on the caller's time: the remote shell's exit takes a round trip.
            threading.Thread(target=session.close, name="hdfmgr-session-close", daemon=True).start()
        else:
            session.kill()

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Close every idle session, all at once (a session in use closes when its step ends)."""
        with self._lock:
            self.closed = True
            idle, self.idle = self.idle, []
            self._ready.notify_all()
        for session in idle:
            session.end_input()
        deadline = time.monotonic() + grace
        for session in idle:
            session.close(max(0.0, deadline - time.monotonic()))
