"""References: what the same files cost without hdfmgr, measured in the same run.

* floor: one ``rsync -a`` (or ``cp -r``, ``scp -r``) of the whole tree into staging plus one
  ``mv`` (over ssh: one ``ssh ... mv``). No verification, no records, no holding.
* bound (small-file backlog): the per-file work the local target includes and nothing else
  (``BOUND_SCRIPT``), in one process; and the same plus the per-file work the delivery
  guarantees require (writer checks, pins, the flush, the file's states in the database).
* ideal rsync+share (small-file backlog): the ssh target's work as a bare pipeline.
* naive: one transfer and one remote ``mv`` per file, as a simple polling manager works.
* lsyncd (when installed): ``default.rsync`` with ``delay = 1`` into the endpoint buffer.

The long link's floor (parallel cold ``tar | ssh tar`` streams) is in longlink.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .consumer import ArrivalWatcher
from .context import Bench
from .site import Site, Writer
from .util import b2_file, count_files, must, now, percentile, wait_until

BOUND_METHOD = "bound: the mandatory work alone"
#: The bound plus the per-file work the delivery guarantees require (see BOUND_SCRIPT).
GUARDED_METHOD = "bound with the guarantees' own work"
#: What the ssh target's work takes as a bare pipeline: two rsyncs of the halves at once over
#: one shared connection with the hashing in a thread beside them, one remote ``sh`` with one
#: ``mv`` per directory and a listing of the endpoint buffer, then the holding renames and one
#: row per file. Timed end to end (wall time: the endpoint's processes are not our children).
IDEAL_SSH_METHOD = "ideal rsync+share: the mandatory work as a bare pipeline"


def run_floor(
    b: Bench, workload: str, family: str, rep: int, tree: tuple[Path, dict[str, str]]
) -> dict[str, Any]:
    """One bulk copy of the tree into staging, then one mv into the endpoint buffer."""
    tag = f"{workload}-floor-{family}-{rep}"
    site = Site(b.work / tag)
    b.link_tree(tree[0], tree[1], site.buffer)
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
        server = b.ssh()
        if family == "rsync-ssh":
            must(["rsync", "-a", "-e", server.rsync_rsh(), f"{site.buffer}/", server.remote(f"{dest}/")])
        else:  # scp
            must(["scp", "-rq", *server.scp_options(), str(site.buffer), server.remote(dest)])
        mv = shlex.join(["mv", "-t", str(site.ep_buffer), *(str(dest / t) for t in top)])
        must([*b.ssh_argv(False), "--", f"{server.user}@{server.host}", mv])
    arrived = watcher.complete.wait(60)
    elapsed = (max(watcher.arrivals.values()) if watcher.arrivals else now()) - t0
    watcher.stop()
    problems = [] if arrived else [f"only {watcher.count()} of {len(tree[1])} arrived"]
    return b.finish_reference(
        site, tag, problems, elapsed, workload=workload, method=f"floor {family}", family=family,
        rep=rep, files=len(tree[1]),
    )  # fmt: skip


def run_bound(
    b: Bench, workload: str, rep: int, tree: tuple[Path, dict[str, str]], *, guarded: bool = False
) -> dict[str, Any]:
    """The mandatory work alone (BOUND_SCRIPT), with the guarantees' own work when ``guarded``:
    its wall time, and its CPU time per core."""
    tag = f"{workload}-bound{'-guarded' if guarded else ''}-{rep}"
    site = Site(b.work / tag)
    b.link_tree(tree[0], tree[1], site.buffer)
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
            *(["guarded"] if guarded else []),
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
    method = GUARDED_METHOD if guarded else BOUND_METHOD
    return b.finish_reference(
        site, tag, problems, elapsed, workload=workload, method=method, family="rsync",
        rep=rep, files=len(tree[1]), cpu_seconds=round(cpu, 4), cores=cores,
        cpu_per_core_seconds=round(cpu / cores, 4), **(json.loads(out) if proc.returncode == 0 else {}),
    )  # fmt: skip


def run_ideal_ssh(b: Bench, workload: str, rep: int, tree: tuple[Path, dict[str, str]]) -> dict[str, Any]:
    """The ssh target's mandatory work as a bare pipeline, timed end to end (IDEAL_SSH_METHOD)."""
    tag = f"{workload}-ideal-{rep}"
    site = Site(b.work / tag)
    b.link_tree(tree[0], tree[1], site.buffer)
    server = b.ssh()
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
    rsh = shlex.join(b.ssh_argv(True))
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
        [*b.ssh_argv(True), "--", server.destination, "sh"],
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
    b.close_master(f"{b.ctl_dir}/cm-%C")
    arrived = count_files(site.ep_buffer)
    if arrived != len(rels):
        problems.append(f"{arrived} of {len(rels)} in the endpoint buffer")
    return b.finish_reference(
        site, tag, problems, elapsed, workload=workload, method=IDEAL_SSH_METHOD, family="rsync-ssh",
        rep=rep, files=len(rels),
    )  # fmt: skip


