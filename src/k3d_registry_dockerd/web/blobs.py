"""Sending a blob: from its file with sendfile (with Range) once its bytes are known to match the digest,
or as a stream put together as it goes out (a layer from the files of the daemon's store); hashing while
sending the first time, so bytes that do not match never complete a response."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, BinaryIO

from aiohttp import hdrs, web

from ..common.hashing import chunks_digest, file_digest
from ..oci.errors import RegistryError
from ..sources.content import Blob, BlobFile, BlobStream

log = logging.getLogger(__package__)
# Sent only once the whole file is known to match its digest.
HELD_BACK = 64 << 10


async def send(request: web.Request, blob: Blob, headers: Mapping[str, str]) -> web.StreamResponse:
    if isinstance(blob, BlobStream):
        return await _send_stream(request, blob, headers)
    # FileResponse streams with sendfile and answers Range/If-Range itself (206, 416). Blob files have no
    # .gz/.br sibling, so it never picks a Content-Encoding.
    if blob.verified is None or request.method == hdrs.METH_HEAD:
        return web.FileResponse(blob.path, headers=headers)
    try:
        # Opened now: a file containerd removes from here on stays readable until it is closed.
        handle = await asyncio.to_thread(open, blob.path, "rb")
    except FileNotFoundError as exc:
        raise RegistryError("BLOB_UNKNOWN", f"blob {blob.digest} is no longer there") from exc
    try:
        stat = os.fstat(handle.fileno())
        if hdrs.RANGE in request.headers:
            # Part of a file cannot be checked alone: the whole is hashed before any of it is sent.
            ok = await asyncio.to_thread(file_digest, handle, stat.st_size) == blob.digest
            blob.verified(ok, stat)
            if not ok:
                raise RegistryError("BLOB_UNKNOWN", f"blob {blob.digest} is damaged and cannot be served")
            return web.FileResponse(blob.path, headers=headers)
        return await _send_hashing(request, handle, stat, blob, headers)
    finally:
        handle.close()


async def _send_hashing(
    request: web.Request, handle: BinaryIO, stat: os.stat_result, blob: BlobFile, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Sends all but the file's last bytes with sendfile while a worker thread hashes the whole file; the
    rest goes out only if the digest matched, else the connection is cut, so the client sees a broken
    transfer instead of wrong bytes. Hashing and sending run side by side, on two cores."""
    assert blob.verified is not None
    loop = asyncio.get_running_loop()
    size = stat.st_size
    held = min(size, HELD_BACK)
    hashing = loop.run_in_executor(None, file_digest, handle, size)
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    try:
        await response.prepare(request)
        if request.transport is None:
            raise ConnectionResetError("the client went away")
        if size > held:
            await loop.sendfile(request.transport, handle, 0, size - held)
    finally:
        # The outcome is kept even when the client left: the next request need not hash again.
        ok = await hashing == blob.digest
        blob.verified(ok, stat)
    if not ok:
        log.error("sending %s aborted: the file's bytes do not match the digest", blob.digest)
        request.transport.abort()
        return response
    handle.seek(size - held)
    await response.write(handle.read(held))
    await response.write_eof()
    return response


def _range(request: web.Request, size: int) -> tuple[int, int, bool] | None:
    """(start, count, partial) of what a request asks for, as aiohttp's FileResponse reads Range; None
    when it cannot be satisfied."""
    try:
        asked = request.http_range
    except ValueError:
        return None
    start, end = asked.start, asked.stop
    if start is None:
        return 0, size, False
    if start < 0 and end is None:
        start = max(start + size, 0)
        count = size - start
    else:
        count = min(end if end is not None else size, size) - start
    if start >= size:
        return None
    return start, count, True


async def _send_stream(
    request: web.Request, blob: BlobStream, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Sends a stream blob (Range and HEAD as for files). Unverified, it is hashed while it goes out and
    its last HELD_BACK bytes are sent only if it matched (a part of one is hashed whole first)."""
    response = web.StreamResponse(headers=headers)
    response.etag = blob.digest.partition(":")[2]
    asked = _range(request, blob.size)
    if asked is None:
        response.set_status(416)
        response.headers[hdrs.CONTENT_RANGE] = f"bytes */{blob.size}"
        await response.prepare(request)
        return response
    start, count, partial = asked
    if partial:
        response.set_status(206)
        response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{start + count - 1}/{blob.size}"
    response.content_length = count
    verify = blob.verified
    if verify is not None and partial and request.method != hdrs.METH_HEAD:
        ok = await asyncio.to_thread(_stream_digest, blob) == blob.digest
        verify(ok)
        if not ok:
            raise RegistryError("BLOB_UNKNOWN", f"blob {blob.digest} is damaged and cannot be served")
        verify = None
    await response.prepare(request)
    if request.method == hdrs.METH_HEAD or count == 0:
        await response.write_eof()
        return response
    hasher = hashlib.sha256() if verify is not None else None
    held = min(count, HELD_BACK) if hasher is not None else 0
    sent, tail = 0, bytearray()
    try:
        async for chunk in _produced(lambda: blob.chunks(start), hasher):
            piece = memoryview(chunk)[: count - sent - len(tail)]
            if held and sent + len(tail) + len(piece) > count - held:
                cut = max(count - held - sent - len(tail), 0)
                if cut:
                    await response.write(piece[:cut])
                    sent += cut
                tail += piece[cut:]
            elif piece:
                await response.write(piece)
                sent += len(piece)
    except OSError as exc:
        log.warning("sending %s aborted: %s", blob.digest, exc.strerror or exc)
        _abort(request)
        return response
    if hasher is not None and verify is not None:
        ok = sent + len(tail) == count and f"sha256:{hasher.hexdigest()}" == blob.digest
        verify(ok)
        if not ok:
            log.error("sending %s aborted: the bytes put together do not match the digest", blob.digest)
            _abort(request)
            return response
    if sent + len(tail) != count:
        log.error("sending %s aborted: %d of its %d bytes were there", blob.digest, sent + len(tail), count)
        _abort(request)
        return response
    if tail:
        await response.write(bytes(tail))
    await response.write_eof()
    return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _stream_digest(blob: BlobStream) -> str:
    digest, size = chunks_digest(blob.chunks(0))
    return digest if size == blob.size else "short"


async def _produced(
    produce: Callable[[], Iterator[bytes]], hasher: Any | None, read_ahead: int = 4
) -> AsyncIterator[bytes]:
    """The chunks `produce` makes in a thread of its own (it blocks on files; a pool thread would be held
    for as long as the client reads), `read_ahead` at most ahead of the consumer, hashed on the way."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(read_ahead)
    stop = threading.Event()

    def hand(item: bytes | BaseException | None) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def run() -> None:
        try:
            for chunk in produce():
                if stop.is_set():
                    return
                if hasher is not None:
                    hasher.update(chunk)
                hand(chunk)
            hand(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            if not stop.is_set():
                hand(exc)

    thread = threading.Thread(target=run, name="blob-stream", daemon=True)
    thread.start()
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Frees a producer waiting for room, so its thread ends.
        while not queue.empty():
            queue.get_nowait()
