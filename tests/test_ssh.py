"""End to end over real SSH: the seed's scp/ssh commands, scp batches and rsync, against the
loopback sshd of ``tests/sshd_fixture.py``.

The "remote" host is this machine, so the endpoint buffer and staging are plain directories
that the tests read directly. Every command goes through a real ``ssh`` login (key, pinned
host key, ``BatchMode``), a real remote login shell and, for transfers, real scp/rsync.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hdfmgr import config as config_mod
from hdfmgr.endpoint import Endpoint, StagedFile
from tests.site import HOSTILE_NAMES, Site, wait_for
from tests.ssh_templates import REMOTE, REMOTE_SHARED, RSYNC, SCP_BATCH, SCP_EACH, SHARE, SSH_OPTS, params
from tests.sshd_fixture import SshServer

BIG = 50 * 1024 * 1024


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture(scope="module")
def big_data() -> bytes:
    """50 MB that no transfer can fake: random, generated once per module."""
    return os.urandom(BIG)


def mixed_set(big: bytes, *, nested_hostile: bool = True) -> dict[str, bytes]:
    """Nested directories, an empty file, 50 MB, and every hostile name, at the top and in a
    subdirectory whose own name has a space; with ``nested_hostile`` false, each hostile name
    once, spread over four directories (four batches that can run in parallel)."""
    files = {
        "night/a/b/c/deep.fits": b"deep" * 1000,
        "night/a/sibling.fits": b"sibling",
        "empty.fits": b"",
        "big.fits": big,
    }
    for i, name in enumerate(HOSTILE_NAMES):
        if nested_hostile:
            files[name] = f"hostile {i}".encode()
            files[f"dir with space/{name}"] = f"nested hostile {i}".encode()
        else:
            files[f"h{i % 4} $(touch PWNED)/{name}"] = f"hostile {i}".encode()
    files[os.fsdecode(b"odd\xffdir") + "/x.fits"] = b"x"
    return files


def home() -> Path:
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def assert_nothing_ran(*dirs: Path) -> None:
    """No file named PWNED (what the hostile names would create if a shell ran them)."""
    places = [home(), Path.cwd(), Path(tempfile.gettempdir()), *dirs]
    found = [p / "PWNED" for p in places if os.path.lexists(p / "PWNED")]
    for d in dirs:
        found += [p for p in d.rglob("PWNED")]
    assert not found, f"a filename was executed by a shell: {found}"


def assert_delivered(site: Site, files: dict[str, bytes], sshd: SshServer) -> None:
    assert site.delivered() == files
    assert site.held() == files
    assert site.waiting() == {}
    rows = site.query("select relpath, state, checksum, size from files")
    assert len(rows) == len(files)
    for relpath, state, checksum, size in rows:
        rel = os.fsdecode(bytes(relpath))
        assert state == "held", rel
        assert checksum == hashlib.blake2b(files[rel]).hexdigest(), rel
        assert size == len(files[rel])
    # Staging keeps only the (empty) slot directories: every staged file was moved, or set
    # aside by verification (``<slot>.rejected``, emptied by that slot's next commit: the retry
    # may have gone through another slot).
    assert not [
        p
        for p in site.staging.rglob("*")
        if not p.is_dir() and not p.parent.name.endswith(".rejected") and not p.name.endswith(".receipt")
    ]
    assert_nothing_ran(site.root, sshd.workdir)


def watch_until_held(site: Site, files: dict[str, bytes], timeout: float = 60) -> str:
    """Start the watcher, write ``files``, wait until all are held, stop it; its output."""
    daemon = site.start()
    try:
        site.write_many(files)
        wait_for(lambda: site.held() == files, timeout, "every file delivered and held")
    finally:
        assert daemon.stop() == 0, daemon.output()
    return daemon.output()


# ---------------------------------------------------------------------------- end to end


def test_scp_per_file_delivers_mixed_set(site: Site, sshd: SshServer, big_data: bytes) -> None:
    """The seed's own command pair: ``scp ... {file}`` once per file, ``ssh ... "{command}"``."""
    site.configure(transfer=SCP_EACH, remote=REMOTE, params=params(sshd), num_threads=4)
    # One handshake per file: each hostile name once, to keep the test short.
    files = mixed_set(big_data, nested_hostile=False)
    site.write_many(files)

    result = site.hdfmgr("rescan", str(site.config_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(files)} delivered" in result.stdout and "0 undelivered" in result.stdout
    assert_delivered(site, files, sshd)
    commands = [r[0] for r in site.query("select command from batches")]
    assert commands and all(c.startswith("scp ") for c in commands)


def test_scp_batch_watch_delivers_mixed_set(site: Site, sshd: SshServer, big_data: bytes) -> None:
    """``{batch}`` scp under the watching daemon: one scp per batch, files arriving while it runs."""
    site.configure(transfer=SCP_BATCH, remote=REMOTE, params=params(sshd))
    files = mixed_set(big_data)
    watch_until_held(site, files)
    assert_delivered(site, files, sshd)
    # Batches carried several files each: the transfers were batched.
    assert site.query("select max(files) from batches")[0][0] > 1


def test_a_chatty_login_shell_does_not_garble_the_commit(site: Site, sshd: SshServer) -> None:
    """Text the endpoint's login shell prints around every remote command (a banner, a module
    system) is skipped: each file is committed once, none is taken for unverified or resent."""
    remote = REMOTE.replace('"{command}"', '"echo Welcome; {command}; echo logout"')
    site.configure(transfer="cp {batch} {dest}", remote=remote, params=params(sshd))
    files = mixed_set(b"big" * 1000)
    output = watch_until_held(site, files)
    assert_delivered(site, files, sshd)
    outcomes = site.query("select outcome, count(*) from attempts group by outcome")
    assert outcomes == [("committed", len(files))]
    assert "reply was lost" not in output


def test_rsync_batch_delivers_mixed_set(site: Site, sshd: SshServer, big_data: bytes) -> None:
    site.configure(transfer=RSYNC, remote=REMOTE, params=params(sshd))
    files = mixed_set(big_data)
    site.write_many(files)

    result = site.hdfmgr("rescan", str(site.config_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert_delivered(site, files, sshd)
    assert all("rsync -a -e" in r[0] for r in site.query("select command from batches"))


def test_checksum_mode_compares_remote_b2sum(site: Site, sshd: SshServer, big_data: bytes) -> None:
    """verify: checksum: the staged copy's remote ``b2sum`` must equal the stored BLAKE2b."""
    site.configure(transfer=SCP_BATCH, remote=REMOTE, params=params(sshd), verify="checksum")
    files = mixed_set(big_data)
    site.write_many(files)

    result = site.hdfmgr("rescan", str(site.config_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert_delivered(site, files, sshd)
    # The digest hdfmgr stored is the one b2sum prints on the endpoint host (and the one the
    # endpoint manager stores).
    stored = site.query("select checksum from files where name = 'big.fits'")[0][0]
    remote = subprocess.run(
        sshd.ssh_argv("b2sum", str(site.ep_buffer / "big.fits")), capture_output=True, timeout=30
    )
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.split()[0].decode() == stored


#: A transfer wrapper: run the real transfer, then, on the first call only, flip one byte of
#: one staged file (same size), as a transfer that corrupts data in flight would.
CORRUPTER = """\
import os, subprocess, sys
flag, victim, dest, *command = sys.argv[1:]
status = subprocess.call(command)
path = os.path.join(dest, victim)
if status == 0 and not os.path.exists(flag) and os.path.exists(path):
    open(flag, "w").close()
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
sys.exit(status)
"""


def corrupting_site(site: Site, sshd: SshServer) -> Path:
    script = site.root / "corrupt.py"
    script.write_text(CORRUPTER)
    flag = site.root / "corrupted-once"
    site.configure(
        transfer=f"{sys.executable} {script} {flag} victim.fits {{dest}} {SCP_BATCH}",
        remote=REMOTE,
        params=params(sshd),
        verify="checksum",
    )
    return flag


def test_corrupted_staged_file_is_not_committed_and_is_sent_again(site: Site, sshd: SshServer) -> None:
    flag = corrupting_site(site, sshd)
    files = {"victim.fits": os.urandom(100_000), "fine.fits": os.urandom(1000), "other/o.fits": b"o"}
    site.write_many(files)

    first = site.hdfmgr("rescan", str(site.config_path))

    # The corrupted copy failed verification in staging and was not moved; the rest was.
    assert flag.exists(), "the wrapper did not corrupt anything"
    assert first.returncode == 65, first.stdout + first.stderr
    assert "1 undelivered" in first.stdout
    assert site.delivered() == {k: v for k, v in files.items() if k != "victim.fits"}
    assert site.waiting() == {"victim.fits": files["victim.fits"]}
    state, error_class, last_error = site.query(
        "select state, error_class, last_error from files where name = 'victim.fits'"
    )[0]
    assert (state, error_class) == ("failed", "verification")
    assert "checksum verification" in last_error
    batch = site.query(
        "select b.status, b.error_class, a.outcome from attempts a join batches b on a.batch_id = b.id"
        " join files f on a.file_id = f.id where f.name = 'victim.fits'"
    )
    assert batch == [("partial", "verification", "unverified")]

    second = site.hdfmgr("rescan", str(site.config_path))

    assert second.returncode == 0, second.stdout + second.stderr
    assert_delivered(site, files, sshd)
    outcomes = site.query(
        "select a.outcome from attempts a join files f on a.file_id = f.id"
        " where f.name = 'victim.fits' order by a.id"
    )
    assert [o[0] for o in outcomes] == ["unverified", "committed"]


def test_watcher_retries_a_corrupted_transfer(site: Site, sshd: SshServer) -> None:
    """The same under the daemon: the retry (after backoff) delivers the right bytes."""
    flag = corrupting_site(site, sshd)
    files = {"victim.fits": os.urandom(100_000), "fine.fits": os.urandom(1000)}
    watch_until_held(site, files, timeout=30)
    assert flag.exists()
    assert_delivered(site, files, sshd)
    rows = site.query(
        "select a.outcome, b.error_class from attempts a join batches b on a.batch_id = b.id"
        " join files f on a.file_id = f.id where f.name = 'victim.fits' order by a.id"
    )
    assert rows == [("unverified", "verification"), ("committed", None)]


# ---------------------------------------------------------------------------- filenames


@pytest.fixture
def control_dir() -> Iterator[Path]:
    """A short directory for ssh control sockets (a socket path must stay under 108 bytes).

    Teardown ends every master started with a socket in it (``ssh -O exit``).
    """
    path = Path(tempfile.mkdtemp(prefix="hdfcm-", dir="/tmp"))
    try:
        yield path
    finally:
        for sock in path.iterdir():
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "hdfmgr-test"],
                capture_output=True,
                timeout=10,
            )
        shutil.rmtree(path, ignore_errors=True)


CANARY = "HDFMGR_CANARY"
#: Pieces that would create the canary in the remote home directory if any shell parsed the
#: names, mixed with arbitrary bytes (no NUL, no '/').
INJECTIONS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f";touch {CANARY};",
    f"'; touch {CANARY}; '",
    f'"; touch {CANARY}; "',
    f"|touch {CANARY}",
    f"&touch {CANARY}&",
    f"\ntouch {CANARY}\n",
    f"'\\''; touch {CANARY} #",
    "${IFS}",
    "!!",
    "~",
    "*",
    "{a,b}",
    "%s%n",
    "-n",
    "--",
    " ",
    "\t",
    "\\",
]
_piece = st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from([p.encode() for p in INJECTIONS]))
filename_bytes = (
    st.lists(_piece, min_size=1, max_size=5)
    .map(lambda pieces: b"".join(pieces).translate(None, b"\0/")[:100])
    .filter(lambda name: name not in (b"", b".", b".."))
)

#: Prints each argument NUL-terminated: what the remote ``sh`` received as "$@".
ECHO_ARGS = "for a; do printf '%s\\000' \"$a\"; done"


@pytest.fixture(scope="module")
def shared_endpoint(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """An Endpoint whose remote command is the ssh template, sharing one connection.

    Connection sharing only reuses the transport: every call is still a new session whose
    command string the remote login shell parses, which is what the property test is about;
    without it 50 examples would cost 50 handshakes.
    """
    site = Site(tmp_path_factory.mktemp("prop"))
    cdir = Path(tempfile.mkdtemp(prefix="hdfcm-", dir="/tmp"))
    site.configure(
        transfer=SCP_BATCH,
        remote=REMOTE_SHARED,
        params=params(sshd, cpath=f"{cdir}/%C"),
    )
    try:
        yield Endpoint(config_mod.load(site.config_path))
    finally:
        for sock in cdir.iterdir():
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
            )
        shutil.rmtree(cdir, ignore_errors=True)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(filename_bytes, min_size=1, max_size=4))
