"""A layer as Docker's classic store and Podman's storage keep it: the tar-split record of the layer's
original tar, and the layer's files in its diff directory. Put together they are that tar byte for byte,
so its sha256 is the layer's diff ID and its length is known from the record alone.

The record (`tar-split.json.gz`, or `<id>.tar-split.gz`) is gzipped JSON lines: segments (type 2, raw
bytes: headers, padding, the end blocks, base64 in `payload`) and files (type 1: `name`, or `name_raw` in
base64 for names that are not UTF-8, and `size`; the file's bytes are not in the record).

The record is held compactly, as blocks of entries compressed with zlib (a tar header is mostly zeros): a
layer of 30,000 files keeps about a megabyte instead of one object per entry. A block is decoded each time
the tar is read through it, which costs less than opening the files it names.

A file is opened one path component at a time beneath the diff directory and never through a symlink:
the names are paths inside the layer, and a symlink in the layer must not lead this process to a file of
the host. A layer that needs one is not served here (`LayerUnservable`).
"""

from __future__ import annotations

import base64
import bisect
import errno
import gzip
import hashlib
import io
import json
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..common.hashing import CHUNK, hash_file
from .pieces import FileRange, Piece, identity, read_into, short

# Encoded entries per compressed block, before compression: decoding one is the most a read holds.
BLOCK = 64 << 10
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = _OPEN_FILE | os.O_DIRECTORY
# An encoded entry: raw bytes (the segments before a file: a tar header, the previous file's padding), then
# a file's bytes (none at the end): the raw bytes' length, the file's size and name's length, the raw bytes,
# the name. One entry per file: a layer of 30,000 files is walked in 30,000 steps.
_ENTRY = struct.Struct("<IQI")
_NEVER = 1 << 62


class LayerUnservable(Exception):
    """The layer cannot be put together from its record and files; the message says why."""


@dataclass(frozen=True)
class Fingerprint:
    """What the layer's bytes on disk were when looked at: the identity (device, inode, size, times) of
    its record and of every file, hashed. A file cannot change without its change time changing, so an
    equal fingerprint means the same bytes, unless a file changed within the filesystem's timestamp
    granularity of being looked at: `newest_change` (the latest change time, ns) says how recent that is."""

    digest: str
    newest_change: int


@dataclass(frozen=True)
class LayerTar:
    diff_dir: Path
    size: int
    # The record's identity, part of the fingerprint.
    record_identity: tuple[int, ...]
    # zlib-compressed runs of encoded entries, and the tar offset each run starts at.
    blocks: tuple[bytes, ...]
    starts: array[int]

    def _entries(self, start: int) -> Iterator[tuple[int, int, bytes, bool]]:
        """(tar offset, end, bytes, is a file) of the parts from the one holding `start`: raw bytes, or a
        file's name."""
        first = max(bisect.bisect_right(self.starts, start) - 1, 0)
        for index in range(first, len(self.blocks)):
            raw = zlib.decompress(self.blocks[index])
            offset, at = self.starts[index], 0
            while at < len(raw):
                length, size, named = _ENTRY.unpack_from(raw, at)
                at += _ENTRY.size + length + named
                if length and offset + length > start:
                    yield offset, offset + length, raw[at - named - length : at - named], False
                offset += length
                if size and offset + size > start:
                    yield offset, offset + size, raw[at - named : at], True
                offset += size

    def check(self) -> Fingerprint:
        """Opens every file as `reader` opens them (blocking) and says what they are: LayerUnservable when
        one cannot be read by this process or lies behind a symlink, so the layer is exported instead."""
        identities = array("q", self.record_identity)
        try:
            with _Beneath(self.diff_dir) as files:
                for _offset, _end, name, is_file in self._entries(0):
                    if not is_file:
                        continue
                    fd = files.open(name)
                    try:
                        identities.extend(identity(os.fstat(fd)))
                    finally:
                        os.close(fd)
        except OSError as exc:
            # A symlink opened as the last component is ELOOP; as a directory on the way, ENOTDIR.
            behind = exc.errno in (errno.ELOOP, errno.ENOTDIR)
            why = "a file lies behind a symlink" if behind else exc.strerror or str(exc)
            raise LayerUnservable(f"its files in {self.diff_dir} cannot be read here ({why})") from exc
        digest = hashlib.sha256(identities.tobytes()).hexdigest()
        # Each identity ends with its change time.
        return Fingerprint(f"sha256:{digest}", max(identities[4::5]))

    def reader(self, start: int = 0, stop: int | None = None, inline_below: int | None = None) -> LayerReader:
        """The tar's bytes from `start` to `stop` as pieces (blocking). Files of `inline_below` bytes or
        more come as ranges of open files, to send as they lie; everything else as bytes, files read."""
        return LayerReader(self, start, self.size if stop is None else min(stop, self.size), inline_below)

    def digest(self) -> str:
        """The tar's digest, reading each file into one buffer (blocking); OSError as `chunks`."""
        hasher = hashlib.sha256()
        buffer = memoryview(bytearray(CHUNK))
        with _Beneath(self.diff_dir) as files:
            for offset, end, data, is_file in self._entries(0):
                if not is_file:
                    hasher.update(data)
                    continue
                fd = files.open(data)
                try:
                    if hash_file(hasher, fd, end - offset, buffer) < end - offset:
                        raise short(data)
                finally:
                    os.close(fd)
        return f"sha256:{hasher.hexdigest()}"


