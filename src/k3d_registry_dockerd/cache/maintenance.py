"""What the cache holds and how it is trimmed: listing, verifying, pruning (`cache ls|verify|prune`, which
work on the cache dir directly, with the registry stopped: see cachedir.py) and eviction past
`--cache-max-size`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .store import RepositoryRecord, Store, TagEntry

CHUNK = 1 << 20


@dataclass(frozen=True)
class CachedImage:
    repository: str
    tags: tuple[str, ...]
    digest: str
    size: int
    last_used: float
    # Pushed by a client: there is no Docker image to export it from again, so it is never evicted.
    pushed: bool = False
    # The manifest and every blob a client fetches for it.
    contents: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Eviction:
    dropped: list[CachedImage]
    # What the cache holds afterwards: over the limit when what is left is in use.
    remaining: int


@dataclass(frozen=True)
class PruneResult:
    tags: int
    manifests: int
    blobs: int
    bytes: int
    # Pushed tags that matched but were kept (no --include-pushed).
    kept_pushed: int = 0


def _closure(record: RepositoryRecord, digest: str) -> set[str]:
    """A manifest and everything a client may fetch because of it (children of an index included)."""
    seen: set[str] = set()
    pending = [digest]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        entry = record.manifests.get(current)
        if entry is not None:
            pending.extend(entry.references)
    return seen


def images(store: Store) -> list[CachedImage]:
    """Tagged images in the cache, most recently used first; size counts the blobs present (from the
    store's bookkeeping: no file is looked at)."""
    found = []
    for record in store.records():
        by_digest: dict[str, list[str]] = {}
        last_used: dict[str, float] = {}
        pushed = {entry.digest for entry in record.tags.values() if entry.pushed}
        for tag, entry in record.tags.items():
            by_digest.setdefault(entry.digest, []).append(tag)
            used = entry.last_used or entry.exported_at
            last_used[entry.digest] = max(last_used.get(entry.digest, 0.0), used)
        for digest, tags in by_digest.items():
            contents = frozenset(_closure(record, digest))
            size = sum(store.known_size(d) or 0 for d in contents)
            found.append(
                CachedImage(
                    record.name,
                    tuple(sorted(tags)),
                    digest,
                    size,
                    last_used[digest],
                    digest in pushed,
                    contents,
                )
            )
    return sorted(found, key=lambda image: image.last_used, reverse=True)


def with_tags(record: RepositoryRecord, tags: dict[str, TagEntry]) -> RepositoryRecord:
    """The record keeping only `tags` and the manifests they reach; untagged exported manifests (served
    by digest once) go with the tags that are dropped, pushed ones stay until deleted."""
    live: set[str] = set()
    for digest in [entry.digest for entry in tags.values()] + [
        d for d, m in record.manifests.items() if m.pushed
    ]:
        live |= _closure(record, digest)
    manifests = {d: m for d, m in record.manifests.items() if d in live}
    return replace(record, tags=tags, manifests=manifests)


def replace_record(store: Store, record: RepositoryRecord, keep: set[str]) -> int:
    """Saves a trimmed `record` and removes the blobs the old one had that nothing (nor `keep`) needs now;
    returns the bytes freed."""
    return remove_blobs(store, store.save_record(record) - keep)


def remove_blobs(store: Store, digests: set[str]) -> int:
    """Deletes these blobs from the cache; returns the bytes freed."""
    return sum(store.remove_blob(digest) for digest in digests)


def eviction_order(store: Store, protected: set[tuple[str, str]]) -> list[CachedImage]:
    """The images eviction may drop, least recently used first: none pushed, none of whose (repository,
    digest) pairs is in `protected` (what clients are fetching now)."""
    return [
        image
        for image in reversed(images(store))
        if not image.pushed and not any((image.repository, d) in protected for d in image.contents)
    ]


def drop_image(store: Store, image: CachedImage, *, durable: bool = True) -> set[str] | None:
    """Removes an image's tags and manifests from its record; the digests no record references any more
    (see `Store.save_record`). None when the image was used or retagged since `image` was listed."""
    record = store.record(image.repository)
    if record is None:
        return None
    tags = {t: e for t, e in record.tags.items() if e.digest == image.digest}
    if not tags or max(e.last_used or e.exported_at for e in tags.values()) > image.last_used:
        return None
    remaining = {t: e for t, e in record.tags.items() if e.digest != image.digest}
    return store.save_record(with_tags(record, remaining), durable=durable)


def verify(store: Store) -> tuple[int, list[Path]]:
    """Re-hashes every blob; removes those whose bytes no longer match their name. (checked, removed)"""
    checked, corrupt = 0, []
    for path in sorted(store.blobs_dir.glob("*/*")):
        hasher = hashlib.sha256()
        with open(path, "rb") as blob:
            while chunk := blob.read(CHUNK):
                hasher.update(chunk)
        checked += 1
        if hasher.hexdigest() != path.name:
            store.remove_blob(f"sha256:{path.name}")
            corrupt.append(path)
    return checked, corrupt


def prune(
    store: Store, *, older_than: float | None = None, everything: bool = False, include_pushed: bool = False
) -> PruneResult:
    """Drops tags unused for `older_than` seconds (or all), the manifests only they kept, and every blob
    no remaining manifest references. Pushed tags, which cannot be exported again, only with
    `include_pushed`; with it and `everything`, untagged pushed manifests and blobs go too."""
    cutoff = time.time() - older_than if older_than is not None else None
    tags = manifests = kept_pushed = 0
    for record in store.records():
        dropped = set()
        for tag, entry in record.tags.items():
            if not everything and (cutoff is None or (entry.last_used or entry.exported_at) >= cutoff):
                continue
            if entry.pushed and not include_pushed:
                kept_pushed += 1
                continue
            dropped.add(tag)
        pruned = with_tags(record, {t: e for t, e in record.tags.items() if t not in dropped})
        if everything and include_pushed:
            pruned = replace(pruned, manifests={}, blobs=[])
        tags += len(dropped)
        manifests += len(record.manifests) - len(pruned.manifests)
        if pruned != record:
            store.save_record(pruned)
    blobs = freed = 0
    for path in list(store.blobs_dir.glob("*/*")):
        if not store.references(f"sha256:{path.name}"):
            freed += store.remove_blob(f"sha256:{path.name}")
            blobs += 1
    return PruneResult(tags, manifests, blobs, freed, kept_pushed)