def test_remote_shell_receives_exact_arguments(shared_endpoint: Endpoint, names: list[bytes]) -> None:
    """What ``ssh ... "{command}"`` hands the remote shell is exactly the original bytes."""
    canary = home() / CANARY
    assert not canary.exists()

    result = shared_endpoint.remote(ECHO_ARGS, *(os.fsdecode(n) for n in names))

    assert result.ok, result.describe()
    assert result.stdout == b"".join(n + b"\0" for n in names)
    assert not canary.exists(), f"a shell ran part of {names!r}"


def test_hdfmgr_dest_never_carries_filename_data(site: Site, sshd: SshServer) -> None:
    """{dest} is a data-free slot directory, whatever the names in the batch."""
    site.configure(transfer=SCP_BATCH, remote=REMOTE, params=params(sshd))
    endpoint = Endpoint(config_mod.load(site.config_path))
    files = [StagedFile(n, os.path.join(site.buffer, n), 1) for n in HOSTILE_NAMES]
    slot_pattern = re.compile(re.escape(str(site.staging)) + r"/hdfmgr\.[A-Za-z0-9_-]+\.[0-9a-f]+\.[0-9]+")
    for template in (SCP_EACH, SCP_BATCH, RSYNC):
        site.configure(transfer=template, remote=REMOTE, params=params(sshd))
        endpoint = Endpoint(config_mod.load(site.config_path))
        for slot in range(8):
            dest = endpoint.slot_dir(slot)
            assert slot_pattern.fullmatch(dest), dest
            for argv in endpoint.transfer_argvs(files, dest):
                assert argv[-1] == f"{sshd.user}@{sshd.host}:{dest}"
                # A name appears only inside an absolute local path of its own.
                for token in argv[:-1]:
                    for name in HOSTILE_NAMES:
                        if name in token:
                            assert token == os.path.join(site.buffer, name)


