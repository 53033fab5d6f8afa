"""Changes to the cache's records, one at a time, the blobs they free, and eviction past the size limit.

What must not be removed whatever the records say is known here too: the blobs a running export relies on
(`claim`ed before its record references them) and the images clients fetched from in the last IN_USE_GRACE
seconds (a pull in progress needs all its layers).

Every change costs what it touches: the store keeps the cache's size and each digest's references as they
change, so an export below the limit costs no look at the rest of the cache, and an eviction holds the
record lock (which a request recording a tag's last use needs too) for one record write at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from ..common import units
from ..common.metrics import Metrics
from . import maintenance
from .store import RepositoryRecord, Store

log = logging.getLogger(__package__)
# How long an image stays safe from --cache-max-size eviction after a client fetched any part of it. A
# pull fetches manifest, config and layers one after another (containerd three at a time), so the gaps
# between its requests are a layer's transfer time; a layer being sent survives eviction anyway (the
# open file outlives its unlink). Five minutes covers 3 GB layers at 10 MB/s.
IN_USE_GRACE = 300.0
# Blobs an eviction removes per hold of the record lock: about what one record write costs.
REMOVE_BATCH = 32


class Records:
    """The one writer of the store's records; `limit` is --cache-max-size (None: no limit)."""

    def __init__(
        self, store: Store, metrics: Metrics, limit: int | None = None, in_use_grace: float = IN_USE_GRACE
    ) -> None:
        self.store = store
        self.limit = limit
        self.in_use_grace = in_use_grace
        self._metrics = metrics
        self._lock = asyncio.Lock()
        # One eviction at a time: the next one finds the cache under the limit already.
        self._evicting = asyncio.Lock()
        # Blobs running exports rely on, one set per export (by identity: two may be equal).
        self._claims: dict[int, set[str]] = {}
        # When a client last fetched (Docker name, digest), while a limit is set.
        self._fetched: dict[tuple[str, str], float] = {}

    @contextlib.contextmanager
    def claim(self) -> Iterator[set[str]]:
        """A set the caller fills with the blobs it relies on; none of them is removed while it is open."""
        claimed: set[str] = set()
        self._claims[id(claimed)] = claimed
        try:
            yield claimed
        finally:
            del self._claims[id(claimed)]

    def _claimed(self, besides: set[str] | None = None) -> set[str]:
        return set().union(*(c for c in self._claims.values() if c is not besides))

    def fetched(self, name: str, digest: str) -> None:
        """A client fetched this manifest or blob of the repository now (it counts as in use)."""
        if self.limit is not None:
            self._fetched[(name, digest)] = time.monotonic()

    async def edit(
        self, name: str, change: Callable[[RepositoryRecord], RepositoryRecord], *, free_blobs: bool = False
    ) -> RepositoryRecord:
        """Applies `change` to a repository's record (an empty one if none) and saves the result, one
        change at a time; `change` raises to refuse. With `free_blobs`, blobs the record no longer needs
        and nothing else uses (running exports included) are removed from the cache."""
        async with self._lock:
            current = self.store.record(name) or RepositoryRecord(name=name)
            record = change(current)
            if free_blobs:
                await asyncio.to_thread(maintenance.replace_record, self.store, record, self._claimed())
            elif record != current:
                await asyncio.to_thread(self.store.save_record, record)
            return record

    async def discard_unused(self, claimed: set[str]) -> int:
        """Removes the blobs of an open claim that no record references and no other claim holds (what a
        finished export stored but nothing serves); the bytes freed."""
        async with self._lock:
            others = self._claimed(besides=claimed)
            unused = {d for d in claimed if not self.store.references(d) and d not in others}
            if not unused:
                return 0
            return await asyncio.to_thread(maintenance.remove_blobs, self.store, unused)

    async def enforce_limit(self, name: str, digest: str) -> None:
        """Evicts least recently used images past the limit, keeping `digest` of `name` (just exported),
        what clients fetched in the last `in_use_grace` seconds and what running exports claimed: the cache
        exceeds the limit only by those."""
        if self.limit is None:
            return
        limit = self.limit
        now = time.monotonic()
        self._fetched[(name, digest)] = now
        self._fetched = {key: at for key, at in self._fetched.items() if now - at < self.in_use_grace}
        if self.store.total_bytes <= limit:
            return
        async with self._evicting:
            eviction = await self.evict(limit, set(self._fetched))
        if eviction.remaining > limit:
            log.info(
                "cache at %s stays over the %s limit: the rest is in use (fetched in the last %s, or an "
                "export running) and is evicted once idle",
                units.size(eviction.remaining),
                units.size(limit),
                units.duration(self.in_use_grace),
            )
        for image in eviction.dropped:
            self._metrics.evictions.inc()
            log.info(
                "evicted %s %s (%s, tags %s) to keep the cache under %s",
                image.repository,
                image.digest,
                units.size(image.size),
                ",".join(image.tags),
                units.size(limit),
            )

    async def evict(self, limit: int, protected: set[tuple[str, str]]) -> maintenance.Eviction:
        """Drops least recently used images until the cache fits `limit` bytes, one image's record write at
        a time under the record lock; the records are made durable once, before any blob goes. An image is
        kept whatever its age while any of its (repository, digest) pairs is in `protected` (what clients
        are fetching now), and so are the blobs open claims hold (what running exports rely on)."""
        total = self.store.total_bytes
        if total <= limit:
            return maintenance.Eviction([], total)
        order = await asyncio.to_thread(maintenance.eviction_order, self.store, protected)
        dropped, unused = [], set()
        for image in order:
            if total <= limit:
                break
            async with self._lock:
                freed = await asyncio.to_thread(maintenance.drop_image, self.store, image, durable=False)
                claimed = self._claimed()
            if freed is None:
                continue
            total -= sum(self.store.known_size(d) or 0 for d in freed - claimed - unused)
            unused |= freed
            dropped.append(image)
        if dropped:
            await asyncio.to_thread(self.store.sync_records)
        freed_blobs = sorted(unused)
        for start in range(0, len(freed_blobs), REMOVE_BATCH):
            async with self._lock:
                batch = set(freed_blobs[start : start + REMOVE_BATCH]) - self._claimed()
                gone = {d for d in batch if not self.store.references(d)}
                await asyncio.to_thread(maintenance.remove_blobs, self.store, gone)
        return maintenance.Eviction(dropped, self.store.total_bytes)
