"""Which blobs of the daemon's own store were hashed and matched their digests, kept in the cache dir so that
a restart does not hash them again.

A blob counts as verified by its digest and a fingerprint of the files holding its bytes: for a layer of
Docker's classic store or Podman's storage, the identity (device, inode, size, modification and change
time) of its tar-split record and of every file it names, hashed together; for a file of containerd's
content store, that file's identity. A file's bytes cannot change without its change time (ctime) changing,
and no call sets a ctime (only setting the clock back would); a file put in another's place differs in
device, inode or ctime. So while the fingerprint is the same, so are the bytes that were hashed.

Except within one tick of the clock the kernel stamps files with (a jiffy, 1-10 ms; a second on some
filesystems): a file written again in the tick of its last change keeps its ctime. As git treats "racily
clean" index entries, a match is written down only when the newest change time in its fingerprint lies
more than MARGIN_NS before its hashing started, so that any later write has a later ctime. A racy match (a
layer written less than MARGIN_NS before it was hashed: an image built a moment ago) counts for this run only:
a daemon does not rewrite a layer it committed, and the next run hashes it once more.

The records are lines of `verified.txt` in the cache dir, after a header: `<digest> <fingerprint>`. They are
appended in batches (one write and one fsync per batch, in a thread, a second after the first match) and
read once at start; a torn last line or garbage is skipped, never fatal. At most LIMIT are kept, the least
recently used dropped; the file is rewritten (atomically) with those kept once it holds twice as many
lines. It holds digests only, no byte of any blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable

from ..common.bounded import BoundedDict
from ..common.metrics import Metrics
from .store import Store

log = logging.getLogger(__package__)

FILE = "verified.txt"
HEADER = b"k3d-registry-dockerd verified blobs v1\n"
LIMIT = 65536
# Coarser than any filesystem a store lies on stamps its files (whole seconds on ext4 with 128-byte inodes,
# the kernel's clock tick, 1-10 ms, elsewhere), with room. What it costs: a layer hashed less than this
# after it was written (an image built a moment before) is hashed once more by the next run.
MARGIN_NS = 2_000_000_000
# How long matches gather before they are written: one fsync for a pull's layers, not one per layer.
BATCH_SECONDS = 1.0
_LINE = re.compile(rb"(sha256:[0-9a-f]{64}) (sha256:[0-9a-f]{64})")
# What a record's entry says: read from the file and not asked about yet in this run; written down (or to
# be); matched in this run only (racy).
_KEPT, _DURABLE, _RACY = 0, 1, 2


def racy(newest_change: int, started: int) -> bool:
    """Whether a file may have changed after hashing `started` (ns) keeping the `newest_change` it had."""
    return newest_change >= started - MARGIN_NS


class VerifiedBlobs:
    """The blobs of the daemon's store known to match their digests, by digest and fingerprint (see the
    module's docstring); kept in the cache dir of `store`, or in memory only without one."""

    def __init__(
        self, store: Store | None = None, metrics: Metrics | None = None, limit: int = LIMIT
    ) -> None:
        self._store = store
        self.path = store.root / FILE if store is not None else None
        self.metrics = metrics
        self.limit = limit
        self._known: BoundedDict[tuple[str, str], int] = BoundedDict(limit)
        # Lines to append, and how many the file holds (a rewrite is due at twice the limit).
        self._pending: list[bytes] = []
        self._lines = 0
        # Whether the file must be written afresh (none, unreadable, or grown past twice the limit), and
        # whether it ends in a torn line (the next append starts a new one).
        self._rewrite = True
        self._torn = False
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def open(self) -> int:
        """Reads the records an earlier run wrote (blocking); how many are kept."""
        if self._store is None:
            return 0
        try:
            raw = self._store.read_state(FILE)
        except OSError as exc:
            log.warning(
                "cannot read %s (%s): every blob of the daemon's store is hashed again", self.path, exc
            )
            return 0
        if raw is None:
            return 0
        if not raw.startswith(HEADER):
            log.warning("%s is not a record of verified blobs: ignored, and written afresh", self.path)
            return 0
        lines = raw[len(HEADER) :].split(b"\n")
        self._torn = lines[-1] != b""
        for line in lines:
            match = _LINE.fullmatch(line)
            if match is not None:
                self._known[(match[1].decode(), match[2].decode())] = _KEPT
        self._lines = len(lines) - 1
        self._rewrite = self._lines > 2 * self.limit
        if self._known:
            log.info(
                "%d blobs of the daemon's store verified by an earlier run are taken as verified while their "
                "files stay as they were (%s)",
                len(self._known),
                self.path,
            )
        return len(self._known)

    def verified(self, digest: str, fingerprint: str) -> bool:
        """Whether the blob's bytes, in files with this fingerprint, were found to match its digest."""
        key = (digest, fingerprint)
        state = self._known.get(key)
        if state is None:
            return False
        if state == _KEPT:
            state = _DURABLE
            if self.metrics is not None:
                self.metrics.verified_before.inc()
        # Used now: the newest, the last one dropped.
        self._known[key] = state
        return True

    def matched(self, digest: str, fingerprint: str, newest_change: int, started: int) -> None:
        """The blob's bytes, in files with this fingerprint whose newest change time is `newest_change`,
        matched its digest when hashed from `started` (both ns since the epoch). Written down soon unless
        the match is racy."""
        if racy(newest_change, started):
            self._known[(digest, fingerprint)] = _RACY
            return
        self._known[(digest, fingerprint)] = _DURABLE
        if self.path is None:
            return
        self._pending.append(f"{digest} {fingerprint}\n".encode())
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_soon())

    async def _write_soon(self) -> None:
        try:
            while self._pending:
                if not self._wake.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), BATCH_SECONDS)
                await self._write()
        finally:
            self._writer = None

    async def _write(self) -> None:
        if self._rewrite or self._lines + len(self._pending) > 2 * self.limit:
            self._pending.clear()
            kept = [f"{d} {f}\n".encode() for (d, f), state in self._known.items() if state != _RACY]
            await self._in_thread(self._replace, kept)
            return
        lines, self._pending = self._pending, []
        await self._in_thread(self._append, lines)

    async def _in_thread(self, write: Callable[[list[bytes]], None], lines: list[bytes]) -> None:
        try:
            await asyncio.to_thread(write, lines)
        except OSError as exc:
            # Written again whole with the next match; until then a restart hashes those blobs again.
            self._rewrite = True
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)

    def _append(self, lines: list[bytes]) -> None:
        assert self.path is not None
        # Not created here: a file removed since is written afresh, with its header.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        with open(fd, "ab") as handle:
            handle.write(b"".join(([b"\n"] if self._torn else []) + lines))
            handle.flush()
            os.fsync(handle.fileno())
        self._torn = False
        self._lines += len(lines)

    def _replace(self, lines: list[bytes]) -> None:
        assert self._store is not None
        self._store.save_state(FILE, HEADER + b"".join(lines))
        self._rewrite, self._torn, self._lines = False, False, len(lines)

    async def close(self) -> None:
        """Writes what is pending now."""
        self._wake.set()
        if self._writer is not None:
            await asyncio.shield(self._writer)
        self._wake.clear()
