"""A real OpenSSH server on loopback for end-to-end tests.

hdfmgr moves files with the system ``ssh``, ``scp`` and ``rsync`` binaries, so
mocking the transport would hide exactly the failures we care about (quoting,
option handling, host-key checks).  This module starts a private
``sshd`` bound to 127.0.0.1 on a free high port, with throwaway host and client
keys in a temporary directory, and hands out client options that ignore the
invoking user's ``~/.ssh`` entirely.

Two entry points:

* ``sshd`` -- a session-scoped pytest fixture (import it into a test module).
* ``start_sshd(workdir)`` -- plain function for scripts such as benchmarks;
  the caller must call ``SshServer.stop()`` (or use it as a context manager).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import pytest

LOOPBACK = "127.0.0.1"

#: How long to wait for a freshly started sshd to accept a real login.
START_TIMEOUT = 15.0
#: How many fresh ports to try when sshd loses the race for the one we picked.
PORT_ATTEMPTS = 5
#: Interval between readiness probes; short so startup stays fast.
POLL_INTERVAL = 0.05
#: Cap on one ``ssh ... true`` probe.  A loopback login takes well under a
#: second; the cap matters when we lost the port race and connected to some
#: other listener that never answers, so we notice sshd's exit and retry.
PROBE_TIMEOUT = 5.0

# sshd refuses to re-exec itself unless started by absolute path, and /usr/sbin
# is often missing from PATH for non-login shells, so search it explicitly.
_SBIN_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
_BIND_FAILURE_MARKERS = ("Address already in use", "Cannot bind any address")


class SshdUnavailableError(RuntimeError):
    """The OpenSSH server or client binaries are not installed."""


class SshdStartError(RuntimeError):
    """sshd was found but did not come up in a usable state."""


@dataclass
class SshServer:
    """A running loopback sshd plus everything a client needs to reach it.

    All client-side settings live here so that tests, the daemon under test
    and benchmarks connect with identical, fully non-interactive options.
    """

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_handle: IO[bytes] | None = field(default=None, repr=False)

    @property
    def destination(self) -> str:
        """``user@host`` as ssh/scp/rsync expect it."""
        return f"{self.user}@{self.host}"

    def remote(self, path: str | os.PathLike[str]) -> str:
        """``user@host:path`` for scp and rsync source/destination arguments."""
        return f"{self.destination}:{os.fspath(path)}"

    @property
    def ssh_options(self) -> list[str]:
        """Client options that pin the host key and never prompt.

        ``-F /dev/null`` keeps the user's ``~/.ssh/config`` out, the known_hosts
        file holds only our host key (so ``StrictHostKeyChecking=yes`` actually
        verifies we reached this sshd), and ``BatchMode``/``IdentitiesOnly``
        stop password prompts and agent keys from leaking in.
        """
        return ["-F", "/dev/null", *_o_options(self.known_hosts)]

    def ssh_argv(self, *remote_args: str, identity: Path | None = None) -> list[str]:
        """Full argv to run ``remote_args`` on the server via ``ssh``.

        ``identity`` overrides the client key, e.g. to check that a foreign key
        is rejected.  ``--`` ends option parsing so remote arguments starting
        with ``-`` are never taken as ssh options.  As with any ssh command,
        the remote arguments are joined by spaces and run by the remote shell.
        """
        key = self.key if identity is None else identity
        return [
            "ssh",
            "-p", str(self.port),
            "-i", str(key),
            *self.ssh_options,
            "--",
            self.destination,
            *remote_args,
        ]  # fmt: skip

    def scp_options(self) -> list[str]:
        """Options for an ``scp`` argv (scp spells the port ``-P``)."""
        return [
            "-F", "/dev/null",
            "-P", str(self.port),
            "-i", str(self.key),
            *_o_options(self.known_hosts),
        ]  # fmt: skip

    def rsync_rsh(self) -> str:
        """The command string for ``rsync -e``.

        rsync splits this string itself (on spaces, honouring quotes), so every
        path is quoted with ``shlex.quote``.
        """
        argv = [
            "ssh",
            "-F", "/dev/null",
            "-p", str(self.port),
            "-i", str(self.key),
            *_o_options(self.known_hosts),
        ]  # fmt: skip
        return shlex.join(argv)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate sshd and its connections (SIGTERM, then SIGKILL); release the log file.

        sshd runs in its own process group, taken down with it; each connection
        runs in a session of its own, so those are killed first (a shared master's
        connection would otherwise outlive the listener).  Safe to call twice.
        """
        proc = self.process
        if proc is not None and proc.poll() is None:
            drop_connections(self)
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
        if proc is not None:
            # Reap stragglers in the group even if the leader already exited.
            _signal_group(proc, signal.SIGKILL)
        self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def read_log(self) -> str:
        """sshd's stderr so far, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _o_options(known_hosts: Path) -> list[str]:
    """The ``-o`` options shared by ssh, scp and rsync's ssh."""
    settings = [
        f"UserKnownHostsFile={known_hosts}",
        "StrictHostKeyChecking=yes",
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "GlobalKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
    ]
    return [arg for setting in settings for arg in ("-o", setting)]


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _find_binary(name: str, search_path: str | None = None) -> str:
    found = shutil.which(name, path=search_path)
    if found is None:
        raise SshdUnavailableError(
            f"{name!r} not found; run scripts/test, which installs openssh-server (and the ssh client)."
        )
    return os.path.abspath(found)


