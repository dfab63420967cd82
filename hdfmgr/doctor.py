"""``hdfmgr doctor CONFIG``: pre-flight checks of a configuration against the real endpoint.

Each check prints one line, ``OK   <what>`` or ``FAIL <what>: <why> -> <fix>``; the exit status
is 0 when every check passed and 1 otherwise. ``WARN <what>: <why> -> <fix>`` is something the
daemon works with at a cost: an assumption of the guarantees that does not hold here (no read
leases on the handoff buffer: writers are then judged by quiet time alone), or an scp transfer
command, which pays round trips per file (measured: 1 test file, then 8); it does not fail the
exit status.
Remote checks run through the configured remote command exactly as the daemon does
(``Endpoint.remote``): constant ``sh -c`` scripts whose only arguments, the configured
directories and tool names, are quoted. Nothing is ever put into the endpoint buffer: the test
transfer (and the measurement of an scp command) goes into a slot directory of its own in
staging, which is removed afterwards (and which a starting daemon sweeps anyway).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from . import db as dbm
from . import longlinks, sharing
from .detect import lease_problem
from .endpoint import Endpoint, StagedFile
from .runner import NOT_STARTED, CommandResult, Feed
from .stream import TarStream
from .templates import Slot

EX_OK = 0
EX_FAIL = 1

#: External programs the commit program, the list and sweep scripts run on the endpoint (plus
#: ``stat`` for this check). ``b2sum`` is added in checksum mode. Without a working ``flock``
#: the commit moves nothing and ``run`` refuses to start (see endpoint.py); likewise without a
#: ``sync`` that flushes the files it is given (what makes a rename survive a power cut).
REMOTE_TOOLS = (
    "mv", "find", "sort", "comm", "cut", "xargs", "head", "tail", "join", "cmp", "cat", "tr", "grep",
    "mkdir", "rm", "flock", "sync", "getconf",
)  # fmt: skip

#: Prints the tools (arguments) the remote shell cannot find, one per line.
TOOLS_SCRIPT = 'for t; do command -v "$t" >/dev/null 2>&1 || printf \'%s\\n\' "$t"; done; exit 0'

#: Runs each GNU option the scripts rely on with empty input; prints the unsupported ones.
GNU_SCRIPT = "; ".join(
    [
        "b=''",
        "find / -maxdepth 0 -printf '' >/dev/null 2>&1 || b=\"$b, find -printf\"",
        'sort -z </dev/null >/dev/null 2>&1 || b="$b, sort -z"',
        'head -z -n 1 </dev/null >/dev/null 2>&1 || b="$b, head -z"',
        'cut -z -b 1- </dev/null >/dev/null 2>&1 || b="$b, cut -z"',
        'comm -z -12 - /dev/null </dev/null >/dev/null 2>&1 || b="$b, comm -z"',
        'xargs -0r true </dev/null >/dev/null 2>&1 || b="$b, xargs -0r"',
        'xargs -0 -x -s 8192 true </dev/null >/dev/null 2>&1 || b="$b, xargs -x -s"',
        'mv --version >/dev/null 2>&1 || b="$b, mv -t"',
        'if [ "$1" = checksum ] && command -v b2sum >/dev/null 2>&1; then'
        ' b2sum -z /dev/null >/dev/null 2>&1 || b="$b, b2sum -z"; fi',
        "printf '%s\\n' \"${b#, }\"",
    ]
)

#: For each directory argument: create it if missing, then print its device number, or "-"
#: when it cannot be created or written (the reason goes to stderr).
DIRS_SCRIPT = (
    'for d; do if mkdir -p -- "$d"; then if [ -w "$d" ]; then stat -L -c %d -- "$d" || echo -; '
    'else echo "$d: not writable" >&2; echo -; fi; else echo -; fi; done; exit 0'
)

#: Size of the test file in its slot directory, then remove the slot directory (and the
#: stream receive's record beside it).
PROBE_SCRIPT = 's=$(wc -c < "$1/$2") || s=-; rm -rf -- "$1" "$1.received"; echo "$s"'

#: Removes the slot directory of the per-file measurement.
REMOVE_SCRIPT = 'rm -rf -- "$1"'

#: The per-file measurement of an scp template sends 1 file, then this many.
COST_FILES = 8

PROBE_NAME = "hdfmgr-doctor.probe"
PROBE_DATA = b"hdfmgr doctor: this file tests the transfer command and is removed at once\n"


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    why: str = ""
    fix: str = ""
    #: An assumption that does not hold, which the daemon works around, or a slow transfer
    #: command (``ok`` stays True).
    warn: bool = False

    def line(self) -> str:
        if self.warn:
            return f"WARN {self.what}: {self.why} -> {self.fix}"
        if self.ok:
            return f"OK   {self.what}"
        return f"FAIL {self.what}: {self.why} -> {self.fix}"


def main(path: str, out: Callable[[str], None] = print) -> int:
    """Run every check for the configuration at ``path``, print one line each, return 0 or 1."""
    config = config_mod.load(path, check_paths=False)
    failed = False
    for check in run_checks(config):
        failed |= not check.ok
        out(check.line())
    return EX_FAIL if failed else EX_OK


def run_checks(config: config_mod.Config) -> Iterator[Check]:
    endpoint = Endpoint(config, generation="doctor")
    timeout = min(config.timeout, 60.0)
    first = _remote_runs(config, endpoint)
    yield first
    remote_ok = first.ok
    if remote_ok:
        yield from _remote_dirs(config, endpoint, timeout)
        yield _remote_tools(config, endpoint, timeout)
        yield _gnu_options(config, endpoint, timeout)
        yield _commit_probe(config, endpoint)
    else:
        for what in (
            "endpoint staging and buffer directories exist",
            "staging and endpoint buffer are on one filesystem",
            "remote tools found",
            "remote tools accept the GNU options hdfmgr uses",
            _PROBE_WHAT,
        ):
            yield Check(what, False, "not checked: the remote command does not work", "fix that first")
    buffer = _local_dir("handoff buffer", config.buffer, write=False, key="handoff.buffer")
    yield buffer
    if buffer.ok:
        yield _leases(config)
    yield _local_dir("holding", config.holding, write=True, key="handoff.holding")
    database = _database(config)
    yield database
    if database.ok:
        yield _durable(config)
    share = _sharing(config)
    if share is not None:
        yield share
    program = _transfer_program(config)
    yield program
    if remote_ok and program.ok:
        transfer = _test_transfer(config, endpoint, timeout)
        yield transfer
        scp = longlinks.scp_transfer(config.transfer)
        if transfer.ok and scp is not None:
            yield _per_file_cost(scp, endpoint, timeout)
    else:
        yield Check(
            "transfer command copies a test file into staging",
            False,
            "not checked: "
            + ("the remote command does not work" if not remote_ok else "no transfer program"),
            "fix that first",
        )


# ---------------------------------------------------------------------------- remote


def _by_hand(argv: list[str]) -> str:
    return shlex.join(argv)


def _why(result: CommandResult) -> str:
    return result.describe()


def _remote_runs(config: config_mod.Config, endpoint: Endpoint) -> Check:
    what = "remote command runs `true`"
    argv = config.remote.render(command="true")
    result = endpoint.probe()
    if result.returncode == NOT_STARTED and not result.stdout and result.stderr.startswith(b"cannot run"):
        return Check(what, False, _why(result), f"install {argv[0]!r} or fix endpoint.commands.remote")
    elif result.returncode == 255:
        fix = f"{_ssh_fix(result.stderr)}; this must succeed without a prompt: {_by_hand(argv)}"
        return Check(what, False, _why(result), fix)
    elif not result.ok:
        return Check(
            what,
            False,
            _why(result),
            "the remote login shell or its startup files fail; this must succeed: " + _by_hand(argv),
        )
    elif result.stdout:
        shown = result.stdout[:60].decode("utf-8", "backslashreplace")
        return Check(
            what,
            False,
            f"it printed {shown!r}, which breaks scp, sftp and rsync through this account",
            "make the remote account's shell startup files print nothing for non-interactive shells",
        )
    else:
        return Check(what, True)


def _ssh_fix(stderr: bytes) -> str:
    """The likely fix for an ssh transport failure, from its message."""
    text = stderr.decode("utf-8", "replace")
    if "Permission denied" in text:
        return (
            "the endpoint refused the login: install the public key in the remote authorized_keys, "
            "check the key and user"
        )
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return "record the endpoint's host key once (run the command below interactively) or fix known_hosts"
    if "Could not resolve" in text or "Name or service not known" in text:
        return "check the host name"
    if "Connection refused" in text or "timed out" in text or "No route to host" in text:
        return "check the host and port, and that sshd runs there"
    return "check the key, user, host, port and known host key"


def _remote_dirs(config: config_mod.Config, endpoint: Endpoint, timeout: float) -> Iterator[Check]:
    exist = "endpoint staging and buffer directories exist"
    same = "staging and endpoint buffer are on one filesystem"
    dirs = (config.staging, config.endpoint_buffer)
    result = endpoint.remote(DIRS_SCRIPT, *dirs, timeout=timeout)
    devices = result.stdout.decode("ascii", "replace").split()
    if not result.ok or len(devices) != 2:
        why = _why(result) if not result.ok else f"unexpected reply {result.stdout[:80]!r}"
        yield Check(exist, False, why, "check that sh, mkdir and stat work on the endpoint host")
        yield Check(same, False, "not checked", "fix the directories first")
        return
    bad = [d for d, dev in zip(dirs, devices, strict=True) if not dev.isdigit()]
    if bad:
        reason = result.stderr_tail().splitlines()
        yield Check(
            exist,
            False,
            f"cannot create or write {', '.join(bad)}" + (f" ({reason[-1]})" if reason else ""),
            "create them on the endpoint host, writable by the remote user (mkdir -p), or fix "
            "endpoint.staging / endpoint.buffer",
        )
        yield Check(same, False, "not checked", "fix the directories first")
        return
    yield Check(exist, True)
    if devices[0] != devices[1]:
        yield Check(
            same,
            False,
            f"staging {config.staging} is on device {devices[0]}, endpoint buffer "
            f"{config.endpoint_buffer} on device {devices[1]}: mv would copy, not rename atomically",
            "put endpoint.staging on the endpoint buffer's filesystem (e.g. a directory beside it)",
        )
    else:
        yield Check(same, True)


def _remote_tools(config: config_mod.Config, endpoint: Endpoint, timeout: float) -> Check:
    tools = [*REMOTE_TOOLS, "stat"] + (["b2sum"] if config.verify == "checksum" else [])
    tools += ["tar"] if config.stream else []
    what = "remote tools found: " + " ".join(tools)
    return _listing_check(
        what,
        endpoint.remote(TOOLS_SCRIPT, *tools, timeout=timeout),
        "not found on the remote PATH: ",
        "install GNU coreutils, findutils and util-linux (flock) on the endpoint host "
        "(b2sum: coreutils >= 8.26), or put them on the remote account's PATH",
    )


def _gnu_options(config: config_mod.Config, endpoint: Endpoint, timeout: float) -> Check:
    what = "remote tools accept the GNU options hdfmgr uses"
    return _listing_check(
        what,
        endpoint.remote(GNU_SCRIPT, config.verify, timeout=timeout),
        "not supported: ",
        "install GNU coreutils and findutils on the endpoint host (BSD and busybox versions lack "
        "these options)",
    )


_PROBE_WHAT = "endpoint can run the commit (the start-up probe run and rescan ask)"


def _commit_probe(config: config_mod.Config, endpoint: Endpoint) -> Check:
    """The very probe ``run`` and ``rescan`` refuse to start on: a real ``flock`` on staging,
    ``b2sum -z`` computing the expected BLAKE2b (checksum mode), a ``sync`` that flushes the
    files it is named (without it a power cut on the endpoint can empty a delivered file), the
    argument limit."""
    result, found = endpoint.requirements()
    if found is None:
        return Check(_PROBE_WHAT, False, _why(result), "check that sh works on the endpoint host")
    problems = [p for p in found.problems(config.verify) if not p.startswith("not found")]
    what = _PROBE_WHAT + (
        f": flock works on staging{', b2sum -z works' if config.verify == 'checksum' else ''}, "
        f"sync -- FILE works{', GNU tar (stream)' if config.stream else ''}, "
        f"ARG_MAX {found.arg_max or 'unknown'}"
    )
    if problems:
        return Check(
            what,
            False,
            "; ".join(problems),
            "install util-linux flock and GNU coreutils >= 8.26 (b2sum -z; sync with file "
            "arguments: >= 8.24) on the endpoint host; on Lustre "
            "mount staging with -o flock (or localflock when one host runs the commits)",
        )
    return Check(what, True)


def _listing_check(what: str, result: CommandResult, problem: str, fix: str) -> Check:
    """A remote script that prints what is wrong (words) and nothing when all is well."""
    if not result.ok:
        return Check(what, False, _why(result), "check that sh works on the endpoint host")
    found = result.stdout.decode("utf-8", "replace").split()
    if found:
        return Check(what, False, problem + " ".join(found), fix)
    return Check(what, True)


def _test_transfer(config: config_mod.Config, endpoint: Endpoint, timeout: float) -> Check:
    what = "transfer command copies a test file into staging"
    slot = endpoint.slot_dir(0)
    prepare = endpoint.prepare(slot)
    if not prepare.ok:
        return Check(what, False, f"cannot create {slot}: {_why(prepare)}", "check endpoint.staging")
    with tempfile.TemporaryDirectory(prefix="hdfmgr-doctor-") as tmp:
        path = os.path.join(tmp, PROBE_NAME)
        Path(path).write_bytes(PROBE_DATA)
        staged = StagedFile(PROBE_NAME, path, len(PROBE_DATA))
        if config.stream:
            tar = TarStream([staged])
            result = endpoint.receive(slot, Feed(tar.length, tar.chunks()), batch=1)
            if not result.ok:
                endpoint.remote(PROBE_SCRIPT, slot, PROBE_NAME, timeout=timeout)
                return Check(
                    what,
                    False,
                    _why(result),
                    "the stream transfer needs GNU tar and flock on the endpoint, and a remote "
                    "command that passes stdin through (as ssh does)",
                )
        else:
            for argv in endpoint.transfer_argvs([staged], slot):
                result = endpoint.transfer(argv)
                if not result.ok:
                    endpoint.remote(PROBE_SCRIPT, slot, PROBE_NAME, timeout=timeout)
                    return Check(what, False, _why(result), f"this must succeed: {_by_hand(argv)}")
    check = endpoint.remote(PROBE_SCRIPT, slot, PROBE_NAME, timeout=timeout)
    size = check.stdout.decode("ascii", "replace").strip()
    if not check.ok or size != str(len(PROBE_DATA)):
        return Check(
            what,
            False,
            f"the transfer exited 0 but {slot}/{PROBE_NAME} has size {size or '?'}, not {len(PROBE_DATA)}",
            "the transfer must copy {file}/{batch} into the directory {dest} names",
        )
    return Check(what, True)


def _per_file_cost(label: str, endpoint: Endpoint, timeout: float) -> Check:
    """An scp template (``label`` from :func:`longlinks.scp_transfer`): time the transfer
    command with 1 small file and with :data:`COST_FILES`, into a slot directory of its own
    (removed afterwards), and show what each further file costs. Always a ``WARN``: the cost
    per file is round trips, so it grows with the link's round trip time whatever it is here."""
    what = "transfer command pays per file"
    slot = endpoint.slot_dir(1)

    def unmeasured(why: str) -> Check:
        return Check(what, True, f"{longlinks.scp_why(label)}; not measured: {why}", longlinks.FIX, warn=True)

    prepare = endpoint.prepare(slot)
    if not prepare.ok:
        return unmeasured(f"cannot create {slot}: {_why(prepare)}")
    seconds: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hdfmgr-doctor-") as tmp:
            files = []
            for i in range(1 + COST_FILES):
                name = f"hdfmgr-doctor.{i}.probe"
                path = os.path.join(tmp, name)
                Path(path).write_bytes(PROBE_DATA)
                files.append(StagedFile(name, path, len(PROBE_DATA)))
            for group in (files[:1], files[1:]):
                start = time.monotonic()
                for argv in endpoint.transfer_argvs(group, slot):
                    result = endpoint.transfer(argv, len(PROBE_DATA) * len(group))
                    if not result.ok:
                        return unmeasured(f"{_why(result)}: {_by_hand(argv)}")
                seconds.append(time.monotonic() - start)
    finally:
        endpoint.remote(REMOVE_SCRIPT, slot, timeout=timeout)
    one, many = seconds
    extra = max(0.0, (many - one) / (COST_FILES - 1))
    visit = longlinks.VISIT_FILES
    spent = (visit - 1) * extra
    shown = f"{spent:.0f}" if spent >= 10 else _seconds(spent)
    return Check(
        what,
        True,
        f"{label} took {_seconds(one)} s for 1 file and {_seconds(many)} s for {COST_FILES} "
        f"({_seconds(extra)} s per extra file; a {visit}-file visit would spend "
        f"~{shown} s on round trips)",
        longlinks.FIX,
        warn=True,
    )


