"""Blob upload sessions: chunks stream to a temp file while hashed; a blob is stored only once its
bytes hash to the digest the client names.

A session lives in memory and in one temp file. The hash state is kept between chunks, so finishing an
upload never reads the data back. A restart drops all sessions (the store clears its temp dir); clients
then see BLOB_UPLOAD_UNKNOWN and start over, as the spec allows. At most `max_uploads` sessions are open
at once (more get 429), and a request whose body stops arriving for `body_timeout` seconds drops its
session with what it had written, so a stalled client holds neither a slot nor disk space.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import StreamReader, hdrs

from ..cache.store import BlobWriter, DigestMismatch, Store
from ..common import units
from ..common.metrics import Metrics
from ..oci.errors import RegistryError
from ..oci.reference import Digest
from .bodies import BodyStalled, chunks

log = logging.getLogger(__package__)

# An upload no request touched for this long is abandoned: its temp file is removed.
IDLE_TIMEOUT = 30 * 60.0
# A request body that sends nothing for this long is given up on (`--body-timeout`).
BODY_TIMEOUT = 60.0
# Upload sessions open at once (`--max-uploads`): each holds a temp file and its descriptor.
MAX_UPLOADS = 64
# What a client refused for too many uploads is asked to wait before retrying.
RETRY_AFTER = 5
EXPIRY_INTERVAL = 60.0
# Bytes gathered from the socket before one write to disk (off the event loop).
WRITE_BUFFER = 1 << 20
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})(?:/(?:[0-9]{1,19}|\*))?")


@dataclass
class Upload:
    id: str
    repository: str
    writer: BlobWriter
    touched: float = field(default_factory=time.monotonic)
    # One request at a time appends: a second one sees the offset the first left.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def offset(self) -> int:
        return self.writer.size

    def headers(self, path: str) -> dict[str, str]:
        """Where the client continues, and how much the registry has (`Range` is inclusive)."""
        return {
            "Location": path,
            "Range": f"0-{max(self.offset - 1, 0)}",
            "Docker-Upload-UUID": self.id,
        }


def parse_content_range(text: str) -> tuple[int, int]:
    """`<start>-<end>` of a PATCH (inclusive); distribution's clients also send a `bytes ` prefix."""
    match = _CONTENT_RANGE_RE.fullmatch(text.strip())
    if not match or int(match[2]) < int(match[1]):
        raise RegistryError("BLOB_UPLOAD_INVALID", f"invalid Content-Range {text[:60]!r}", status=416)
    return int(match[1]), int(match[2])


