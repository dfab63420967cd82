"""Warm sessions (hdfmgr/session.py, hdfmgr/remote/session.sh): the framing parser without any
shell; the loop under sh and tcsh; then through the real loopback sshd: many steps over one
login, a session killed on the endpoint mid-step, a step timing out, hostile names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hdfmgr.config import ConfigError, from_mapping
from hdfmgr.endpoint import BOOTSTRAP, Endpoint, commit_groups, commit_payload, program
from hdfmgr.session import PING_AFTER, READY_ERR, READY_OUT, Reply, step_request
from tests.delay_relay import DelayRelay, known_hosts_for
from tests.site import Consumer, content, wait_for
from tests.site import Site as DaemonSite
from tests.ssh_templates import REMOTE, params
from tests.sshd_fixture import SshServer
from tests.test_endpoint_script import HOSTILE, Site, listing, no_pwned, stage

TOKEN = "0123456789abcdef0123456789abcdef"

# --------------------------------------------------------------------------- framing, no shell


def end_out(token: str = TOKEN, status: int = 0) -> bytes:
    return b"\0/hdfmgr-step/" + token.encode() + f"/{status}/".encode() + b"\0"


def end_err(token: str = TOKEN) -> bytes:
    return b"\n/hdfmgr-step/" + token.encode() + b"/\n"


def test_a_reply_is_complete_only_with_both_end_records_in_any_chunking() -> None:
    out = b"\0/hdfmgr-begin/\0Mname\0/hdfmgr-end/\0" + end_out(status=96)
    err = b"hdfmgr commit: cut short\n" + end_err()
    for size in (1, 2, 3, 7, 64):
        reply = Reply.step(TOKEN)
        for i in range(0, max(len(out), len(err)), size):
            assert not reply.done
            reply.feed_out(out[i : i + size])
            reply.feed_err(err[i : i + size])
        assert reply.done and not reply.trailing
        assert reply.status == 96
        assert bytes(reply.out) == b"\0/hdfmgr-begin/\0Mname\0/hdfmgr-end/\0"
        assert bytes(reply.err) == b"hdfmgr commit: cut short\n"


def test_another_steps_token_or_a_half_record_never_ends_a_reply() -> None:
    reply = Reply.step(TOKEN)
    reply.feed_out(end_out("ffffffffffffffffffffffffffffffff") + b"\0/hdfmgr-step/" + TOKEN.encode() + b"/0/")
    reply.feed_err(end_err("ffffffffffffffffffffffffffffffff"))
    assert not reply.done and reply.status is None
    reply.feed_out(b"\0")
    reply.feed_err(end_err())
    assert reply.done and reply.status == 0


def test_output_after_the_end_record_is_a_protocol_doubt() -> None:
    reply = Reply.step(TOKEN)
    reply.feed_out(end_out() + b"late")
    reply.feed_err(end_err())
    assert reply.done and reply.trailing
    reply = Reply.step(TOKEN)
    reply.feed_out(end_out())
    reply.feed_out(b"x")
    assert reply.trailing


def test_the_ready_reply_swallows_what_a_login_prints_first() -> None:
    reply = Reply.ready()
    reply.feed_out(b"Welcome!\n" + READY_OUT)
    reply.feed_err(b"motd\n" + READY_ERR)
    assert reply.done and not reply.trailing


def test_a_step_request_is_length_prefixed() -> None:
    request = step_request(TOKEN, "echo hi", ["hdfmgr-x", "a b", "it's"], b"\0data")
    header, rest = request.split(b"\n", 1)
    k, p, a, d = header.split(b" ")
    assert k == TOKEN.encode() and int(p) == 7 and int(d) == 5
    assert rest[:7] == b"echo hi" and rest[7 + int(a) :] == b"\0data"
    assert rest[7 : 7 + int(a)] == b"hdfmgr-x 'a b' 'it'\"'\"'s'"
    with pytest.raises(ValueError):
        step_request(TOKEN, "echo hi\n", ["x"], b"")
    with pytest.raises(ValueError):
        step_request("not hex!", "true", ["x"], b"")


# --------------------------------------------------------------------------- the loop itself

SHELLS = [sh for sh in ("dash", "bash") if os.path.exists(f"/bin/{sh}")]


def start_loop(shell: str) -> subprocess.Popen[bytes]:
    loop = program("session.sh")
    proc = subprocess.Popen(
        [shell, "-c", BOOTSTRAP, "hdfmgr", str(len(loop)), "hdfmgr-session"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(loop.encode())
    proc.stdin.flush()
    return proc


@pytest.mark.parametrize("shell", SHELLS)
def test_the_loop_runs_steps_in_order_and_drops_unread_data(shell: str) -> None:
    """A program that reads none of its data (or part of it) never leaves it to be taken for
    the next step's header."""
    proc = start_loop(shell)
    steps = [
        step_request("aa" * 8, 'echo "$0:$#:$1"; exit 3', ["one", "x y"], b"unread\n" * 10_000),
        step_request("bb" * 8, "head -c 2; echo; echo err >&2", ["two"], b"1234567"),
        step_request("cc" * 8, "wc -c", ["three"], b""),
    ]
    out, err = proc.communicate(b"".join(steps), timeout=30)
    assert proc.returncode == 0
    assert out == (
        READY_OUT
        + b"one:1:x y\n"
        + b"\0/hdfmgr-step/" + b"aa" * 8 + b"/3/\0"
        + b"12\n"
        + b"\0/hdfmgr-step/" + b"bb" * 8 + b"/0/\0"
        + b"0\n"
        + b"\0/hdfmgr-step/" + b"cc" * 8 + b"/0/\0"
    )  # fmt: skip
    assert (
        err
        == READY_ERR
        + b"\n/hdfmgr-step/"
        + b"aa" * 8
        + b"/\nerr\n\n/hdfmgr-step/"
        + b"bb" * 8
        + b"/\n"
        + (b"\n/hdfmgr-step/" + b"cc" * 8 + b"/\n")
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_a_step_cut_short_never_runs_and_ends_the_loop(shell: str, tmp_path: Path) -> None:
    """The daemon died while writing a step: a program or argument list that did not arrive
    whole never runs; data cut short reaches the program as an early end of file."""
    marker = tmp_path / "ran"
    request = step_request(TOKEN, 'touch "$1"', ["hdfmgr-x", str(marker)], b"")
    for cut in range(len(request)):
        proc = start_loop(shell)
        out, _ = proc.communicate(request[:cut], timeout=30)
        assert not marker.exists(), cut
        assert b"/hdfmgr-step/" not in out
    # Data cut short: the program sees what came and an end of file, then the loop ends.
    proc = start_loop(shell)
    request = step_request(TOKEN, 'wc -c; echo "$?"', ["hdfmgr-x"], b"x" * 100)
    out, _ = proc.communicate(request[:-40], timeout=30)
    assert out.startswith(READY_OUT + b"60\n0\n")
    assert proc.returncode == 0


def test_a_commit_whose_data_is_cut_short_moves_nothing(tmp_path: Path) -> None:
    """The daemon died while writing the commit's data into a long-lived session: the commit
    program sees an early end of file, finds its last record missing and moves nothing; the
    loop then ends."""
    site = Site(tmp_path / "site")
    slot = site.slot()
    files = [site.local(f"d/{name}", os.fsencode(name)) for name in HOSTILE[:6]]
    for f in files:
        stage(slot, f.basename, os.fsencode(f.basename))
    data, nrec, nplan = commit_payload(commit_groups(files, site.endpoint.final_dir), "size", slot)
    args = ["hdfmgr-commit", slot, "size", "5", "1", str(nrec), str(nplan)]
    request = step_request(TOKEN, program("commit.sh"), args, data)
    for cut in [*range(len(request) - len(data), len(request), 13), len(request) - 1]:
        proc = start_loop(SHELLS[0])
        out, _ = proc.communicate(request[:cut], timeout=30)
        assert b"X96 commit input cut short" in out, cut
        assert out.endswith(b"/hdfmgr-step/" + TOKEN.encode() + b"/96/\0"), cut
        assert proc.returncode == 0, cut
        assert len(listing(slot)) == len(files), cut
        assert not (site.ep_buffer / "d").exists(), cut
    proc = start_loop(SHELLS[0])
    out, _ = proc.communicate(request, timeout=30)
    assert out.endswith(b"\0/hdfmgr-step/" + TOKEN.encode() + b"/0/\0")
    assert listing(slot) == {} and len(listing(site.ep_buffer / "d")) == len(files)


# --------------------------------------------------------------------------- through a local shell


def warm_site(root: Path, **kwargs: object) -> Site:
    site = Site(root, **kwargs)  # type: ignore[arg-type]
    site.endpoint = Endpoint(site.config, generation="g1", warm=True)
    return site


def commit_hostile(site: Site) -> None:
    ep = site.endpoint
    slot = ep.slot_dir(0)
    assert ep.prepare(slot).ok
    files = []
    for i, name in enumerate(HOSTILE):
        data = f"{i}:".encode() + os.fsencode(name)
        f = site.local(f"{'ab'[i % 2]}/{name}", data)
        stage(slot, f.basename, data)
        files.append(f)
    result, report = ep.commit(slot, None, files, batch=1)
    assert result.ok, result.stderr
    assert report is not None and report.moved == {f.basename for f in files}
    for i, name in enumerate(HOSTILE):
        got = listing(site.ep_buffer / "ab"[i % 2])
        assert got[os.fsencode(name)] == f"{i}:".encode() + os.fsencode(name)
    assert listing(slot) == {}
    no_pwned(site.root, Path.cwd())


@pytest.mark.parametrize("remote", ['sh -c "{command}"', 'tcsh -f -c "{command}"'])
def test_hostile_names_commit_byte_identical_through_a_warm_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remote: str
) -> None:
    """tcsh: a csh-family login shell parses only the constant bootstrap of the loop."""
    if remote.startswith("tcsh") and not os.path.exists("/usr/bin/tcsh"):
        pytest.fail("tcsh is not installed (apt-get install tcsh)")
    monkeypatch.chdir(tmp_path)
    site = warm_site(tmp_path / "site", remote=remote)
    try:
        commit_hostile(site)
        _, present = site.endpoint.list_slots([site.endpoint.slot_dir(0)])
        assert present == {site.endpoint.slot_dir(0): set()}
        assert site.endpoint.probe().ok
        assert site.endpoint.sessions is not None and site.endpoint.sessions.started == 1
    finally:
        site.endpoint.close()


