from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.store import (
    DigestMismatch,
    ManifestEntry,
    RepositoryRecord,
    Store,
    TagEntry,
)
from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.oci.reference import Digest


def sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_open_creates_the_layout(tmp_path: Path) -> None:
    store = Store(tmp_path / "new" / "cache")
    store.open()
    assert store.blobs_dir.is_dir()
    assert store.records_dir.is_dir()
    assert store.tmp_dir.is_dir()


def test_writer_commits_under_its_digest(store: Store) -> None:
    writer = store.writer()
    writer.write(b"hello ")
    writer.write(memoryview(b"world"))
    assert writer.size == 11
    digest = writer.commit(sha(b"hello world"))
    assert digest == sha(b"hello world")
    assert store.has_blob(digest)
    assert store.read_blob(digest) == b"hello world"
    assert store.blob_size(digest) == 11
    path = store.blob_path(Digest.parse(digest))
    assert path == store.blobs_dir / digest[7:9] / digest[7:]
    assert files_under(store.tmp_dir) == []


def test_commit_without_expected_digest(store: Store) -> None:
    writer = store.writer()
    writer.write(b"anything")
    assert writer.commit() == sha(b"anything")
    assert store.read_blob(sha(b"anything")) == b"anything"


def test_commit_mismatch_leaves_nothing(store: Store) -> None:
    writer = store.writer()
    writer.write(b"actual bytes")
    claimed = sha(b"claimed bytes")
    with pytest.raises(DigestMismatch):
        writer.commit(claimed)
    assert not store.has_blob(claimed)
    assert not store.has_blob(sha(b"actual bytes"))
    assert files_under(store.blobs_dir) == []
    assert files_under(store.tmp_dir) == []


def test_commit_of_existing_blob_keeps_it_and_cleans_up(store: Store) -> None:
    digest = store.put_bytes(b"same")
    path = store.blob_path(Digest.parse(digest))
    inode = path.stat().st_ino
    writer = store.writer()
    writer.write(b"same")
    assert writer.commit(digest) == digest
    assert path.stat().st_ino == inode
    assert files_under(store.tmp_dir) == []
    assert files_under(store.blobs_dir) == [path]


def test_abort_removes_the_temp_file(store: Store) -> None:
    writer = store.writer()
    writer.write(b"partial")
    assert len(files_under(store.tmp_dir)) == 1
    writer.abort()
    writer.abort()  # idempotent
    assert files_under(store.tmp_dir) == []
    assert files_under(store.blobs_dir) == []


def test_put_bytes(store: Store) -> None:
    assert store.put_bytes(b"") == sha(b"")
    assert store.read_blob(sha(b"")) == b""
    assert store.put_bytes(b"x", sha(b"x")) == sha(b"x")
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"y", sha(b"x-not-y"))
    assert files_under(store.tmp_dir) == []


def test_absent_blob(store: Store) -> None:
    missing = sha(b"missing")
    assert not store.has_blob(missing)
    assert store.blob_size(missing) is None
    assert store.read_blob(missing) is None


def test_blob_lookups_validate_digests(store: Store) -> None:
    with pytest.raises(RegistryError):
        store.has_blob("sha256:../../etc/passwd")


def sample_record(name: str = "docker.io/library/alpine") -> RepositoryRecord:
    return RepositoryRecord(
        name=name,
        tags={
            "latest": TagEntry(
                digest=sha(b"m"),
                media_type="application/vnd.oci.image.manifest.v1+json",
                image_id="sha256:" + "1" * 64,
                exported_at=1700000000.5,
                pulled_at=None,
            ),
            "3.20": TagEntry(
                sha(b"m"), "application/vnd.oci.image.manifest.v1+json", "sha256:" + "1" * 64, 1.0, 2.0
            ),
        },
        manifests={
            sha(b"m"): ManifestEntry(
                "application/vnd.oci.image.manifest.v1+json", 1, [sha(b"config"), sha(b"layer")]
            )
        },
    )


def test_records_survive_reopen(store: Store) -> None:
    record = sample_record()
    store.save_record(record)
    assert store.record(record.name) == record
    assert files_under(store.tmp_dir) == []

    reopened = Store(store.root)
    assert reopened.record(record.name) is None
    reopened.open()
    assert reopened.record(record.name) == record
    assert reopened.record("docker.io/library/other") is None


def test_save_record_replaces(store: Store) -> None:
    record = sample_record()
    store.save_record(record)
    record.tags.pop("3.20")
    store.save_record(record)
    assert len(list(store.records_dir.glob("*.json"))) == 1
    reopened = Store(store.root)
    reopened.open()
    assert set(reopened.record(record.name).tags) == {"latest"}


def test_record_file_names_are_hashes(store: Store) -> None:
    store.save_record(sample_record("127.0.0.1:5001/../../x"))
    (path,) = store.records_dir.iterdir()
    assert path.name == hashlib.sha256(b"127.0.0.1:5001/../../x").hexdigest() + ".json"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b'{"version": 99, "name": "x", "tags": {}, "manifests": {}}',
        b'{"version": 1, "name": "x"}',
        b'{"version": 1, "name": "x", "tags": {"t": {"digest": "d"}}, "manifests": {}}',
        b'{"version": 1, "name": "x", "tags": {}, "manifests": {"d": {"size": 1}}}',
    ],
)
def test_unreadable_record_is_ignored_with_a_warning(
    store: Store, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = sample_record()
    store.save_record(good)
    (store.records_dir / "broken.json").write_bytes(content)
    reopened = Store(store.root)
    with caplog.at_level(logging.WARNING, logger="k3d_registry_dockerd.cache"):
        reopened.open()
    assert reopened.record(good.name) == good
    assert any("broken.json" in message for message in caplog.messages)


@pytest.mark.parametrize(
    "content", [b"[]", b"null", b'{"version": 1, "name": "x", "tags": [], "manifests": {}}']
)
def test_record_that_is_json_but_not_an_object_is_ignored(store: Store, content: bytes) -> None:
    (store.records_dir / "odd.json").write_bytes(content)
    reopened = Store(store.root)
    reopened.open()
    assert reopened.record("x") is None


def test_leftover_temp_files_are_removed_on_open(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    writer = store.writer()
    writer.write(b"crashed mid-write")  # never committed nor aborted: a crash
    (store.tmp_dir / "record-abc").write_bytes(b"{}")
    assert len(files_under(store.tmp_dir)) == 2
    reopened = Store(store.root)
    with caplog.at_level(logging.INFO, logger="k3d_registry_dockerd.cache"):
        reopened.open()
    assert files_under(store.tmp_dir) == []
    assert any("removed 2 temp files" in message for message in caplog.messages)
    writer.abort()


def test_serves_blob() -> None:
    record = sample_record()
    assert record.serves_blob(sha(b"m"))
    assert record.serves_blob(sha(b"config"))
    assert record.serves_blob(sha(b"layer"))
    assert not record.serves_blob(sha(b"other"))
    assert not RepositoryRecord(name="empty").serves_blob(sha(b"m"))


def test_record_json_round_trip() -> None:
    record = sample_record()
    assert RepositoryRecord.from_json(record.to_json()) == record
    assert b'"version": 1' in record.to_json()