def test_legacy_scp_lets_the_remote_shell_expand_the_destination(sshd: SshServer, tmp_path: Path) -> None:
    """Why hdfmgr keeps data out of {dest}: ``scp -O`` (legacy protocol, the default before
    OpenSSH 9.0) runs ``$(...)`` in a remote path; SFTP-mode scp and rsync >= 3.2.4 do not."""
    src = tmp_path / "src.fits"
    src.write_bytes(b"payload")
    received = tmp_path / "received"
    received.mkdir()
    canary = tmp_path / "PWNED"

    legacy = subprocess.run(
        ["scp", "-O", *sshd.scp_options(), str(src), sshd.remote(f"{received}/$(touch {canary})")],
        capture_output=True,
        timeout=30,
    )
    assert legacy.returncode == 0, legacy.stderr
    assert canary.exists(), "scp -O did not expand the remote path: the hazard is not real here"
    canary.unlink()

    literal = "$(touch PWNED) `touch PWNED`;touch PWNED.fits"
    sftp = subprocess.run(
        ["scp", *sshd.scp_options(), str(src), sshd.remote(f"{received}/{literal}")],
        capture_output=True,
        timeout=30,
    )
    assert sftp.returncode == 0, sftp.stderr
    assert (received / literal).read_bytes() == b"payload"
    (received / literal).unlink()

    rsync_version = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
    major, minor, patch = map(int, re.search(r"version (\d+)\.(\d+)\.(\d+)", rsync_version).groups())
    assert (major, minor, patch) >= (3, 2, 4), rsync_version.splitlines()[0]
    rsync = subprocess.run(
        ["rsync", "-a", "-e", sshd.rsync_rsh(), str(src), sshd.remote(f"{received}/{literal}")],
        capture_output=True,
        timeout=30,
    )
    assert rsync.returncode == 0, rsync.stderr
    assert (received / literal).read_bytes() == b"payload"
    assert_nothing_ran(tmp_path, sshd.workdir)


