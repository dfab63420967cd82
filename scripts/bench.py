#!/usr/bin/env python3
"""Benchmark hdfmgr against the bulk-copy floor, the naive per-file way and lsyncd.

Run it through ``scripts/bench`` (which provides the project's virtualenv)::

    scripts/bench --quick        small sizes, one repetition, correctness only (< 1 minute)
    scripts/bench                the full run; writes docs/benchmarks.md
    scripts/bench --only backlog,trickle --reps 5

Every measurement starts from a fresh site (buffer, holding, endpoint staging and buffer,
SQLite database, a configuration in the seed's format) and starts the real ``hdfmgr-watch`` as a
subprocess. The sites live on /dev/shm when it is a tmpfs (``--sites`` to choose): on a shared
disk, the disk's noise would swamp the ratios. A drain is timed from the moment the process is started to
the moment the last file is in the endpoint buffer *and* out of the local buffer.

The references run in the same invocation on the same files:

* floor: one ``rsync -a`` (or ``cp -r``, ``scp -r``) of the whole tree into staging plus one
  ``mv`` (over ssh: one ``ssh ... mv``). No verification, no records, no holding.
* naive: one transfer and one remote ``mv`` per file, as a simple polling manager works, then
  a local rename into holding. Capped in time; a capped run is extrapolated from its rate and
  marked so.
* lsyncd (when installed): ``default.rsync`` with ``delay = 1`` into the endpoint buffer. It
  does not move files to holding; only arrival is compared.
* bound (small-file backlog): the per-file work the local target includes and nothing else
  (``BOUND_SCRIPT``), in one process. Its CPU time divided by the cores is the least time any
  tool doing that work could take here; hdfmgr runs also record their own CPU time and the
  consumer's, which shares the cores with them.
* ideal rsync+share (small-file backlog): the ssh target's work as a bare pipeline
  (``IDEAL_SSH_METHOD``), timed end to end: what the 1.5x target leaves for a daemon.

Every figure is reported as a ratio to the floor of the same run. A consumer watches the
endpoint buffer with inotify: one thread stamps each file as it appears (the arrival times),
and for hdfmgr runs a second one reads and hashes every arrived file at once: a file that is
not byte-identical then counts as "partial seen", and one written in place as such.

Results: one JSON line per measurement on stdout and in ``bench-out/results.jsonl``; a Markdown
report (``docs/benchmarks.md``, or ``bench-out/benchmarks-quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import queue
import re
import select
import shlex
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for tests.sshd_fixture; hdfmgr itself comes from the snapshot

KiB = 1024
MiB = 1024 * KiB

#: A camera: ``(site, expected digests to fill in, on_close(rel, t))`` -> close time per file.
Writer = Callable[["Site", dict[str, str], Callable[[str, float], None]], dict[str, float]]

#: Commands the PATH shim counts (hdfmgr runs the local "remote" script via ``sh -c``).
SHIMMED = ("cp", "sh", "scp", "ssh", "rsync", "mv", "false")

#: ssh client options: ignore ~/.ssh/config, pin the sshd's host key, never prompt.
SSH_OPTS = (
    "-F /dev/null -o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null"
    " -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes -o LogLevel=ERROR"
)
SHARE = " -o ControlMaster=auto -o ControlPath={cpath} -o ControlPersist=120"


# ====================================================================== small helpers


def now() -> float:
    return time.monotonic()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> Any:
    """Poll ``predicate`` until truthy; return its value, or None after ``timeout`` s."""
    deadline = now() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if now() > deadline:
            return None
        time.sleep(interval)


def count_files(top: Path) -> int:
    n = 0
    for _dirpath, _dirs, names in os.walk(top):
        n += len(names)
    return n


def has_files(top: Path) -> bool:
    """Whether any file is left under ``top``; stops at the first one.

    The drain's end is polled every few milliseconds while the daemon's last holding moves run
    on the same cores: a full walk of a 10,000-file tree per poll would load them itself.
    """
    stack = [str(top)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    return True
    return False


def b2(data: bytes) -> str:
    return hashlib.blake2b(data).hexdigest()


def b2_file(path: str) -> str:
    """Bare ``os.read``: on 4 KiB files the cheapest way (the consumer's CPU counts, see BOUND_SCRIPT)."""
    digest = hashlib.blake2b()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, MiB):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a running process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time of a live process and of the children it has waited for (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def run_quiet(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, **kw)


def must(argv: list[str], **kw: Any) -> None:
    result = run_quiet(argv, **kw)
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
        )


# ====================================================================== inotify consumer

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


# ====================================================================== sites and daemons


@dataclass
class Transport:
    """How files travel: the two seed-format command templates plus parameters."""

    name: str
    transfer: str
    remote: str
    params: dict[str, Any] = field(default_factory=dict)
    family: str = "local"  # which floor it is compared with
    cpath: str | None = None  # ControlPath of a shared connection, to close after a run


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
                "commands": {"transfer": transport.transfer, "remote": transport.remote},
                **transport.params,
            },
            "database": {"engine": f"sqlite:///{self.db}"},
            "logging": {"level": level},
        }
        if general:
            data["general"] = general
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))

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


# ====================================================================== the run context


@dataclass
class Sizes:
    backlog_dirs: int
    backlog_per_dir: int
    backlog_size: int
    big_count: int
    big_size: int
    trickle_rates: tuple[float, ...]
    trickle_seconds: float
    trickle_size: int
    scale_dirs: int
    scale_per_dir: int
    naive_cap: float  # seconds a naive run may take before it is extrapolated


