"""cache ls / verify / prune on a store filled by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set

from k3d_registry_dockerd.cache import maintenance
from k3d_registry_dockerd.cache.records import Records
from k3d_registry_dockerd.cache.store import ManifestEntry, RepositoryRecord, Store, TagEntry
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.oci.reference import Digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _image(store: Store, seed: str, shared: str | None = None) -> tuple[str, list[str]]:
    """Stores a config and a layer (plus an optional shared layer) and a manifest naming them."""
    blobs = [store.put_bytes(f"{seed}-config".encode()), store.put_bytes(f"{seed}-layer".encode() * 100)]
    if shared is not None:
        blobs.append(store.put_bytes(shared.encode()))
    manifest = store.put_bytes(f"manifest of {seed} {blobs}".encode())
    return manifest, blobs


def _record(store: Store, name: str, tags: dict[str, tuple[str, list[str], float]]) -> None:
    record = RepositoryRecord(name)
    for tag, (manifest, blobs, used) in tags.items():
        record.tags[tag] = TagEntry(manifest, MANIFEST, f"sha256:{tag}", used - 10, None, used)
        record.manifests[manifest] = ManifestEntry(MANIFEST, store.blob_size(manifest) or 0, blobs)
    store.save_record(record)


def evict(
    store: Store, limit: int, protected: set[tuple[str, str]], keep_blobs: Set[str] = frozenset()
) -> maintenance.Eviction:
    """The registry's eviction down to `limit`, with `keep_blobs` claimed as a running export would."""
    records = Records(store, Metrics(), limit)

    async def run() -> maintenance.Eviction:
        with records.claim() as claimed:
            claimed.update(keep_blobs)
            return await records.evict(limit, protected)

    return asyncio.run(run())


def test_ls_lists_tagged_images_by_last_use(store: Store) -> None:
    now = time.time()
    old, old_blobs = _image(store, "old")
    new, new_blobs = _image(store, "new")
    _record(store, "docker.io/library/app", {"1": (old, old_blobs, now - 86400), "2": (new, new_blobs, now)})
    listed = maintenance.images(store)
    assert [(i.tags, i.digest) for i in listed] == [(("2",), new), (("1",), old)]
    assert listed[0].size == sum(store.blob_size(d) or 0 for d in [new, *new_blobs])


def test_verify_removes_corrupt_blobs(store: Store) -> None:
    manifest, blobs = _image(store, "v")
    path = store.blob_path(Digest.parse(blobs[1]))
    path.write_bytes(b"bit rot")
    checked, corrupt = maintenance.verify(store)
    assert checked == 3
    assert corrupt == [path]
    assert not path.exists()
    assert store.has_blob(manifest)


def test_prune_older_than_keeps_shared_blobs(store: Store) -> None:
    now = time.time()
    old, old_blobs = _image(store, "old", shared="base layer")
    new, new_blobs = _image(store, "new", shared="base layer")
    _record(
        store, "docker.io/library/app", {"old": (old, old_blobs, now - 3600), "new": (new, new_blobs, now)}
    )
    result = maintenance.prune(store, older_than=600)
    assert (result.tags, result.manifests) == (1, 1)
    assert not store.has_blob(old)
    assert not store.has_blob(old_blobs[0])
    assert store.has_blob(old_blobs[2])  # the shared layer stays: "new" references it
    assert all(store.has_blob(d) for d in [new, *new_blobs])
    reopened = Store(store.root)
    reopened.open()
    record = reopened.record("docker.io/library/app")
    assert record is not None and set(record.tags) == {"new"}


def test_prune_all_and_orphans(store: Store) -> None:
    now = time.time()
    manifest, blobs = _image(store, "x")
    orphan = store.put_bytes(b"left by an export that was rejected")
    _record(store, "docker.io/library/x", {"1": (manifest, blobs, now)})
    assert maintenance.prune(store, older_than=3600).blobs == 1  # only the orphan
    assert not store.has_blob(orphan)
    result = maintenance.prune(store, everything=True)
    assert (result.tags, result.blobs) == (1, 3)
    assert list(store.blobs_dir.glob("*/*")) == []
    assert maintenance.images(store) == []