def test_legacy_scp_transfers_are_safe_but_mangle_newlines(site: Site, sshd: SshServer) -> None:
    """With ``scp -O`` hostile names still never run (they are local arguments and {dest}
    carries no data), but legacy scp renames a name with a newline in transit: hdfmgr sees
    the name missing in staging and never commits it."""
    site.configure(transfer=SCP_BATCH.replace("scp -Bpq", "scp -O -Bpq"), remote=REMOTE, params=params(sshd))
    files = {name: f"hostile {i}".encode() for i, name in enumerate(HOSTILE_NAMES)}
    site.write_many(files)

    result = site.hdfmgr("rescan", str(site.config_path))

    newline = "new\nline.fits"
    assert result.returncode == 65, result.stdout + result.stderr
    assert site.delivered() == {k: v for k, v in files.items() if k != newline}
    assert site.waiting() == {newline: files[newline]}
    assert site.states()[newline] == "failed"
    assert site.query("select error_class from files where state = 'failed'") == [("verification",)]
    assert_nothing_ran(site.root, sshd.workdir)


# ---------------------------------------------------------------------------- connection sharing


def control(sshd: SshServer, cpath: str, operation: str) -> list[str]:
    """``ssh -O operation`` for the master behind ``cpath``."""
    return [
        "ssh",
        "-p",
        str(sshd.port),
        *sshd.ssh_options,
        "-o",
        f"ControlPath={cpath}",
        "-O",
        operation,
        sshd.destination,
    ]