def test_a_session_that_cannot_start_falls_back_to_one_command_per_step(tmp_path: Path) -> None:
    """A template that gives the remote command no stdin: the loop never says ready; steps
    run as single commands (those without data work), and no start is retried at once."""
    site = warm_site(tmp_path / "site", remote='sh -c "exec </dev/null; {command}"')
    sessions = site.endpoint.sessions
    assert sessions is not None
    slot = site.endpoint.slot_dir(0)
    result = site.endpoint.prepare(slot)
    assert result.ok and "warm session" not in " ".join(result.argv)
    assert os.path.isdir(slot)
    assert sessions.started == 0 and sessions.failures == 1 and sessions.not_before > time.monotonic()
    assert site.endpoint.probe().ok
    assert sessions.failures == 1  # within the backoff: not tried again


def test_an_outage_fails_steps_as_transport_failures_then_sessions_come_back(tmp_path: Path) -> None:
    """Unreachable (exit 255 before anything runs): the session cannot start and the step,
    run as one command, fails as without warm sessions (the breaker counts it). Once a
    plain command gets through, the next step starts a session at once, not after the
    backoff."""
    down = tmp_path / "down"
    down.touch()
    site = warm_site(tmp_path / "site", remote=f'sh -c "if [ -e {down} ]; then exit 255; fi; {{command}}"')
    ep, sessions = site.endpoint, site.endpoint.sessions
    assert sessions is not None
    slot = ep.slot_dir(0)
    try:
        result = ep.prepare(slot)
        assert result.returncode == 255 and not os.path.isdir(slot)
        assert sessions.failures == 1 and sessions.not_before > time.monotonic() + 1
        assert ep.probe().returncode == 255  # within the backoff: one command, failing
        down.unlink()
        result = ep.probe()
        assert result.ok and "warm session" not in " ".join(result.argv)
        result = ep.prepare(slot)
        assert result.ok and "warm session" in " ".join(result.argv) and os.path.isdir(slot)
        assert sessions.started == 1
    finally:
        ep.close()


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = parent(pid)
        if pid == ancestor:
            return True
    return False


