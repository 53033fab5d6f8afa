"""Reads a `docker save` stream into the store and names the images it holds.

Three shapes arrive here: an OCI image layout written by Docker >= 25 (classic store: manifests Docker
generates; containerd image store: the original indexes and manifests), and the legacy format of older
Docker and Podman (``manifest.json`` + config + layer tars), for which an OCI manifest is built.

`read_save_stream` is blocking and runs in a worker thread; `ThreadedStream` feeds it from the event loop.

Docker >= 25 puts more into a layout's blobs than its manifests use (the legacy per-layer metadata of the
older format, for one). The tar lists index.json after the blobs, so small blobs are held in memory until
it is read, and only those the index reaches are stored: nothing is written just to be deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import posixpath
import queue
import re
import tarfile
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import IO, Any

from ..cache.store import DigestMismatch, Store
from ..oci.mediatypes import OCI_MANIFEST
from .generated import legacy_manifest
from .plans import Root

MAX_METADATA_SIZE = 16 << 20
CHUNK = 1 << 20
# Blobs up to this size wait in memory for index.json (up to HELD_TOTAL bytes of them per export).
HELD_MAX = 64 << 10
HELD_TOTAL = 16 << 20
_METADATA_FILES = frozenset({"index.json", "manifest.json", "oci-layout", "repositories"})
_LAYOUT_BLOB_RE = re.compile(r"blobs/sha256/([a-f0-9]{64})")
_LEGACY_CONFIG_RE = re.compile(r"([a-f0-9]{64})\.json")
# Annotations Docker and containerd put on index.json entries to name the image they stand for.
_IMAGE_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")


class ExportError(Exception):
    """The save stream is malformed, truncated or carries bytes that do not match their digests."""


@dataclass
class SaveContents:
    layout: str
    roots: list[Root]
    blobs_written: int = 0
    bytes_written: int = 0


class ThreadedStream(io.RawIOBase):
    """A blocking file object over an asyncio stream, for `tarfile` running in a worker thread.

    A pump task on the event loop reads ahead up to `read_ahead` chunks into a thread-safe queue, so Docker
    keeps writing while the worker hashes and writes to disk, and the worker's reads cost no loop round
    trip. `close()` (on the loop) stops the pump if the worker gave up early. The pump awaits `gate` before
    each read: a paused export stops reading, and Docker, its socket full, stops working on it.
    """

    def __init__(
        self,
        stream: Any,
        loop: asyncio.AbstractEventLoop,
        read_ahead: int = 16,
        gate: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._gate = gate
        self._loop = loop
        self._chunks: queue.SimpleQueue[bytes | BaseException] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(read_ahead)
        self._pending = memoryview(b"")
        self._eof = False
        # Bytes handed to the reader so far: an export's progress, for the status page.
        self.bytes_read = 0
        self._pump = loop.create_task(self._fill())

    async def _fill(self) -> None:
        try:
            while True:
                await self._room.acquire()
                if self._gate is not None:
                    await self._gate()
                # read(n) hands over everything buffered (up to n) without waiting for n bytes.
                chunk = await self._stream.read(CHUNK)
                self._chunks.put(chunk)
                if not chunk:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._chunks.put(exc)

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        """Waits for the pump's next chunk; False at the end of the stream."""
        while not self._pending:
            if self._eof:
                return False
            item = self._chunks.get()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing left to pump
                self._loop.call_soon_threadsafe(self._room.release)
            if isinstance(item, BaseException):
                raise item
            self._eof = not item
            self._pending = memoryview(item)
        return True

    def read(self, size: int = -1) -> bytes:
        """Hands over a whole pumped chunk when it fits, saving a copy per MiB (tarfile reads this way)."""
        if not self._next_chunk():
            return b""
        if size < 0 or size >= len(self._pending):
            data, self._pending = self._pending, memoryview(b"")
            self.bytes_read += len(data)
            return data.obj if data.nbytes == len(data.obj) else data.tobytes()  # type: ignore[arg-type]
        data, self._pending = self._pending[:size], self._pending[size:]
        self.bytes_read += size
        return data.tobytes()

    def readinto(self, buffer: Any) -> int:
        if not self._next_chunk():
            return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        self.bytes_read += size
        return size

    def close(self) -> None:
        self._pump.cancel()
        # Wakes a worker still waiting for data, so its thread ends instead of blocking forever.
        self._chunks.put(ExportError("the save stream was closed"))
        super().close()