class LayerReader:
    """Hands out a layer's tar in order, a batch at a time (see `LayerTar.reader`), holding the directories
    and the file it opened until closed. Blocking: run each call off the event loop."""

    def __init__(self, tar: LayerTar, start: int, stop: int, inline_below: int | None) -> None:
        self._tar = tar
        self._stop = stop
        self._at = start
        # Files this long or longer are handed out as ranges of open files.
        self._ranges_from = _NEVER if inline_below is None else inline_below
        # The block being walked (decoded), where its next entry lies in it and in the tar.
        self._block = max(bisect.bisect_right(tar.starts, start) - 1, 0)
        self._raw = b""
        self._pos = 0
        self._next = tar.starts[self._block] if tar.starts else 0
        # The entry being handed out: where its raw bytes start, its file starts and ends; those bytes and
        # the file's name.
        self._entry = (0, 0, 0, b"", b"")
        self._files: _Beneath | None = None
        # The file being read into memory across batches.
        self._fd: int | None = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._files is not None:
            self._files.close()
            self._files = None

    @property
    def done(self) -> bool:
        return self._at >= self._stop

    def next(self, limit: int, max_files: int = 8) -> list[Piece]:
        """The next pieces: about `limit` bytes held in memory at most, and `max_files` open files; empty
        at the end. A file that is gone or shorter than recorded raises OSError."""
        pieces: list[Piece] = []
        # Filled up to `filled`, files read straight into it; it may grow past `limit` by one entry's raw
        # bytes.
        pending = bytearray(limit)
        view = memoryview(pending)
        filled = files = 0
        # The walk's state in locals (attribute lookups per entry cost as much as its file's read), written
        # back at the end.
        stop, at = self._stop, self._at
        raw, pos, block, following = self._raw, self._pos, self._block, self._next
        start, file_start, end, data, name = self._entry
        blocks, starts, entry = self._tar.blocks, self._tar.starts, _ENTRY.unpack_from
        try:
            while at < stop and filled < limit and files < max_files:
                while at >= end:
                    if pos >= len(raw):
                        raw, pos, following = zlib.decompress(blocks[block]), 0, starts[block]
                        block += 1
                    length, size, named = entry(raw, pos)
                    pos += _ENTRY.size + length + named
                    data, name = raw[pos - named - length : pos - named], raw[pos - named : pos]
                    start, file_start = following, following + length
                    end = following = file_start + size
                if at < file_start:
                    upto = file_start if file_start < stop else stop
                    piece = data if at == start and upto == file_start else data[at - start : upto - start]
                    if filled + len(piece) > len(pending):
                        view.release()
                        pending[filled:] = piece
                        view = memoryview(pending)
                    else:
                        view[filled : filled + len(piece)] = piece
                    filled += len(piece)
                    at = upto
                    if at >= end or at >= stop or filled >= limit:
                        continue
                upto = end if end < stop else stop
                if self._fd is None and upto - at >= self._ranges_from:
                    if filled:
                        view.release()
                        del pending[filled:]
                        pieces.append(pending)
                        pending, filled = bytearray(limit), 0
                        view = memoryview(pending)
                    opened = io.FileIO(self._open(name), "rb")
                    pieces.append(
                        FileRange(opened, at - file_start, upto - at, name.decode(errors="replace"))
                    )
                    files += 1
                else:
                    whole = upto
                    upto = min(upto, at + limit - filled)
                    fd = self._fd if self._fd is not None else self._open(name)
                    self._fd = None
                    try:
                        got = os.pread(fd, upto - at, at - file_start)
                        view[filled : filled + len(got)] = got
                        if len(got) < upto - at:
                            with view[filled + len(got) : filled + upto - at] as rest:
                                read_into(fd, rest, at - file_start + len(got), name)
                    finally:
                        if upto == whole:
                            os.close(fd)
                        else:
                            self._fd = fd
                    filled += upto - at
                at = upto
        except BaseException:
            for piece in pieces:
                if isinstance(piece, FileRange):
                    piece.file.close()
            raise
        finally:
            self._at = at
            self._raw, self._pos, self._block, self._next = raw, pos, block, following
            self._entry = start, file_start, end, data, name
        view.release()
        if filled:
            del pending[filled:]
            pieces.append(pending)
        if at >= stop:
            self.close()
        return pieces

    def _open(self, name: bytes) -> int:
        if self._files is None:
            self._files = _Beneath(self._tar.diff_dir).__enter__()
        return self._files.open(name)


