"""Checks that the loopback sshd fixture behaves like a real remote host.

Every end-to-end transfer test relies on this fixture, so it gets its own
tests: if these fail, transfer failures elsewhere are not hdfmgr's fault.
"""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

from tests.sshd_fixture import SshServer, drop_connections, restart_sshd, start_sshd

TIMEOUT = 30


def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)


def test_ssh_true_succeeds(sshd: SshServer) -> None:
    result = _run(sshd.ssh_argv("true"))
    assert result.returncode == 0, result.stderr


def test_remote_command_output(sshd: SshServer) -> None:
    result = _run(sshd.ssh_argv("printf %s hello"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello"


def test_client_options_pin_host_key(sshd: SshServer) -> None:
    # The whole point of the known_hosts file: never fall back to trust-on-use.
    assert "StrictHostKeyChecking=yes" in sshd.ssh_options
    assert "StrictHostKeyChecking=no" not in sshd.rsync_rsh()
    assert "StrictHostKeyChecking=no" not in sshd.scp_options()


def test_scp_copies_bytes_exactly(sshd: SshServer, tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(256 * 1024) + b"\x00\r\n\xff")
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()

    result = _run(["scp", *sshd.scp_options(), str(source), sshd.remote(remote_dir)])

    assert result.returncode == 0, result.stderr
    assert (remote_dir / "payload.bin").read_bytes() == source.read_bytes()


def test_rsync_over_rsh(sshd: SshServer, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "a.txt").write_text("alpha\n")
    (source / "nested" / "b.bin").write_bytes(os.urandom(4096))
    dest = tmp_path / "dest"

    result = _run(["rsync", "-a", "-e", sshd.rsync_rsh(), f"{source}/", sshd.remote(f"{dest}/")])

    assert result.returncode == 0, result.stderr
    assert (dest / "a.txt").read_text() == "alpha\n"
    nested = "nested/b.bin"
    assert (dest / nested).read_bytes() == (source / nested).read_bytes()


def test_foreign_key_is_rejected(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
        check=True,
        capture_output=True,
    )

    result = _run(sshd.ssh_argv("true", identity=stranger))

    assert result.returncode == 255
    assert b"Permission denied" in result.stderr


def _connected(server: SshServer) -> subprocess.Popen[bytes]:
    """A client whose remote command is running: it said 'up' and waits on its input."""
    pipe = subprocess.PIPE
    client = subprocess.Popen(server.ssh_argv("echo up; read x"), stdin=pipe, stdout=pipe, stderr=pipe)
    assert client.stdout is not None
    ready, _, _ = select.select([client.stdout], [], [], TIMEOUT)
    assert ready and client.stdout.readline() == b"up\n", "the remote command did not start"
    return client


def test_dropped_connections_and_a_restart_on_the_same_port(tmp_path: Path) -> None:
    """The faults of ``scripts/soak --ssh``: a drop ends the live connections and keeps the
    listener; a stop ends them too (they have sessions of their own); a restart on the same
    port serves the same clients, host key pinned, again."""
    workdir = tmp_path / "own"
    workdir.mkdir()
    server = start_sshd(workdir)
    try:
        client = _connected(server)
        assert drop_connections(server) >= 1
        client.communicate(timeout=TIMEOUT)  # had the drop missed, EOF on its input: status 0
        assert client.returncode == 255
        assert _run(server.ssh_argv("true")).returncode == 0
        client = _connected(server)
        server.stop()
        client.communicate(timeout=TIMEOUT)
        assert client.returncode == 255
        assert _run(server.ssh_argv("true")).returncode == 255
        server = restart_sshd(server)
        result = _run(server.ssh_argv("printf %s back"))
        assert (result.returncode, result.stdout) == (0, b"back"), result.stderr
    finally:
        server.stop()