def _copy_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    store: Store,
    expected: str | None,
    committer: Executor,
    flusher: Executor,
) -> Future[str]:
    """Writes a member to a temp file, hashing on the way; fsync and rename happen on `committer`."""
    # In stream mode the member's bytes come next in tar.fileobj; reading them there directly skips the
    # two extra copies extractfile() makes, and tarfile skips the padding when it reads the next header.
    source = tar.fileobj
    writer = store.writer(flusher)
    try:
        remaining = member.size
        while remaining and (chunk := source.read(min(CHUNK, remaining))):
            writer.write(chunk)
            remaining -= len(chunk)
    except BaseException:
        writer.abort()
        raise
    if writer.size != member.size:
        writer.abort()
        raise ExportError(f"{member.name}: got {writer.size} of {member.size} bytes")
    return committer.submit(writer.commit, expected)


def read_save_stream(fileobj: IO[bytes], store: Store, claimed: set[str] | None = None) -> SaveContents:
    """Stores every blob of a save stream (verified) and returns the images it names.

    Digests the export relies on go into `claimed` before they are relied on, so a cache eviction running
    meanwhile keeps them (it cannot know yet that this export's record will reference them).

    Nothing is buffered beyond a few chunks except the small metadata files. fsyncs run on a second
    thread while the stream is read on, so the disk and Docker work at the same time.
    """
    claim = claimed.add if claimed is not None else (lambda _digest: None)
    metadata: dict[str, bytes] = {}
    pending: dict[str, tuple[Future[str], int]] = {}
    links: dict[str, str] = {}
    # Small layout blobs by digest (tar path, bytes), stored once index.json says they are used.
    held: dict[str, tuple[str, bytes]] = {}
    held_bytes = written = written_bytes = 0
    mismatches: list[str] = []
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-flush") as flusher,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="blob-commit") as committer,
    ):
        try:
            with tarfile.open(fileobj=fileobj, mode="r|", bufsize=CHUNK) as tar:
                for member in tar:
                    path = posixpath.normpath(member.name.lstrip("/"))
                    if member.issym() or member.islnk():
                        base = posixpath.dirname(path) if member.issym() else ""
                        links[path] = posixpath.normpath(posixpath.join(base, member.linkname))
                        continue
                    if not member.isfile():
                        continue
                    if path in _METADATA_FILES:
                        if member.size > MAX_METADATA_SIZE:
                            raise ExportError(f"{path} is {member.size} bytes, too large")
                        source = tar.extractfile(member)
                        metadata[path] = source.read() if source else b""
                        continue
                    blob = _LAYOUT_BLOB_RE.fullmatch(path)
                    legacy_config = _LEGACY_CONFIG_RE.fullmatch(path)
                    if blob:
                        expected: str | None = f"sha256:{blob.group(1)}"
                        claim(expected)
                        if store.has_blob(expected):
                            pending[path] = (_done(expected), member.size)
                            continue
                        if member.size <= HELD_MAX and held_bytes + member.size <= HELD_TOTAL:
                            data = _read_member(tar, member)
                            got = f"sha256:{hashlib.sha256(data).hexdigest()}"
                            if got != expected:
                                mismatches.append(f"{path}: content hashes to {got}, expected {expected}")
                                continue
                            held[expected] = (path, data)
                            held_bytes += member.size
                            continue
                    elif legacy_config:
                        expected = f"sha256:{legacy_config.group(1)}"
                        claim(expected)
                    elif path.endswith(".tar"):
                        expected = None
                    else:
                        continue
                    pending[path] = (
                        _copy_member(tar, member, store, expected, committer, flusher),
                        member.size,
                    )
                    written += 1
                    written_bytes += member.size
            # A manifest too large to be held is read from the store: its commit must be done.
            wait([future for future, _ in pending.values()])
            used = _reachable(metadata.get("index.json"), held, store)
            for digest, (path, data) in held.items():
                if used is None or digest in used:
                    pending[path] = (committer.submit(store.put_bytes, data, digest), len(data))
                    written += 1
                    written_bytes += len(data)
        except tarfile.TarError as exc:
            raise ExportError(f"malformed or truncated save stream: {exc}") from exc
        finally:
            # Every commit is waited for and claimed, also when the stream broke, so whatever the export
            # stored can be removed again if it is not used.
            files, failed, failure = _settle(pending, claim)
            mismatches += failed
        if failure is not None:
            raise failure
        if mismatches:
            raise ExportError("; ".join(mismatches))

    if "index.json" in metadata:
        roots = _layout_roots(metadata["index.json"])
        layout = "oci"
    elif "manifest.json" in metadata:
        roots = _legacy_roots(metadata["manifest.json"], files, links, store)
        for root in roots:
            claim(root.digest)
        layout = "legacy"
    else:
        raise ExportError("save stream has neither index.json nor manifest.json")
    return SaveContents(layout=layout, roots=roots, blobs_written=written, bytes_written=written_bytes)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    data = source.read() if source else b""
    if len(data) != member.size:
        raise ExportError(f"{member.name}: got {len(data)} of {member.size} bytes")
    return data