class _Beneath:
    """Opens files by their path inside a directory, one component at a time, following no symlink; the
    directories opened are kept for the files after them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[bytes, int] = {}

    def __enter__(self) -> _Beneath:
        self._dirs[b""] = os.open(self.root, _OPEN_DIR)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _dir(self, path: bytes) -> int:
        found = self._dirs.get(path)
        if found is None:
            parent, _, name = path.rpartition(b"/")
            found = self._dirs[path] = os.open(name, _OPEN_DIR, dir_fd=self._dir(parent))
        return found

    def open(self, name: bytes) -> int:
        """A file descriptor of the file `name` (checked by `parse` to stay inside) for reading."""
        parent, _, base = name.rpartition(b"/")
        return os.open(base, _OPEN_FILE, dir_fd=self._dir(parent))


def _clean_name(raw: bytes) -> bytes:
    """The entry's path inside the layer, refused when it could lead outside (absolute, `..`)."""
    parts = [part for part in raw.split(b"/") if part not in (b"", b".")]
    if not parts or b".." in parts or raw.startswith(b"/"):
        raise LayerUnservable(f"the record names {raw!r}, not a path inside the layer")
    return b"/".join(parts)


class _Blocks:
    """Encodes entries into compressed blocks as the record is read."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self.starts = array("q")
        self.size = 0
        self._pending = bytearray()
        self._pending_start = 0
        # Raw bytes not in an entry yet: they go before the next file.
        self._raw = bytearray()

    def raw(self, data: bytes) -> None:
        self._raw += data
        if len(self._raw) >= BLOCK:
            self.file(b"", 0)

    def file(self, name: bytes, size: int) -> None:
        if not self._pending:
            self._pending_start = self.size
        self._pending += _ENTRY.pack(len(self._raw), size, len(name))
        self._pending += self._raw
        self._pending += name
        self.size += len(self._raw) + size
        self._raw.clear()
        if len(self._pending) >= BLOCK:
            self.flush()

    def finish(self) -> None:
        if self._raw:
            self.file(b"", 0)
        self.flush()

    def flush(self) -> None:
        if self._pending:
            self.blocks.append(zlib.compress(self._pending, 1))
            self.starts.append(self._pending_start)
            self._pending.clear()


def parse(record: BinaryIO, diff_dir: Path, record_identity: tuple[int, ...] = ()) -> LayerTar:
    """The layer's tar from its (gunzipped) tar-split record."""
    blocks = _Blocks()
    for entries in _batches(record):
        try:
            for entry in json.loads(b"[" + b",".join(entries) + b"]"):
                _add(blocks, entry)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LayerUnservable(f"the record is not tar-split JSON: {exc}") from exc
    blocks.finish()
    if not blocks.blocks:
        raise LayerUnservable("the record is empty")
    return LayerTar(diff_dir, blocks.size, record_identity or (0,) * 5, tuple(blocks.blocks), blocks.starts)


