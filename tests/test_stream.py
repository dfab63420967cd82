"""The built-in stream transfer (hdfmgr/stream.py, hdfmgr/remote/receive.sh).

The stream itself against GNU tar, without any shell; the fed runner; the receive program on
a local endpoint, through one command and through a warm session; then the daemon over the
real loopback sshd: hostile names delivered once and byte-identical, every file hashed once,
a stream cut off on the endpoint retried, and the start-up probe refusing an endpoint
without GNU tar.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hdfmgr.config import from_mapping
from hdfmgr.endpoint import Endpoint, StagedFile
from hdfmgr.runner import TIMED_OUT, Feed, FeedMismatch, run_fed
from hdfmgr.session import SessionPool
from hdfmgr.stream import TarStream
from tests.site import Consumer, Daemon, content, wait_for
from tests.site import Site as DaemonSite
from tests.ssh_templates import REMOTE, params
from tests.sshd_fixture import SshServer
from tests.test_commit_holes import SYSTEM_PATH, fake_tools
from tests.test_endpoint_script import HOSTILE, Site, listing, no_pwned

STREAM = "builtin:stream"


def staged(root: Path, files: dict[str, bytes]) -> list[StagedFile]:
    out = []
    for rel, data in files.items():
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(rel))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out.append(StagedFile(rel, str(path), len(data)))
    return out


def untar(stream: bytes, into: Path) -> subprocess.CompletedProcess[bytes]:
    into.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["tar", "-x", "-f", "-", "--no-same-owner", "-C", str(into)], input=stream, capture_output=True
    )


# --------------------------------------------------------------------------- the stream, no shell


def test_the_stream_is_as_long_as_declared_and_gnu_tar_unpacks_every_name_byte_for_byte(
    tmp_path: Path,
) -> None:
    names = [*HOSTILE, "x" * 240, "ends with newline\n"]
    data = {
        f"d{i % 3}/{name}": os.urandom(i * 517 + (3 << 20 if i == 0 else 1)) for i, name in enumerate(names)
    }
    files = staged(tmp_path / "buffer", data)
    tar = TarStream(files)
    chunks = list(tar.chunks())
    assert sum(map(len, chunks)) == tar.length and tar.length % 512 == 0
    assert max(map(len, chunks)) <= 1 << 20
    done = untar(b"".join(chunks), tmp_path / "out")
    assert done.returncode == 0, done.stderr
    got = listing(tmp_path / "out")
    assert got == {os.fsencode(f.basename): data[f.rel] for f in files}
    assert tar.digests == {rel: hashlib.blake2b(body).hexdigest() for rel, body in data.items()}
    assert not tar.unread and not tar.short


def test_a_file_known_by_its_checksum_is_sent_but_not_hashed_again(tmp_path: Path) -> None:
    (f,) = staged(tmp_path, {"a.fits": b"abc"})
    tar = TarStream([StagedFile(f.rel, f.path, f.size, "known")])
    assert untar(b"".join(tar.chunks()), tmp_path / "out").returncode == 0
    assert tar.digests == {} and (tmp_path / "out" / "a.fits").read_bytes() == b"abc"


def test_a_file_that_shrank_grew_or_vanished_keeps_the_stream_whole_and_is_reported(tmp_path: Path) -> None:
    files = staged(
        tmp_path / "buffer", {"shrank": b"s" * 5000, "grew": b"g" * 100, "gone": b"x" * 10, "ok": b"o"}
    )
    Path(files[0].path).write_bytes(b"s" * 10)
    Path(files[1].path).write_bytes(b"g" * 9000)
    os.unlink(files[2].path)
    tar = TarStream(files)
    stream = b"".join(tar.chunks())
    assert len(stream) == tar.length
    assert untar(stream, tmp_path / "out").returncode == 0
    assert tar.short == {"shrank"} and set(tar.unread) == {"gone"}
    assert set(tar.digests) == {"grew", "ok"}
    assert (tmp_path / "out" / "grew").read_bytes() == b"g" * 100  # cut at the registered size
    assert (tmp_path / "out" / "shrank").stat().st_size == 5000


def test_basenames_must_be_distinct(tmp_path: Path) -> None:
    files = staged(tmp_path, {"a/x.fits": b"1", "b/x.fits": b"2"})
    with pytest.raises(ValueError, match="distinct"):
        TarStream(files)


def test_a_feed_that_yields_other_than_it_declared_is_refused() -> None:
    with pytest.raises(FeedMismatch, match="short"):
        list(Feed(5, [b"abc"]).exact())
    with pytest.raises(FeedMismatch, match="past"):
        list(Feed(2, [b"abc"]).exact())


# --------------------------------------------------------------------------- the fed runner


def test_run_fed_streams_its_input_and_reads_both_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    chunks = [os.urandom(1 << 20) for _ in range(8)]
    script = f"cat > {out}; echo done; echo note >&2"
    result = run_fed(["sh", "-c", script], timeout=30, feed=Feed(8 << 20, chunks))
    assert result.ok, result.stderr
    assert out.read_bytes() == b"".join(chunks)
    assert result.stdout == b"done\n" and result.stderr == b"note\n"


def test_run_fed_gives_a_command_that_stops_reading_no_more_and_does_not_hang() -> None:
    endless = (bytes(1 << 16) for _ in range(1 << 14))  # 1 GiB, never read
    t0 = time.monotonic()
    result = run_fed(["sh", "-c", "exit 3"], timeout=30, feed=Feed(1 << 30, endless))
    assert result.returncode == 3 and time.monotonic() - t0 < 10


def test_run_fed_kills_the_whole_group_at_its_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = run_fed(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1, feed=Feed(0, []))
    assert result.timed_out and result.returncode == TIMED_OUT
    pid = int(pid_file.read_text())
    wait_for(
        lambda: (
            not Path(f"/proc/{pid}").exists()
            or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split(b")")[1][:3]
        ),
        10,
        "the grandchild to die",
    )


# --------------------------------------------------------------------------- receive, local endpoint


def stream_site(
    root: Path, *, warm: bool, remote: str = 'sh -c "{command}"', verify: str = "checksum"
) -> Site:
    site = Site(root, verify=verify, remote=remote)
    raw = site.config.raw
    endpoint = {**raw["endpoint"], "commands": {"transfer": STREAM, "remote": remote}}
    general = {**raw["general"], "warm_sessions": warm}
    site.config = from_mapping({**raw, "endpoint": endpoint, "general": general}, path=root / "config.yaml")
    assert site.config.stream
    site.endpoint = Endpoint(site.config, generation="g1", warm=warm)
    return site


@pytest.mark.parametrize("warm", [False, True])
def test_hostile_names_are_received_and_committed_byte_identical(tmp_path: Path, warm: bool) -> None:
    site = stream_site(tmp_path / "site", warm=warm)
    ep = site.endpoint
    try:
        files = [site.local(f"n/{name}", name.encode("utf-8", "surrogateescape") * 3) for name in HOSTILE]
        tar = TarStream([StagedFile(f.rel, f.path, f.size) for f in files])
        slot = ep.slot_dir(0)  # never prepared: receive creates it
        result = ep.receive(slot, Feed(tar.length, tar.chunks()), batch=1)
        assert result.ok, result.stderr
        assert (ep.sessions is not None) == warm and (not warm or ep.sessions.started == 1)
        files = [StagedFile(f.rel, f.path, f.size, tar.digests[f.rel]) for f in files]
        result, report = ep.commit(slot, None, files, batch=1)
        assert result.ok and report is not None and report.moved == {f.basename for f in files}, result.stderr
        got = listing(site.ep_buffer / "n")
        assert got == {os.fsencode(f.basename): os.fsencode(f.basename) * 3 for f in files}
        no_pwned(site.root)
    finally:
        ep.close()


def test_a_receive_waits_for_the_slots_lock_and_gives_up_with_93(tmp_path: Path) -> None:
    """A commit (or a receive) of an earlier batch still running in the slot: nothing is
    written until it ends; past the wait the receive fails, and nothing was unpacked."""
    site = stream_site(tmp_path / "site", warm=False)
    site.config = from_mapping(
        {**site.config.raw, "general": {**site.config.raw["general"], "timeout": 2}},
        path=tmp_path / "site" / "config.yaml",
    )
    ep = site.endpoint = Endpoint(site.config, generation="g1")
    slot = ep.slot_dir(0)
    os.makedirs(slot)
    holder = subprocess.Popen(["flock", slot, "sleep", "30"])
    try:
        wait_for(lambda: subprocess.run(["flock", "-n", slot, "true"]).returncode != 0, 10, "the lock held")
        (f,) = [site.local("a.fits", b"data")]
        tar = TarStream([f])
        result = ep.receive(slot, Feed(tar.length, tar.chunks()), batch=1)
        assert result.returncode == 93, result
        assert os.listdir(slot) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_receive_that_comes_late_never_writes_over_a_later_batch(tmp_path: Path) -> None:
    """A receive whose client died while it waited for the lock gets it after the next batch
    was received: it must not replace that batch's copies (with verify: size, a stale copy of
    the same size would pass)."""
    site = stream_site(tmp_path / "site", warm=False, verify="size")
    ep = site.endpoint
    slot = ep.slot_dir(0)
    new = site.local("a.fits", b"new!")
    assert ep.receive(slot, feed_of([new]), batch=7).ok
    old = site.local("a.fits", b"old!")
    late = ep.receive(slot, feed_of([old]), batch=6)
    assert late.returncode == 95 and b"not above batch 7" in late.stderr, late
    assert Path(slot, "a.fits").read_bytes() == b"new!"
    assert ep.receive(slot, feed_of([site.local("a.fits", b"next")]), batch=8).ok
    assert Path(slot, "a.fits").read_bytes() == b"next"


def test_the_endpoints_tar_options_cannot_keep_a_leftover(tmp_path: Path) -> None:
    """TAR_OPTIONS=--skip-old-files in the endpoint account: a leftover of the same size (say,
    the zeros a failed read left) is still replaced by what the stream carries."""
    remote = 'env TAR_OPTIONS=--skip-old-files sh -c "{command}"'
    site = stream_site(tmp_path / "site", warm=False, verify="size", remote=remote)
    ep = site.endpoint
    slot = ep.slot_dir(0)
    os.makedirs(slot)
    Path(slot, "a.fits").write_bytes(bytes(4))
    assert ep.receive(slot, feed_of([site.local("a.fits", b"data")]), batch=1).ok
    assert Path(slot, "a.fits").read_bytes() == b"data"


def test_a_copy_is_readable_by_its_owner_whatever_the_local_mode(tmp_path: Path) -> None:
    site = stream_site(tmp_path / "site", warm=False)
    f = site.local("locked.fits", b"secret")
    os.chmod(f.path, 0o040)
    slot = site.endpoint.slot_dir(0)
    assert site.endpoint.receive(slot, feed_of([f]), batch=1).ok
    assert os.stat(os.path.join(slot, "locked.fits")).st_mode & 0o777 == 0o640


def test_a_vanished_file_is_sent_as_zeros_in_bounded_chunks(tmp_path: Path) -> None:
    huge = StagedFile("gone.fits", str(tmp_path / "gone.fits"), 64 << 30)
    tar = TarStream([huge])
    chunks = tar.chunks()
    first = [len(next(chunks)) for _ in range(5)]
    assert max(first) <= 1 << 20 and set(tar.unread) == {"gone.fits"}


def feed_of(files: list[StagedFile]) -> Feed:
    tar = TarStream(files)
    return Feed(tar.length, tar.chunks())


def test_the_configuration_names_the_stream_and_validate_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hdfmgr import cli

    site = DaemonSite(tmp_path / "site")
    site.configure(transfer=STREAM)
    assert cli.main(["validate", str(site.config_path)]) == 0
    out = capsys.readouterr().out
    assert f"transfer  {STREAM}  (one tar stream per batch" in out, out
    site.configure(transfer="builtin:tar")
    assert cli.main(["validate", str(site.config_path)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "endpoint.commands.transfer" in err[0] and STREAM in err[0], err


# --------------------------------------------------------------------------- prewarm


def test_prewarmed_sessions_serve_the_first_steps_without_new_starts(tmp_path: Path) -> None:
    site = stream_site(tmp_path / "site", warm=True)
    pool = site.endpoint.sessions
    assert isinstance(pool, SessionPool)
    try:
        pool.prewarm()
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(site.endpoint.probe())) for _ in range(pool.keep)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.ok for r in results) and len(results) == pool.keep
        assert pool.started == pool.keep, "a step started a session of its own while others started"
    finally:
        site.endpoint.close()


def slow_starts(root: Path, seconds: float) -> str:
    """A remote template whose first start is quick and every later one takes ``seconds``."""
    script = root / "slow.sh"
    count = root / "starts"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}\n"
        f'[ "$n" -ge 1 ] && sleep {seconds}\n'
        'exec sh -c "$1"\n'
    )
    script.chmod(0o755)
    return f'{script} "{{command}}"'


def test_a_session_given_back_serves_a_step_waiting_for_slow_starts(tmp_path: Path) -> None:
    site = stream_site(tmp_path / "site", warm=True, remote=slow_starts(tmp_path, 6))
    ep = site.endpoint
    pool = ep.sessions
    assert pool is not None
    try:
        pool.prewarm(1)
        wait_for(lambda: pool.idle, 10, "the first session")
        holder = threading.Thread(target=lambda: ep.remote("sleep 1"))
        holder.start()
        wait_for(lambda: not pool.idle, 10, "the step to hold the only session")
        pool.prewarm()  # the others start, slowly
        t0 = time.monotonic()
        result = ep.remote("true")
        took = time.monotonic() - t0
        holder.join()
        assert result.ok and took < 4, f"waited {took:.1f} s for a start while a session came back"
    finally:
        ep.close()


def test_a_step_waits_for_starts_ahead_within_its_own_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = stream_site(tmp_path / "site", warm=True, remote='sh -c "sleep 30; {command}"')
    site.config = from_mapping(
        {**site.config.raw, "general": {**site.config.raw["general"], "timeout": 2}},
        path=tmp_path / "site" / "config.yaml",
    )
    ep = site.endpoint = Endpoint(site.config, generation="g1", warm=True)
    try:
        ep.prewarm()
        t0 = time.monotonic()
        result = ep.remote("true")
        took = time.monotonic() - t0
        assert not result.ok and took < 5, f"a step with a 2 s timeout took {took:.1f} s"
    finally:
        ep.close()


def test_a_start_ahead_that_raises_leaves_no_step_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hdfmgr import session as session_mod

    site = stream_site(tmp_path / "site", warm=True)
    pool = site.endpoint.sessions
    assert pool is not None

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    try:
        monkeypatch.setattr(session_mod.Session, "start", staticmethod(broken))
        pool.prewarm(1)
        wait_for(lambda: pool.starting == 0, 10, "the failed start to be counted out")
        monkeypatch.undo()
        assert site.endpoint.probe().ok
    finally:
        site.endpoint.close()


# --------------------------------------------------------------------------- the daemon over ssh


def daemon_site(root: Path, sshd: SshServer, *, remote: str = REMOTE, **general: object) -> DaemonSite:
    site = DaemonSite(root)
    site.configure(transfer=STREAM, remote=remote, params=params(sshd), verify="checksum", **general)
    return site


def deliver_all(
    site: DaemonSite,
    bodies: dict[str, bytes],
    *,
    written: bool = False,
    interrupt: Callable[[Daemon], Daemon] | None = None,
    timeout: float = 60,
) -> tuple[list[str], str]:
    """Run the daemon until every file of ``bodies`` is held and seen once by a consumer
    checking its bytes; the consumer's arrivals and the (last) daemon's log."""
    consumer = Consumer(site.ep_buffer, expect=lambda rel: bodies.get(rel))
    consumer.start()
    try:
        daemon = site.start()
        if interrupt is not None:
            daemon = interrupt(daemon)
        try:
            if not written:
                site.write_many(bodies)
            wait_for(lambda: set(site.held()) == set(bodies), timeout, "everything held")
            wait_for(lambda: len(consumer.arrivals) >= len(bodies), 10, "the consumer")
        finally:
            assert daemon.stop() == 0, daemon.output()
    finally:
        consumer.stop_event.set()
        consumer.join(5)
    assert not consumer.bad, consumer.bad
    return consumer.arrivals, daemon.output()


def tar_once(root: Path, action: str) -> str:
    """A remote template whose endpoint tar runs ``action`` (sh) on the first extraction only."""
    shim, flag = root / "shim", root / "first-extraction"
    shim.mkdir()
    (shim / "tar").write_text(
        f'#!/bin/sh\nif [ "$1" = -x ] && [ -e {flag} ]; then rm -f {flag}; {action}; fi\nexec /bin/tar "$@"\n'
    )
    (shim / "tar").chmod(0o755)
    flag.touch()
    return REMOTE.replace('"{command}"', f'"PATH={shim}:$PATH {{command}}"')


def test_the_daemon_delivers_hostile_names_once_over_ssh_hashing_each_file_once(
    tmp_path: Path, sshd: SshServer
) -> None:
    site = daemon_site(tmp_path / "site", sshd)
    names = [f"v/{name}" for name in HOSTILE] + [f"big/{i}.fits" for i in range(3)]
    bodies = {rel: os.fsencode(rel) * (20000 if rel.startswith("big/") else 3) for rel in names}
    arrivals, log = deliver_all(site, bodies)
    assert sorted(arrivals) == sorted(names)
    hashed = [line for line in log.splitlines() if "hashed " in line]
    assert len(hashed) == len(names), hashed  # read once: the stream hashed what it sent
    no_pwned(site.root)
    rows = site.query("select status, returncode, command from batches")
    assert rows and {(status, code) for status, code, _ in rows} == {("committed", 0)}, rows
    assert all("warm session" in command or "hdfmgr-receive" in command for *_, command in rows), rows
    assert set(site.states().values()) == {"held"}, site.states()


def test_a_stream_cut_off_on_the_endpoint_is_sent_again_and_delivered_once(
    tmp_path: Path, sshd: SshServer
) -> None:
    """The endpoint's tar is killed in the middle of a batch: the batch failed (recorded with
    its status), nothing of it reached the endpoint buffer, and the next attempt delivers every
    file exactly once."""
    parked = tmp_path / "parked"
    remote = tar_once(tmp_path, f'head -c 100000 >/dev/null; echo "$$" > {parked}; kill -9 $$')
    site = daemon_site(tmp_path / "site", sshd, remote=remote, num_threads=1)
    names = [f"d/f{i}.fits" for i in range(6)]
    arrivals, _ = deliver_all(site, {rel: content(rel) * 50 for rel in names})
    assert parked.exists(), "the cut never happened"
    assert sorted(arrivals) == sorted(names)
    rows = site.query("select status, returncode, stderr from batches order by id")
    assert rows[0][:2] != ("committed", 0) and rows[-1][:2] == ("committed", 0), rows


def test_run_refuses_an_endpoint_without_gnu_tar_for_the_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hdfmgr import cli

    monkeypatch.chdir(tmp_path)
    for case, tools, hide in (
        ("missing", {}, ("tar",)),
        ("busybox", {"tar": 'echo "tar (busybox) 1.36.1"'}, ()),
    ):
        (tmp_path / case).mkdir()
        bin_dir = fake_tools(tmp_path / case, tools, hide=hide)
        path = str(bin_dir) if hide else f"{bin_dir}:{SYSTEM_PATH}"
        site = DaemonSite(tmp_path / case / "site")
        site.configure(transfer=STREAM, remote=f'env PATH={path} sh -c "{{command}}"')
        site.write("a.fits", b"data")
        assert cli.main(["rescan", str(site.config_path)]) == cli.EX_UNAVAILABLE, case
        err = capsys.readouterr().err.strip().splitlines()
        assert err and "tar" in err[-1] and "Traceback" not in "\n".join(err), err
        assert site.waiting() == {"a.fits": b"data"} and site.delivered() == {}


def test_doctor_checks_the_stream_end_to_end(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hdfmgr import doctor

    monkeypatch.chdir(tmp_path)
    site = daemon_site(tmp_path / "site", sshd)
    lines: list[str] = []
    assert doctor.main(str(site.config_path), out=lines.append) == doctor.EX_OK, lines
    text = "\n".join(lines)
    assert "OK   transfer is the built-in stream" in text, text
    assert "OK   transfer command copies a test file into staging" in text, text
    assert "GNU tar (stream)" in text and " tar" in text, text
    assert site.delivered() == {}


def test_a_killed_daemon_mid_stream_loses_nothing_and_delivers_once(tmp_path: Path, sshd: SshServer) -> None:
    """kill -9 of the daemon and everything it started while a batch streams: the restart
    sends it again, and each file arrives once."""
    parked = tmp_path / "parked"
    remote = tar_once(tmp_path, f"touch {parked}; sleep 20")
    site = daemon_site(tmp_path / "site", sshd, remote=remote, num_threads=1)
    names = [f"k/f{i}.fits" for i in range(4)]
    bodies = {rel: os.urandom(4 << 20) for rel in names}
    site.write_many(bodies)

    def kill_mid_stream(daemon: Daemon) -> Daemon:
        wait_for(parked.exists, 60, "the stream to start")
        daemon.kill()
        return site.start()

    arrivals, _ = deliver_all(site, bodies, written=True, interrupt=kill_mid_stream, timeout=90)
    assert sorted(arrivals) == sorted(names)
