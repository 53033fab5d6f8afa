from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.oci.mediatypes import OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.oci.reference import Digest
from k3d_registry_dockerd.sources.plans import IncompleteImage, Root, plan_manifests
from k3d_registry_dockerd.sources.savestream import (
    ExportError,
    SaveContents,
    ThreadedStream,
    read_save_stream,
    select_root,
)

from .saves import (
    DOCKER_MANIFEST,
    TarBuilder,
    classic_save,
    descriptor,
    digest_of,
    hex_of,
    layer_tar,
    legacy_save,
    make_image,
    make_index,
    members,
    oci_layout,
)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
AMD64_JSON = {"os": "linux", "architecture": "amd64"}
ARM64_JSON = {"os": "linux", "architecture": "arm64", "variant": "v8"}


def read(data: bytes, store: Store) -> SaveContents:
    return read_save_stream(io.BytesIO(data), store)


def plan(store: Store, root: Root, platform: Platform = AMD64):
    return plan_manifests(root, store.read_blob, store.has_blob, platform)


def stored_files(store: Store) -> list[Path]:
    return sorted(p for p in store.blobs_dir.rglob("*") if p.is_file())


def tmp_files(store: Store) -> list[Path]:
    return list(store.tmp_dir.iterdir())


# ---- a. OCI layout of Docker >= 25, classic store -------------------------------------------------


def test_classic_store_layout(store: Store) -> None:
    image = make_image("classic")
    data = classic_save(image, "docker.io/library/alpine:3.20")
    entries = {m.name: m for m in members(data)}
    assert entries["blobs"].isdir()
    assert any(m.issym() for m in entries.values())
    assert list(entries)[-4:] == ["index.json", "manifest.json", "oci-layout", "repositories"]

    contents = read(data, store)

    assert contents.layout == "oci"
    assert contents.roots == [
        Root(image.digest, OCI_MANIFEST, len(image.manifest), ("docker.io/library/alpine:3.20", "3.20"))
    ]
    assert contents.blobs_written == 4  # manifest, config, two layers
    assert contents.bytes_written == sum(len(b) for b in image.blobs().values())
    for digest, blob in image.blobs().items():
        assert store.read_blob(digest) == blob
    assert len(stored_files(store)) == 4
    assert tmp_files(store) == []

    result = plan(store, contents.roots[0])
    assert result.root == contents.roots[0]
    assert set(result.manifests) == {image.digest}
    entry = result.manifests[image.digest]
    assert entry.media_type == OCI_MANIFEST
    assert entry.size == len(image.manifest)
    assert entry.references == [image.config_digest, *image.layer_digests]


def test_blobs_already_stored_are_not_written_again(store: Store) -> None:
    image = make_image("again")
    data = classic_save(image)
    read(data, store)
    inodes = {p: p.stat().st_ino for p in stored_files(store)}
    contents = read(data, store)
    assert contents.blobs_written == 0
    assert contents.bytes_written == 0
    assert {p: p.stat().st_ino for p in stored_files(store)} == inodes
    assert plan(store, contents.roots[0]).manifests[image.digest].references == [
        image.config_digest,
        *image.layer_digests,
    ]


def test_docker_media_types_are_kept(store: Store) -> None:
    image = make_image("docker-types", docker_media_types=True)
    data = oci_layout(image.blobs(), [descriptor(image.manifest, DOCKER_MANIFEST, name="x/y:z")])
    (root,) = read(data, store).roots
    assert root.media_type == DOCKER_MANIFEST
    assert plan(store, root).manifests[image.digest].media_type == DOCKER_MANIFEST


# ---- b. OCI layout of the containerd image store ---------------------------------------------------


