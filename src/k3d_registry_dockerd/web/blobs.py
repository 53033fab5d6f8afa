"""Sending a blob from its file: sendfile (with Range) once its bytes are known to match the digest, and
hashing while sending the first time, so bytes that do not match never complete a response."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Mapping
from typing import BinaryIO

from aiohttp import hdrs, web

from ..oci.errors import RegistryError
from ..sources.content import BlobFile

log = logging.getLogger(__package__)
# Sent only once the whole file is known to match its digest.
HELD_BACK = 64 << 10
CHUNK = 1 << 20


async def send(request: web.Request, blob: BlobFile, headers: Mapping[str, str]) -> web.StreamResponse:
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
            ok = await asyncio.to_thread(_digest_of, handle, stat.st_size) == blob.digest
            blob.verified(ok, stat)
            if not ok:
                raise RegistryError("BLOB_UNKNOWN", f"blob {blob.digest} is damaged and cannot be served")
            return web.FileResponse(blob.path, headers=headers)
        return await _send_hashing(request, handle, stat, blob, headers)
    finally:
        handle.close()


def _digest_of(handle: BinaryIO, size: int) -> str:
    """The file's digest, read with pread into one buffer: independent of the file position sendfile
    moves, and no more memory than the buffer (a mapping would count the whole file as resident)."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        read = os.preadv(handle.fileno(), [view], offset)
        if read == 0:
            break
        hasher.update(view[:read])
        offset += read
    return f"sha256:{hasher.hexdigest()}"


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
    hashing = loop.run_in_executor(None, _digest_of, handle, size)
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
