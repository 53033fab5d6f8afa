"""Hashing bytes that lie in files or come in chunks, with no more memory than one buffer; and a bounded
pool that hashes each thing once for all who ask about it at the same time."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

from .flights import SingleFlight

CHUNK = 1 << 20
T = TypeVar("T")


def hash_file(hasher: Any, fd: int, size: int, buffer: memoryview) -> int:
    """Adds the file's first `size` bytes to `hasher`, read with pread into `buffer` (independent of the
    file position sendfile moves); how many there were (fewer when the file is shorter)."""
    done = 0
    while done < size:
        read = os.preadv(fd, [buffer[: min(len(buffer), size - done)]], done)
        if read == 0:
            break
        hasher.update(buffer[:read])
        done += read
    return done


def file_digest(handle: BinaryIO, size: int) -> str:
    """The file's digest, with no more memory than one buffer (a mapping would count the whole file as
    resident)."""
    hasher = hashlib.sha256()
    hash_file(hasher, handle.fileno(), size, memoryview(bytearray(CHUNK)))
    return f"sha256:{hasher.hexdigest()}"


def chunks_digest(chunks: Iterable[bytes]) -> tuple[str, int]:
    """The digest of the bytes, and how many there were."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size


class Hashing:
    """Hashing off the event loop in a few threads of its own (hashing is CPU work: more threads than cores
    would only queue), once per key for the callers that ask while it runs: thirty nodes pulling a new
    image at once hash each blob once. A caller leaving does not stop the work."""

    def __init__(self, workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1), thread_name_prefix="hashing")
        self._flights = SingleFlight()

    async def once(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """`work`'s outcome, shared with the callers asking about `key` while it runs."""
        return await self._flights.run(key, work)

    async def run(self, blocking: Callable[[], T]) -> T:
        """`blocking` in one of the pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, blocking)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