def containerd_save(*, with_arm64_manifest: bool = False) -> tuple[bytes, bytes, object, object]:
    amd64 = make_image("multi-amd64")
    arm64 = make_image("multi-arm64", arch="arm64")
    index = make_index([(amd64, AMD64_JSON), (arm64, ARM64_JSON)])
    blobs = {**amd64.blobs(), digest_of(index): index}
    if with_arm64_manifest:
        blobs[arm64.digest] = arm64.manifest  # manifest without its config and layers
    data = oci_layout(blobs, [descriptor(index, OCI_INDEX, name="docker.io/library/multi:1")])
    return data, index, amd64, arm64


def test_containerd_index_serves_the_complete_child(store: Store) -> None:
    data, index, amd64, arm64 = containerd_save()
    (root,) = read(data, store).roots
    assert root == Root(digest_of(index), OCI_INDEX, len(index), ("docker.io/library/multi:1", "1"))

    result = plan(store, root, AMD64)
    assert set(result.manifests) == {digest_of(index), amd64.digest}
    assert result.manifests[digest_of(index)].media_type == OCI_INDEX
    assert result.manifests[digest_of(index)].size == len(index)
    assert result.manifests[digest_of(index)].references == [amd64.digest, arm64.digest]
    assert result.manifests[amd64.digest].references == [amd64.config_digest, *amd64.layer_digests]


@pytest.mark.parametrize("with_arm64_manifest", [False, True])
def test_containerd_index_without_the_wanted_child_is_incomplete(
    store: Store, with_arm64_manifest: bool
) -> None:
    data, _, _, _ = containerd_save(with_arm64_manifest=with_arm64_manifest)
    (root,) = read(data, store).roots
    with pytest.raises(IncompleteImage, match="linux/arm64"):
        plan(store, root, ARM64)
    with pytest.raises(IncompleteImage):
        plan(store, root, Platform("linux", "arm64"))


def test_manifest_missing_a_layer_is_incomplete(store: Store) -> None:
    """moby/moby#49473: the export names a manifest whose layer blob it does not contain."""
    image = make_image("lacking")
    blobs = image.blobs()
    del blobs[image.layer_digests[1]]
    (root,) = read(oci_layout(blobs, [descriptor(image.manifest, OCI_MANIFEST)]), store).roots
    with pytest.raises(IncompleteImage, match=image.digest):
        plan(store, root)


def test_index_child_missing_a_layer_is_incomplete(store: Store) -> None:
    amd64 = make_image("child-lacking")
    index = make_index([(amd64, AMD64_JSON)])
    blobs = {**amd64.blobs(), digest_of(index): index}
    del blobs[amd64.config_digest]
    (root,) = read(oci_layout(blobs, [descriptor(index, OCI_INDEX)]), store).roots
    with pytest.raises(IncompleteImage):
        plan(store, root)


def test_root_manifest_absent_or_garbage_is_incomplete(store: Store) -> None:
    image = make_image("absent-root")
    blobs = image.blobs()
    del blobs[image.digest]
    (root,) = read(oci_layout(blobs, [descriptor(image.manifest, OCI_MANIFEST)]), store).roots
    with pytest.raises(IncompleteImage):
        plan(store, root)

    garbage = b"not json at all"
    (root,) = read(
        oci_layout({digest_of(garbage): garbage}, [descriptor(garbage, OCI_MANIFEST)]), store
    ).roots
    with pytest.raises(IncompleteImage):
        plan(store, root)


def test_index_skips_incomplete_and_nested_children(store: Store) -> None:
    amd64 = make_image("skip-amd64")
    attestation = make_image("skip-attestation")
    nested = make_index([(amd64, AMD64_JSON)])
    index = canonical = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_INDEX,
                    "digest": digest_of(nested),
                    "size": len(nested),
                    "platform": AMD64_JSON,
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": amd64.digest,
                    "size": len(amd64.manifest),
                    "platform": AMD64_JSON,
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": attestation.digest,
                    "size": len(attestation.manifest),
                    "platform": {"os": "unknown", "architecture": "unknown"},
                },
            ],
        }
    ).encode()
    blobs = {**amd64.blobs(), **attestation.blobs(), digest_of(nested): nested, digest_of(index): canonical}
    (root,) = read(oci_layout(blobs, [descriptor(index, OCI_INDEX)]), store).roots
    result = plan(store, root)
    assert set(result.manifests) == {digest_of(index), amd64.digest, attestation.digest}