FULL = Sizes(100, 100, 4 * KiB, 20, 64 * MiB, (20.0, 200.0), 30.0, 64 * KiB, 100, 1000, 20.0)
QUICK = Sizes(5, 40, 4 * KiB, 2, 2 * MiB, (20.0,), 3.0, 64 * KiB, 4, 250, 2.0)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.sizes = QUICK if self.quick else FULL
        self.reps: int = args.reps or (1 if self.quick else 3)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        # The big workload keeps a tree and one site (buffer + endpoint copies) at a time.
        need = 3 * self.sizes.big_count * self.sizes.big_size + 512 * MiB
        self.sites = Path(args.sites).resolve() if args.sites else default_sites(self.out, need)
        self.sites.mkdir(parents=True, exist_ok=True)
        # Sites, the generated trees (hard-linked into each buffer) and the code snapshot.
        self.work = Path(tempfile.mkdtemp(prefix="hdfmgr-bench-", dir=self.sites))
        self.cache = self.work / "cache"
        self.results: list[dict[str, Any]] = []
        self.results_file = open(self.out / "results.jsonl", "w")  # noqa: SIM115 - closed in close()
        self.failures: list[str] = []
        self.sshd: Any = None
        self.base_env = dict(os.environ)
        self.base_env["PATH"] = os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
        )
        self.code = self._snapshot_code()
        self.shim_dir = self._make_shims()
        self.lsyncd = shutil.which("lsyncd")
        self.ctl_dir = Path(tempfile.mkdtemp(prefix="hdfb", dir="/tmp"))  # short: socket paths

    # -- bookkeeping

    def record(self, **row: Any) -> dict[str, Any]:
        self.results.append(row)
        line = json.dumps(row, sort_keys=True)
        print(line, flush=True)
        self.results_file.write(line + "\n")
        self.results_file.flush()
        return row

    def discard(self, site: Site) -> None:
        """Remove a measured site (the large workload leaves 1.3 GB per run behind)."""
        if not self.args.keep:
            shutil.rmtree(site.root, ignore_errors=True)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"CORRECTNESS FAILURE: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.results_file.close()
        if self.sshd is not None:
            self.sshd.stop()
        shutil.rmtree(self.ctl_dir, ignore_errors=True)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- environment

    def _snapshot_code(self) -> dict[str, Any]:
        """Freeze the hdfmgr package for the whole run: others may commit while it runs.

        Every daemon, the database-count helper and the hashing comparison import this copy
        (``PYTHONPATH`` comes before the editable install), so all repetitions measure one version.
        """
        code = self.work / "code"
        shutil.copytree(ROOT / "hdfmgr", code / "hdfmgr", ignore=shutil.ignore_patterns("__pycache__"))
        # Compiled, as an installation leaves it (pip byte-compiles what it installs): with
        # PYTHONDONTWRITEBYTECODE set, every daemon would otherwise compile the package anew.
        if not compileall.compile_dir(str(code), quiet=1):
            raise RuntimeError(f"cannot byte-compile the snapshot in {code}")
        self.base_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(code), os.environ.get("PYTHONPATH")) if p
        )
        sys.path.insert(0, str(code))
        probe = subprocess.run(
            [sys.executable, "-c", "import hdfmgr; print(hdfmgr.__file__)"],
            capture_output=True, text=True, env=self.base_env, check=True, cwd=self.work,
        )  # fmt: skip
        if not probe.stdout.strip().startswith(str(code)):
            raise RuntimeError(f"the daemon would not run the snapshot: {probe.stdout.strip()}")

        def git(*args: str) -> str:
            out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
            return out.stdout.rstrip()

        modified = [line[3:] for line in git("status", "--porcelain", "--", "hdfmgr").splitlines()]
        started = datetime.now().strftime("%Y-%m-%d %H:%M")
        return {"commit": git("rev-parse", "--short", "HEAD"), "modified": modified, "started": started}

    def _make_shims(self) -> Path:
        """Wrappers that append ``name ppid`` to a counter file and exec the real binary."""
        shim = self.out / "shim"
        shim.mkdir(exist_ok=True)
        for name in SHIMMED:
            real = shutil.which(name)
            if real is None:
                continue
            script = shim / name
            script.write_text(
                "#!/bin/sh\n"
                f'printf \'%s %s\\n\' {name} "$PPID" >> "$HDFMGR_BENCH_COUNTER"\n'
                f'exec {shlex.quote(real)} "$@"\n'
            )
            script.chmod(0o755)
        return shim

    def env(self, counter: Path | None) -> dict[str, str]:
        env = dict(self.base_env)
        if counter is not None:
            env["PATH"] = os.pathsep.join([str(self.shim_dir), env["PATH"]])
            env["HDFMGR_BENCH_COUNTER"] = str(counter)
        return env

    def ssh(self) -> Any:
        if self.sshd is None:
            from tests.sshd_fixture import start_sshd

            workdir = self.out / "sshd"
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir()
            self.sshd = start_sshd(workdir)
        return self.sshd

    def ssh_params(self, share: bool) -> dict[str, Any]:
        server = self.ssh()
        params = {
            "user": server.user,
            "host": server.host,
            "port": server.port,
            "key": str(server.key),
            "known_hosts": str(server.known_hosts),
        }
        if share:
            params["cpath"] = str(self.ctl_dir / "cm-%C")
        return params

    def transport(self, name: str) -> Transport:
        if name == "local":
            return Transport("local", "cp {batch} {dest}", 'sh -c "{command}"')
        share = name.endswith("+share")
        opts = SSH_OPTS + (SHARE if share else "")
        params = self.ssh_params(share)
        remote = "ssh -p {port} -i {key} " + opts + ' {user}@{host} "{command}"'
        cpath = params.get("cpath")
        if name.startswith("scp"):
            transfer = "scp -Bpq -P {port} -i {key} " + opts + " {batch} {user}@{host}:{dest}"
            return Transport(name, transfer, remote, params, "scp", cpath)
        transfer = 'rsync -a -e "ssh -p {port} -i {key} ' + opts + '" {batch} {user}@{host}:{dest}'
        return Transport(name, transfer, remote, params, "rsync-ssh", cpath)

    def close_shared(self, transport: Transport) -> None:
        """End a ControlPersist master so that it does not outlive its run."""
        if transport.cpath is not None:
            self.close_master(transport.cpath)

    def close_master(self, cpath: str) -> None:
        server = self.ssh()
        argv = ["ssh", "-o", f"ControlPath={cpath}", "-O", "exit", "-p", str(server.port), server.destination]
        run_quiet(argv, timeout=10)

    def share_options(self) -> list[str]:
        cpath = f"{self.ctl_dir}/cm-%C"
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={cpath}", "-o", "ControlPersist=120"]

    def ssh_argv(self, share: bool) -> list[str]:
        server = self.ssh()
        argv = ["ssh", "-p", str(server.port), "-i", str(server.key), *server.ssh_options]
        return argv + (self.share_options() if share else [])

    def remote_command_cost(self) -> dict[str, float]:
        """Seconds per ``ssh host true`` (median of 5), with and without a shared connection.

        Every remote command pays the remote login shell's start-up (here root's ~/.bashrc).
        """
        server = self.ssh()
        costs = {}
        for share in (False, True):
            argv = [*self.ssh_argv(share), "--", server.destination, "true"]
            must(argv)  # a master, when shared, is up before the timing
            times = []
            for _ in range(5):
                t0 = now()
                must(argv, stdin=subprocess.DEVNULL)
                times.append(now() - t0)
            costs["shared_seconds" if share else "new_connection_seconds"] = round(
                statistics.median(times), 3
            )
        self.close_master(f"{self.ctl_dir}/cm-%C")
        return costs

    # -- data

    def cached_tree(self, name: str, dirs: int, per_dir: int, size: int) -> tuple[Path, dict[str, str]]:
        """A tree of random files made once per bench run; runs hard-link it into a buffer."""
        top = self.cache / name
        manifest = self.cache / f"{name}.json"
        if manifest.exists() and top.exists():
            return top, json.loads(manifest.read_text())
        if top.exists():
            shutil.rmtree(top)
        expected: dict[str, str] = {}
        for d in range(dirs):
            directory = top / (f"night{d:03d}" if dirs > 1 else "night")
            directory.mkdir(parents=True)
            for i in range(per_dir):
                # Unique across directories, as a camera's names are (they carry the
                # observation id): batches may then span directories.
                rel = f"{directory.name}/img{d:03d}_{i:05d}.fits"
                digest = hashlib.blake2b()
                with open(top / rel, "wb") as f:
                    left = size
                    while left:
                        chunk = os.urandom(min(left, 4 * MiB))
                        digest.update(chunk)
                        f.write(chunk)
                        left -= len(chunk)
                expected[rel] = digest.hexdigest()
        manifest.write_text(json.dumps(expected))
        return top, expected

    @staticmethod
    def link_tree(src: Path, expected: dict[str, str], dst: Path) -> None:
        for rel in expected:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(src / rel, target)

    # ================================================================== measurements

    def run_hdfmgr(
        self,
        workload: str,
        transport: Transport,
        rep: int,
        *,
        tree: tuple[Path, dict[str, str]] | None = None,
        writer: Writer | None = None,
        count: bool = False,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """One hdfmgr drain (``tree``) or trickle (``writer``) on a fresh site."""
        tag = f"{workload}-hdfmgr-{transport.name}-{rep}{'-count' if count else ''}"
        site = Site(self.work / tag)
        site.configure(transport)
        expected: dict[str, str] = {}
        if tree is not None:
            self.link_tree(tree[0], tree[1], site.buffer)
            expected.update(tree[1])
        else:
            (site.buffer / "night").mkdir()
        counter = site.root / "spawned.txt" if count else None
        if counter is not None:
            counter.touch()
        watcher = ArrivalWatcher(site.ep_buffer, expected, ingest=True)
        watcher.start()
        daemon = Daemon(site, self.env(counter))
        closed: dict[str, float] = {}
        backlog: list[tuple[float, int]] = []
        try:
            if writer is not None:
                if not wait_until(daemon.started_at, 30, 0.02):
                    raise RuntimeError(f"daemon did not start:\n{daemon.output()}")
                sampler = BacklogSampler(watcher)
                sampler.start()
                closed.update(writer(site, expected, sampler.note_close))
                sampler.stop()
                backlog = sampler.samples
            watcher.expect(len(expected))
            arrived = watcher.complete.wait(timeout)
            t_arrived = max(watcher.arrivals.values()) if watcher.arrivals else now()
            emptied = wait_until(lambda: not has_files(site.buffer) and now(), timeout if arrived else 1)
            rss = vm_hwm_kib(daemon.pid)
            cpu = process_cpu_seconds(daemon.pid)
            started = daemon.started_at()
        finally:
            code = daemon.stop()
            watcher.stop()
            self.close_shared(transport)
        t_end = max(t_arrived, emptied or now())
        elapsed = t_end - daemon.t0
        row: dict[str, Any] = {
            "workload": workload,
            "method": f"hdfmgr {transport.name}",
            "transport": transport.name,
            "family": transport.family,
            "rep": rep,
            "files": len(expected),
            "bytes": sum(
                os.path.getsize(site.holding / rel) for rel in expected if (site.holding / rel).exists()
            ),
            "seconds": round(elapsed, 4),
            "arrival_seconds": round(t_arrived - daemon.t0, 4),
            "startup_seconds": round(started, 3) if started is not None else None,
            "peak_rss_mb": round(rss / 1024, 1) if rss else None,
            "cpu_seconds": round(cpu, 3) if cpu is not None else None,
            "consumer_cpu_seconds": round(watcher.cpu_seconds, 3),
            "exit_status": code,
            "shimmed": count,
        }
        if closed:
            lat = [watcher.arrivals[rel] - t for rel, t in closed.items() if rel in watcher.arrivals]
            if lat:
                row.update(
                    latency_p50=round(percentile(lat, 50), 4),
                    latency_p95=round(percentile(lat, 95), 4),
                    latency_max=round(max(lat), 4),
                    drain_after_last_close=round(t_arrived - max(closed.values()), 4),
                    backlog_slope=round(slope(backlog), 3) if len(backlog) > 4 else None,
                    backlog_max=max((b for _, b in backlog), default=0),
                )
        batches = site.query("select count(*), coalesce(sum(files), 0) from batches")[0]
        row["batches"] = batches[0]
        if counter is not None:
            row.update(spawn_counts(counter.read_text(), daemon.pid, batches[0], len(expected)))
            row.update(steady_commands(site))
        row.update(self.check_delivery(site, expected, watcher, arrived=arrived, emptied=bool(emptied)))
        if row["problems"]:
            self.fail(f"{tag}: {'; '.join(row['problems'])}")
        self.discard(site)
        return self.record(**row)

    def check_delivery(
        self, site: Site, expected: dict[str, str], watcher: ArrivalWatcher, *, arrived: bool, emptied: bool
    ) -> dict[str, Any]:
        """Byte-identical at the endpoint, never partial for the consumer, all in holding."""
        problems = []
        if not arrived:
            problems.append(f"only {watcher.count()} of {len(expected)} files arrived")
        if not emptied:
            problems.append(f"{count_files(site.buffer)} file(s) left in the buffer")
        if watcher.partial:
            problems.append(f"{len(watcher.partial)} file(s) partial or wrong when they appeared")
        if watcher.unexpected:
            problems.append(f"unexpected files in the endpoint buffer: {watcher.unexpected[:3]}")
        if watcher.in_place:
            problems.append(f"{watcher.in_place} file(s) written in place in the endpoint buffer")
        if watcher.overflow:
            problems.append("inotify queue overflow in the consumer")
        at_endpoint = {
            os.path.relpath(os.path.join(d, n), site.ep_buffer)
            for d, _, names in os.walk(site.ep_buffer)
            for n in names
        }
        if at_endpoint != set(expected):
            problems.append(
                f"endpoint buffer differs: {len(set(expected) - at_endpoint)} missing, "
                f"{len(at_endpoint - set(expected))} extra"
            )
        # The consumer hashed every file as it appeared; hash a sample again now.
        for rel in sorted(expected)[:: max(1, len(expected) // 50)]:
            path = site.ep_buffer / rel
            if path.exists() and b2_file(str(path)) != expected[rel]:
                problems.append(f"{rel} differs at the endpoint")
        missing_held = [rel for rel in expected if not (site.holding / rel).exists()]
        if missing_held:
            problems.append(f"{len(missing_held)} file(s) not in holding")
        staged = [n for _, _, names in os.walk(site.staging) for n in names]
        if staged:
            problems.append(f"{len(staged)} file(s) left in staging")
        states = dict(site.query("select state, count(*) from files group by state"))
        if states.get("held", 0) != len(expected) or len(states) != 1:
            problems.append(f"database states {states}, expected {len(expected)} held")
        return {"ok": not problems, "problems": problems}

    # -- references

    def finish_reference(
        self, site: Site, tag: str, problems: list[str], elapsed: float, **row: Any
    ) -> dict[str, Any]:
        """Report a reference run's problems, remove its site and record its row."""
        if problems:
            self.fail(f"{tag}: {problems[0]}")
        self.discard(site)
        return self.record(**row, seconds=round(elapsed, 4), ok=not problems, problems=problems)

    def run_floor(
        self, workload: str, family: str, rep: int, tree: tuple[Path, dict[str, str]]
    ) -> dict[str, Any]:
        """One bulk copy of the tree into staging, then one mv into the endpoint buffer."""
        tag = f"{workload}-floor-{family}-{rep}"
        site = Site(self.work / tag)
        self.link_tree(tree[0], tree[1], site.buffer)
        dest = site.staging / "floor"
        top = sorted(os.listdir(site.buffer))
        watcher = ArrivalWatcher(site.ep_buffer)
        watcher.start()
        watcher.expect(len(tree[1]))
        t0 = now()
        if family == "rsync":
            must(["rsync", "-a", f"{site.buffer}/", f"{dest}/"])
            must(["mv", "-t", str(site.ep_buffer), *(str(dest / t) for t in top)])
        elif family == "cp":
            must(["cp", "-r", str(site.buffer), str(dest)])
            must(["mv", "-t", str(site.ep_buffer), *(str(dest / t) for t in top)])
        else:
            server = self.ssh()
            if family == "rsync-ssh":
                must(["rsync", "-a", "-e", server.rsync_rsh(), f"{site.buffer}/", server.remote(f"{dest}/")])
            else:  # scp
                must(["scp", "-rq", *server.scp_options(), str(site.buffer), server.remote(dest)])
            mv = shlex.join(["mv", "-t", str(site.ep_buffer), *(str(dest / t) for t in top)])
            must([*self.ssh_argv(False), "--", f"{server.user}@{server.host}", mv])
        arrived = watcher.complete.wait(60)
        elapsed = (max(watcher.arrivals.values()) if watcher.arrivals else now()) - t0
        watcher.stop()
        problems = [] if arrived else [f"only {watcher.count()} of {len(tree[1])} arrived"]
        return self.finish_reference(
            site, tag, problems, elapsed, workload=workload, method=f"floor {family}", family=family,
            rep=rep, files=len(tree[1]),
        )  # fmt: skip

    def run_bound(self, workload: str, rep: int, tree: tuple[Path, dict[str, str]]) -> dict[str, Any]:
        """The mandatory work alone (BOUND_SCRIPT): its wall time, and its CPU time per core."""
        tag = f"{workload}-bound-{rep}"
        site = Site(self.work / tag)
        self.link_tree(tree[0], tree[1], site.buffer)
        t0 = now()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                BOUND_SCRIPT,
                str(site.buffer),
                str(site.staging),
                str(site.ep_buffer),
                str(site.holding),
                str(site.root / "bound.db"),
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = now() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime  # the children's too: cp was waited for
        problems = [] if proc.returncode == 0 else [f"exit status {proc.returncode}"]
        arrived = count_files(site.ep_buffer)
        if arrived != len(tree[1]):
            problems.append(f"{arrived} of {len(tree[1])} in the endpoint buffer")
        cores = os.cpu_count() or 1
        return self.finish_reference(
            site, tag, problems, elapsed, workload=workload, method=BOUND_METHOD, family="rsync",
            rep=rep, files=len(tree[1]), cpu_seconds=round(cpu, 4), cores=cores,
            cpu_per_core_seconds=round(cpu / cores, 4), **(json.loads(out) if proc.returncode == 0 else {}),
        )  # fmt: skip

    def run_ideal_ssh(self, workload: str, rep: int, tree: tuple[Path, dict[str, str]]) -> dict[str, Any]:
        """The ssh target's mandatory work as a bare pipeline, timed end to end (IDEAL_SSH_METHOD)."""
        tag = f"{workload}-ideal-{rep}"
        site = Site(self.work / tag)
        self.link_tree(tree[0], tree[1], site.buffer)
        server = self.ssh()
        buffer, holding, ep = str(site.buffer), str(site.holding), str(site.ep_buffer)
        rels = sorted(tree[1])
        halves = (rels[: len(rels) // 2], rels[len(rels) // 2 :])
        slots = [f"{site.staging}/ideal.{i}" for i in range(2)]
        tops = sorted({os.path.dirname(r) for r in rels})
        rows: list[tuple[str, int, str]] = []
        t0 = now()

        def hash_all() -> None:
            for r in rels:
                path = f"{buffer}/{r}"
                rows.append((r, os.lstat(path).st_size, b2_file(path)))

        hasher = threading.Thread(target=hash_all)
        hasher.start()
        rsh = shlex.join(self.ssh_argv(True))
        copies = [
            subprocess.Popen(
                ["rsync", "-a", "-e", rsh, *(f"{buffer}/{r}" for r in half), server.remote(f"{slot}/")],
                stderr=subprocess.PIPE,
            )
            for slot, half in zip(slots, halves, strict=True)
        ]
        problems = [f"rsync: {p.communicate()[1][-300:]!r}" for p in copies if p.wait() != 0]
        script = ["mkdir -p -- " + " ".join(shlex.quote(f"{ep}/{t}") for t in tops)]
        for slot, half in zip(slots, halves, strict=True):
            by_top: dict[str, list[str]] = {}
            for r in half:
                by_top.setdefault(os.path.dirname(r), []).append(f"{slot}/{os.path.basename(r)}")
            script += [shlex.join(["mv", "-t", f"{ep}/{top}", "--", *paths]) for top, paths in by_top.items()]
        script.append(shlex.join(["find", ep, "-type", "f", "-printf", "%s %p\\0"]) + " >/dev/null")
        commit = subprocess.run(
            [*self.ssh_argv(True), "--", server.destination, "sh"],
            input="\n".join(script).encode(),
            capture_output=True,
            check=False,
        )
        if commit.returncode != 0:
            problems.append(f"commit: {commit.stderr[-300:]!r}")
        hasher.join()
        for top in tops:
            os.makedirs(f"{holding}/{top}", exist_ok=True)
        for r in rels:
            os.rename(f"{buffer}/{r}", f"{holding}/{r}")
        con = sqlite3.connect(site.root / "ideal.db")
        con.execute("create table files (name text primary key, size integer, checksum text)")
        with con:
            con.executemany("insert into files values (?, ?, ?)", rows)
        con.close()
        elapsed = now() - t0
        self.close_master(f"{self.ctl_dir}/cm-%C")
        arrived = count_files(site.ep_buffer)
        if arrived != len(rels):
            problems.append(f"{arrived} of {len(rels)} in the endpoint buffer")
        return self.finish_reference(
            site, tag, problems, elapsed, workload=workload, method=IDEAL_SSH_METHOD, family="rsync-ssh",
            rep=rep, files=len(rels),
        )  # fmt: skip

    def run_naive(
        self, workload: str, family: str, rep: int, tree: tuple[Path, dict[str, str]], *, share: bool = False
    ) -> dict[str, Any]:
        """Per file: one transfer into staging, one remote mkdir+mv, one local rename to holding."""
        name = f"naive {family}{' +share' if share else ''}"
        tag = f"{workload}-naive-{family}{'-share' if share else ''}-{rep}"
        site = Site(self.work / tag)
        self.link_tree(tree[0], tree[1], site.buffer)
        cap = self.sizes.naive_cap
        rels = sorted(tree[1])
        server = self.ssh() if family != "local" else None
        if server is not None:
            ssh = [*self.ssh_argv(share), "--", f"{server.user}@{server.host}"]
            scp = ["scp", "-Bpq", *server.scp_options(), *(self.share_options() if share else [])]
        done = 0
        t0 = now()
        for rel in rels:
            src = site.buffer / rel
            tmp = site.staging / rel.replace("/", "%")
            final_dir = site.ep_buffer / os.path.dirname(rel)
            d, t = shlex.quote(str(final_dir)), shlex.quote(str(tmp))
            mv = f"mkdir -p {d} && mv {t} {d}/"
            if server is None:
                must(["cp", str(src), str(tmp)])
                must(["sh", "-c", mv])
            else:
                must([*scp, str(src), server.remote(tmp)])
                must([*ssh, mv])
            (site.holding / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, site.holding / rel)
            done += 1
            if now() - t0 > cap:
                break
        elapsed = now() - t0
        if share:
            self.close_master(f"{self.ctl_dir}/cm-%C")
        projected = elapsed * len(rels) / done
        self.discard(site)
        return self.record(
            workload=workload,
            method=name,
            family=family if family != "local" else "rsync",
            rep=rep,
            files=len(rels),
            files_measured=done,
            extrapolated=done < len(rels),
            seconds=round(projected, 4),
            measured_seconds=round(elapsed, 4),
            ok=True,
            problems=[],
        )

    def lsyncd_config(self, site: Site, family: str) -> Path:
        conf = site.root / "lsyncd.lua"
        target = str(site.ep_buffer) + "/"
        rsync = "archive = true"
        if family == "rsync-ssh":
            server = self.ssh()
            target = server.remote(target)
            rsh = server.rsync_rsh().replace("\\", "\\\\").replace('"', '\\"')
            rsync += f', rsh = "{rsh}"'
        conf.write_text(
            "settings {\n"
            f'  logfile = "{site.root}/lsyncd.log",\n'
            f'  statusFile = "{site.root}/lsyncd.status",\n'
            "  nodaemon = true,\n"
            "}\n"
            "sync {\n"
            "  default.rsync,\n"
            f'  source = "{site.buffer}",\n'
            f'  target = "{target}",\n'
            "  delay = 1,\n"
            f"  rsync = {{ {rsync} }},\n"
            "}\n"
        )
        return conf

    def run_lsyncd(
        self,
        workload: str,
        family: str,
        rep: int,
        *,
        tree: tuple[Path, dict[str, str]] | None = None,
        writer: Writer | None = None,
    ) -> dict[str, Any]:
        tag = f"{workload}-lsyncd-{family}-{rep}"
        site = Site(self.work / tag)
        expected: dict[str, str] = {}
        if tree is not None:
            self.link_tree(tree[0], tree[1], site.buffer)
            expected.update(tree[1])
        else:
            (site.buffer / "night").mkdir()
            (site.ep_buffer / "night").mkdir()
        conf = self.lsyncd_config(site, family)
        watcher = ArrivalWatcher(site.ep_buffer)
        watcher.start()
        t0 = now()
        log = open(site.root / "lsyncd.out", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            ["lsyncd", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        closed: dict[str, float] = {}
        try:
            if writer is not None:
                # lsyncd watches once its startup sync finished: wait for the log to say so.
                wait_until(
                    lambda: (
                        "Startup of" in (site.root / "lsyncd.log").read_text(errors="replace")
                        if (site.root / "lsyncd.log").exists()
                        else False
                    ),
                    30,
                    0.02,
                )
                closed.update(writer(site, expected, lambda rel, t: None))
            watcher.expect(len(expected))
            arrived = watcher.complete.wait(600)
            t_arrived = max(watcher.arrivals.values()) if watcher.arrivals else now()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            log.close()
            watcher.stop()
        problems = [] if arrived else [f"only {watcher.count()} of {len(expected)} arrived"]
        row: dict[str, Any] = {
            "workload": workload,
            "method": f"lsyncd {family}",
            "family": family,
            "rep": rep,
            "files": len(expected),
            "seconds": round(t_arrived - t0, 4),
            "ok": not problems,
            "problems": problems,
        }
        if closed:
            lat = [watcher.arrivals[rel] - t for rel, t in closed.items() if rel in watcher.arrivals]
            if lat:
                row.update(
                    latency_p50=round(percentile(lat, 50), 4),
                    latency_p95=round(percentile(lat, 95), 4),
                    latency_max=round(max(lat), 4),
                )
        if problems:
            self.fail(f"{tag}: {problems[0]}")
        self.discard(site)
        return self.record(**row)

    # ================================================================== workloads

    def backlog(self, workload: str, tree: tuple[Path, dict[str, str]], *, big: bool) -> None:
        local = self.transport("local")
        ssh_names = ["scp+share", "rsync+share", "scp", "rsync"]
        if self.quick:
            ssh_names = ["scp+share", "rsync"]
        for rep in range(self.reps):
            self.run_floor(workload, "rsync", rep, tree)
            self.run_floor(workload, "cp", rep, tree)
            if not big:
                self.run_bound(workload, rep, tree)
            if not self.quick:
                self.run_hdfmgr(workload, local, rep, tree=tree)
            self.run_naive(workload, "local", rep, tree)
            if self.lsyncd:
                self.run_lsyncd(workload, "rsync", rep, tree=tree)
            if self.args.no_ssh:
                continue
            self.run_floor(workload, "rsync-ssh", rep, tree)
            self.run_floor(workload, "scp", rep, tree)
            if not big:
                self.run_ideal_ssh(workload, rep, tree)
            for name in ssh_names:
                if not self.quick:
                    self.run_hdfmgr(workload, self.transport(name), rep, tree=tree)
            if not big or self.quick:
                self.run_naive(workload, "scp", rep, tree, share=True)
                if not self.quick:
                    self.run_naive(workload, "scp", rep, tree, share=False)
            if self.lsyncd and (not big or self.quick):
                self.run_lsyncd(workload, "rsync-ssh", rep, tree=tree)
        # One more run of each hdfmgr configuration through the PATH shim: processes spawned.
        self.run_hdfmgr(workload, local, 0, tree=tree, count=True)
        if not self.args.no_ssh:
            for name in ssh_names:
                self.run_hdfmgr(workload, self.transport(name), 0, tree=tree, count=True)

    def trickle(self) -> None:
        local = self.transport("local")
        sizes = self.sizes
        for rate in sizes.trickle_rates:
            workload = f"trickle {rate:g}/s"
            writer = make_writer(rate, sizes.trickle_seconds, sizes.trickle_size)
            for rep in range(self.reps):
                self.run_hdfmgr(workload, local, rep, writer=writer, count=self.quick)
                if self.lsyncd and rate <= 20:
                    self.run_lsyncd(workload, "rsync", rep, writer=writer)
            if not self.quick:
                self.run_hdfmgr(workload, local, 0, writer=writer, count=True)

    def scale(self) -> None:
        """100,000 known files: restart time, no re-hashing, memory with all of them waiting."""
        sizes = self.sizes
        n = sizes.scale_dirs * sizes.scale_per_dir
        site = Site(self.work / "scale")
        for d in range(sizes.scale_dirs):
            directory = site.buffer / f"night{d:03d}"
            directory.mkdir()
            for i in range(sizes.scale_per_dir):
                (directory / f"img{i:05d}.fits").write_bytes(os.urandom(4 * KiB))
        failing = Transport("failing", "false {batch} {dest}", 'sh -c "{command}"')
        general = {"retry_initial": 0.5, "retry_max": 2.0}
        site.configure(failing, level="DEBUG", **general)
        # Populate: every file registered and hashed once; every transfer fails, so all stay.
        daemon = Daemon(site, self.env(None))
        t0 = now()
        populated = wait_until(
            lambda: (
                site.db.exists()
                and site.query("select count(*) from files where checksum is not null")[0][0] >= n
            ),
            900,
            0.5,
        )
        populate_seconds = now() - t0
        daemon.stop()
        rows_before = site.query("select count(*) from files")[0][0]
        hashed_first = daemon.output().count("DEBUG hdfmgr.checksum: hashed ")
        if not populated:
            self.fail(f"scale: only {site.query('select count(*) from files')[0][0]} of {n} registered")
        self.record(
            workload="scale",
            method="populate",
            files=n,
            rows=rows_before,
            seconds=round(populate_seconds, 3),
            hashes=hashed_first,
            ok=bool(populated),
            problems=[],
        )
        for rep in range(self.reps):
            site.log.write_text("")
            max_batch = site.query("select coalesce(max(id), 0) from batches")[0][0]
            daemon = Daemon(site, self.env(None))
            started = wait_until(daemon.started_at, 120, 0.02)
            rss_started = vm_hwm_kib(daemon.pid)
            # Let the failed files come back from their retry delay and go out again.
            wait_until(
                lambda m=max_batch: site.query(f"select count(*) from batches where id > {m}")[0][0] >= 4,
                60,
                0.25,
            )
            rss = vm_hwm_kib(daemon.pid)
            daemon.stop()
            out = daemon.output()
            scans = [float(m) for m in re.findall(r"scan: \d+ entries, ([0-9.]+) s", out)]
            rehashed = out.count("DEBUG hdfmgr.checksum: hashed ")
            rows = site.query("select count(*) from files")[0][0]
            batches = site.query(f"select count(*) from batches where id > {max_batch}")[0][0]
            problems = []
            if rows != rows_before:
                problems.append(f"{rows - rows_before} file rows added on restart (files re-registered)")
            if rehashed:
                problems.append(f"{rehashed} file(s) re-hashed on restart")
            if count_files(site.buffer) != n:
                problems.append("files left the buffer")
            if problems:
                self.fail(f"scale rep {rep}: {'; '.join(problems)}")
            self.record(
                workload="scale",
                method="restart",
                rep=rep,
                files=n,
                startup_seconds=started and round(started, 3),
                scan_seconds=scans[0] if scans else None,
                rehashed=rehashed,
                batches_after_restart=batches,
                peak_rss_mb=round(rss / 1024, 1) if rss else None,
                rss_at_start_mb=round(rss_started / 1024, 1) if rss_started else None,
                ok=not problems,
                problems=problems,
            )
        if not self.args.keep:
            shutil.rmtree(site.root, ignore_errors=True)

    def dbcount(self, tree: tuple[Path, dict[str, str]]) -> None:
        """Database statements and transactions per batch, counted inside a rescan run."""
        site = Site(self.work / "dbcount")
        self.link_tree(tree[0], tree[1], site.buffer)
        site.configure(self.transport("local"))
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--dbcount-helper", str(site.config)],
            capture_output=True,
            text=True,
            env=self.env(None),
            timeout=600,
            cwd=site.root,
            check=False,
        )
        try:
            counts = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            self.fail(f"dbcount helper failed: {result.stderr[-2000:]}")
            return
        self.discard(site)
        batches = max(1, counts["batches"])
        self.record(
            workload="backlog small",
            method="db writes (rescan)",
            files=len(tree[1]),
            batches=counts["batches"],
            transactions=counts["transactions"],
            statements=counts["statements"],
            transactions_per_batch=round(counts["transactions"] / batches, 2),
            statements_per_batch=round(counts["statements"] / batches, 1),
            statements_per_file=round(counts["statements"] / max(1, len(tree[1])), 2),
            ok=counts["outcome"] == "drained",
            problems=[],
        )

    def hashing(self, tree: tuple[Path, dict[str, str]]) -> None:
        """hdfmgr's BLAKE2b of large files against b2sum on the same (cached) files."""
        from hdfmgr.checksum import blake2b_file

        paths = [str(tree[0] / rel) for rel in sorted(tree[1])]
        for rep in range(self.reps):
            t0 = now()
            digests = [blake2b_file(p) for p in paths]
            ours = now() - t0
            t0 = now()
            must(["b2sum", *paths])
            theirs = now() - t0
            ok = digests == [tree[1][rel] for rel in sorted(tree[1])]
            if not ok:
                self.fail("hashing: blake2b_file digest differs from the expected one")
            total = sum(os.path.getsize(p) for p in paths)
            self.record(
                workload="hashing",
                method="blake2b_file vs b2sum",
                rep=rep,
                files=len(paths),
                bytes=total,
                seconds=round(ours, 4),
                b2sum_seconds=round(theirs, 4),
                relative_speed=round(theirs / ours, 3),
                ok=ok,
                problems=[],
            )

    # ================================================================== driver

    def run(self) -> int:
        only = set(self.args.only.split(",")) if self.args.only else None

        def wanted(name: str) -> bool:
            return only is None or name in only

        s = self.sizes
        started = now()
        sites_fs = subprocess.run(
            ["stat", "-f", "-c", "%T", str(self.sites)], capture_output=True, text=True, check=False
        ).stdout.strip()
        self.record(
            workload="machine",
            method="code",
            ok=True,
            problems=[],
            sites=str(self.sites),
            sites_fs=sites_fs,
            **self.code,
        )
        if not self.args.no_ssh:
            self.record(
                workload="machine", method="ssh true", ok=True, problems=[], **self.remote_command_cost()
            )
        if wanted("backlog"):
            small = self.cached_tree(
                f"small-{s.backlog_dirs}x{s.backlog_per_dir}",
                s.backlog_dirs,
                s.backlog_per_dir,
                s.backlog_size,
            )
            self.backlog("backlog small", small, big=False)
            self.dbcount(small)
        if wanted("big"):
            big = self.cached_tree(f"big-{s.big_count}x{s.big_size}", 1, s.big_count, s.big_size)
            self.backlog("backlog big", big, big=True)
            self.hashing(big)
        if wanted("trickle"):
            self.trickle()
        if wanted("scale"):
            self.scale()
        self.record(
            workload="total",
            method="bench",
            seconds=round(now() - started, 1),
            ok=not self.failures,
            problems=self.failures,
        )
        report = render_report(self.results, quick=self.quick, sizes=self.sizes, reps=self.reps)
        md = (
            Path(self.args.md)
            if self.args.md
            else (self.out / "benchmarks-quick.md" if self.quick else ROOT / "docs" / "benchmarks.md")
        )
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(report)
        print(f"report: {md}", file=sys.stderr)
        if self.failures:
            print(f"{len(self.failures)} correctness failure(s):", file=sys.stderr)
            for failure in self.failures:
                print(f"  {failure}", file=sys.stderr)
            return 1
        return 0


# ====================================================================== trickle


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


def make_writer(rate: float, seconds: float, size: int) -> Writer:
    """A camera: closes one ``size``-byte file every 1/rate s (absolute schedule), in place."""

    def write(
        site: Site, expected: dict[str, str], on_close: Callable[[str, float], None]
    ) -> dict[str, float]:
        closed: dict[str, float] = {}
        n = int(rate * seconds)
        pool = os.urandom(size + n)
        t0 = now()
        for i in range(n):
            due = t0 + i / rate
            delay = due - now()
            if delay > 0:
                time.sleep(delay)
            rel = f"night/img{i:06d}.fits"
            data = pool[i : i + size]
            expected[rel] = b2(data)
            with open(site.buffer / rel, "wb") as f:
                f.write(data)
            closed[rel] = now()
            on_close(rel, closed[rel])
        return closed

    return write


def slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares growth of the backlog in files per second over the second half."""
    half = samples[len(samples) // 2 :]
    xs = [t for t, _ in half]
    ys = [b for _, b in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


# ====================================================================== process counting


def spawn_counts(text: str, daemon_pid: int, batches: int, files: int) -> dict[str, Any]:
    """From the shim's ``name ppid`` lines: what the daemon itself started, and everything."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    direct = [name for name, ppid in lines if int(ppid) == daemon_pid]
    by_name: dict[str, int] = {}
    for name in direct:
        by_name[name] = by_name.get(name, 0) + 1
    return {
        "spawned_by_daemon": len(direct),
        "spawned_by_name": by_name,
        "spawned_total_shimmed": len(lines),
        "spawned_per_batch": round(len(direct) / batches, 2) if batches else None,
        "spawned_per_file": round(len(direct) / files, 4) if files else None,
    }


def steady_commands(site: Site) -> dict[str, Any]:
    """Commands per batch from the audit trail, after each slot's one-time preparation."""
    rows = site.query("select command from batches order by id")
    counts = [len([c for c in (cmd or "").split("\n") if c.strip()]) for (cmd,) in rows]
    return {
        "commands_per_batch_max": max(counts, default=0),
        "commands_per_batch_steady_max": max(counts[2:], default=max(counts, default=0)),
    }


# ====================================================================== the mandatory-work bound

#: The per-file work the local drain target includes, and nothing else: no daemon, no events, no
#: database reads, no retries. Two ``cp`` processes copy the two halves into two staging
#: directories at once (as two slots would); then, in this one thread, each file is hashed,
#: renamed into the endpoint buffer, checked with one ``lstat``, renamed into holding, and given
#: one row (hdfmgr writes four) in one transaction. Each step is done the cheapest way
#: (plain ``cp``, one bare ``os.read`` per file), so its CPU time, divided by the cores, is a
#: lower bound for any tool that does this work on this machine.
BOUND_SCRIPT = """
import hashlib, json, os, sqlite3, subprocess, sys, time
t0 = time.perf_counter()
buffer, staging, ep, holding, db = sys.argv[1:6]
rels = sorted(os.path.join(d, n) for d in os.listdir(buffer) for n in os.listdir(os.path.join(buffer, d)))
halves = (rels[: len(rels) // 2], rels[len(rels) // 2 :])
slots = []
for i, half in enumerate(halves):
    slot = os.path.join(staging, str(i))
    os.mkdir(slot)
    slots.append(subprocess.Popen(["cp", "--", *(os.path.join(buffer, r) for r in half), slot]))
if any(p.wait() for p in slots):
    sys.exit("cp failed")
t1 = time.perf_counter()
rows = []
made = set()
for i, half in enumerate(halves):
    slot = os.path.join(staging, str(i))
    for rel in half:
        src = os.path.join(buffer, rel)
        fd = os.open(src, os.O_RDONLY)
        digest = hashlib.blake2b(os.read(fd, 1 << 20)).hexdigest()  # every file is smaller
        os.close(fd)
        top = os.path.dirname(rel)
        if top not in made:
            os.mkdir(os.path.join(ep, top))
            os.mkdir(os.path.join(holding, top))
            made.add(top)
        final = os.path.join(ep, rel)
        os.rename(os.path.join(slot, os.path.basename(rel)), final)
        size = os.lstat(final).st_size
        os.rename(src, os.path.join(holding, rel))
        rows.append((rel, size, digest))
t2 = time.perf_counter()
con = sqlite3.connect(db)
con.execute("create table files (name text primary key, size integer, checksum text)")
with con:
    con.executemany("insert into files values (?, ?, ?)", rows)
con.close()
t3 = time.perf_counter()
print(json.dumps({"copy_seconds": t1 - t0, "per_file_seconds": t2 - t1, "record_seconds": t3 - t2}))
"""


# ====================================================================== db counting helper


def dbcount_helper(config_path: str) -> int:
    """Run one rescan pass in this process, counting database statements and commits."""
    import peewee as pw

    from hdfmgr import config as config_mod
    from hdfmgr.pipeline import Pipeline

    counts = {"statements": 0, "transactions": 0}
    execute_sql = pw.Database.execute_sql
    commit = pw.Database.commit

    def counting_execute(self: Any, sql: str, params: Any = None, *args: Any, **kw: Any) -> Any:
        if not sql.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            counts["statements"] += 1
        return execute_sql(self, sql, params, *args, **kw)

    def counting_commit(self: Any) -> Any:
        counts["transactions"] += 1
        return commit(self)

    pw.Database.execute_sql = counting_execute  # type: ignore[method-assign]
    pw.Database.commit = counting_commit  # type: ignore[method-assign]
    pipeline = Pipeline(config_mod.load(config_path), once=True)
    outcome = pipeline.run()
    print(json.dumps({**counts, "batches": pipeline.counters.batches, "outcome": outcome.value}))
    return 0


# ====================================================================== report

TARGETS = [
    # (key, description, threshold text)
    ("backlog_local", "Backlog 10,000 x 4 KiB, local: drain ≤ 1.3x the rsync floor", 1.3),
    ("backlog_ssh", "Backlog over loopback ssh with connection sharing: ≤ 1.5x the scp/rsync floor", 1.5),
    ("trickle_p50", "Trickle 20 files/s, local, defaults: latency p50 ≤ 0.25 s", 0.25),
    ("trickle_p95", "Trickle 20 files/s, local, defaults: latency p95 ≤ 0.5 s", 0.5),
    (
        "trickle_200",
        "Trickle 200 files/s: no backlog growth (slope ≤ 2 files/s, drained ≤ 1 s after the last close)",
        None,
    ),
    ("procs", "Steady state: ≤ 3 processes spawned per batch, none per file ({batch} mode)", 3),
    ("scale_startup", "100,000 known files: startup (process start to 'started:') ≤ 2 s", 2.0),
    ("scale_rehash", "100,000 known files: no file re-hashed on restart", 0),
    ("scale_rss", "100,000 files waiting: daemon peak RSS ≤ 80 MB", 80.0),
    ("db_batched", "Database writes batched per transfer batch, not per file", None),
    ("hashing", "BLAKE2b of large files ≥ 80 % of b2sum's speed", 0.8),
]


def default_sites(out: Path, need: int) -> Path:
    """/dev/shm when it is a tmpfs with ``need`` bytes free, else ``out``.

    On a RAM filesystem the ratios measure the software: on this machine's shared disk one
    ``cp -r`` of the small tree took from 0.14 s to 2.4 s within minutes.
    """
    shm = Path("/dev/shm")
    try:
        kind = subprocess.run(
            ["stat", "-f", "-c", "%T", str(shm)], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        st = os.statvfs(shm)
    except OSError:
        return out
    roomy = st.f_bavail * st.f_frsize >= need
    return shm if kind == "tmpfs" and roomy and os.access(shm, os.W_OK) else out


def machine() -> list[str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not installed"
        return (
            (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"
        )

    mem = "?"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"- CPUs: {os.cpu_count()} (`nproc` {first_line(['nproc'])}), {cpu}",
        f"- memory: {mem}",
        f"- kernel: {platform.release()}",
        f"- Python: {platform.python_version()}",
        f"- OpenSSH: {first_line(['ssh', '-V'])}",
        f"- rsync: {first_line(['rsync', '--version'])}",
        f"- lsyncd: {first_line(['lsyncd', '-version']) if shutil.which('lsyncd') else 'not installed'}",
    ]


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    return median([r[key] for r in rows if r.get(key) is not None])


def _fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def render_report(results: list[dict[str, Any]], *, quick: bool, sizes: Sizes, reps: int) -> str:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        by.setdefault((row["workload"], row["method"]), []).append(row)

    def floor(workload: str, family: str) -> float | None:
        key = {"local": "rsync"}.get(family, family)
        return _med(by.get((workload, f"floor {key}"), []), "seconds")

    started = next((r.get("started") for r in by.get(("machine", "code"), [])), None) or "?"
    lines = [
        "# hdfmgr benchmarks",
        "",
        "Generated by `scripts/bench`"
        + (" --quick (small sizes, 1 repetition: NOT a measurement)" if quick else "")
        + f" (run started {started}). Medians of {reps} repetition(s); every time is"
        " also given as a ratio to the floor of the same run (rsync floor for local and rsync-over-ssh,"
        " scp floor for scp). A drain is timed from process start to the last file in the endpoint buffer"
        " and out of the local buffer; the floor from its first command to the end of its `mv`.",
        "",
        "Machine:",
        "",
        *machine(),
    ]
    for row in by.get(("machine", "code"), []):
        if row.get("sites_fs"):
            lines.append(f"- filesystem of the sites: {row['sites_fs']} ({row['sites']})")
        modified = ", ".join(row["modified"]) or "none"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"- hdfmgr: commit {row['commit']}{note}; uncommitted changes under hdfmgr/: {modified}")
    for row in by.get(("machine", "ssh true"), []):
        lines.append(
            f"- one remote command over the loopback sshd (`ssh host true`, median of 5): "
            f"{row['new_connection_seconds']:.3f} s on a new connection, "
            f"{row['shared_seconds']:.3f} s on a shared one. On a shared one it is mostly the remote"
            " login shell starting (here root's `~/.bashrc` runs `pyenv init`), which every method pays"
            " once per remote command; a new connection adds its key exchange."
        )
    lines.append("")
    # ---- drains
    for workload in ("backlog small", "backlog big"):
        methods = [m for (w, m) in by if w == workload and not m.startswith("db ")]
        if not methods:
            continue
        title = (
            f"{sizes.backlog_dirs * sizes.backlog_per_dir:,} x {sizes.backlog_size // KiB} KiB in "
            f"{sizes.backlog_dirs} directories"
            if workload == "backlog small"
            else f"{sizes.big_count} x {sizes.big_size // MiB} MiB"
        )
        lines += [
            f"## Backlog drain: {title}",
            "",
            "| method | median s | ratio to floor | runs | peak RSS MB "
            "| spawned/batch (incl. start-up) | spawned/file | correct |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for method in sorted(methods, key=_method_order):
            rows = by[(workload, method)]
            timed = timed_rows(rows)
            shim = [r for r in rows if r.get("shimmed")]
            family = rows[0].get("family", "rsync")
            fl = floor(workload, family)
            sec = _med(timed, "seconds")
            ratio = sec / fl if sec is not None and fl else None
            extrap = " (extrapolated)" if any(r.get("extrapolated") for r in timed) else ""
            ok = all(r.get("ok", True) for r in rows)
            lines.append(
                f"| {method}{extrap} | {_fmt(sec, 3)} | {_fmt(ratio)}x | {len(timed)} | "
                f"{_fmt(_med(timed, 'peak_rss_mb'), 0)} | {_fmt(_med(shim, 'spawned_per_batch'))} | "
                f"{_fmt(_med(shim, 'spawned_per_file'), 4)} | {'yes' if ok else 'NO'} |"
            )
        lines.append("")
        bound = bound_line(by, workload, floor(workload, "rsync"))
        if bound:
            lines += [bound, ""]
        ideal = ideal_line(by, workload, floor(workload, "rsync-ssh"))
        if ideal:
            lines += [ideal, ""]
    # ---- trickle
    trickles = sorted({w for (w, _) in by if w.startswith("trickle")}, key=lambda w: float(w.split()[1][:-2]))
    if trickles:
        lines += [
            f"## Trickle: {sizes.trickle_size // KiB} KiB files closed at a fixed rate for "
            f"{sizes.trickle_seconds:g} s (latency: close → in the endpoint buffer)",
            "",
            "| rate | method | p50 s | p95 s | max s | backlog slope files/s "
            "| drained after last close s | correct |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for workload in trickles:
            for method in sorted(m for (w, m) in by if w == workload):
                rows = by[(workload, method)]
                timed = timed_rows(rows)
                ok = all(r.get("ok", True) for r in rows)
                lines.append(
                    f"| {workload.split()[1]} | {method} | {_fmt(_med(timed, 'latency_p50'), 3)} | "
                    f"{_fmt(_med(timed, 'latency_p95'), 3)} | {_fmt(_med(timed, 'latency_max'), 3)} | "
                    f"{_fmt(_med(timed, 'backlog_slope'))} | "
                    f"{_fmt(_med(timed, 'drain_after_last_close'), 3)} | "
                    f"{'yes' if ok else 'NO'} |"
                )
        lines.append("")
    # ---- scale
    restarts = by.get(("scale", "restart"), [])
    populate = by.get(("scale", "populate"), [])
    if restarts:
        n = restarts[0]["files"]
        lines += [
            f"## Scale: {n:,} known files waiting (registered and hashed by an earlier run whose "
            "transfers all "
            "failed), daemon restarted",
            "",
            "| measure | median | runs |",
            "|---|---:|---:|",
            f"| startup: process start → 'started:' (s) | {_fmt(_med(restarts, 'startup_seconds'), 3)} | "
            f"{len(restarts)} |",
            f"| of which the stat-only rescan (s) | {_fmt(_med(restarts, 'scan_seconds'), 3)} "
            f"| {len(restarts)} |",
            f"| files re-hashed after the restart | {_fmt(_med(restarts, 'rehashed'), 0)} "
            f"| {len(restarts)} |",
            f"| batches retried after the restart (their files' checksums come from the database) | "
            f"{_fmt(_med(restarts, 'batches_after_restart'), 0)} | {len(restarts)} |",
            f"| peak RSS with all files waiting (MB) | {_fmt(_med(restarts, 'peak_rss_mb'), 1)} "
            f"| {len(restarts)} |",
        ]
        if populate:
            p = populate[0]
            lines.append(
                f"| first run: files hashed / files registered | {p['hashes']:,} / {p['rows']:,} | 1 |"
            )
        lines.append("")
    # ---- db and hashing
    dbrows = by.get(("backlog small", "db writes (rescan)"), [])
    if dbrows:
        d = dbrows[0]
        lines += [
            "## Database writes (one rescan pass over the small backlog, counted inside the process)",
            "",
            "| files | batches | transactions | per batch | write statements | per batch | per file |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {d['files']:,} | {d['batches']} | {d['transactions']} | {d['transactions_per_batch']} | "
            f"{d['statements']} | {d['statements_per_batch']} | {d['statements_per_file']} |",
            "",
        ]
    hashing = by.get(("hashing", "blake2b_file vs b2sum"), [])
    if hashing:
        lines += [
            "## Hashing (BLAKE2b-512 of the large files, page cache warm)",
            "",
            "| hdfmgr s | b2sum s | hdfmgr speed / b2sum speed |",
            "|---:|---:|---:|",
            f"| {_fmt(_med(hashing, 'seconds'), 3)} | {_fmt(_med(hashing, 'b2sum_seconds'), 3)} | "
            f"{_fmt(_med(hashing, 'relative_speed'))} |",
            "",
        ]
    # ---- targets
    lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    for key, text, _threshold in TARGETS:
        measured, verdict = judge(key, by, floor)
        lines.append(f"| {text} | {measured} | {verdict} |")
    lines.append("")
    failed = [r for r in results if not r.get("ok", True)]
    lines += [
        "## Correctness",
        "",
        "Every hdfmgr run checks: each file byte-identical at the endpoint (hashed by a consumer the"
        " instant it appeared, and a sample again at the end), no file ever seen partial or written in"
        " place in the endpoint buffer, nothing left in staging or the buffer, every file in holding and"
        " recorded as held.",
        "",
        f"Result: {'all runs correct' if not failed else f'{len(failed)} run(s) FAILED'}.",
        "",
    ]
    for row in failed:
        lines.append(f"- {row['workload']} / {row['method']}: {'; '.join(row.get('problems', []))}")
    notes = ROOT / "docs" / "benchmarks-notes.md"
    if not quick and notes.exists():
        # Hand-written analysis (profiles, proposals) kept beside the generated tables.
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def timed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose times count: runs through the PATH shim pay for it, so they count only
    when nothing else ran (--quick)."""
    return [r for r in rows if r.get("seconds") is not None and not r.get("shimmed")] or rows


BOUND_METHOD = "bound: the mandatory work alone"
#: What the ssh target's work takes as a bare pipeline: two rsyncs of the halves at once over
#: one shared connection with the hashing in a thread beside them, one remote ``sh`` with one
#: ``mv`` per directory and a listing of the endpoint buffer, then the holding renames and one
#: row per file. Timed end to end (wall time: the endpoint's processes are not our children).
IDEAL_SSH_METHOD = "ideal rsync+share: the mandatory work as a bare pipeline"


def bound_figures(by: dict[tuple[str, str], list[dict[str, Any]]], workload: str) -> dict[str, float] | None:
    """CPU-seconds of the bound, of the consumer and of hdfmgr in the local runs; the cores."""
    rows = by.get((workload, BOUND_METHOD), [])
    cpu = _med(rows, "cpu_seconds")
    if cpu is None:
        return None
    local = timed_rows(by.get((workload, "hdfmgr local"), []))
    return {
        "cpu": cpu,
        "cores": rows[0]["cores"],
        "seconds": _med(rows, "seconds") or 0.0,
        "consumer": _med(local, "consumer_cpu_seconds") or 0.0,
        "own": _med(local, "cpu_seconds") or 0.0,
    }


def bound_line(by: dict[tuple[str, str], list[dict[str, Any]]], workload: str, fl: float | None) -> str:
    """What the mandatory-work bound says about the ratio any tool could reach here."""
    b = bound_figures(by, workload)
    if b is None or not fl:
        return ""
    cpu, cores = b["cpu"], b["cores"]
    text = (
        f"The bound row does only the work the local target includes (BOUND_SCRIPT in"
        f" `scripts/bench.py`: two `cp`s into staging, then per file a hash, a rename into the"
        f" endpoint buffer, an `lstat`, a rename into holding and one database row), in"
        f" {b['seconds']:.3f} s on one thread. It used {cpu:.3f} CPU-seconds: on"
        f" {cores:g} core(s), perfectly parallel and with nothing else running, that work alone"
        f" needs at least {cpu / cores:.3f} s, {cpu / cores / fl:.2f}x the rsync floor."
    )
    if b["consumer"] and b["own"]:
        text += (
            f" hdfmgr's local runs share the cores with the benchmark's consumer, which hashes every"
            f" file that arrives ({b['consumer']:.3f} CPU-seconds): with it, the bound is"
            f" {(cpu + b['consumer']) / cores / fl:.2f}x. hdfmgr itself, with its `cp` and `sh`"
            f" children, used {b['own']:.3f} CPU-seconds ({b['own'] / cpu:.1f}x the bound's)."
        )
    return text


def ideal_line(by: dict[tuple[str, str], list[dict[str, Any]]], workload: str, fl: float | None) -> str:
    """How much of the ssh target the bare pipeline leaves to a daemon."""
    sec = _med(by.get((workload, IDEAL_SSH_METHOD), []), "seconds")
    if sec is None or not fl:
        return ""
    shared = _med(timed_rows(by.get((workload, "hdfmgr rsync+share"), [])), "seconds")
    text = (
        f"The ideal rsync+share row does the ssh target's work as a bare pipeline (IDEAL_SSH_METHOD"
        f" in `scripts/bench.py`): {sec:.3f} s, {sec / fl:.2f}x the rsync-over-ssh floor, with no consumer"
        f" running. The 1.5x target leaves {1.5 * fl - sec:.3f} s beyond it for everything a daemon adds"
        f" (start-up, events, settle checks, records, per-file verification)"
    )
    if shared is not None:
        text += f"; hdfmgr rsync+share took {shared - sec:.3f} s more than the pipeline"
    return text + "."


def _method_order(method: str) -> tuple[int, str]:
    order = ("floor", "bound", "ideal", "hdfmgr", "naive", "lsyncd")
    return (next((i for i, p in enumerate(order) if method.startswith(p)), 9), method)


def judge(
    key: str, by: dict[tuple[str, str], list[dict[str, Any]]], floor: Callable[..., float | None]
) -> tuple[str, str]:
    def timed(workload: str, method: str) -> list[dict[str, Any]]:
        rows = by.get((workload, method), [])
        return timed_rows(rows)

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("PASS" if ok else "FAIL")

    if key == "backlog_local":
        sec, fl = _med(timed("backlog small", "hdfmgr local"), "seconds"), floor("backlog small", "rsync")
        if sec is None or not fl:
            return "–", verdict(None)
        text = f"{sec:.2f} s vs {fl:.2f} s = {sec / fl:.2f}x"
        b = bound_figures(by, "backlog small")
        if b is not None:
            least = (b["cpu"] + b["consumer"]) / b["cores"] / fl
            text += f"; with its consumer, the mandatory work alone needs ≥ {least:.2f}x here"
        return text, verdict(sec / fl <= 1.3)
    if key == "backlog_ssh":
        # Each transport against the floor of its own tool; the target holds when both do.
        parts, oks = [], []
        for name, family in (("scp+share", "scp"), ("rsync+share", "rsync-ssh")):
            sec, fl = (
                _med(timed("backlog small", f"hdfmgr {name}"), "seconds"),
                floor("backlog small", family),
            )
            if sec is not None and fl:
                ok = sec / fl <= 1.5
                parts.append(
                    f"{name}: {sec:.2f} s vs {family} floor {fl:.2f} s = {sec / fl:.2f}x ({verdict(ok)})"
                )
                oks.append(ok)
        return ("; ".join(parts) or "–"), verdict(all(oks) if oks else None)
    if key in ("trickle_p50", "trickle_p95"):
        q = key.split("_")[1]
        rows = timed("trickle 20/s", "hdfmgr local")
        value = _med(rows, f"latency_{q}")
        limit = 0.25 if q == "p50" else 0.5
        return _fmt(value, 3, " s"), verdict(None if value is None else value <= limit)
    if key == "trickle_200":
        rows = timed("trickle 200/s", "hdfmgr local")
        sl, drain = _med(rows, "backlog_slope"), _med(rows, "drain_after_last_close")
        if sl is None or drain is None:
            return "–", verdict(None)
        return f"slope {sl:.2f} files/s, drained {drain:.2f} s after the last close", verdict(
            sl <= 2 and drain <= 1
        )
    if key == "procs":
        # Judged where batches are many (the small backlog): with a single batch the one-time
        # start-up commands (staging sweep, slot preparation) would count as per-batch.
        rows = [
            r
            for (w, _m), rs in by.items()
            if w == "backlog small"
            for r in rs
            if r.get("shimmed") and r.get("spawned_per_batch") is not None
        ]
        if not rows:
            return "–", verdict(None)
        worst = max(r["commands_per_batch_steady_max"] for r in rows)
        per_file = max(r["spawned_per_file"] for r in rows)
        per_batch = max(r["spawned_per_batch"] for r in rows)
        return (
            f"≤ {worst} commands in any steady-state batch; the daemon spawned {per_batch:.2f} per batch and "
            f"{per_file:.4f} per file, start-up included (small backlog, worst transport)",
            verdict(worst <= 3 and per_batch <= 3 and per_file < 0.1),
        )
    if key.startswith("scale_"):
        rows = by.get(("scale", "restart"), [])
        if not rows:
            return "–", verdict(None)
        if key == "scale_startup":
            v = _med(rows, "startup_seconds")
            return _fmt(v, 2, " s"), verdict(None if v is None else v <= 2.0)
        if key == "scale_rehash":
            v = max(r["rehashed"] for r in rows)
            return f"{v} re-hashed", verdict(v == 0)
        v = _med(rows, "peak_rss_mb")
        return _fmt(v, 1, " MB"), verdict(None if v is None else v <= 80)
    if key == "db_batched":
        rows = by.get(("backlog small", "db writes (rescan)"), [])
        if not rows:
            return "–", verdict(None)
        d = rows[0]
        return (
            f"{d['transactions_per_batch']} transactions per batch; "
            f"{d['statements_per_file']} write statements "
            "per file",
            verdict(d["transactions_per_batch"] <= 5 and d["statements_per_file"] < 1),
        )
    if key == "hashing":
        rows = by.get(("hashing", "blake2b_file vs b2sum"), [])
        v = _med(rows, "relative_speed")
        return _fmt(v, 2, "x b2sum's speed"), verdict(None if v is None else v >= 0.8)
    return "–", verdict(None)


# ====================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition, correctness only")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--only", default="", help="comma-separated subset: backlog,big,trickle,scale")
    parser.add_argument("--no-ssh", action="store_true", help="skip the loopback sshd transports")
    parser.add_argument("--out", default=str(ROOT / "bench-out"), help="results directory")
    parser.add_argument(
        "--sites",
        default="",
        help="where the measured sites live (default /dev/shm when it is a tmpfs, else --out)",
    )
    parser.add_argument("--md", default="", help="where to write the Markdown report")
    parser.add_argument("--keep", action="store_true", help="keep the sites (for inspection)")
    parser.add_argument("--render", default="", help="only rewrite the report from a results.jsonl")
    parser.add_argument("--dbcount-helper", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dbcount_helper:
        return dbcount_helper(args.dbcount_helper)
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]
        reps = 1 + max((r.get("rep", 0) for r in rows), default=0)
        md = Path(args.md) if args.md else ROOT / "docs" / "benchmarks.md"
        md.write_text(render_report(rows, quick=args.quick, sizes=QUICK if args.quick else FULL, reps=reps))
        print(f"report: {md}", file=sys.stderr)
        return 0
    bench = Bench(args)
    try:
        return bench.run()
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
