"""A TCP relay on 127.0.0.1 that passes answers back slowly: an upstream registry behind it looks like a
far one, so a pull through dockerd takes seconds instead of milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class ThrottledRelay:
    """Relays 127.0.0.1:`port` to `target_host`:`target_port`; each connection's answers at `rate` B/s."""

    def __init__(self, target_host: str, target_port: int, rate: float) -> None:
        self.target = (target_host, target_port)
        self.rate = rate
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ThrottledRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pump(client_reader, target_writer, None),
            self._pump(target_reader, client_writer, self.rate),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        began, sent = loop.time(), 0
        try:
            while chunk := await reader.read(16 << 10):
                if rate:
                    await asyncio.sleep(max(0.0, began + sent / rate - loop.time()))
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        finally:
            with contextlib.suppress(OSError):
                writer.close()