def master_pid(sshd: SshServer, cpath: str) -> int | None:
    """The pid ``ssh -O check`` reports for the master behind ``cpath``, or None."""
    check = subprocess.run(
        control(sshd, cpath, "check"),
        capture_output=True,
        text=True,
        timeout=10,
    )
    match = re.search(r"Master running \(pid=(\d+)\)", check.stderr)
    return int(match.group(1)) if check.returncode == 0 and match else None


def session_id(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[3])


def test_connection_sharing_reuses_a_master_and_survives_its_death(
    site: Site, sshd: SshServer, control_dir: Path
) -> None:
    cpath = f"{control_dir}/cm-%r@%h:%p"
    socket_path = control_dir / f"cm-{sshd.user}@{sshd.host}:{sshd.port}"
    site.configure(
        transfer=f"scp -Bpq -P {{port}} -i {{key}} {SSH_OPTS} {SHARE} {{batch}} {{user}}@{{host}}:{{dest}}",
        remote=REMOTE_SHARED,
        params=params(sshd, cpath=cpath),
    )
    expected: dict[str, bytes] = {}

    def deliver(tag: str) -> None:
        files = {f"{tag}/f{i}.fits": os.urandom(1000 + i) for i in range(5)}
        files[f"{tag}/with space $(touch PWNED).fits"] = tag.encode()
        site.write_many(files)
        expected.update(files)
        wait_for(lambda: site.held() == expected, 30, f"delivery of {tag}")

    daemon = site.start()
    try:
        deliver("first")
        # The first command started a master; it runs in a session of its own (ssh daemonises
        # it), so neither hdfmgr's per-command process groups nor the daemon's end it.
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
        first = master_pid(sshd, cpath)
        assert first is not None
        assert session_id(first) != daemon.proc.pid
        sessions = site.query("select count(*) from batches")[0][0]

        deliver("second")
        # Later batches went through the same master: it is still the one running.
        assert site.query("select count(*) from batches")[0][0] > sessions
        assert master_pid(sshd, cpath) == first

        # The master dies hard and leaves a stale socket: the next command replaces it.
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{first}"), 10, "the master to die")
        deliver("third")
        second = master_pid(sshd, cpath)
        assert second is not None and second != first

        # The master is told to exit (and removes its socket): the next command starts one.
        subprocess.run(
            control(sshd, cpath, "exit"),
            capture_output=True,
            timeout=10,
            check=True,
        )
        wait_for(lambda: not os.path.exists(f"/proc/{second}"), 10, "the master to exit")
        deliver("fourth")
        third = master_pid(sshd, cpath)
        assert third is not None and third not in (first, second)
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert site.query("select count(*) from batches where status != 'committed'") == [(0,)]
    assert set(site.states().values()) == {"held"}
    assert_nothing_ran(site.root, sshd.workdir)
