"""What is kept of the verification of the daemon's store across restarts (`cache.verified`): the records
themselves, and each in-place source (classic, Podman, containerd) restarted on the same cache dir."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from k3d_registry_dockerd.cache import verified as verified_module
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.cache.verified import FILE, HEADER, MARGIN_NS, VerifiedBlobs
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.sources.classic import ClassicContent
from k3d_registry_dockerd.sources.containerd import ContainerdContent
from k3d_registry_dockerd.sources.content import BlobPieces, ImageContent
from k3d_registry_dockerd.sources.podman import PodmanContent

from .test_sources_contract import (
    APP,
    INFO,
    ClassicBackend,
    ContainerdBackend,
    PodmanBackend,
    Published,
    file_digest,
    publish_image,
)


def digest(n: int) -> str:
    return f"sha256:{hashlib.sha256(b'blob %d' % n).hexdigest()}"


def fingerprint(n: int) -> str:
    return f"sha256:{hashlib.sha256(b'files %d' % n).hexdigest()}"


# A match hashed now of files last changed long ago: written down.
NOW = time.time_ns()
OLD = NOW - 10 * MARGIN_NS


def counted(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def restarted(store: Store, limit: int = verified_module.LIMIT) -> VerifiedBlobs:
    records = VerifiedBlobs(store, Metrics(), limit)
    records.open()
    return records


# ---- the records ------------------------------------------------------------------------------------


async def test_matches_are_kept_across_a_restart(store: Store) -> None:
    first = await restarted(store)
    for n in range(3):
        first.matched(digest(n), fingerprint(n), OLD, NOW)
    assert first.verified(digest(0), fingerprint(0))
    await first.close()
    again = await restarted(store)
    assert all(again.verified(digest(n), fingerprint(n)) for n in range(3))
    # The same blob in other files, or another blob in those files, is not.
    assert not again.verified(digest(0), fingerprint(1))
    assert not again.verified(digest(1), fingerprint(0))
    assert (
        again.metrics is not None and counted(again.metrics, "k3d_registry_blobs_verified_before_total") == 3
    )
    # Taken as verified again, not counted again.
    assert again.verified(digest(0), fingerprint(0))
    assert counted(again.metrics, "k3d_registry_blobs_verified_before_total") == 3


async def test_the_file_holds_digests_only(store: Store) -> None:
    records = await restarted(store)
    records.matched(digest(0), fingerprint(0), OLD, NOW)
    await records.close()
    assert (store.root / FILE).read_bytes() == HEADER + f"{digest(0)} {fingerprint(0)}\n".encode()


async def test_a_racy_match_counts_in_this_run_only(store: Store) -> None:
    records = await restarted(store)
    # Files changed less than the margin before hashing started: a write in the same clock tick after the
    # hash would not show in their change times.
    records.matched(digest(0), fingerprint(0), NOW - MARGIN_NS // 2, NOW)
    records.matched(digest(1), fingerprint(1), NOW - MARGIN_NS - 1, NOW)
    assert records.verified(digest(0), fingerprint(0)) and records.verified(digest(1), fingerprint(1))
    await records.close()
    again = await restarted(store)
    assert not again.verified(digest(0), fingerprint(0))
    assert again.verified(digest(1), fingerprint(1))


async def test_records_are_bounded_the_least_recently_used_dropped(store: Store) -> None:
    records = await restarted(store, limit=2)
    for n in range(2):
        records.matched(digest(n), fingerprint(n), OLD, NOW)
    await records.close()
    # Used since: kept over the one not used.
    assert records.verified(digest(0), fingerprint(0))
    for n in range(2, 5):
        records.matched(digest(n), fingerprint(n), OLD, NOW)
        await records.close()
    assert not records.verified(digest(0), fingerprint(0))
    again = await restarted(store, limit=2)
    assert [again.verified(digest(n), fingerprint(n)) for n in range(5)] == [False, False, False, True, True]
    # The file is written afresh before it holds more than twice the bound.
    lines = (store.root / FILE).read_bytes().count(b"\n")
    assert lines <= 1 + 2 * 2


async def test_a_torn_or_damaged_file_is_skipped_not_fatal(store: Store) -> None:
    path = store.root / FILE
    good = f"{digest(0)} {fingerprint(0)}\n".encode()
    path.write_bytes(
        HEADER + b"garbage\n" + good + b"\x00\xff\n" + f"{digest(1)} {fingerprint(1)}".encode()[:50]
    )
    records = await restarted(store)
    assert records.verified(digest(0), fingerprint(0))
    assert not records.verified(digest(1), fingerprint(1))
    # The next match goes on a line of its own, after the torn one.
    records.matched(digest(2), fingerprint(2), OLD, NOW)
    await records.close()
    again = await restarted(store)
    assert again.verified(digest(0), fingerprint(0)) and again.verified(digest(2), fingerprint(2))


async def test_a_file_of_another_kind_is_ignored_and_written_afresh(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    path = store.root / FILE
    path.write_bytes(b"\x1f\x8b not ours\n" + f"{digest(0)} {fingerprint(0)}\n".encode())
    records = await restarted(store)
    assert not records.verified(digest(0), fingerprint(0))
    assert "is not a record of verified blobs" in caplog.text
    records.matched(digest(1), fingerprint(1), OLD, NOW)
    await records.close()
    assert path.read_bytes() == HEADER + f"{digest(1)} {fingerprint(1)}\n".encode()


async def test_an_unreadable_file_or_one_that_cannot_be_written_is_not_fatal(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    (store.root / FILE).mkdir()
    records = await restarted(store)
    assert "cannot read" in caplog.text
    records.matched(digest(0), fingerprint(0), OLD, NOW)
    with caplog.at_level(logging.WARNING):
        await records.close()
    assert "cannot write" in caplog.text
    assert records.verified(digest(0), fingerprint(0))


async def test_without_a_cache_dir_nothing_is_written() -> None:
    records = VerifiedBlobs()
    assert records.open() == 0
    records.matched(digest(0), fingerprint(0), OLD, NOW)
    await records.close()
    assert records.verified(digest(0), fingerprint(0))


async def test_matches_are_written_in_batches(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(verified_module.os, "fsync", counting_fsync)
    records = await restarted(store)
    records.matched(digest(0), fingerprint(0), OLD, NOW)
    await records.close()
    syncs.clear()
    for n in range(1, 11):
        records.matched(digest(n), fingerprint(n), OLD, NOW)
    await records.close()
    assert len(syncs) == 1
    assert (store.root / FILE).read_bytes().count(b"\n") == 1 + 11


# ---- the in-place sources, restarted ----------------------------------------------------------------

InPlace = ClassicBackend | PodmanBackend | ContainerdBackend


@pytest.fixture(params=["classic", "podman", "containerd"])
def in_place(request: pytest.FixtureRequest, tmp_path: Path) -> InPlace:
    if request.param == "classic":
        return ClassicBackend(tmp_path / "docker")
    if request.param == "podman":
        return PodmanBackend(tmp_path / "storage")
    return ContainerdBackend(tmp_path / "content")


@dataclass
class Run:
    """One run of a registry's in-place source on a cache dir."""

    source: ImageContent
    metrics: Metrics
    records: VerifiedBlobs

    def counted(self, name: str) -> float:
        return counted(self.metrics, name)

    async def stop(self) -> None:
        await self.records.close()
        await self.source.close()  # type: ignore[attr-defined]