def test_a_session_idle_too_long_must_answer_an_empty_step_first(tmp_path: Path) -> None:
    """A connection that died quietly (here: a remote shell that stopped answering) is found
    by the empty step, within its own timeout, before the real step is sent into it."""
    site = warm_site(tmp_path / "site", timeout=2)
    ep, sessions = site.endpoint, site.endpoint.sessions
    assert sessions is not None
    now = [1000.0]
    sessions.clock = lambda: now[0]
    try:
        assert ep.probe().ok
        (session,) = sessions.idle
        now[0] += 10
        assert ep.probe().ok and session.steps == 2  # recent: no empty step
        now[0] += PING_AFTER + 1
        assert ep.probe().ok and session.steps == 4  # the empty step, then the probe
        stopped = [pid for pid in session_loops() if descends(pid, session.pid)]
        assert len(stopped) == 1
        os.kill(stopped[0], signal.SIGSTOP)
        now[0] += PING_AFTER + 1
        slot = ep.slot_dir(0)
        result = ep.prepare(slot)
        assert result.ok and os.path.isdir(slot)
        assert not session.usable() and sessions.started == 2
    finally:
        ep.close()


def session_loops() -> list[int]:
    """PIDs of the warm sessions' remote shells on this machine (the loop's $0)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"hdfmgr-session" in argv and argv[:2] == [b"sh", b"-c"]:
                pids.append(int(entry))
    return pids


# --------------------------------------------------------------------------- through the real sshd


def ssh_site(
    root: Path,
    sshd: SshServer,
    *,
    timeout: float = 30,
    warm: bool = True,
    share: bool = True,
    **extra: object,
) -> Site:
    site = Site(root, timeout=timeout)
    raw = site.config.raw
    commands = {**raw["endpoint"]["commands"], "remote": REMOTE}
    endpoint = {**raw["endpoint"], "commands": commands, **params(sshd, **extra)}
    general = {**raw["general"], "share_connections": share}
    site.config = from_mapping({**raw, "endpoint": endpoint, "general": general}, path=root / "config.yaml")
    assert site.config.warm_sessions  # auto: the remote template runs ssh
    site.endpoint = Endpoint(site.config, generation="g1", warm=warm)
    return site


KILLED_DAEMON = """
import sys, time
from hdfmgr.endpoint import Endpoint
from tests.test_endpoint_script import Site
from pathlib import Path
site = Site(Path(sys.argv[1]), remote=sys.argv[2])
ep = Endpoint(site.config, generation="g1", warm=True)
assert ep.prepare(ep.slot_dir(0)).ok
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("over", ["sh", "ssh"])
def test_a_killed_daemon_leaves_no_remote_shell_running(tmp_path: Path, sshd: SshServer, over: str) -> None:
    """kill -9 of the process holding the session: the ssh client's stdin closes, the loop
    reads end of file and exits, and the ssh client with it."""
    remote = 'sh -c "{command}"'
    if over == "ssh":
        remote = REMOTE
        for key, value in params(sshd).items():
            remote = remote.replace("{" + key + "}", str(value))
    before = set(session_loops())
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DAEMON, str(tmp_path / "site"), remote],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        ours = set(session_loops()) - before
        assert len(ours) == 1
        clients = {
            pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if parent(pid) == proc.pid
        }
        assert clients
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    wait_for(lambda: not ours & set(session_loops()), 10, "the loop to exit on end of file")
    wait_for(lambda: not any(running(pid) for pid in clients), 10, "the ssh client to exit")