def run_naive(
    b: Bench, workload: str, family: str, rep: int, tree: tuple[Path, dict[str, str]], *, share: bool = False
) -> dict[str, Any]:
    """Per file: one transfer into staging, one remote mkdir+mv, one local rename to holding."""
    name = f"naive {family}{' +share' if share else ''}"
    tag = f"{workload}-naive-{family}{'-share' if share else ''}-{rep}"
    site = Site(b.work / tag)
    b.link_tree(tree[0], tree[1], site.buffer)
    cap = b.sizes.naive_cap
    rels = sorted(tree[1])
    server = b.ssh() if family != "local" else None
    if server is not None:
        ssh = [*b.ssh_argv(share), "--", f"{server.user}@{server.host}"]
        scp = ["scp", "-Bpq", *server.scp_options(), *(b.share_options() if share else [])]
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
        b.close_master(f"{b.ctl_dir}/cm-%C")
    projected = elapsed * len(rels) / done
    b.discard(site)
    return b.record(
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


def lsyncd_config(b: Bench, site: Site, family: str) -> Path:
    conf = site.root / "lsyncd.lua"
    target = str(site.ep_buffer) + "/"
    rsync = "archive = true"
    if family == "rsync-ssh":
        server = b.ssh()
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
    b: Bench,
    workload: str,
    family: str,
    rep: int,
    *,
    tree: tuple[Path, dict[str, str]] | None = None,
    writer: Writer | None = None,
) -> dict[str, Any]:
    tag = f"{workload}-lsyncd-{family}-{rep}"
    site = Site(b.work / tag)
    expected: dict[str, str] = {}
    if tree is not None:
        b.link_tree(tree[0], tree[1], site.buffer)
        expected.update(tree[1])
    else:
        (site.buffer / "night").mkdir()
        (site.ep_buffer / "night").mkdir()
    conf = lsyncd_config(b, site, family)
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
        b.fail(f"{tag}: {problems[0]}")
    b.discard(site)
    return b.record(**row)