class Uploads:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        body_timeout: float | None = BODY_TIMEOUT,
        max_uploads: int = MAX_UPLOADS,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.max_uploads = max_uploads
        self._uploads: dict[str, Upload] = {}
        # Sessions being opened (their temp file made off the event loop): they count against the bound.
        self._opening = 0
        metrics.uploads.set_function(lambda: len(self._uploads))
        # Background fdatasync of large uploads, as exports do: the final fsync has little left.
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-flush")

    def __len__(self) -> int:
        return len(self._uploads)

    def __contains__(self, upload_id: object) -> bool:
        return upload_id in self._uploads

    async def start(self, repository: str) -> Upload:
        """A new session; TOOMANYREQUESTS with Retry-After while `max_uploads` are open. At the bound,
        sessions no request touched for longer than a body may stall (opened and left) are dropped first."""
        if len(self._uploads) + self._opening >= self.max_uploads and self.body_timeout:
            await self.expire(self.body_timeout)
        if len(self._uploads) + self._opening >= self.max_uploads:
            raise RegistryError(
                "TOOMANYREQUESTS",
                f"{len(self._uploads)} uploads are in progress, the most this registry takes at once "
                f"(--max-uploads); retry in {RETRY_AFTER} s",
                headers={hdrs.RETRY_AFTER: str(RETRY_AFTER)},
            )
        self._opening += 1
        try:
            writer = await asyncio.to_thread(self.store.writer, self._flusher)
        finally:
            self._opening -= 1
        upload = Upload(str(uuid.uuid4()), repository, writer)
        self._uploads[upload.id] = upload
        return upload

    def get(self, repository: str, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        # A session is bound to the repository it was started in.
        if upload is None or upload.repository != repository:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN", f"blob upload unknown: {upload_id}")
        upload.touched = time.monotonic()
        return upload

    async def append(
        self, upload: Upload, body: StreamReader, content_range: str | None, length: int | None
    ) -> None:
        """Appends a request body. With Content-Range the chunk must start where the upload ends (else
        416); a chunk shorter than its range leaves the upload where the bytes that did arrive put it."""
        expected = None
        if content_range is not None:
            start, end = parse_content_range(content_range)
            if start != upload.offset:
                raise RegistryError(
                    "BLOB_UPLOAD_INVALID",
                    f"chunk starts at {start}, but the upload has {upload.offset} bytes",
                    status=416,
                )
            expected = end - start + 1
            if length is not None and length != expected:
                raise RegistryError(
                    "BLOB_UPLOAD_INVALID",
                    f"Content-Length {length} does not match Content-Range {content_range}",
                    status=416,
                )
        received = await self._write_body(upload, body)
        if expected is not None and received != expected:
            raise RegistryError(
                "BLOB_UPLOAD_INVALID", f"chunk of {received} bytes, Content-Range said {expected}", status=400
            )

    async def _write_body(self, upload: Upload, body: StreamReader) -> int:
        """Writes what arrives; a client going away keeps what arrived before (the upload resumes from
        there), while a failed disk write or a body that stops arriving ends the upload."""
        received = 0
        pending = bytearray()
        try:
            async for chunk in chunks(body, self.body_timeout):
                pending += chunk
                received += len(chunk)
                if len(pending) >= WRITE_BUFFER:
                    await self._write(upload, pending)
                upload.touched = time.monotonic()
        except ConnectionError:
            if pending:
                await self._write(upload, pending)
            raise
        except BodyStalled as exc:
            raise await self._stalled(upload, exc) from exc
        if pending:
            await self._write(upload, pending)
        return received

    async def _write(self, upload: Upload, pending: bytearray) -> None:
        try:
            await asyncio.to_thread(upload.writer.write, bytes(pending))
        except OSError as exc:
            raise await self._storage_failed(upload, exc) from exc
        pending.clear()

    async def finish(self, upload: Upload, digest: Digest) -> None:
        """Commits the upload under `digest`; a mismatch (DIGEST_INVALID) discards it, nothing stored."""
        self._uploads.pop(upload.id, None)
        try:
            await asyncio.to_thread(upload.writer.commit, str(digest))
        except DigestMismatch as exc:
            log.info("upload %s to %s rejected: %s", upload.id, upload.repository, exc)
            raise RegistryError("DIGEST_INVALID", f"digest invalid: {exc}") from exc
        except OSError as exc:
            raise await self._storage_failed(upload, exc) from exc

    async def _stalled(self, upload: Upload, exc: BodyStalled) -> RegistryError:
        """The client stopped sending: the upload and what it wrote are dropped, its slot freed."""
        self.metrics.stalled_bodies.labels("upload").inc()
        log.warning(
            "upload %s to %s dropped with %s written: %s",
            upload.id,
            upload.repository,
            units.size(upload.offset),
            exc,
        )
        await self.cancel(upload)
        return RegistryError(
            "BLOB_UPLOAD_INVALID",
            f"upload to {upload.repository} dropped: {exc}; start it again",
            status=408,
            headers={hdrs.CONNECTION: "close"},
        )

    async def _storage_failed(self, upload: Upload, exc: OSError) -> RegistryError:
        """A write or fsync failed (a full disk, most likely): the upload is dropped, not left half-done."""
        log.error(
            "upload %s to %s failed writing to the cache %s: %s",
            upload.id,
            upload.repository,
            self.store.root,
            exc,
        )
        await self.cancel(upload)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return RegistryError(
            "UNAVAILABLE",
            f"cannot store the upload in the cache {self.store.root}: {exc.strerror or exc}",
            status=507 if full else 503,
        )

    async def cancel(self, upload: Upload) -> None:
        self._uploads.pop(upload.id, None)
        await asyncio.to_thread(upload.writer.abort)

    async def expire(self, idle: float | None = None) -> int:
        """Drops uploads idle longer than `idle` (default the idle timeout), not one a request is
        appending to right now."""
        cutoff = time.monotonic() - (self.idle_timeout if idle is None else idle)
        stale = [u for u in self._uploads.values() if u.touched < cutoff and not u.lock.locked()]
        for upload in stale:
            log.info(
                "dropping upload %s to %s: abandoned with %d bytes",
                upload.id,
                upload.repository,
                upload.offset,
            )
            await self.cancel(upload)
        return len(stale)

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            await self.expire()

    async def close(self) -> None:
        for upload in list(self._uploads.values()):
            await self.cancel(upload)
        self._flusher.shutdown(wait=True)