def sshd_connections(sshd: SshServer) -> int:
    """sshd processes serving connections (the listener's descendants named sshd*)."""
    assert sshd.process is not None
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            names[int(entry)] = text[text.index(b"(") + 1 : text.rindex(b")")].decode(errors="replace")
            parents[int(entry)] = int(text.rsplit(b")", 1)[1].split()[1])
    ours = {sshd.process.pid}
    while True:
        more = {p for p, parent in parents.items() if parent in ours and names[p].startswith("sshd")} - ours
        if not more:
            return len(ours) - 1
        ours |= more


def test_many_steps_over_one_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd: SshServer) -> None:
    monkeypatch.chdir(tmp_path)
    site = ssh_site(tmp_path / "site", sshd)
    ep = site.endpoint
    try:
        commit_hostile(site)
        counts: list[int] = []
        slot = ep.slot_dir(0)
        for i in range(20):
            f = site.local(f"n/f{i}", b"x" * i)
            stage(slot, f.basename, b"x" * i)
            result, report = ep.commit(slot, None, [f], batch=2 + i)
            assert result.ok and report is not None and report.moved == {f.basename}
            counts.append(sshd_connections(sshd))
            assert ep.list_slots([slot])[1] == {slot: set()}
        assert ep.sessions is not None and ep.sessions.started == 1
        # The same login all along: never more connections than after the first step (another
        # test's shared master, ending after its ControlPersist, may leave meanwhile).
        assert counts[0] >= 1 and max(counts) == counts[0], counts
        assert (site.ep_buffer / "n" / "f19").read_bytes() == b"x" * 19
    finally:
        ep.close()


