"""A measured site (buffer, holding, endpoint staging and buffer, database, configuration),
the daemon under test, and a transport's two command templates."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .util import now

#: A camera: ``(site, expected digests to fill in, on_close(rel, t))`` -> close time per file.
Writer = Callable[["Site", dict[str, str], Callable[[str, float], None]], dict[str, float]]


@dataclass
class Transport:
    """How files travel: the seed-format command templates plus parameters (``params`` go into
    the ``endpoint`` section beside them, so a transport may also set other keys there)."""

    name: str
    transfer: str
    remote: str
    params: dict[str, Any] = field(default_factory=dict)
    family: str = "local"  # which floor it is compared with
    cpath: str | None = None  # ControlPath of a shared connection, to close after a run
    server: Any = None  # the sshd as the client reaches it (directly or through a relay)
    rtt_ms: float = 0.0  # the emulated round trip, 0 on loopback
    general: dict[str, Any] = field(default_factory=dict)  # general.* keys the transport sets

    def commands(self) -> dict[str, str]:
        """The ``endpoint.commands`` section: a transport without a transfer command (say, a
        built-in stream through the remote command) leaves ``transfer`` out."""
        commands = {"remote": self.remote}
        if self.transfer:
            commands = {"transfer": self.transfer, **commands}
        return commands


@dataclass
class Site:
    root: Path

    def __post_init__(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        for d in (self.buffer, self.holding, self.ep_buffer, self.staging):
            d.mkdir(parents=True)

    @property
    def buffer(self) -> Path:
        return self.root / "buffer"

    @property
    def holding(self) -> Path:
        return self.root / "holding"

    @property
    def ep_buffer(self) -> Path:
        return self.root / "endpoint" / "buffer"

    @property
    def staging(self) -> Path:
        return self.root / "endpoint" / "staging"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def db(self) -> Path:
        return self.root / "handoff.db"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    def configure(self, transport: Transport, *, level: str = "INFO", **general: Any) -> None:
        """The seed's format; everything not given stays at its default."""
        import yaml

        data: dict[str, Any] = {
            "handoff": {"buffer": str(self.buffer), "holding": str(self.holding)},
            "endpoint": {
                "buffer": str(self.ep_buffer),
                "staging": str(self.staging),
                "commands": transport.commands(),
                **transport.params,
            },
            "database": {"engine": f"sqlite:///{self.db}"},
            "logging": {"level": level},
        }
        general = {**transport.general, **general}
        if general:
            data["general"] = general
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))

    def count_or_zero(self, sql: str) -> int:
        """A count, or 0 while the daemon has not created its tables yet."""
        try:
            return int(self.query(sql)[0][0])
        except sqlite3.OperationalError:
            return 0

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as conn:
            return conn.execute(sql).fetchall()


class Daemon:
    """``hdfmgr-watch`` as a subprocess, its log in a file."""

    def __init__(self, site: Site, env: dict[str, str]) -> None:
        self.site = site
        self._log = open(site.log, "ab")  # noqa: SIM115 - closed in stop()
        exe = Path(sys.executable).parent / "hdfmgr-watch"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "hdfmgr", "run"]
        self.wall0 = time.time()
        self.t0 = now()
        self.proc = subprocess.Popen(
            [*argv, str(site.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=site.root,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.site.log.read_text(errors="replace")

    def started_at(self) -> float | None:
        """Seconds from process start to the 'started:' log line (log timestamps, ms)."""
        for line in self.output().splitlines():
            if " started: " in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return stamp - self.wall0
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(10)
        self._log.close()
        return code
