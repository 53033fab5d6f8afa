"""Reading what a client sends with an idle timeout: a client that stops sending mid-body gets an error
and frees what its request holds (an upload's slot and temp file), instead of holding it for ever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader

from ..common import units


class BodyStalled(Exception):
    """No bytes of a request body arrived for `seconds`."""

    def __init__(self, seconds: float, received: int) -> None:
        super().__init__(
            f"no bytes of the body arrived for {units.duration(seconds)} (after {units.size(received)})"
        )
        self.seconds = seconds
        self.received = received


async def chunks(body: StreamReader, idle: float | None) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive; BodyStalled when none arrive for `idle` seconds (None: wait)."""
    received = 0
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await body.readany()
        except TimeoutError:
            raise BodyStalled(idle or 0.0, received) from None
        if not chunk:
            return
        received += len(chunk)
        yield chunk


async def read_at_most(body: StreamReader, limit: int, idle: float | None) -> bytes:
    """The body, or its first `limit + 1` bytes when it is longer (so the caller can refuse it)."""
    data = bytearray()
    async for chunk in chunks(body, idle):
        data += chunk
        if len(data) > limit:
            break
    return bytes(data[: limit + 1])
