"""The content-addressed cache on disk: verified blobs and per-repository tag/manifest records.

Crash safety comes from one rule: a file reaches its final name only by ``rename`` after its bytes were
hashed and fsynced, so at any kill point a blob either does not exist or matches its digest, and a
record is either the old or the new version. Temp files of a crashed run are removed at the next start.

The bookkeeping the size limit and the status page need (each blob's size, the cache's total, how many
records reference each digest) is read from disk once at `open` and kept up to date as blobs and records
are written and removed, so no question about the whole cache costs a walk of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common import units
from ..oci.reference import Digest

log = logging.getLogger(__package__)

RECORD_VERSION = 1
FLUSH_EVERY = 16 << 20


class DigestMismatch(Exception):
    """Bytes did not hash to the digest they were delivered under."""


@dataclass
class ManifestEntry:
    media_type: str
    size: int
    # Every digest a client may fetch because of this manifest: config, layers, child manifests.
    references: list[str] = field(default_factory=list)
    # Pushed by a client (not exported from Docker): never evicted, only deleted by request.
    pushed: bool = False
    # The manifest's `subject` and artifact type, for the referrers API.
    subject: str | None = None
    artifact_type: str | None = None


@dataclass
class TagEntry:
    digest: str
    media_type: str
    image_id: str
    exported_at: float
    # When this registry last had Docker pull the tag; None if Docker already had it.
    pulled_at: float | None = None
    # When a client last asked for the tag (to the minute), for `cache ls` and `cache prune`.
    last_used: float | None = None
    # Pushed by a client; `image_id` is then what Docker had under the tag after the push.
    pushed: bool = False
    # Exported in the background after the tag moved in Docker (see prefetch.py), not asked for since.
    prefetched: bool = False


@dataclass
class RepositoryRecord:
    """What this registry serves under one repository name."""

    name: str
    tags: dict[str, TagEntry] = field(default_factory=dict)
    manifests: dict[str, ManifestEntry] = field(default_factory=dict)
    # Blobs pushed (uploaded or mounted) into this repository, whether or not a manifest uses them yet.
    blobs: list[str] = field(default_factory=list)
    # Docker tags this registry made by loading a push: tag -> the image ID it loaded. Only these may be
    # moved by a later push's load, and untagged when their push is deleted.
    loaded: dict[str, str] = field(default_factory=dict)

    def digests(self) -> set[str]:
        """Every digest the record keeps in the cache: its manifests, what they reference, pushed blobs."""
        found = set(self.manifests) | set(self.blobs)
        for entry in self.manifests.values():
            found.update(entry.references)
        return found

    def empty(self) -> bool:
        return not (self.tags or self.manifests or self.blobs or self.loaded)

    def serves_blob(self, digest: str) -> bool:
        return (
            digest in self.manifests
            or digest in self.blobs
            or any(digest in m.references for m in self.manifests.values())
        )

    def to_json(self) -> bytes:
        data = {"version": RECORD_VERSION, **asdict(self)}
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RepositoryRecord:
        data: dict[str, Any] = json.loads(raw)
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {data.get('version')!r}")
        loaded = dict(data.get("loaded", {}))
        tags = {}
        for tag, entry in data["tags"].items():
            # Records written before `loaded` moved to the record kept it per tag entry.
            if entry.pop("loaded", False):
                loaded.setdefault(tag, entry["image_id"])
            tags[tag] = TagEntry(**entry)
        return cls(
            name=data["name"],
            tags=tags,
            manifests={digest: ManifestEntry(**entry) for digest, entry in data["manifests"].items()},
            blobs=list(data.get("blobs", [])),
            loaded=loaded,
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """Streams one blob into a temp file, hashing as it goes; `commit` verifies and publishes it.

    With a `flusher`, written data is fdatasync'ed there every FLUSH_EVERY bytes while writing goes on,
    so the disk works during the download and the fsync at commit has little left to do.
    """

    def __init__(self, store: Store, flusher: Executor | None = None) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self._flusher = flusher
        self._flushes: list[Future[None]] = []
        self._flushed = 0
        self.size = 0

    def write(self, chunk: bytes | memoryview) -> None:
        # Written first: after a failed write the hash must not include bytes the file lacks.
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)
        if self._flusher is not None and self.size - self._flushed >= FLUSH_EVERY:
            self._file.flush()
            self._flushed = self.size
            self._flushes.append(self._flusher.submit(os.fdatasync, self._file.fileno()))

    def _settle_flushes(self) -> None:
        """Waits for background flushes: the file must not be closed (its fd reused) under them."""
        for flush in self._flushes:
            with contextlib.suppress(OSError):
                flush.result()
        self._flushes.clear()

    def commit(self, expected: str | None = None) -> str:
        """Publishes the blob under its sha256 digest; refuses it when `expected` differs."""
        digest = f"sha256:{self._hash.hexdigest()}"
        try:
            if expected is not None and digest != expected:
                raise DigestMismatch(f"content hashes to {digest}, expected {expected}")
            final = self._store.blob_path(Digest(digest[7:]))
            if final.exists():
                self._store.added(digest, self.size)
                return digest
            self._file.flush()
            self._settle_flushes()
            os.fsync(self._file.fileno())
            self._file.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, final)
            _fsync_dir(final.parent)
            self._store.added(digest, self.size)
            return digest
        finally:
            self.abort()

    def abort(self) -> None:
        self._settle_flushes()
        try:
            # On a full disk, close() fails flushing the buffer again; the file goes all the same.
            with contextlib.suppress(OSError):
                self._file.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()


class Store:
    """Blobs under ``blobs/sha256/<xx>/<hex>``, records under ``repositories/<sha256(name)>.json``.

    Record file names are hashes, so no request path ever becomes a file name.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.records_dir = root / "repositories"
        self.tmp_dir = root / "tmp"
        # Blob paths as strings: built for every request, where a pathlib join costs more than the stat.
        self._blobs = str(self.blobs_dir)
        self._records: dict[str, RepositoryRecord] = {}
        # Sizes of the blobs on disk and their total; blobs are committed from worker threads.
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._sizes_lock = threading.Lock()
        # How many records reference each digest, and what each record referenced when it was saved
        # (callers may have changed a record object in place since).
        self._references: Counter[str] = Counter()
        self._digests: dict[str, frozenset[str]] = {}
        # Counts record changes, so a view of the records can tell whether it is still current.
        self.generation = 0

    def open(self) -> None:
        """Creates the layout, drops temp files a crash left behind, and loads the records and the sizes of
        the blobs (the one walk of the cache)."""
        for directory in (self.blobs_dir, self.records_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        leftovers = list(self.tmp_dir.iterdir())
        for leftover in leftovers:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        if leftovers:
            log.info("removed %d temp files left by an earlier run", len(leftovers))
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                record = RepositoryRecord.from_json(path.read_bytes())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("ignoring unreadable record %s: %s", path, exc)
                continue
            self._records[record.name] = record
            self._digests[record.name] = frozenset(record.digests())
            self._references.update(self._digests[record.name])
        self._load_sizes()
        log.info(
            "cache %s: %d repositories, %d blobs, %s",
            self.root,
            len(self._records),
            len(self._sizes),
            units.size(self._bytes),
        )

    def _load_sizes(self) -> None:
        sizes = {}
        for prefix in os.scandir(self.blobs_dir):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        sizes[f"sha256:{entry.name}"] = entry.stat(follow_symlinks=False).st_size
        with self._sizes_lock:
            self._sizes = sizes
            self._bytes = sum(sizes.values())

    def added(self, digest: str, size: int) -> None:
        """A blob reached its final name (committed, or found there already)."""
        with self._sizes_lock:
            if digest not in self._sizes:
                self._sizes[digest] = size
                self._bytes += size

    @property
    def total_bytes(self) -> int:
        """Bytes of the blobs in the cache."""
        return self._bytes

    @property
    def blob_count(self) -> int:
        return len(self._sizes)

    def known_size(self, digest: str) -> int | None:
        """A blob's size as kept since `open` (no file system call), None when it is not in the cache."""
        return self._sizes.get(digest)

    def references(self, digest: str) -> int:
        """How many records reference the digest."""
        return self._references.get(digest, 0)

    def remove_blob(self, digest: str) -> int:
        """Deletes a blob from the cache (blocking); the bytes freed."""
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(Digest.parse(digest)).unlink()
        with self._sizes_lock:
            size = self._sizes.pop(digest, 0)
            self._bytes -= size
        return size

    def _file(self, digest: str) -> str:
        hex_digest = Digest.parse(digest).hex
        return f"{self._blobs}/{hex_digest[:2]}/{hex_digest}"

    def blob_path(self, digest: Digest) -> Path:
        return Path(f"{self._blobs}/{digest.hex[:2]}/{digest.hex}")

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self._file(digest))

    def blob_size(self, digest: str) -> int | None:
        try:
            return os.stat(self._file(digest)).st_size
        except FileNotFoundError:
            return None

    def read_blob(self, digest: str) -> bytes | None:
        try:
            with open(self._file(digest), "rb") as blob:
                return blob.read()
        except FileNotFoundError:
            return None

    def writer(self, flusher: Executor | None = None) -> BlobWriter:
        return BlobWriter(self, flusher)

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        writer = self.writer()
        writer.write(data)
        return writer.commit(expected)

    def put_file(self, path: Path, expected: str) -> str:
        """Copies a file into the store under its digest, refusing it unless it hashes to `expected`."""
        with open(path, "rb") as source:
            return self.put_chunks(iter(lambda: source.read(FLUSH_EVERY), b""), expected)

    def put_chunks(self, chunks: Iterable[bytes], expected: str) -> str:
        """Stores the bytes under their digest, refusing them unless they hash to `expected` (blocking)."""
        writer = self.writer()
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit(expected)

    def check_writable(self) -> None:
        """Raises OSError unless a file can be created (and removed) where blobs are written first."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="ready-")
        os.close(fd)
        os.unlink(name)

    def records(self) -> list[RepositoryRecord]:
        return list(self._records.values())

    def record(self, name: str) -> RepositoryRecord | None:
        return self._records.get(name)

    def save_record(self, record: RepositoryRecord, *, durable: bool = True) -> set[str]:
        """Replaces the record on disk atomically (blocking: call it off the event loop); an empty one is
        removed. Without `durable`, the rename may be lost in a crash until `sync_records` (one fsync of
        the directory for a batch of records). Returns the digests the record no longer references that
        no other record does either (their blobs are for the caller to remove, once nothing else relies on
        them)."""
        path = self.records_dir / f"{hashlib.sha256(record.name.encode()).hexdigest()}.json"
        if record.empty():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if durable:
                self.sync_records()
        else:
            self._replace(path, record.to_json(), durable=durable)
        # Requests read these maps from the event loop while this runs in a thread: a saved record is
        # replaced in one assignment, never removed and put back.
        after = frozenset(record.digests())
        if record.empty():
            self._records.pop(record.name, None)
            before = self._digests.pop(record.name, frozenset())
        else:
            self._records[record.name] = record
            before = self._digests.get(record.name, frozenset())
            self._digests[record.name] = after
        self._references.update(after - before)
        unused = set()
        for digest in before - after:
            self._references[digest] -= 1
            if self._references[digest] <= 0:
                del self._references[digest]
                unused.add(digest)
        self.generation += 1
        return unused

    def sync_records(self) -> None:
        """Makes the records saved without `durable` survive a crash."""
        _fsync_dir(self.records_dir)

    def read_state(self, name: str) -> bytes | None:
        """A state file of the cache's top directory (`save_state`), None when there is none."""
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def save_state(self, name: str, payload: bytes) -> None:
        """Replaces a state file of the cache's top directory atomically (blocking)."""
        self._replace(self.root / name, payload)

    def _replace(self, path: Path, payload: bytes, *, durable: bool = True) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="record-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
