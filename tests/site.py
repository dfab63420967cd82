"""A throwaway handoff site for end-to-end tests: directories, a config, a running daemon.

The daemon runs as a real process (``python -m hdfmgr``) so that signals, exit statuses and
kill -9 behave as in production. Tests wait on polled conditions with deadlines, never on
fixed sleeps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Filenames that must arrive byte-identical and never run anything.
HOSTILE_NAMES = [
    "with space.fits",
    "quote'single.fits",
    'quote"double.fits',
    "$(touch PWNED).fits",
    "`touch PWNED`.fits",
    "semi;colon|pipe&amp.fits",
    "glob*?[a].fits",
    "-leading-dash.fits",
    "--option=like.fits",
    "{dest} {file} {batch}.fits",
    "new\nline.fits",
    "tab\there.fits",
    "colon:in:name.fits",
    os.fsdecode(b"non-utf8-\xff\xfe.fits"),
    "ünïcödé.fits",
]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


@dataclass
class Site:
    root: Path
    #: database.engine; None: a SQLite file in the site (``db_path``, which ``query`` reads).
    engine: str | None = None
    buffer: Path = field(init=False)
    holding: Path = field(init=False)
    ep_buffer: Path = field(init=False)
    staging: Path = field(init=False)
    config_path: Path = field(init=False)
    db_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.buffer = self.root / "buffer"
        self.holding = self.root / "holding"
        self.ep_buffer = self.root / "endpoint" / "buffer"
        self.staging = self.root / "endpoint" / "staging"
        for d in (self.buffer, self.holding, self.ep_buffer, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "config.yaml"
        self.db_path = self.root / "handoff.db"
        self.configure()

    def configure(
        self,
        *,
        transfer: str = "cp {batch} {dest}",
        remote: str = 'sh -c "{command}"',
        params: dict[str, Any] | None = None,
        logging: dict[str, Any] | None = None,
        database: dict[str, Any] | None = None,
        **general: Any,
    ) -> Path:
        """Write the config in the seed's format; ``general`` overrides general.* keys."""
        general = {"settle": 0.05, "stable_age": 0.5, "retry_initial": 0.2, "retry_max": 2.0, **general}
        data = {
            "handoff": {"buffer": str(self.buffer), "holding": str(self.holding)},
            "endpoint": {
                "buffer": str(self.ep_buffer),
                "staging": str(self.staging),
                "commands": {"transfer": transfer, "remote": remote},
                **(params or {}),
            },
            "database": {"engine": self.engine or f"sqlite:///{self.db_path}", **(database or {})},
            "logging": {"level": "DEBUG", **(logging or {})},
            "general": general,
        }
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.config_path

    # ------------------------------------------------------------------ files

    def write(self, rel: str | bytes, data: bytes) -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(self.buffer), os.fsencode(rel))))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def write_many(self, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            self.write(rel, data)

    def files_under(self, top: Path) -> dict[str, bytes]:
        out = {}
        for dirpath, _dirs, names in os.walk(top):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, top)
                if rel == ".hdfmgr.lock" or rel.startswith(".hdfmgr-send/"):
                    continue  # the lock, and the pins of batches in flight (hdfmgr.pin)
                try:
                    with open(full, "rb") as f:
                        out[rel] = f.read()
                except FileNotFoundError:
                    continue  # moved away while we looked (to holding, by a consumer)
        return out

    def delivered(self) -> dict[str, bytes]:
        return self.files_under(self.ep_buffer)

    def held(self) -> dict[str, bytes]:
        return self.files_under(self.holding)

    def waiting(self) -> dict[str, bytes]:
        return self.files_under(self.buffer)

    # ------------------------------------------------------------------ database

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    def states(self) -> dict[str, str]:
        rows = self.query("select relpath, state from files order by id")
        return {os.fsdecode(bytes(r[0])): r[1] for r in rows}

    # ------------------------------------------------------------------ processes

    def hdfmgr(
        self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hdfmgr", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            cwd=self.root,
        )

    def start(
        self,
        *,
        env: dict[str, str] | None = None,
        command: str = "run",
        wait: bool = True,
        wrap: Iterable[str] = (),
    ) -> Daemon:
        """Start the daemon (``wrap``: a command prefix, such as ``setpriv`` dropping a capability)."""
        log = open(self.root / f"daemon-{time.monotonic_ns()}.log", "w+b")  # noqa: SIM115
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "hdfmgr", command, str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        daemon = Daemon(proc, log)
        STARTED.append(daemon)
        if not wait:
            return daemon
        wait_for(lambda: daemon.started() or proc.poll() is not None, 30, "daemon start")
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early ({proc.returncode}):\n{daemon.output()}")
        return daemon


#: Every daemon a test started; conftest kills what a failed test left running.
STARTED: list[Daemon] = []


def kill_leftovers() -> None:
    while STARTED:
        daemon = STARTED.pop()
        if daemon.proc.poll() is None:
            daemon.kill()
        daemon.close()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Any
    _final: str = ""

    def output(self) -> str:
        if self.log.closed:
            return self._final
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def started(self) -> bool:
        return "started:" in self.output()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            output = self.output()
            self.kill()
            raise AssertionError(f"daemon did not stop on SIGTERM:\n{output}") from None
        finally:
            self.close()

    def close(self) -> None:
        if not self.log.closed:
            self._final = self.output()
            self.log.close()

    def kill(self) -> None:
        """kill -9 the daemon and every process it started (its whole session).

        The daemon runs each command in a process group of its own, so killing the daemon's
        group is not enough: everything in its session goes, as in a power cut.
        """
        for pid in session_members(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.close()


def session_members(sid: int) -> list[int]:
    """Pids whose session id is ``sid`` (the daemon first)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            members.append(int(entry))
    return sorted(members, key=lambda p: p != sid)


def slow_mv(shims: Path, seconds: float, started: Path | None = None) -> Path:
    """Write ``shims/mv``: the real ``mv`` after ``seconds`` (touching ``started`` first, when
    given), for a commit script that must still be moving files at a chosen moment. Returns
    ``shims``, to put in front of a PATH."""
    shims.mkdir(exist_ok=True)
    touch = f"touch {started}\n" if started is not None else ""
    (shims / "mv").write_text(f'#!/bin/sh\n{touch}sleep {seconds}\nexec {shutil.which("mv")} "$@"\n')
    (shims / "mv").chmod(0o755)
    return shims


def content(name: str) -> bytes:
    """Deterministic content, so any copy can be checked against its name alone."""
    seed = hashlib.blake2b(name.encode()).digest()
    size = 1000 + int.from_bytes(seed[:2], "big") * 4
    return (seed * (size // len(seed) + 1))[:size]


class Consumer(threading.Thread):
    """The endpoint manager: ingests and removes each file as soon as it appears."""

    def __init__(self, root: Path, expect: Callable[[str], bytes | None] = content) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.expect = expect
        self.arrivals: list[str] = []
        self.bad: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for dirpath, _dirs, names in os.walk(self.root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, self.root)
                    try:
                        data = Path(path).read_bytes()
                    except FileNotFoundError:
                        continue
                    if data != self.expect(rel):
                        self.bad.append(rel)
                    self.arrivals.append(rel)
                    os.unlink(path)
            self.stop_event.wait(0.002)  # a polling consumer's pace; leaves the CPU to the daemon