#: The per-file work the local drain target includes, and nothing else: no daemon, no events, no
#: database reads, no retries. Two ``cp`` processes copy the two halves into two staging
#: directories at once (as two slots would); then, in this one thread, each file is hashed,
#: renamed into the endpoint buffer, checked with one ``lstat``, renamed into holding, and given
#: one row (hdfmgr writes four) in one transaction. Each step is done the cheapest way
#: (plain ``cp``, one bare ``os.read`` per file), so its CPU time, divided by the cores, is a
#: lower bound for any tool that does this work on this machine.
#:
#: With the argument ``guarded`` it adds, the same cheapest way, the per-file work that the
#: delivery guarantees require of any tool and the plain bound leaves out (GUARDED_METHOD): the
#: writer check (a read lease taken and released) when the file is registered and again before
#: it moves to holding, the pin (a hard link into a private directory, checked by ``lstat``,
#: sent and hashed from there, checked again after the copy, unlinked at the end), one ``sync``
#: of each slot's staged copies before the renames, and the file's life in the database as
#: hdfmgr records it (a row when registered, its state at the start of the batch, at the commit
#: and when held, and an attempt row), each step of a batch one ``executemany``.
BOUND_SCRIPT = """
import fcntl, hashlib, json, os, sqlite3, subprocess, sys, time
t0 = time.perf_counter()
buffer, staging, ep, holding, db = sys.argv[1:6]
guarded = sys.argv[6:] == ["guarded"]
rels = sorted(os.path.join(d, n) for d in os.listdir(buffer) for n in os.listdir(os.path.join(buffer, d)))
halves = (rels[: len(rels) // 2], rels[len(rels) // 2 :])
pins = os.path.join(holding, ".pins")


def writer_check(path):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def sent(i, rel):
    return os.path.join(pins, str(i), os.path.basename(rel)) if guarded else os.path.join(buffer, rel)


if guarded:
    con = sqlite3.connect(db)
    con.execute("create table files (id integer primary key, name text unique, size integer,"
                " checksum text, state text, attempts integer)")
    con.execute("create table attempts (id integer primary key, batch integer, file integer, outcome text)")
    con.execute("create index attempts_batch_file on attempts (batch, file)")
    registered = []
    for rel in rels:
        st = os.lstat(os.path.join(buffer, rel))
        writer_check(os.path.join(buffer, rel))
        registered.append((rel, st.st_size, "READY", 0))
    with con:
        con.executemany("insert into files (name, size, state, attempts) values (?, ?, ?, ?)", registered)
    ids = dict(con.execute("select name, id from files"))
    os.mkdir(pins)
slots = []
for i, half in enumerate(halves):
    slot = os.path.join(staging, str(i))
    os.mkdir(slot)
    if guarded:
        os.mkdir(os.path.join(pins, str(i)))
        for rel in half:
            os.link(os.path.join(buffer, rel), sent(i, rel), follow_symlinks=False)
            os.lstat(sent(i, rel))
        with con:
            con.executemany("update files set state = 'STAGING', attempts = attempts + 1 where id = ?",
                            [(ids[r],) for r in half])
            con.executemany("insert into attempts (batch, file, outcome) values (?, ?, 'running')",
                            [(i, ids[r]) for r in half])
    slots.append(subprocess.Popen(["cp", "--", *(sent(i, r) for r in half), slot]))
if any(p.wait() for p in slots):
    sys.exit("cp failed")
t1 = time.perf_counter()
rows = []
made = set()
for i, half in enumerate(halves):
    slot = os.path.join(staging, str(i))
    digests = []
    for rel in half:
        fd = os.open(sent(i, rel), os.O_RDONLY)
        digests.append(hashlib.blake2b(os.read(fd, 1 << 20)).hexdigest())  # every file is smaller
        os.close(fd)
        if guarded:
            os.lstat(sent(i, rel))
    if guarded:
        with con:
            con.executemany("update files set state = 'COMMITTING', checksum = ? where id = ?",
                            [(d, ids[r]) for r, d in zip(half, digests)])
        subprocess.run(["sync", "--", *(os.path.join(slot, os.path.basename(r)) for r in half)], check=True)
    for rel, digest in zip(half, digests):
        src = os.path.join(buffer, rel)
        top = os.path.dirname(rel)
        if top not in made:
            os.mkdir(os.path.join(ep, top))
            os.mkdir(os.path.join(holding, top))
            made.add(top)
        final = os.path.join(ep, rel)
        os.rename(os.path.join(slot, os.path.basename(rel)), final)
        size = os.lstat(final).st_size
        if guarded:
            writer_check(src)
            os.lstat(src)
        os.rename(src, os.path.join(holding, rel))
        if guarded:
            os.unlink(sent(i, rel))
        rows.append((rel, size, digest))
    if guarded:
        with con:
            con.executemany("update files set state = 'HELD' where id = ?", [(ids[r],) for r in half])
            con.executemany("update attempts set outcome = 'committed' where batch = ? and file = ?",
                            [(i, ids[r]) for r in half])
t2 = time.perf_counter()
if not guarded:
    con = sqlite3.connect(db)
    con.execute("create table files (name text primary key, size integer, checksum text)")
    with con:
        con.executemany("insert into files values (?, ?, ?)", rows)
con.close()
t3 = time.perf_counter()
print(json.dumps({"copy_seconds": t1 - t0, "per_file_seconds": t2 - t1, "record_seconds": t3 - t2}))
"""