def started(backend: InPlace, store: Store) -> Run:
    """The backend's source as a registry started on `store`'s cache dir makes it."""
    metrics = Metrics()
    records = VerifiedBlobs(store, metrics)
    records.open()
    source: ImageContent
    if isinstance(backend, ClassicBackend):
        source = ClassicContent(backend.root, "overlay2", metrics, records)
    elif isinstance(backend, PodmanBackend):
        source = PodmanContent(backend.root, "overlay", metrics, records)
    else:
        source = ContainerdContent(backend.containerd, backend.blobs_dir, metrics, records)  # type: ignore[arg-type]
    return Run(source, metrics, records)


def layer_files(backend: InPlace, blob: str) -> list[Path]:
    """The files holding the layer's bytes in the backend's store."""
    if isinstance(backend, ContainerdBackend):
        return [backend.blobs_dir / blob.removeprefix("sha256:")]
    return [path for path in backend.diff_dirs[blob].rglob("*") if path.is_file()]


async def hashed_to_send(run: Run, published: Published) -> dict[str, bool]:
    """Whether each layer of the image, asked for as a pull does, had to be hashed to be sent."""
    assert await run.source.by_tag(APP, "v1", published.inspect, INFO, None) is not None
    hashed = {}
    for blob in published.image.layer_digests:
        found = await run.source.blob(APP, blob, INFO)
        assert found is not None and file_digest(found) == blob
        verify = found.verify if isinstance(found, BlobPieces) else None
        hashed[blob] = verify is not None
        if verify is not None:
            assert await verify()
    return hashed


async def test_a_restart_takes_verified_blobs_as_verified_until_their_files_change(
    in_place: InPlace, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fixture's files were written a moment ago: as if they were older than the margin.
    monkeypatch.setattr(verified_module, "MARGIN_NS", 0)
    published = publish_image(in_place, APP, "v1", "kept")
    first, second = published.image.layer_digests
    before = started(in_place, store)
    assert await hashed_to_send(before, published) == {first: True, second: True}
    assert before.counted("k3d_registry_blobs_hashed_total") == 2
    await before.stop()

    after = started(in_place, store)
    assert await hashed_to_send(after, published) == {first: False, second: False}
    assert after.counted("k3d_registry_blobs_hashed_total") == 0
    assert after.counted("k3d_registry_blobs_verified_before_total") == 2
    await after.stop()

    # A file of the first layer is written again: its times move (set here, as `touch` would).
    for path in layer_files(in_place, first):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = started(in_place, store)
    assert await hashed_to_send(changed, published) == {first: True, second: False}
    assert changed.counted("k3d_registry_blobs_hashed_total") == 1
    await changed.stop()
