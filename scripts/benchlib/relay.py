"""A long link on loopback: a TCP relay that releases every chunk a fixed delay after it read it.

``netem`` is not available here, so a round trip is emulated in user space: the relay listens on
127.0.0.1, opens one upstream connection per client, and in each direction reads chunks, stamps
them, and writes each one ``delay`` seconds after it was read (so a round trip costs twice the
delay, and a stream in flight is not slowed beyond its window: chunks overlap in the delay).
That is enough for what a long link costs ssh, scp and rsync: handshakes of several round
trips, per-file round trips, and one channel's window per round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from pathlib import Path
from typing import Any

CHUNK = 256 * 1024
#: Chunks in flight per direction before the relay stops reading (about 64 MiB): a bound on
#: memory, far above what one ssh window holds.
MAX_IN_FLIGHT = 256


class Relay:
    """``Relay(upstream_port, delay)``: a running relay on 127.0.0.1:``port``; ``stop()`` ends it."""

    def __init__(self, upstream_port: int, delay: float, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"relay-{delay:g}")
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("the relay did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, reuse_address=True)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [c_writer]
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
            writers.append(u_writer)
            for w in writers:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(self._pipe(c_reader, u_writer), self._pipe(u_reader, c_writer))
        except (OSError, asyncio.CancelledError):
            pass  # a connection ends; cancelled: the relay stops (not an error of the stream)
        finally:
            self._tasks.discard(task)
            for w in writers:
                w.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await w.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read and stamp, and beside it release each chunk when it is due."""
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(MAX_IN_FLIGHT)

        async def release() -> None:
            broken = False  # the far side went away: keep taking chunks so the reader never blocks
            while (item := await line.get()) is not None:
                if broken:
                    continue
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    broken = True
            if not broken and writer.can_write_eof():
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write_eof()

        releaser = asyncio.create_task(release())
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(CHUNK):
                    await line.put((loop.time() + self.delay, data))
            await line.put(None)
            with contextlib.suppress(ConnectionError, OSError):
                await releaser
        finally:
            releaser.cancel()
            with contextlib.suppress(BaseException):
                await releaser

    def stop(self) -> None:
        """Close the listening socket and every relayed connection; end the thread."""

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def start_relay_link(server: Any, rtt_ms: float, workdir: Path) -> tuple[Any, Relay]:
    """A relay in front of the test sshd ``server`` with ``rtt_ms`` per round trip (half each
    way), and a copy of ``server`` that reaches it through the relay (its own known_hosts
    entry for the relay's port, the same host key)."""
    relay = Relay(server.port, rtt_ms / 2000.0)
    workdir.mkdir(parents=True, exist_ok=True)
    known = workdir / "known_hosts"
    entries = server.known_hosts.read_text().split()
    known.write_text(f"[{server.host}]:{relay.port} {entries[1]} {entries[2]}\n")
    relayed = dataclasses.replace(server, port=relay.port, known_hosts=known, process=None, _log_handle=None)
    return relayed, relay
