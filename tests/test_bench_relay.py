"""The benchmark's long link: a relay that delays every chunk by half a round trip each way.

The long-link figures rest on it: a round trip must cost what it says, the bytes must pass
unchanged in both directions with end-of-stream, and a stream in flight must not be slowed
beyond the delay (chunks overlap in the delay, as on a real link).
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

from tests.sshd_fixture import SshServer

ROOT = Path(__file__).resolve().parent.parent


def load_relay() -> ModuleType:
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)
    return importlib.import_module("benchlib.relay")


class EchoServer(threading.Thread):
    """Echoes every byte of each connection back, then closes it at end-of-stream."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.echo, args=(conn,), daemon=True).start()

    @staticmethod
    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload``, half-close, read everything back; seconds until the first byte came."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        t0 = time.monotonic()
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        first = None
        while data := conn.recv(1 << 16):
            if first is None:
                first = time.monotonic() - t0
            received += data
        sender.join()
    return bytes(received), first if first is not None else float("inf")


def test_a_round_trip_costs_twice_the_delay_and_the_bytes_pass_unchanged() -> None:
    relay_mod = load_relay()
    echo = EchoServer()
    echo.start()
    relay = relay_mod.Relay(echo.port, 0.05)
    try:
        payload = os.urandom(1000)
        received, first = round_trip(relay.port, payload)
        assert received == payload  # both directions, end-of-stream passed on both ways
        assert 0.1 <= first < 0.6
        assert relay.connections == 1
    finally:
        relay.stop()
        echo.sock.close()


def test_a_stream_is_not_slowed_beyond_the_delay() -> None:
    """16 MiB in 64 chunks: released one delay after each was read, overlapping, so the whole
    stream takes about one round trip more than on loopback, not 64 of them."""
    relay_mod = load_relay()
    echo = EchoServer()
    echo.start()
    relay = relay_mod.Relay(echo.port, 0.05)
    try:
        payload = os.urandom(16 << 20)
        t0 = time.monotonic()
        received, _ = round_trip(relay.port, payload)
        elapsed = time.monotonic() - t0
        assert received == payload
        assert 0.1 <= elapsed < 3.0, elapsed  # serially it would take 64 x 0.1 s = 6.4 s
    finally:
        relay.stop()
        echo.sock.close()


def test_ssh_through_the_relay_pays_its_round_trips(sshd: SshServer, tmp_path: Path) -> None:
    """The bench's way to the sshd over a long link: a new connection costs several round trips."""
    relay_mod = load_relay()
    relayed, relay = relay_mod.start_relay_link(sshd, 100.0, tmp_path / "relay")
    try:
        t0 = time.monotonic()
        direct = subprocess.run(sshd.ssh_argv("true"), capture_output=True, timeout=30, check=False)
        loopback = time.monotonic() - t0
        t0 = time.monotonic()
        result = subprocess.run(relayed.ssh_argv("echo", "far"), capture_output=True, timeout=60, check=False)
        far = time.monotonic() - t0
        assert direct.returncode == 0 and result.returncode == 0, result.stderr
        assert result.stdout == b"far\n"
        assert far >= loopback + 0.4, (far, loopback)  # at least 4 more round trips of 0.1 s
        assert relay.connections == 1
    finally:
        relay.stop()