# ---- c. the legacy format -------------------------------------------------------------------------


def repeated_layer_image():
    a = layer_tar({"a.txt": b"A" * 100})
    b = layer_tar({"b.txt": b"B" * 200})
    return make_image("legacy", layers=[a, b, a])


def test_legacy_save_builds_an_oci_manifest(store: Store) -> None:
    image = repeated_layer_image()
    data = legacy_save(image, ["alpine:latest", "alpine:3"])
    links = [m for m in members(data) if m.issym()]
    assert len(links) == 1 and links[0].name.endswith("/layer.tar")

    contents = read(data, store)

    assert contents.layout == "legacy"
    (root,) = contents.roots
    assert root.media_type == OCI_MANIFEST
    assert root.names == ("alpine:latest", "alpine:3")
    body = store.read_blob(root.digest)
    assert body is not None
    assert digest_of(body) == root.digest
    assert len(body) == root.size
    manifest = json.loads(body)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == {
        "mediaType": OCI_CONFIG,
        "digest": image.config_digest,
        "size": len(image.config),
    }
    assert manifest["layers"] == [
        {"mediaType": OCI_LAYER_TAR, "digest": digest_of(layer), "size": len(layer)} for layer in image.layers
    ]
    for digest, blob in image.blobs().items():
        if digest != image.digest:
            assert store.read_blob(digest) == blob
    assert tmp_files(store) == []

    result = plan(store, root)
    assert result.manifests[root.digest].references == [image.config_digest, *image.layer_digests]


def test_legacy_manifest_is_deterministic(tmp_path: Path) -> None:
    image = repeated_layer_image()
    digests = []
    for n in range(2):
        store = Store(tmp_path / f"store{n}")
        store.open()
        (root,) = read(legacy_save(image), store).roots
        digests.append(root.digest)
    assert digests[0] == digests[1]


def test_docker_25_manifest_json_alone_is_read_as_legacy(store: Store) -> None:
    """manifest.json of Docker >= 25 names blobs/sha256/<hex> paths; it works without index.json too."""
    image = make_image("manifest-json-only")
    data = classic_save(image, include_index=False)
    contents = read(data, store)
    assert contents.layout == "legacy"
    manifest = json.loads(store.read_blob(contents.roots[0].digest))
    assert [layer["digest"] for layer in manifest["layers"]] == image.layer_digests


def test_legacy_diff_ids_mismatch(store: Store) -> None:
    image = make_image("mismatch")
    wrong = make_image("mismatch", layers=[layer_tar({"other": b"x"}), *image.layers[1:]])
    # The config says diff_ids of `wrong`, the layer tars are those of `image`.
    forged = type(image)(config=wrong.config, layers=image.layers, manifest=image.manifest)
    with pytest.raises(ExportError, match="diff_ids"):
        read(legacy_save(forged), store)


