"""A TCP relay on loopback that delays every byte by a fixed time in each direction.

``netem`` is not available on the test machines, so a long link is emulated in user space:
each accepted connection gets one upstream connection, and in each direction one thread reads
and stamps chunks while another sends each chunk when its time has come. Chunks overlap in
flight, so the delay costs a round trip per exchange, not per chunk (what ssh's handshake and
a step's request and reply pay). ``connections`` counts the connections accepted: a login each.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self


class DelayRelay:
    """``DelayRelay(upstream_port, delay)`` listens on 127.0.0.1:``port`` at once."""

    def __init__(self, upstream_port: int, delay: float, *, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.delay = delay
        self.connections = 0
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(s)
            self._direction(client, server)
            self._direction(server, client)

    def _direction(self, source: socket.socket, sink: socket.socket) -> None:
        line: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = source.recv(262144)
                except OSError:
                    data = b""
                line.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def send() -> None:
            while True:
                due, data = line.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if data:
                        sink.sendall(data)
                    else:
                        sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if not data:
                    return

        threading.Thread(target=read, name="relay-read", daemon=True).start()
        threading.Thread(target=send, name="relay-send", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def known_hosts_for(known_hosts: Path, server_port: int, relay_port: int, out: Path) -> Path:
    """A copy of ``known_hosts`` whose entries for ``server_port`` name ``relay_port`` too: ssh
    pins a host key per host and port, and through the relay the port is the relay's."""
    lines = known_hosts.read_text().splitlines()
    extra = [line.replace(f"]:{server_port} ", f"]:{relay_port} ") for line in lines]
    out.write_text("\n".join([*lines, *extra]) + "\n")
    return out