def _keygen(path: Path) -> None:
    """Create a passphrase-less ed25519 key pair at ``path``/``path.pub``."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _free_port() -> int:
    """A currently unused loopback port; racy, hence the retries in start_sshd."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _write_sshd_config(path: Path, port: int, host_key: Path, authorized_keys: Path, pid_file: Path) -> None:
    # UsePAM/StrictModes off: PAM stacks and ownership checks on the tmp dir
    # vary between machines and are not what we test.  internal-sftp is
    # required because modern scp speaks SFTP.  The generous MaxStartups and
    # MaxSessions let tests open many connections at once without sshd
    # randomly dropping them.
    lines = [
        f"Port {port}",
        f"ListenAddress {LOOPBACK}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp",
        f"PidFile {pid_file}",
        "LogLevel ERROR",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
    ]
    path.write_text("\n".join(lines) + "\n")


def _write_known_hosts(path: Path, port: int, host_pub: Path) -> None:
    key_type, key_blob = host_pub.read_text().split()[:2]
    path.write_text(f"[{LOOPBACK}]:{port} {key_type} {key_blob}\n")


def _ssh_login_works(server: SshServer, timeout: float) -> tuple[bool, str]:
    """Try a real ``ssh ... true``; return success and ssh's stderr."""
    try:
        result = subprocess.run(
            server.ssh_argv("true"),
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"ssh probe timed out after {timeout:.1f}s"
    return result.returncode == 0, result.stderr.decode(errors="replace")


def _launch(sshd_bin: str, workdir: Path, port: int, user: str, client_key: Path) -> SshServer:
    host_key = workdir / "ssh_host_ed25519_key"
    config = workdir / "sshd_config"
    log_path = workdir / f"sshd-{port}.log"
    _write_sshd_config(config, port, host_key, workdir / "authorized_keys", workdir / "sshd.pid")
    known_hosts = workdir / "known_hosts"
    _write_known_hosts(known_hosts, port, host_key.with_suffix(".pub"))

    log_handle = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            [sshd_bin, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_handle,
            start_new_session=True,
        )
    except BaseException:
        log_handle.close()
        raise
    return SshServer(
        host=LOOPBACK,
        port=port,
        user=user,
        key=client_key,
        known_hosts=known_hosts,
        workdir=workdir,
        log_path=log_path,
        process=proc,
        _log_handle=log_handle,
    )


def _wait_ready(server: SshServer) -> None:
    """Block until sshd accepts a real login, or raise SshdStartError.

    A listening socket alone is not enough: sshd may still reject logins
    (bad config, key permissions), so the final check is an actual ``ssh``.
    """
    deadline = time.monotonic() + START_TIMEOUT
    last_error = "port never accepted TCP connections"
    proc = server.process
    assert proc is not None
    while True:
        if proc.poll() is not None:
            raise SshdStartError(
                f"sshd exited with status {proc.returncode} on port {server.port}"
                f"\n--- sshd log ---\n{server.read_log()}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SshdStartError(
                f"sshd on port {server.port} not ready after {START_TIMEOUT:.0f}s:"
                f" {last_error}\n--- sshd log ---\n{server.read_log()}"
            )
        # If sshd lost the bind race, the open port belongs to someone else and
        # the probe would hang; skip it when sshd is already gone (otherwise
        # PROBE_TIMEOUT bounds the wait).
        if _port_open(server.port) and proc.poll() is None:
            ok, stderr = _ssh_login_works(server, timeout=min(remaining, PROBE_TIMEOUT))
            if ok:
                return
            last_error = f"ssh probe failed: {stderr.strip()}"
        time.sleep(POLL_INTERVAL)


def start_sshd(workdir: str | os.PathLike[str]) -> SshServer:
    """Start a loopback sshd with fresh keys under ``workdir`` and wait for it.

    ``workdir`` must exist and should not contain whitespace (the rsync ``-e``
    string is quoted, but other tools the tests drive may not be).  Raises
    SshdUnavailableError if OpenSSH is not installed and SshdStartError if the
    server does not accept a login within START_TIMEOUT seconds.
    """
    workdir = Path(workdir).resolve()
    sshd_bin = _find_binary("sshd", _SBIN_SEARCH_PATH)
    for tool in ("ssh", "ssh-keygen"):
        _find_binary(tool)

    if os.geteuid() == 0:
        # Privilege-separation directory; normally created by the init script.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "client_ed25519_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text(client_key.with_suffix(".pub").read_text())
    authorized_keys.chmod(0o600)

    user = pwd.getpwuid(os.getuid()).pw_name
    failures: list[str] = []
    for _ in range(PORT_ATTEMPTS):
        server = _launch(sshd_bin, workdir, _free_port(), user, client_key)
        try:
            _wait_ready(server)
        except SshdStartError as exc:
            server.stop()
            failures.append(str(exc))
            log = server.read_log()
            if any(marker in log for marker in _BIND_FAILURE_MARKERS):
                continue  # someone grabbed the port between probe and bind
            raise
        except BaseException:
            server.stop()
            raise
        return server
    raise SshdStartError(
        f"sshd could not bind a port after {PORT_ATTEMPTS} attempts:\n" + "\n".join(failures)
    )


def restart_sshd(server: SshServer) -> SshServer:
    """Start sshd again after ``server.stop()``: same port, keys and client settings.

    For outages (``scripts/soak --ssh``): clients that pinned the host key and port reconnect
    as to a server that came back. Raises SshdStartError if it does not accept a login.
    """
    sshd_bin = _find_binary("sshd", _SBIN_SEARCH_PATH)
    again = _launch(sshd_bin, server.workdir, server.port, server.user, server.key)
    try:
        _wait_ready(again)
    except BaseException:
        again.stop()
        raise
    return again


def drop_connections(server: SshServer) -> int:
    """Kill every sshd process of ``server`` but the listener: each connection drops at once,
    as over a network fault, and new ones are accepted. Returns how many were killed.

    sshd gives each connection a session of its own, so its processes are found as the
    listener's descendants named sshd (``sshd-session`` since OpenSSH 9.8). The commands they
    ran are left alone, as a network fault would: a reply they write after the drop goes
    nowhere.
    """
    if server.process is None:
        return 0
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        names[int(entry)] = text[text.index(b"(") + 1 : text.rindex(b")")].decode(errors="replace")
        parents[int(entry)] = int(text.rsplit(b")", 1)[1].split()[1])
    ours = {server.process.pid}
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in ours and names[pid].startswith("sshd")}
        grew = not found <= ours
        ours |= found
    killed = 0
    for pid in ours - {server.process.pid}:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """Session-wide loopback sshd; fails (never skips) if it cannot start.

    A skip would let an environment without openssh-server silently pass the
    end-to-end suite, so a missing binary is a hard failure.
    """
    workdir = tmp_path_factory.mktemp("sshd")
    # Fail outside the except blocks so the report is the message alone, not a
    # chained traceback.
    problem: str | None = None
    try:
        server = start_sshd(workdir)
    except SshdUnavailableError as exc:
        problem = str(exc)
    except SshdStartError as exc:
        problem = f"could not start test sshd: {exc}"
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        server.stop()
