"""Hashing bytes that lie in files or come in chunks, with no more memory than one buffer."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import BinaryIO

CHUNK = 1 << 20


def file_digest(handle: BinaryIO, size: int) -> str:
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


def chunks_digest(chunks: Iterable[bytes]) -> tuple[str, int]:
    """The digest of the bytes, and how many there were."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size