def _batches(record: BinaryIO, size: int = 1 << 20) -> Iterator[list[bytes]]:
    """The record's non-empty lines, read `size` bytes at a time: one JSON parse of many entries costs a
    third of as many parses of one, and a line at a time costs more than the parse."""
    rest = b""
    while chunk := record.read(size):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if found := [line for line in lines if line.strip()]:
            yield found
    if rest.strip():
        yield [rest]


def _add(blocks: _Blocks, entry: dict[str, Any]) -> None:
    kind = entry["type"]
    if kind == 2:
        data = base64.b64decode(entry.get("payload") or b"")
        if data:
            blocks.raw(data)
    elif kind == 1:
        length = int(entry.get("size") or 0)
        if length:
            raw = base64.b64decode(entry["name_raw"]) if entry.get("name_raw") else entry["name"].encode()
            name = _clean_name(raw)
            blocks.file(name, length)
    else:
        raise LayerUnservable(f"unknown entry type {kind!r}")


def read(record_path: Path, diff_dir: Path) -> LayerTar:
    """The layer's tar from its tar-split file (blocking); LayerUnservable when it cannot be read."""
    try:
        with open(record_path, "rb") as handle:
            found = identity(os.fstat(handle.fileno()))
            with gzip.GzipFile(fileobj=handle) as record:
                return parse(record, diff_dir, found)
    except FileNotFoundError as exc:
        raise LayerUnservable(f"it has no tar-split record ({record_path})") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise LayerUnservable(f"its tar-split record {record_path} is damaged: {exc}") from exc
    except OSError as exc:
        raise LayerUnservable(f"its tar-split record {record_path} cannot be read: {exc.strerror}") from exc


class ParsedRecords:
    """Layers' records as parsed, kept while their file is unchanged, up to `budget` bytes of them: an image
    read again (a client's first pull after verification ahead read it, images sharing layers) costs a stat
    per layer, not a parse (half a second for a layer of 30,000 files). Blocking, used from threads."""

    def __init__(self, budget: int = 64 << 20) -> None:
        self._budget = budget
        self._kept: OrderedDict[Path, LayerTar] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def read(self, record: Path, diff_dir: Path) -> LayerTar:
        """As `read`, the parse kept."""
        try:
            now = identity(record.stat())
        except OSError:
            now = None
        with self._lock:
            kept = self._kept.get(record)
            if kept is not None and (kept.record_identity, kept.diff_dir) == (now, diff_dir):
                self._kept.move_to_end(record)
                return kept
        tar = read(record, diff_dir)
        size = sum(map(len, tar.blocks))
        with self._lock:
            old = self._kept.pop(record, None)
            self._bytes -= sum(map(len, old.blocks)) if old is not None else 0
            if size <= self._budget:
                self._kept[record] = tar
                self._bytes += size
            while self._bytes > self._budget:
                _path, dropped = self._kept.popitem(last=False)
                self._bytes -= sum(map(len, dropped.blocks))
        return tar