def test_legacy_missing_layer_file(store: Store) -> None:
    builder = TarBuilder()
    config = make_image("missing").config
    builder.file(f"{hex_of(digest_of(config))}.json", config)
    manifest = [{"Config": f"{hex_of(digest_of(config))}.json", "RepoTags": [], "Layers": ["nope/layer.tar"]}]
    builder.file("manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ExportError, match=r"nope/layer\.tar"):
        read(builder.getvalue(), store)


def test_legacy_config_not_matching_its_name(store: Store) -> None:
    builder = TarBuilder()
    builder.file(f"{'0' * 64}.json", b"{}")
    builder.file("manifest.json", json.dumps([{"Config": f"{'0' * 64}.json", "Layers": []}]).encode())
    with pytest.raises(ExportError):
        read(builder.getvalue(), store)
    assert stored_files(store) == []


def test_legacy_empty_manifest_list(store: Store) -> None:
    with pytest.raises(ExportError, match="no images"):
        read(TarBuilder().file("manifest.json", b"[]").getvalue(), store)


# ---- d. bad streams ------------------------------------------------------------------------------


def test_blob_not_matching_its_name(store: Store) -> None:
    image = make_image("corrupt")
    blobs = image.blobs()
    victim = image.layer_digests[0]
    blobs[victim] = b"these are not the bytes you are looking for"
    data = oci_layout(blobs, [descriptor(image.manifest, OCI_MANIFEST)])
    with pytest.raises(ExportError, match=victim):
        read(data, store)
    assert not store.has_blob(victim)
    assert not store.has_blob(digest_of(blobs[victim]))
    assert tmp_files(store) == []


def test_stream_cut_in_the_middle_of_a_blob(store: Store) -> None:
    image = make_image("truncated", layers=[layer_tar({"big": bytes(range(256)) * 64})])
    data = classic_save(image)
    layer = next(m for m in members(data) if m.name.endswith(hex_of(image.layer_digests[0])))
    cut = data[: layer.offset_data + layer.size // 2]
    with pytest.raises(ExportError):
        read(cut, store)
    assert not store.has_blob(image.layer_digests[0])
    assert tmp_files(store) == []
    for path in stored_files(store):  # whatever came before the cut is complete and verified
        assert digest_of(path.read_bytes()) == f"sha256:{path.name}"


@pytest.mark.parametrize("keep", [0, 100, 511])
def test_stream_cut_in_the_first_header(store: Store, keep: int) -> None:
    data = classic_save(make_image("short"))
    with pytest.raises(ExportError):
        read(data[:keep], store)


def test_stream_without_metadata(store: Store) -> None:
    image = make_image("no-metadata")
    data = oci_layout(image.blobs(), [], include_index=False)
    with pytest.raises(ExportError, match=r"neither index\.json nor manifest\.json"):
        read(data, store)


def test_not_a_tar(store: Store) -> None:
    with pytest.raises(ExportError):
        read(b"\x89PNG" + bytes(2000), store)


@pytest.mark.parametrize(
    "index",
    [b"{broken", json.dumps({"schemaVersion": 2, "manifests": []}).encode()],
    ids=["invalid", "empty"],
)
def test_bad_index_json(store: Store, index: bytes) -> None:
    with pytest.raises(ExportError, match=r"index\.json"):
        read(TarBuilder().file("index.json", index).getvalue(), store)


def test_files_outside_the_layout_are_ignored(store: Store) -> None:
    image = make_image("extra")
    extra = {
        "README": b"hello",
        "blobs/sha256/not-a-digest": b"x",
        "blobs/sha512/" + "0" * 128: b"y",
        "../escape/blobs/sha256/" + "0" * 64: b"z",
        "some/dir/json": b"{}",
    }
    data = classic_save(image, extra_files=extra)
    contents = read(data, store)
    assert contents.roots[0].digest == image.digest
    assert len(stored_files(store)) == 4


# ---- e. choosing among roots; platforms -------------------------------------------------------------


def test_select_root() -> None:
    one = Root("sha256:" + "1" * 64, OCI_MANIFEST, 1, ("docker.io/library/a:1", "1"))
    two = Root("sha256:" + "2" * 64, OCI_MANIFEST, 2, ("docker.io/library/b:2", "2"))
    assert select_root([one], ("anything",)) is one
    assert select_root([one, two], ("docker.io/library/b:2",)) is two
    assert select_root([one, two], ("x", "1")) is one
    with pytest.raises(ExportError, match="2 images"):
        select_root([one, two], ("docker.io/library/c:3",))


def test_select_root_from_a_save_with_two_images(store: Store) -> None:
    first, second = make_image("first"), make_image("second")
    data = oci_layout(
        {**first.blobs(), **second.blobs()},
        [
            descriptor(first.manifest, OCI_MANIFEST, name="docker.io/library/first:1"),
            descriptor(second.manifest, OCI_MANIFEST, name="docker.io/library/second:2"),
        ],
    )
    roots = read(data, store).roots
    assert select_root(roots, ("docker.io/library/second:2",)).digest == second.digest


@pytest.mark.parametrize(
    ("platform", "candidate", "matches"),
    [
        (AMD64, AMD64_JSON, True),
        (AMD64, {"os": "linux", "architecture": "amd64", "variant": "v3"}, True),
        (AMD64, ARM64_JSON, False),
        (AMD64, {"os": "windows", "architecture": "amd64"}, False),
        (AMD64, None, False),
        (AMD64, {}, False),
        (Platform("linux", "arm64"), {"os": "linux", "architecture": "arm64"}, True),
        (Platform("linux", "arm64"), ARM64_JSON, True),
        (ARM64, {"os": "linux", "architecture": "arm64"}, True),
        (Platform("linux", "arm64"), {"os": "linux", "architecture": "arm64", "variant": "v9"}, False),
        (ARM64, {"os": "linux", "architecture": "arm64", "variant": "v9"}, False),
        (Platform("linux", "arm", "v7"), {"os": "linux", "architecture": "arm", "variant": "v7"}, True),
        (Platform("linux", "arm", "v7"), {"os": "linux", "architecture": "arm", "variant": "v6"}, False),
        (Platform("linux", "arm", "v7"), {"os": "linux", "architecture": "arm"}, True),
    ],
)
def test_platform_matches(platform: Platform, candidate: dict | None, matches: bool) -> None:
    assert platform.matches(candidate) is matches


def test_platform_text() -> None:
    assert str(AMD64) == "linux/amd64"
    assert str(ARM64) == "linux/arm64/v8"
    assert json.loads(AMD64.as_json()) == {"os": "linux", "architecture": "amd64"}
    assert json.loads(ARM64.as_json()) == {"os": "linux", "architecture": "arm64", "variant": "v8"}


# ---- f. ThreadedStream ----------------------------------------------------------------------------


async def test_threaded_stream_feeds_a_worker_thread(store: Store) -> None:
    image = make_image("threaded", layers=[layer_tar({"f": bytes(range(256)) * 8192})])  # a 2 MiB layer
    data = classic_save(image)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    stream = ThreadedStream(reader, loop)
    worker = asyncio.ensure_future(asyncio.to_thread(read_save_stream, stream, store))
    for start in range(0, len(data), 300_000):
        reader.feed_data(data[start : start + 300_000])
        await asyncio.sleep(0)
    reader.feed_eof()
    contents = await worker
    stream.close()
    assert contents.roots[0].digest == image.digest
    for digest, blob in image.blobs().items():
        assert store.read_blob(digest) == blob


async def test_threaded_stream_surfaces_a_broken_stream(store: Store) -> None:
    image = make_image("broken", layers=[layer_tar({"f": bytes(range(256)) * 8192})])
    data = classic_save(image)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    stream = ThreadedStream(reader, loop)
    worker = asyncio.ensure_future(asyncio.to_thread(read_save_stream, stream, store))
    reader.feed_data(data[: len(data) // 2])
    await asyncio.sleep(0)
    reader.set_exception(ConnectionResetError("the daemon went away"))
    with pytest.raises(ConnectionResetError, match="went away"):
        await worker
    stream.close()
    assert not store.has_blob(image.layer_digests[0])
    assert tmp_files(store) == []


async def test_threaded_stream_readinto_at_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"abc")
    reader.feed_eof()
    stream = ThreadedStream(reader, asyncio.get_running_loop())
    assert stream.readable()
    assert await asyncio.to_thread(stream.read, 10) == b"abc"
    assert await asyncio.to_thread(stream.read, 10) == b""
    stream.close()


def other_tasks() -> set[asyncio.Task]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()}


async def test_threaded_stream_close_stops_the_pump_when_the_worker_gives_up(store: Store) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"this is not a tar archive" * 100)  # and no EOF: Docker would keep the stream open
    stream = ThreadedStream(reader, asyncio.get_running_loop())
    with pytest.raises(ExportError):
        await asyncio.to_thread(read_save_stream, stream, store)
    assert other_tasks(), "the pump is still waiting for more of the stream"
    stream.close()
    for _ in range(3):
        await asyncio.sleep(0)
    assert other_tasks() == set()


async def test_threaded_stream_close_wakes_a_waiting_worker(store: Store) -> None:
    data = classic_save(make_image("stalled"))
    reader = asyncio.StreamReader()
    reader.feed_data(data[: len(data) // 2])  # Docker stalls: no more data, no EOF
    stream = ThreadedStream(reader, asyncio.get_running_loop())
    worker = asyncio.ensure_future(asyncio.to_thread(read_save_stream, stream, store))
    await asyncio.sleep(0)
    stream.close()  # what Mirror._export does when its task is cancelled
    try:
        done, _ = await asyncio.wait({worker}, timeout=2)
        assert worker in done, "the worker thread is still blocked after close()"
        assert worker.exception() is not None
    finally:
        if not worker.done():
            stream._chunks.put(ConnectionAbortedError("unblocked by the test"))  # free the thread
            await asyncio.wait({worker})
            worker.exception()


def test_stream_cut_between_members_is_caught_by_the_plan(store: Store) -> None:
    """tarfile takes a stream that ends at a member boundary for a complete archive; the plan's
    completeness check is what keeps such an export from being served."""
    image = make_image("cut-between")
    index = {"schemaVersion": 2, "manifests": [descriptor(image.manifest, OCI_MANIFEST, name="x/y:1")]}
    builder = TarBuilder().file("index.json", json.dumps(index).encode())
    for digest, blob in image.blobs().items():
        builder.file(f"blobs/sha256/{hex_of(digest)}", blob)
    data = builder.getvalue()
    last = members(data)[-1]
    cut = data[: last.offset]  # everything up to the last blob's header
    (root,) = read(cut, store).roots
    with pytest.raises(IncompleteImage):
        plan(store, root)


def test_an_export_claims_every_blob_it_relies_on(store: Store) -> None:
    image = make_image("claims")
    data = classic_save(image, "docker.io/library/claims:1")
    claimed: set[str] = set()
    read_save_stream(io.BytesIO(data), store, claimed)
    assert claimed == set(image.blobs())
    # Present already: still claimed, before the export relies on them.
    again: set[str] = set()
    read_save_stream(io.BytesIO(data), store, again)
    assert again == set(image.blobs())


def test_blobs_no_manifest_uses_are_never_written(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker >= 25 adds the legacy per-layer metadata of the older format as blobs no manifest names.
    image = make_image("unused")
    legacy_json = json.dumps({"id": "0" * 64, "created": "2024-01-01T00:00:00Z"}).encode()
    data = classic_save(image, blobs={digest_of(legacy_json): legacy_json})
    written: list[str] = []
    original = Store.writer
    monkeypatch.setattr(Store, "writer", lambda self, *a: written.append("temp") or original(self, *a))

    contents = read(data, store)

    assert contents.blobs_written == 4
    assert len(written) == 4  # no temp file for the unused blob
    assert set(stored_files(store)) == {store.blob_path(Digest.parse(d)) for d in image.blobs()}
    assert not store.has_blob(digest_of(legacy_json))
    assert set(plan(store, contents.roots[0]).manifests) == {image.digest}


def test_a_corrupt_blob_no_manifest_uses_still_rejects_the_export(store: Store) -> None:
    image = make_image("unused-corrupt")
    data = classic_save(image, blobs={digest_of(b"named after this"): b"but these bytes"})
    with pytest.raises(ExportError, match="content hashes to"):
        read(data, store)