def test_a_session_killed_on_the_endpoint_mid_step(tmp_path: Path, sshd: SshServer) -> None:
    """Its outcome is unknown (a failed command, no framed reply); the next step runs on a
    new session."""
    site = ssh_site(tmp_path / "site", sshd)
    ep = site.endpoint
    assert ep.sessions is not None
    started = tmp_path / "started"
    before = set(session_loops())
    try:
        assert ep.probe().ok
        loops = set(session_loops()) - before
        assert len(loops) == 1
        killer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys, time, signal\n"
                "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
                "os.killpg(os.getpgid(int(sys.argv[2])), signal.SIGKILL)\n",
                str(started),
                str(loops.pop()),
            ]
        )
        result = ep.remote('touch "$1"; sleep 20; printf "\\000/hdfmgr-begin/\\000"', str(started))
        killer.wait(timeout=30)
        assert not result.ok and not result.timed_out and result.returncode == 255
        assert result.duration < 15
        assert ep.probe().ok
        assert ep.sessions.started == 2
    finally:
        ep.close()


def test_a_step_timing_out_kills_its_session(tmp_path: Path, sshd: SshServer) -> None:
    site = ssh_site(tmp_path / "site", sshd)
    ep = site.endpoint
    assert ep.sessions is not None
    try:
        assert ep.probe().ok
        t0 = time.monotonic()
        result = ep.remote("sleep 30", timeout=1.0)
        assert result.timed_out and result.returncode == 124
        assert time.monotonic() - t0 < 10
        assert ep.sessions.idle == []
        slot = ep.slot_dir(0)
        assert ep.prepare(slot).ok and os.path.isdir(slot)
        assert ep.sessions.started == 2
    finally:
        ep.close()