def _reachable(index: bytes | None, held: dict[str, tuple[str, bytes]], store: Store) -> set[str] | None:
    """The digests index.json reaches: its manifests and indexes (read from `held` or the store), their
    children, configs and layers. None when there is no index to go by (keep everything)."""
    if index is None:
        return None
    reached: set[str] = set()
    try:
        pending = [entry["digest"] for entry in _load_json(index, "index.json").get("manifests", [])]
        while pending:
            digest = pending.pop()
            if digest in reached:
                continue
            reached.add(digest)
            raw = held[digest][1] if digest in held else store.read_blob(digest)
            try:
                manifest = json.loads(raw or b"null")
            except ValueError:
                continue  # kept as it is: planning the image says what is wrong with it
            if not isinstance(manifest, dict):
                continue
            pending += [child["digest"] for child in manifest.get("manifests", [])]
            blobs = [manifest.get("config"), *manifest.get("layers", [])]
            reached.update(blob["digest"] for blob in blobs if blob)
    except (ExportError, AttributeError, KeyError, TypeError):
        return None
    return reached


def _settle(
    pending: dict[str, tuple[Future[str], int]], claim: Callable[[str], None]
) -> tuple[dict[str, tuple[str, int]], list[str], OSError | None]:
    """Waits for every commit: the stored files by tar path (claimed), the digest mismatches, and the
    first write failure."""
    files: dict[str, tuple[str, int]] = {}
    mismatches = []
    failure = None
    for path, (future, size) in pending.items():
        try:
            files[path] = (future.result(), size)
        except DigestMismatch as exc:
            mismatches.append(f"{path}: {exc}")
            continue
        except OSError as exc:
            failure = failure or exc
            continue
        claim(files[path][0])
    return files, mismatches, failure


def _done(value: str) -> Future[str]:
    future: Future[str] = Future()
    future.set_result(value)
    return future


def _load_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ExportError(f"{what} is not valid JSON: {exc}") from exc


def _layout_roots(raw: bytes) -> list[Root]:
    index = _load_json(raw, "index.json")
    roots = []
    for entry in index.get("manifests", []):
        annotations = entry.get("annotations") or {}
        names = tuple(annotations[key] for key in _IMAGE_NAME_ANNOTATIONS if key in annotations)
        roots.append(Root(entry["digest"], entry.get("mediaType", OCI_MANIFEST), int(entry["size"]), names))
    if not roots:
        raise ExportError("index.json lists no manifests")
    return roots


def _legacy_roots(
    raw: bytes, files: dict[str, tuple[str, int]], links: dict[str, str], store: Store
) -> list[Root]:
    """Builds an OCI manifest per image of a legacy save: config + uncompressed layer tars."""

    def lookup(path: str) -> tuple[str, int]:
        seen = 0
        path = posixpath.normpath(path)
        while path in links and seen < 16:
            path, seen = links[path], seen + 1
        if path not in files:
            raise ExportError(f"manifest.json names {path}, which the save stream does not contain")
        return files[path]

    roots = []
    for image in _load_json(raw, "manifest.json"):
        config_digest, config_size = lookup(image["Config"])
        layers = [lookup(layer) for layer in image["Layers"]]
        config = _load_json(store.read_blob(config_digest) or b"", image["Config"])
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if diff_ids != [digest for digest, _ in layers]:
            said = [*diff_ids, *["nothing"] * len(layers)]
            wrong = [
                f"{path} hashes to {digest}, the config says {said[i]}"
                for i, (path, (digest, _)) in enumerate(zip(image["Layers"], layers, strict=True))
                if said[i] != digest
            ] or [f"the config lists {len(diff_ids)} layers, the image {len(layers)}"]
            raise ExportError(
                f"layers of {image['Config']} do not match its rootfs.diff_ids: {'; '.join(wrong)}"
            )
        body = legacy_manifest((config_digest, config_size), layers)
        digest = store.put_bytes(body)
        roots.append(Root(digest, OCI_MANIFEST, len(body), tuple(image.get("RepoTags") or ())))
    if not roots:
        raise ExportError("manifest.json lists no images")
    return roots


def select_root(roots: list[Root], wanted: tuple[str, ...]) -> Root:
    """Picks the image a request asked for among those a save stream names."""
    if len(roots) == 1:
        return roots[0]
    for root in roots:
        if set(root.names) & set(wanted):
            return root
    raise ExportError(f"save stream names {len(roots)} images, none of them {' or '.join(wanted)}")