def test_evict_drops_least_recently_used_but_not_the_protected(store: Store) -> None:
    now = time.time()
    oldest, oldest_blobs = _image(store, "oldest", shared="base")
    middle, middle_blobs = _image(store, "middle", shared="base")
    newest, newest_blobs = _image(store, "newest", shared="base")
    _record(
        store,
        "docker.io/library/app",
        {
            "a": (oldest, oldest_blobs, now - 300),
            "b": (middle, middle_blobs, now - 200),
            "c": (newest, newest_blobs, now),
        },
    )
    total = store.total_bytes
    one_image = sum(store.blob_size(d) or 0 for d in [newest, *newest_blobs[:2]])
    # Room for two images' own blobs: only the least recently used one has to go.
    dropped = evict(store, total - one_image + 1, protected=set()).dropped
    assert [image.digest for image in dropped] == [oldest]
    assert not store.has_blob(oldest_blobs[0])
    assert store.has_blob(oldest_blobs[2])  # shared with the images that stay

    # The protected image stays even when the limit asks for everything to go.
    dropped = evict(store, 0, protected={("docker.io/library/app", middle)}).dropped
    assert [image.digest for image in dropped] == [newest]
    assert all(store.has_blob(d) for d in [middle, *middle_blobs])
    record = store.record("docker.io/library/app")
    assert record is not None and set(record.tags) == {"b"}


def test_evict_keeps_blobs_a_running_export_relies_on(store: Store) -> None:
    now = time.time()
    old, old_blobs = _image(store, "old")
    _record(store, "docker.io/library/app", {"old": (old, old_blobs, now - 60)})
    dropped = evict(store, 0, protected=set(), keep_blobs={old_blobs[1]}).dropped
    assert [image.digest for image in dropped] == [old]
    assert not store.has_blob(old_blobs[0])
    assert store.has_blob(old_blobs[1])


def test_evict_keeps_an_image_while_any_of_its_blobs_is_being_fetched(store: Store) -> None:
    now = time.time()
    old, old_blobs = _image(store, "old")
    new, new_blobs = _image(store, "new")
    _record(store, "docker.io/library/app", {"old": (old, old_blobs, now - 60), "new": (new, new_blobs, now)})
    # A client fetching a layer of the old image under another repository does not protect it here.
    dropped = evict(store, 0, protected={("docker.io/library/other", old_blobs[0])}).dropped
    assert [image.digest for image in dropped] == [old, new]

    old, old_blobs = _image(store, "old")
    _record(store, "docker.io/library/app", {"old": (old, old_blobs, now - 60)})
    kept = evict(store, 0, protected={("docker.io/library/app", old_blobs[-1])})
    assert kept.dropped == []
    assert kept.remaining == store.total_bytes > 0
    assert all(store.has_blob(d) for d in [old, *old_blobs])


def _pushed(store: Store, name: str, tag: str, seed: str, used: float) -> tuple[str, list[str]]:
    manifest, blobs = _image(store, seed)
    record = store.record(name) or RepositoryRecord(name)
    record.tags[tag] = TagEntry(manifest, MANIFEST, "", used, None, used, pushed=True)
    record.manifests[manifest] = ManifestEntry(MANIFEST, store.blob_size(manifest) or 0, blobs, pushed=True)
    store.save_record(record)
    return manifest, blobs


def test_prune_keeps_pushed_images_unless_asked(store: Store) -> None:
    now = time.time()
    exported, exported_blobs = _image(store, "exported")
    _record(store, "docker.io/library/app", {"1": (exported, exported_blobs, now - 86400)})
    pushed, pushed_blobs = _pushed(store, "docker.io/library/app", "dev", "pushed", now - 86400)

    for options in ({"older_than": 3600.0}, {"everything": True}):
        result = maintenance.prune(store, **options)  # type: ignore[arg-type]
        assert result.kept_pushed == 1
        assert store.record("docker.io/library/app").tags.keys() == {"dev"}
        assert all(store.has_blob(d) for d in [pushed, *pushed_blobs])
    assert not store.has_blob(exported)

    result = maintenance.prune(store, everything=True, include_pushed=True)
    assert (result.tags, result.kept_pushed) == (1, 0)
    assert not any(store.has_blob(d) for d in [pushed, *pushed_blobs])