def _seconds(value: float) -> str:
    """Two decimals from 0.1 s, milliseconds below (a loopback's)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


# ---------------------------------------------------------------------------- local


def _local_dir(label: str, path: Path, *, write: bool, key: str) -> Check:
    what = f"{label} {path} is {'writable' if write else 'readable'}"
    if not path.is_dir():
        return Check(
            what, False, "no such directory", f"create it (mkdir -p {shlex.quote(str(path))}) or fix {key}"
        )
    if not os.access(path, os.R_OK | os.X_OK | (os.W_OK if write else 0)):
        return Check(what, False, "permission denied", f"give the user running hdfmgr access, or fix {key}")
    if write:
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".hdfmgr-doctor-"):
                pass
        except OSError as exc:
            return Check(what, False, f"cannot create a file: {exc.strerror}", f"fix the filesystem or {key}")
    return Check(what, True)


def _leases(config: config_mod.Config) -> Check:
    """The writer check of Settle and of holding: read leases on the buffer's filesystem and,
    for files of other users, CAP_LEASE (this process's: run doctor as the service runs)."""
    what = "writers can be seen in the handoff buffer (read leases)"
    problem = lease_problem(os.fspath(config.buffer))
    if problem is None:
        return Check(what, True)
    return Check(
        what,
        True,
        problem,
        f"a file without a close event counts as complete after general.stable_age "
        f"({config.stable_age:g} s) of unchanged stats: set it above the longest pause of any "
        "writer (README, Settle), or give the service CAP_LEASE "
        "(systemd: AmbientCapabilities=CAP_LEASE) on a local filesystem",
        warn=True,
    )


def _durable(config: config_mod.Config) -> Check:
    """Power loss: each transaction that precedes a side effect must be on disk when it
    returns (SQLite ``synchronous=FULL``; PostgreSQL ``fsync`` and ``synchronous_commit``)."""
    what = "database commits are on disk before what follows them (power loss)"
    sqlite = config.database.startswith("sqlite:")
    if sqlite and not config_mod.sqlite_path(config.database, config.path.parent).exists():
        return Check(what + ": SQLite synchronous=FULL, set at every connection", True)
    try:
        database = dbm.connect(config)
        try:
            if sqlite:
                level = database.execute_sql("PRAGMA synchronous").fetchone()[0]
                settings = {"synchronous": {0: "off", 1: "normal", 2: "full", 3: "extra"}.get(level, level)}
                bad = [] if level >= 2 else [f"synchronous={settings['synchronous']}"]
            else:
                settings = {
                    name: database.execute_sql(f"SHOW {name}").fetchone()[0]
                    for name in ("fsync", "synchronous_commit")
                }
                bad = [f"{name}={value}" for name, value in settings.items() if value == "off"]
        finally:
            database.close()
    except Exception as exc:  # peewee wraps the driver's errors in many types
        return Check(what, False, f"cannot ask the database: {exc}".strip(), "check database.engine")
    shown = ", ".join(f"{name}={value}" for name, value in settings.items())
    if bad:
        return Check(
            f"{what}: {shown}",
            False,
            "a power cut may roll back a checkpoint written before a remote mv (" + ", ".join(bad) + ")",
            "turn fsync and synchronous_commit on in the server's configuration",
        )
    return Check(f"{what}: {shown}", True)


def _database(config: config_mod.Config) -> Check:
    location = dbm.database_location(config)
    what = f"database {location} is writable"
    if not config.database.startswith("sqlite:"):
        try:
            database = dbm.connect(config)
            database.close()
        except Exception as exc:  # peewee wraps the driver's errors in many types
            return Check(
                what, False, f"cannot connect: {exc}".strip(), "check database.engine and the server"
            )
        return Check(what, True)
    target = config_mod.sqlite_path(config.database, config.path.parent)
    if target.exists():
        if not os.access(target, os.R_OK | os.W_OK):
            return Check(what, False, "permission denied", "give the user running hdfmgr write access")
        return Check(what, True)
    directory = target.parent
    if not directory.is_dir():
        return Check(what, False, f"directory {directory} does not exist", "create it or fix database.engine")
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".hdfmgr-doctor-"):
            pass
    except OSError as exc:
        return Check(
            what,
            False,
            f"cannot create files in {directory}: {exc.strerror}",
            "fix the directory's permissions",
        )
    return Check(what, True)


