"""Sending a blob. A file known to match its digest goes out with aiohttp's FileResponse (sendfile, Range).
Pieces (a layer put together from its store's files, a file not verified yet) go out in order: the bytes
held in memory with a write, each larger file's range with the kernel's sendfile, so a warm layer costs no
copy through Python; the blocking work (opening, reading small files) runs a batch at a time in a bounded
pool, so a stream holds no thread while its client reads and at most a batch of memory. The first time,
the bytes are hashed beside the send (by the source, once for all requests asking at the same time) and
the last ones are held back until the digest matched: bytes that do not match never complete a response.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from aiohttp import hdrs, web

from ..oci.errors import RegistryError
from ..sources.content import Blob, BlobFile, BlobPieces
from ..sources.pieces import FileRange, Piece, Pieces, read_exactly

log = logging.getLogger(__package__)
# Sent only once the whole blob is known to match its digest.
HELD_BACK = 64 << 10
# Bytes read into memory per batch of pieces: a stream holds two at most (one going out, the next read).
# Fewer, larger batches cost fewer hand-offs between the pool and the event loop: a layer of 30,000 small
# files took 1.5x as long in batches of 128 KiB as in batches of 512 KiB.
BATCH = 512 << 10
# Files this long or longer are sent with sendfile; shorter ones are read with the bytes around them. A
# sendfile call costs a syscall on the event loop's thread per file, and asyncio's (when the socket is full)
# a wait for its buffer to empty: measured against a client that hashes what it gets, layers of 8,000 files
# of 2-64 KiB took 410 ms with sendfile from 32 KiB, 223 ms from 256 KiB (178-211 ms all through a thread,
# before); a 200 MiB file costs a third of the CPU it does read through Python.
SENDFILE_FROM = 256 << 10
READERS = 4


class BlobSender:
    """Sends blobs; owns the pool that opens and reads pieces (see the module's docstring)."""

    def __init__(self, readers: int = READERS) -> None:
        self._reads = ThreadPoolExecutor(readers, thread_name_prefix="blob-read")

    def close(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)

    async def send(self, request: web.Request, blob: Blob, headers: Mapping[str, str]) -> web.StreamResponse:
        if isinstance(blob, BlobFile):
            # FileResponse answers Range/If-Range itself (206, 416). Blob files have no .gz/.br sibling,
            # so it never picks a Content-Encoding.
            return web.FileResponse(blob.path, headers=headers)
        return await self._send_pieces(request, blob, headers)

    async def _send_pieces(
        self, request: web.Request, blob: BlobPieces, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """Range and HEAD as for files (FileResponse). Unverified, a part of the blob is sent only once the
        whole matched; the whole, all but the last HELD_BACK bytes while it is hashed."""
        response = web.StreamResponse(headers=headers)
        response.etag = blob.digest.partition(":")[2]
        asked = _range(request, blob.size)
        if asked is None:
            response.set_status(416)
            response.headers[hdrs.CONTENT_RANGE] = f"bytes */{blob.size}"
            return response
        start, count, partial = asked
        if partial:
            response.set_status(206)
            response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{start + count - 1}/{blob.size}"
        response.content_length = count
        verify = blob.verify
        body = request.method != hdrs.METH_HEAD and count > 0
        if verify is not None and partial and body:
            try:
                matched = await _verified(verify)
            except _Unreadable as exc:
                raise RegistryError("BLOB_UNKNOWN", f"blob {blob.digest} cannot be read: {exc}") from exc
            if not matched:
                raise RegistryError("BLOB_UNKNOWN", f"blob {blob.digest} is damaged and cannot be served")
            verify = None
        try:
            await response.prepare(request)
            if not body or await self._send_body(request, response, blob, start, start + count, verify):
                await response.write_eof()
        except ConnectionError:
            # The client went away: aiohttp ends the answer (and logs it) as for a file it sends.
            log.debug("sending %s: the client went away", blob.digest)
        return response

    async def _send_body(
        self,
        request: web.Request,
        response: web.StreamResponse,
        blob: BlobPieces,
        start: int,
        end: int,
        verify: Callable[[], Awaitable[bool]] | None,
    ) -> bool:
        """Whether all was sent; the connection is cut when bytes could not be read or did not match."""
        checking = asyncio.ensure_future(_verified(verify)) if verify is not None else None
        held = min(end - start, HELD_BACK) if checking is not None else 0
        try:
            await self._send_range(request, response, blob, start, end - held)
            if checking is not None and not await checking:
                log.error("sending %s aborted: its bytes do not match the digest", blob.digest)
                _abort(request)
                return False
            await self._send_range(request, response, blob, end - held, end)
        except _Unreadable as exc:
            log.warning("sending %s aborted: %s", blob.digest, exc)
            _abort(request)
            return False
        finally:
            if checking is not None and not checking.done():
                # The hashing itself goes on (the source shares it); only this wait for it ends.
                checking.cancel()
        return True

    async def _send_range(
        self, request: web.Request, response: web.StreamResponse, blob: BlobPieces, start: int, stop: int
    ) -> None:
        """Sends the pieces from `start` to `stop`, reading the next batch while this one goes out (one
        batch ahead: reading and sending overlap, and a stream holds at most two batches)."""
        if start >= stop:
            return
        pieces = blob.pieces(start, stop, SENDFILE_FROM)
        reading: asyncio.Future[list[Piece]] | None = self._read(pieces)
        try:
            while reading is not None:
                try:
                    batch = await asyncio.shield(reading)
                except OSError as exc:
                    reading = None
                    raise _Unreadable(exc.strerror or str(exc)) from exc
                reading = None if pieces.done else self._read(pieces)
                try:
                    for piece in batch:
                        if isinstance(piece, FileRange):
                            await self._send_file(request, response, piece)
                        else:
                            await response.write(piece)
                finally:
                    _close(batch)
        finally:
            if reading is None:
                pieces.close()
            else:
                # The pool's thread still reads with what the pieces hold open: freed once it is done.
                reading.add_done_callback(functools.partial(_dispose, pieces=pieces))

    def _read(self, pieces: Pieces) -> asyncio.Future[list[Piece]]:
        return asyncio.get_running_loop().run_in_executor(self._reads, pieces.next, BATCH)

    async def _send_file(self, request: web.Request, response: web.StreamResponse, piece: FileRange) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        loop = asyncio.get_running_loop()
        try:
            sent = _sendfile_now(transport, piece)
            if sent < piece.count:
                sent += await loop.sendfile(transport, piece.file, piece.offset + sent, piece.count - sent)
        except NotImplementedError:
            # An event loop without sendfile (uvloop): the pool reads what the kernel would have sent.
            await self._copy(response, piece, sent)
            return
        except ConnectionError:
            raise
        except OSError as exc:
            raise _Unreadable(exc.strerror or str(exc)) from exc
        if sent < piece.count:
            raise _Unreadable(f"{piece.name} is shorter than expected: it changed or is damaged")

    async def _copy(self, response: web.StreamResponse, piece: FileRange, sent: int) -> None:
        loop = asyncio.get_running_loop()
        fd, end = piece.file.fileno(), piece.offset + piece.count
        for at in range(piece.offset + sent, end, BATCH):
            count = min(BATCH, end - at)
            try:
                data = await loop.run_in_executor(self._reads, read_exactly, fd, at, count, piece.name)
            except OSError as exc:
                raise _Unreadable(exc.strerror or str(exc)) from exc
            await response.write(data)


def _sendfile_now(transport: asyncio.Transport, piece: FileRange) -> int:
    """Sends what the connection's socket takes at once, with one sendfile call: loop.sendfile waits for an
    event loop turn (and two epoll changes) even when everything fits, and a client reading as fast as we
    send is the common case. Only on a plain socket whose transport holds nothing unsent (the bytes would
    overtake it); the rest goes through loop.sendfile."""
    sock = transport.get_extra_info("socket")
    if (
        sock is None
        or transport.get_extra_info("sslcontext") is not None
        or transport.get_write_buffer_size()
    ):
        return 0
    try:
        return os.sendfile(sock.fileno(), piece.file.fileno(), piece.offset, piece.count)
    except (BlockingIOError, InterruptedError):
        return 0


class _Unreadable(Exception):
    """The blob's bytes could not be read from where they lie (a file gone, changed or unreadable)."""


async def _verified(verify: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await verify()
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from exc


def _close(batch: list[Piece]) -> None:
    for piece in batch:
        if isinstance(piece, FileRange):
            piece.file.close()


def _dispose(done: asyncio.Future[list[Piece]], pieces: Pieces) -> None:
    if not done.cancelled() and done.exception() is None:
        _close(done.result())
    pieces.close()


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


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
