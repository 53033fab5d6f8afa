"""A blob handed out as pieces, for sending: bytes held in memory, and ranges of open files that are sent
as they lie (with sendfile). A layer of Docker's classic store or Podman's storage is its tar-split
record's raw bytes between its files' bytes (`tarsplit.LayerReader`); a file not verified yet is one range
(`FilePieces`). Files shorter than the caller's threshold come read into memory with the bytes around
them: a sendfile call per small file costs more than copying it."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..common.hashing import CHUNK


@dataclass(frozen=True)
class FileRange:
    """`count` bytes of an open file from `offset`, to send as they lie. Whoever gets it closes it."""

    file: io.FileIO
    offset: int
    count: int
    # For messages: the file's path inside its layer, or on disk.
    name: str


Piece = bytearray | FileRange


class Pieces(Protocol):
    """A blob's bytes from one offset to another, in order, a batch at a time. Blocking: each call runs
    off the event loop. Closing frees what it holds open."""

    def next(self, limit: int, max_files: int = 8) -> list[Piece]:
        """The next pieces: about `limit` bytes in memory at most, and `max_files` file ranges; empty at
        the end. OSError when a file is gone or shorter than expected."""

    def close(self) -> None: ...

    @property
    def done(self) -> bool:
        """Whether every piece was handed out."""


def read_all(pieces: Pieces, chunk: int = CHUNK) -> Iterator[bytearray]:
    """Every byte of the pieces, files read too, in chunks of about `chunk` (blocking); closes them."""
    with contextlib.closing(pieces):
        while batch := pieces.next(chunk):
            for piece in batch:
                if isinstance(piece, bytearray):
                    yield piece
                    continue
                with piece.file:
                    for at in range(piece.offset, piece.offset + piece.count, chunk):
                        count = min(chunk, piece.offset + piece.count - at)
                        yield read_exactly(piece.file.fileno(), at, count, piece.name)


def identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells a file's bytes from others': where it is, its size, when it was written and changed (a
    write changes the last, which nothing can set back)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def short(name: str | bytes) -> OSError:
    """The error for a file that ends before the bytes it should hold."""
    shown = name.decode(errors="replace") if isinstance(name, bytes) else name
    return OSError(f"{shown} is shorter than expected: it changed or is damaged")


def read_into(fd: int, into: memoryview, start: int, name: str | bytes) -> None:
    """Fills `into` with the file's bytes from `start`; OSError when it is shorter."""
    done = 0
    while done < len(into):
        read = os.preadv(fd, [into[done:]], start + done)
        if not read:
            raise short(name)
        done += read


def read_exactly(fd: int, start: int, count: int, name: str | bytes) -> bytearray:
    """`count` bytes of the file from `start`; OSError when it is shorter."""
    data = bytearray(count)
    read_into(fd, memoryview(data), start, name)
    return data


class FilePieces:
    """A file's bytes from `start` to `stop` as one range (`inline_below` or longer) or read into memory."""

    def __init__(self, path: Path, start: int, stop: int, inline_below: int | None) -> None:
        self._path = path
        self._at = start
        self._stop = stop
        self._inline_below = inline_below
        self._fd: int | None = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def done(self) -> bool:
        return self._at >= self._stop

    def next(self, limit: int, max_files: int = 8) -> list[Piece]:
        if self._at >= self._stop:
            self.close()
            return []
        count = self._stop - self._at
        if self._fd is None and self._inline_below is not None and count >= self._inline_below:
            self._at = self._stop
            return [FileRange(io.FileIO(self._path, "rb"), self._stop - count, count, str(self._path))]
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        count = min(count, limit)
        piece = read_exactly(self._fd, self._at, count, str(self._path))
        self._at += count
        return [piece]