def test_config_warm_sessions_switch(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    raw = site.config.raw

    def load(general: dict[str, object], remote: str = 'sh -c "{command}"') -> bool:
        endpoint = {**raw["endpoint"], "commands": {**raw["endpoint"]["commands"], "remote": remote}}
        data = {**raw, "endpoint": endpoint, "general": {**raw["general"], **general}}
        return from_mapping(data, path=tmp_path / "c.yaml").warm_sessions

    assert load({}) is False  # auto: not an ssh template
    assert load({}, '/usr/bin/ssh host "{command}"') is True
    assert load({"warm_sessions": False}, 'ssh host "{command}"') is False
    assert load({"warm_sessions": True}) is True
    with pytest.raises(ConfigError, match=r"general\.warm_sessions"):
        load({"warm_sessions": "yes"})


@pytest.mark.parametrize(("warm", "share"), [(True, False), (False, False), (False, True)])
def test_over_a_long_link_a_warm_endpoint_logs_in_once(
    tmp_path: Path, sshd: SshServer, warm: bool, share: bool
) -> None:
    """Counted at a relay in front of sshd (20 ms each way): ten commits and listings over one
    connection with warm sessions or with the connection sharing hdfmgr adds, one connection
    per step with neither."""
    with DelayRelay(sshd.port, 0.02) as relay:
        known = known_hosts_for(sshd.known_hosts, sshd.port, relay.port, tmp_path / "known_hosts")
        site = ssh_site(
            tmp_path / "site", sshd, warm=warm, share=share, port=relay.port, known_hosts=str(known)
        )
        ep = site.endpoint
        try:
            slot = site.slot()
            for i in range(10):
                f = site.local(f"n/f{i}", b"y" * i)
                stage(slot, f.basename, b"y" * i)
                result, report = ep.commit(slot, None, [f], batch=1 + i)
                assert result.ok and report is not None and report.moved == {f.basename}
            assert ep.list_slots([slot])[1] == {slot: set()}
            assert relay.connections == (1 if warm or share else 12)
        finally:
            ep.close()


# --------------------------------------------------------------------------- the daemon


def ancestors_cmdlines(pid: int) -> list[bytes]:
    out = []
    while pid > 1:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            break
        pid = parent(pid)
    return out


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_daemon_whose_session_dies_mid_commit_delivers_each_file_once(
    tmp_path: Path, sshd: SshServer, when: str
) -> None:
    """The endpoint kills the warm session while the commit is in its mv (before or after the
    rename): the daemon gets no framed reply, keeps the files in doubt, lists the slot through
    a new session and settles each file exactly once."""
    shim = tmp_path / "shim"
    shim.mkdir()
    flag, parked = tmp_path / "park", tmp_path / "parked"
    move = '/bin/mv "$@"; ' if when == "after" else ""
    (shim / "mv").write_text(
        "#!/bin/sh\n"
        f'if [ -e {flag} ]; then {move}echo "$$" > {parked}.tmp; '
        f"/bin/mv {parked}.tmp {parked}; sleep 60; fi\n"
        'exec /bin/mv "$@"\n'
    )
    (shim / "mv").chmod(0o755)
    remote = REMOTE.replace('"{command}"', f'"PATH={shim}:$PATH {{command}}"')
    site = DaemonSite(tmp_path / "site")
    site.configure(remote=remote, params=params(sshd), num_threads=1)
    names = [f"d/f{i}.fits" for i in range(5)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    try:
        flag.touch()
        daemon = site.start()
        try:
            for rel in names:
                site.write(rel, content(rel))
            wait_for(parked.exists, 30, "the commit to park in its mv")
            pid = int(parked.read_text())
            assert any(b"hdfmgr-session" in c for c in ancestors_cmdlines(pid)), "not in a warm session"
            flag.unlink()
            os.killpg(os.getpgid(pid), signal.SIGKILL)  # the endpoint ends the session
            wait_for(lambda: set(site.held()) == set(names), 60, "everything held")
            wait_for(lambda: len(set(consumer.arrivals)) == len(names), 10, "consumer")
        finally:
            assert daemon.stop() == 0, daemon.output()
    finally:
        consumer.stop_event.set()
        consumer.join(5)
    assert sorted(consumer.arrivals) == sorted(names), "each file must arrive exactly once"
    assert not consumer.bad
    log = daemon.output()
    assert "reply was lost" in log, log
    attempts = dict(site.query("select name, attempts from files"))
    if when == "after":
        assert set(attempts.values()) == {1}, attempts  # the listing found them delivered
