"""An Engine API proxy on a unix socket that passes everything through except, when told, `docker save`.

The registry under test gets ``DOCKER_HOST=unix://<proxy socket>``; the proxy forwards every request to the
real dockerd socket (aiohttp server in front, aiohttp client over a UnixConnector behind, both on an event
loop of its own in a thread). The body of ``GET /images/{name}/get`` can be damaged on the way:

- ``cut``: the connection is closed after N body bytes, without the final chunk (a daemon dying);
- ``short``: the chunked body ends cleanly after N bytes (a well-formed HTTP response, a truncated tar);
- ``flip``: one byte is inverted (a bit-rotten or tampered blob).

Or slowed down: with ``save_rate`` set, save bodies pass at that many bytes per second (a big image
exporting from a busy daemon).

N defaults to the middle of the data of the ``nth`` regular tar member of at least ``min_member`` bytes (a
layer, well past any tar header); the proxy follows the tar headers as the bytes pass, so it knows which
member it damaged (`SaveRecord.member`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web
from yarl import URL

from .daemons import make_temp_dir, remove_tree

MiB = 1 << 20
BLOCK = 512
_SAVE_PATH = re.compile(r"^/(?:v[0-9.]+/)?images/.+/get$")
# Hop-by-hop headers, and those the proxy recomputes.
_NOT_FORWARDED = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Accept-Encoding",
    )
)

FaultKind = Literal["cut", "short", "flip"]


@dataclass(frozen=True)
class SaveFault:
    kind: FaultKind
    # Absolute offset in the save stream's body; None: the middle of the data of the `nth` (from 0) regular
    # member of at least `min_member` bytes.
    at: int | None = None
    min_member: int = 1 * MiB
    nth: int = 0


@dataclass(frozen=True)
class TarMember:
    name: str
    type: bytes
    size: int
    data_offset: int


@dataclass
class SaveRecord:
    """One save request that went through the proxy, and what was done to it."""

    path: str
    fault: SaveFault | None
    bytes_sent: int = 0
    members: list[TarMember] = field(default_factory=list)
    # Where the fault struck: absolute offset, and the member (name, offset in its data) it fell in.
    damaged_at: int | None = None
    member: TarMember | None = None
    # sha256 of the damaged member's data as the proxy sent it (complete only for `flip`).
    member_digest: str | None = None
    finished: bool = False

    @property
    def offset_in_member(self) -> int | None:
        if self.damaged_at is None or self.member is None:
            return None
        return self.damaged_at - self.member.data_offset


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for big numbers
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


class TarWalker:
    """Follows tar headers through a stream fed chunk by chunk (headers only; data is skipped)."""

    def __init__(self) -> None:
        self.position = 0
        self.members: list[TarMember] = []
        self._next_header = 0
        self._header = bytearray()
        self._ended = False

    def feed(self, chunk: bytes | bytearray) -> None:
        start, end = self.position, self.position + len(chunk)
        while not self._ended:
            wanted = self._next_header + len(self._header)
            if wanted >= end:
                break
            if wanted < start:  # cannot happen: headers are collected as their bytes pass
                raise AssertionError("tar walker fell behind")
            take = min(end, self._next_header + BLOCK)
            self._header += chunk[wanted - start : take - start]
            if len(self._header) == BLOCK:
                self._parse(bytes(self._header))
                self._header.clear()
        self.position = end

    def _parse(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._ended = True
            return
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        size = _octal(header[124:136])
        kind = header[156:157]
        data_offset = self._next_header + BLOCK
        self.members.append(TarMember(name, kind, size, data_offset))
        self._next_header = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK

    def big_member(self, min_size: int, nth: int = 0) -> TarMember | None:
        big = [m for m in self.members if m.type in (b"0", b"\0") and m.size >= min_size]
        return big[nth] if len(big) > nth else None


class DockerProxy:
    """`start()` / `stop()`; `host` is the DOCKER_HOST to give the registry; set `fault` any time."""

    def __init__(self, upstream_socket: Path) -> None:
        self.upstream_socket = Path(upstream_socket)
        self.root = make_temp_dir("prx")
        self.socket = self.root / "proxy.sock"
        self.host = f"unix://{self.socket}"
        self.fault: SaveFault | None = None
        self.save_rate: float | None = None
        self.saves: list[SaveRecord] = []
        self.requests: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> DockerProxy:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="docker-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            self._loop = self._thread = None
            remove_tree(self.root)

    def __enter__(self) -> DockerProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.upstream_socket)),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A client that goes away ends its relay (the registry's event stream would otherwise be relayed
        # on forever), and a stop does not wait for relays still running.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket)).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ---- forwarding -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        self.requests.append(f"{request.method} {request.raw_path}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        headers["Accept-Encoding"] = "identity"
        data: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            if request.content_length is not None and request.content_length <= MiB:
                data = await request.read()
            else:
                data = _stream(request.content)
        url = URL(f"http://docker{request.raw_path}", encoded=True)
        async with self._session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _NOT_FORWARDED:
                    response.headers.add(key, value)
            is_save = request.method == "GET" and _SAVE_PATH.match(request.path) and upstream.status == 200
            if is_save:
                return await self._relay_save(request, upstream, response)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response

    async def _relay_save(
        self, request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> web.StreamResponse:
        fault = self.fault
        record = SaveRecord(request.path, fault)
        self.saves.append(record)
        walker = TarWalker()
        # Chunked, as dockerd sends it: a short body must still look like a complete HTTP response.
        response.enable_chunked_encoding()
        await response.prepare(request)
        member: TarMember | None = None
        hasher = hashlib.sha256()
        began = asyncio.get_running_loop().time()
        async for raw in upstream.content.iter_any():
            if self.save_rate:
                due = began + record.bytes_sent / self.save_rate
                await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            chunk = bytearray(raw)
            start = walker.position
            walker.feed(chunk)
            target = self._target(fault, walker)
            if target is not None and member is None:
                # Known once its header has passed, which is before any of its data.
                member = _member_at(walker.members, target)
            strikes = (
                target is not None and record.damaged_at is None and start <= target < start + len(chunk)
            )
            if fault is not None and target is not None and strikes:
                record.damaged_at, record.member = target, member
                if fault.kind == "flip":
                    chunk[target - start] ^= 0xFF
                else:
                    await response.write(bytes(chunk[: target - start]))
                    record.bytes_sent += target - start
                    record.members = list(walker.members)
                    if fault.kind == "cut":
                        # No final chunk: the client sees the connection drop mid-body.
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    await response.write_eof()
                    return response
            if member is not None:
                low = max(start, member.data_offset)
                high = min(start + len(chunk), member.data_offset + member.size)
                if low < high:
                    hasher.update(chunk[low - start : high - start])
                if high == member.data_offset + member.size and record.member_digest is None:
                    record.member_digest = f"sha256:{hasher.hexdigest()}"
            await response.write(bytes(chunk))
            record.bytes_sent += len(chunk)
        record.members = list(walker.members)
        record.finished = True
        await response.write_eof()
        return response

    @staticmethod
    def _target(fault: SaveFault | None, walker: TarWalker) -> int | None:
        if fault is None:
            return None
        if fault.at is not None:
            return fault.at
        member = walker.big_member(fault.min_member, fault.nth)
        return member.data_offset + member.size // 2 if member else None


def _member_at(members: list[TarMember], offset: int) -> TarMember | None:
    return next((m for m in members if m.data_offset <= offset < m.data_offset + m.size), None)


async def _stream(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    async for chunk in content.iter_any():
        yield chunk
