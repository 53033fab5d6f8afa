"""The cache's bookkeeping: sizes, totals and references kept as records and blobs change, never by a walk
of the cache; eviction writes each record once, makes the batch durable with one fsync, and lets a request
that needs the record lock in between its record writes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from k3d_registry_dockerd.cache import maintenance
from k3d_registry_dockerd.cache.records import Records
from k3d_registry_dockerd.cache.store import ManifestEntry, RepositoryRecord, Store, TagEntry
from k3d_registry_dockerd.common.metrics import Metrics

from .test_cache import evict

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BASE = "shared base layer"


def on_disk(store: Store) -> int:
    return sum(p.stat().st_size for p in store.blobs_dir.rglob("*") if p.is_file())


def cache_image(store: Store, name: str, seed: str, used: float, tag: str = "1") -> tuple[str, list[str]]:
    """Stores an image (config, own layer, the shared base layer) and tags it in `name`'s record."""
    blobs = [
        store.put_bytes(f"{seed} config".encode()),
        store.put_bytes(f"{seed} layer".encode() * 50),
        store.put_bytes(BASE.encode()),
    ]
    manifest = store.put_bytes(f"manifest {seed} {blobs}".encode())
    record = store.record(name) or RepositoryRecord(name)
    store.save_record(
        RepositoryRecord(
            name,
            tags={**record.tags, tag: TagEntry(manifest, MANIFEST, f"sha256:{seed}", used - 10, None, used)},
            manifests={**record.manifests, manifest: ManifestEntry(MANIFEST, 10, blobs)},
        )
    )
    return manifest, blobs


def fill(store: Store, count: int) -> list[tuple[str, list[str]]]:
    """`count` images, one repository each, image 0 least recently used."""
    now = time.time()
    return [cache_image(store, f"docker.io/library/app{i}", f"app{i}", now - 1000 + i) for i in range(count)]


class Spy:
    """Counts directory listings and fsyncs while on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scans: list[str] = []
        self.fsyncs = 0
        scandir, listdir, fsync = os.scandir, os.listdir, os.fsync

        def scanning(real: Any, what: str) -> Any:
            def spy(*args: Any, **kwargs: Any) -> Any:
                self.scans.append(f"{what} {args[:1]}")
                return real(*args, **kwargs)

            return spy

        def counting(fd: int) -> None:
            self.fsyncs += 1
            fsync(fd)

        monkeypatch.setattr(os, "scandir", scanning(scandir, "scandir"))
        monkeypatch.setattr(os, "listdir", scanning(listdir, "listdir"))
        monkeypatch.setattr(os, "fsync", counting)
        for method in ("glob", "rglob", "iterdir"):
            monkeypatch.setattr(Path, method, scanning(getattr(Path, method), method))


def test_totals_follow_writes_and_removals_and_survive_a_reopen(store: Store) -> None:
    images = fill(store, 3)
    assert store.total_bytes == on_disk(store)
    assert store.blob_count == 3 * 3 + 1
    (_, (_, _, base)) = images[0]
    assert store.references(base) == 3
    # The same bytes again: no change.
    store.put_bytes(BASE.encode())
    assert store.total_bytes == on_disk(store)

    record = store.record("docker.io/library/app0")
    assert record is not None
    unused = store.save_record(RepositoryRecord(record.name, loaded={"x": "y"}))
    assert unused == {images[0][0], *images[0][1][:2]}  # the base layer is still used by two others
    assert store.references(base) == 2
    assert maintenance.remove_blobs(store, unused) > 0
    assert store.total_bytes == on_disk(store)

    reopened = Store(store.root)
    reopened.open()
    assert (reopened.total_bytes, reopened.blob_count) == (store.total_bytes, store.blob_count)
    assert reopened.references(base) == 2
    assert all(reopened.references(d) == store.references(d) for d in images[1][1])


def test_a_record_changed_in_place_before_its_save_is_counted_right(store: Store) -> None:
    manifest, blobs = fill(store, 1)[0]
    record = store.record("docker.io/library/app0")
    assert record is not None
    record.manifests.clear()
    record.tags.clear()
    assert store.save_record(record) == {manifest, *blobs}
    assert not any(store.references(d) for d in [manifest, *blobs])
    # Nothing left: the record's file goes instead of being rewritten empty.
    assert store.record(record.name) is None
    assert list(store.records_dir.glob("*.json")) == []


def test_an_export_under_the_limit_looks_at_nothing_on_disk(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store, 20)
    records = Records(store, Metrics(), limit=1 << 40)
    spy = Spy(monkeypatch)

    async def export() -> None:
        with records.claim() as claimed:
            claimed.add(store.put_bytes(b"an export's new layer"))
            await records.edit("docker.io/library/app0", lambda r: r)
            await records.discard_unused(claimed)
        await records.enforce_limit("docker.io/library/app0", "sha256:" + "0" * 64)

    asyncio.run(export())
    assert spy.scans == []


def test_evicting_half_writes_each_record_once_with_one_directory_fsync(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = fill(store, 20)
    # Two images in one repository: evicting the older rewrites that record; the others empty theirs.
    shared, _ = cache_image(store, "docker.io/library/app19", "app19-old", time.time() - 5000, tag="old")
    total = store.total_bytes
    saves: list[str] = []
    save = Store.save_record

    def counting_save(self: Store, record: RepositoryRecord, **kwargs: Any) -> set[str]:
        saves.append(record.name)
        return save(self, record, **kwargs)

    monkeypatch.setattr(Store, "save_record", counting_save)
    spy = Spy(monkeypatch)

    eviction = evict(store, total // 2, protected=set())

    evicted = [image.digest for image in eviction.dropped]
    assert evicted == [shared] + [manifest for manifest, _ in images[: len(evicted) - 1]]
    assert len(saves) == len(set(saves)) == len(evicted)
    # One record rewritten (its file fsynced), the emptied ones removed, then the directory once.
    assert spy.fsyncs == 2
    assert spy.scans == []
    assert eviction.remaining == store.total_bytes == on_disk(store) <= total // 2
    (_, (_, _, base)) = images[-1]
    assert store.has_blob(base)
    assert all(not store.has_blob(d) for manifest, _ in images[: len(evicted) - 1] for d in [manifest])


def test_eviction_lets_a_record_write_in_between_its_own(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store, 10)
    records = Records(store, Metrics(), limit=0, in_use_grace=0.0)
    drops: list[str] = []
    drop = maintenance.drop_image

    def slow_drop(*args: Any, **kwargs: Any) -> set[str] | None:
        drops.append("drop")
        time.sleep(0.01)
        return drop(*args, **kwargs)

    monkeypatch.setattr(maintenance, "drop_image", slow_drop)

    async def run() -> int:
        eviction = asyncio.ensure_future(
            records.enforce_limit("docker.io/library/other", "sha256:" + "1" * 64)
        )
        while not drops:
            await asyncio.sleep(0.001)
        used = await records.edit("docker.io/library/app9", lambda r: r)
        done_at = len(drops)
        await eviction
        assert used.name == "docker.io/library/app9"
        return done_at

    done_at = asyncio.run(run())
    assert len(drops) == 10
    assert done_at <= 2  # waited for one record write of the eviction, not for all ten
    assert store.total_bytes == on_disk(store) == 0