def _sharing(config: config_mod.Config) -> Check | None:
    """Whether the ssh-based commands share one connection (README, Connection sharing); no
    line for commands that do not run ssh."""
    what = "ssh connections are shared"
    templates = [config.remote] if config.stream else [config.transfer, config.remote]
    if config.control_dir is not None:
        return Check(f"{what} (hdfmgr adds ControlMaster, sockets in {config.control_dir})", True)
    if any(sharing.mentions_sharing(t) for t in templates):
        return Check(f"{what} as the templates say (their own Control* options)", True)
    sharable = any(sharing.shared(t, "/d") is not None for t in templates)
    if not sharable:
        return None
    if config.sharing_problem is not None:
        why = f"hdfmgr would add sharing, but {config.sharing_problem}"
        fix = "make it a directory of this user with mode 0700 (or use systemd's RuntimeDirectory=hdfmgr)"
    else:
        why = "general.share_connections is false: each command opens a new connection (about 8 round trips)"
        fix = "set it to auto, or add ControlMaster options yourself (README, Connection sharing)"
    return Check(what, True, why, fix, warn=True)


def _transfer_program(config: config_mod.Config) -> Check:
    if config.stream:
        return Check(f"transfer is the built-in stream ({config_mod.STREAM}): no program of its own", True)
    first = config.transfer.tokens[0]
    program = "".join(seg for seg in first if not isinstance(seg, Slot))
    what = f"transfer program {program} found"
    if shutil.which(program) is None:
        return Check(
            what, False, f"{program!r} is not an executable on PATH", "install it or give its full path"
        )
    return Check(what, True)
