"""A TCP relay that can make its live connections go silent: a network partition in a test.

``partition()`` stops relaying on every open connection without closing it, as a dropped NAT
entry or a failed-over load balancer does: the peers see no FIN and no RST, only silence, so a
client that does not time out waits forever. ``heal()`` lets new connections through again; the
silenced ones stay silent, as they would on a real network.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress

from worker.demo.sandboxes import free_port


class Relay:
    """127.0.0.1:``port`` relays to ``target_port`` until a partition."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.generation = 0
        self.partitioned = False
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(10), "relay did not start"
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._ready.set()
        self.loop.run_forever()

    def partition(self) -> None:
        """Every open connection goes silent (never closed); new ones are silent too."""
        self.partitioned = True

    def heal(self) -> None:
        """New connections are relayed again; the silenced ones stay silent."""
        self.generation += 1
        self.partitioned = False

    def stop(self) -> None:
        """Close everything: cancel the relaying tasks, then stop the loop."""

        async def close_all() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self._writers:
                with suppress(Exception):
                    await writer.wait_closed()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def _live(self, generation: int) -> bool:
        return generation == self.generation and not self.partitioned

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self.generation
        self.connections += 1
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, generation), self._pump(up_reader, writer, generation)
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        with suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self._live(generation):
                    writer.write(data)
                    await writer.drain()
                # else: swallowed, like packets into a black hole; the socket stays open
            if self._live(generation):
                writer.close()
