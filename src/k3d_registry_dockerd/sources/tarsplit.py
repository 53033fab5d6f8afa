"""A layer as Docker's classic store and Podman's storage keep it: the tar-split record of the layer's
original tar, and the layer's files in its diff directory. Put together they are that tar byte for byte,
so its sha256 is the layer's diff ID and its length is known from the record alone.

The record (`tar-split.json.gz`, or `<id>.tar-split.gz`) is gzipped JSON lines: segments (type 2, raw
bytes: headers, padding, the end blocks, base64 in `payload`) and files (type 1: `name`, or `name_raw` in
base64 for names that are not UTF-8, and `size`; the file's bytes are not in the record).

A file is opened one path component at a time beneath the diff directory and never through a symlink:
the names are paths inside the layer, and a symlink in the layer must not lead this process to a file of
the host. A layer that needs one is not served here (`LayerUnservable`).
"""

from __future__ import annotations

import base64
import bisect
import errno
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = _OPEN_FILE | os.O_DIRECTORY


class LayerUnservable(Exception):
    """The layer cannot be put together from its record and files; the message says why."""


@dataclass(frozen=True)
class LayerTar:
    """A layer's tar as parts in order: raw bytes, or the (name, size) of a file in `diff_dir`."""

    diff_dir: Path
    parts: tuple[bytes | tuple[bytes, int], ...]
    # Where each part starts in the tar, and the tar's length.
    offsets: tuple[int, ...]
    size: int

    def check(self) -> None:
        """Raises LayerUnservable unless every file can be opened as `chunks` opens it (blocking): a layer
        whose files this process may not read, or that lie behind a symlink, is exported instead."""
        try:
            with _Beneath(self.diff_dir) as files:
                for part in self.parts:
                    if not isinstance(part, bytes):
                        os.close(files.open(part[0]))
        except OSError as exc:
            # A symlink opened as the last component is ELOOP; as a directory on the way, ENOTDIR.
            behind = exc.errno in (errno.ELOOP, errno.ENOTDIR)
            why = "a file lies behind a symlink" if behind else exc.strerror or str(exc)
            raise LayerUnservable(f"its files in {self.diff_dir} cannot be read here ({why})") from exc

    def chunks(self, start: int = 0) -> Iterator[bytes]:
        """The tar from byte `start` on, in chunks of about CHUNK bytes (blocking). A file that is gone or
        shorter than recorded raises OSError."""
        if start >= self.size:
            return
        first = bisect.bisect_right(self.offsets, start) - 1
        pending = bytearray()
        with _Beneath(self.diff_dir) as files:
            for index in range(first, len(self.parts)):
                part = self.parts[index]
                skip = start - self.offsets[index] if index == first else 0
                if isinstance(part, bytes):
                    pending += part[skip:] if skip else part
                else:
                    yield from _file_chunks(files, part, skip, pending)
                if len(pending) >= CHUNK:
                    yield bytes(pending)
                    pending.clear()
        if pending:
            yield bytes(pending)


def _file_chunks(files: _Beneath, entry: tuple[bytes, int], skip: int, pending: bytearray) -> Iterator[bytes]:
    """Adds a file's bytes (after `skip`) to `pending`, yielding whole chunks as they fill up."""
    name, size = entry
    fd = files.open(name)
    try:
        offset, remaining = skip, size - skip
        while remaining:
            # `pending` holds less than a chunk here: its caller hands on every full one.
            piece = os.pread(fd, min(CHUNK - len(pending), remaining), offset)
            if not piece:
                raise OSError(f"{name.decode(errors='replace')} is shorter than the layer's record says")
            pending += piece
            offset += len(piece)
            remaining -= len(piece)
            if len(pending) >= CHUNK:
                yield bytes(pending)
                pending.clear()
    finally:
        os.close(fd)


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


def parse(record: bytes, diff_dir: Path) -> LayerTar:
    """The layer's tar from its (gunzipped) tar-split record."""
    parts: list[bytes | tuple[bytes, int]] = []
    offsets: list[int] = []
    size = 0
    for line in record.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            kind = entry["type"]
            if kind == 2:
                data = base64.b64decode(entry.get("payload") or b"")
                if data:
                    offsets.append(size)
                    parts.append(data)
                    size += len(data)
            elif kind == 1:
                length = int(entry.get("size") or 0)
                if length:
                    raw = (
                        base64.b64decode(entry["name_raw"])
                        if entry.get("name_raw")
                        else entry["name"].encode()
                    )
                    offsets.append(size)
                    parts.append((_clean_name(raw), length))
                    size += length
            else:
                raise LayerUnservable(f"unknown entry type {kind!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LayerUnservable(f"the record is not tar-split JSON: {exc}") from exc
    if not parts:
        raise LayerUnservable("the record is empty")
    return LayerTar(diff_dir, tuple(parts), tuple(offsets), size)


def read(record_path: Path, diff_dir: Path) -> LayerTar:
    """The layer's tar from its tar-split file (blocking); LayerUnservable when it cannot be read."""
    try:
        compressed = record_path.read_bytes()
    except FileNotFoundError as exc:
        raise LayerUnservable(f"it has no tar-split record ({record_path})") from exc
    except OSError as exc:
        raise LayerUnservable(f"its tar-split record {record_path} cannot be read: {exc.strerror}") from exc
    try:
        record = gzip.decompress(compressed)
    except (OSError, EOFError) as exc:
        raise LayerUnservable(f"its tar-split record {record_path} is damaged: {exc}") from exc
    return parse(record, diff_dir)
