"""The run context: options, sizes, the code snapshot, the sshd and its relays, the data trees,
and one measured hdfmgr run with its correctness check (every file once, byte-identical, held).

References (references.py) and workloads (workloads/) are functions of this context.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import transports
from .consumer import ArrivalWatcher, BacklogSampler
from .relay import Relay, start_relay_link
from .site import Daemon, Site, Transport, Writer
from .transports import Link
from .util import (
    ROOT,
    KiB,
    MiB,
    b2_file,
    count_files,
    default_sites,
    has_files,
    must,
    now,
    percentile,
    process_cpu_seconds,
    run_quiet,
    slope,
    vm_hwm_kib,
    wait_until,
)

#: Commands the PATH shim counts (hdfmgr runs the local "remote" script via ``sh -c``).
SHIMMED = ("cp", "sh", "scp", "ssh", "rsync", "mv", "false")


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
    # Over the long link (issue: a camera visit, a big visit, a slow trickle).
    visit_count: int = 189
    visit_size: int = 256 * KiB
    bigvisit_count: int = 24
    bigvisit_size: int = 32 * MiB
    slow_rate: float = 2.0
    slow_seconds: float = 20.0
    slow_size: int = 1 * MiB


FULL = Sizes(100, 100, 4 * KiB, 20, 64 * MiB, (20.0, 200.0), 30.0, 64 * KiB, 100, 1000, 20.0)
QUICK = Sizes(
    5, 40, 4 * KiB, 2, 2 * MiB, (20.0,), 3.0, 64 * KiB, 4, 250, 2.0,
    visit_count=12, visit_size=64 * KiB, bigvisit_count=2, bigvisit_size=1 * MiB,
    slow_rate=2.0, slow_seconds=1.0, slow_size=64 * KiB,
)  # fmt: skip


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
        self.relays: dict[float, tuple[Any, Relay]] = {}
        self.rtt_ms: float = getattr(args, "rtt", 0.0)

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
        for _, relay in self.relays.values():
            relay.stop()
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
        source = Path(self.args.code).resolve() if self.args.code else ROOT / "hdfmgr"
        shutil.copytree(source, code / "hdfmgr", ignore=shutil.ignore_patterns("__pycache__"))
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
        row = {"commit": git("rev-parse", "--short", "HEAD"), "modified": modified, "started": started}
        if self.args.code:
            row["note"] = f"the package measured is {source}"
        return row

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

    def link(self, rtt_ms: float = 0.0) -> Link:
        """The way to the sshd: direct (loopback) or through a relay delaying each chunk."""
        if rtt_ms <= 0:
            return Link(self.ssh(), self.ctl_dir, 0.0)
        if rtt_ms not in self.relays:
            self.relays[rtt_ms] = start_relay_link(self.ssh(), rtt_ms, self.out / f"relay-{rtt_ms:g}")
        relayed, _ = self.relays[rtt_ms]
        return Link(relayed, self.ctl_dir, rtt_ms)

    def transport(self, name: str, rtt_ms: float = 0.0) -> Transport:
        """A transport by name (see transports/): its templates, reaching the sshd via ``rtt_ms``."""
        link = self.link(rtt_ms) if name != "local" else Link(None, self.ctl_dir, 0.0)
        return transports.build(name, link)

    def close_shared(self, transport: Transport) -> None:
        """End a ControlPersist master so that it does not outlive its run."""
        if transport.cpath is not None:
            self.close_master(transport.cpath, transport.server)

    def close_master(self, cpath: str, server: Any = None) -> None:
        server = server or self.ssh()
        argv = ["ssh", "-o", f"ControlPath={cpath}", "-O", "exit", "-p", str(server.port), server.destination]
        run_quiet(argv, timeout=10)

    def share_options(self) -> list[str]:
        cpath = f"{self.ctl_dir}/cm-%C"
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={cpath}", "-o", "ControlPersist=120"]

    def ssh_argv(self, share: bool, server: Any = None) -> list[str]:
        server = server or self.ssh()
        argv = ["ssh", "-p", str(server.port), "-i", str(server.key), *server.ssh_options]
        return argv + (self.share_options() if share else [])

    def remote_command_cost(self, rtt_ms: float = 0.0) -> dict[str, float]:
        """Seconds per ``ssh host true`` (median of 5), with and without a shared connection.

        Every remote command pays the remote login shell's start-up (here root's ~/.bashrc).
        """
        server = self.link(rtt_ms).server
        costs: dict[str, float] = {"rtt_ms": rtt_ms}
        for share in (False, True):
            argv = [*self.ssh_argv(share, server), "--", server.destination, "true"]
            must(argv)  # a master, when shared, is up before the timing
            times = []
            for _ in range(5):
                t0 = now()
                must(argv, stdin=subprocess.DEVNULL)
                times.append(now() - t0)
            costs["shared_seconds" if share else "new_connection_seconds"] = round(
                statistics.median(times), 3
            )
        self.close_master(f"{self.ctl_dir}/cm-%C", server)
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
            "rtt_ms": transport.rtt_ms,
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
        # A slot's receipt (what its latest commit renamed) and the stream's record of the last
        # batch received stay beside it: not staged copies.
        beside = (".receipt", ".received")
        staged = [n for _, _, names in os.walk(site.staging) for n in names if not n.endswith(beside)]
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
