"""What gets loaded into Docker after a push, and the `docker save`-shaped archive it is sent as."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from typing import Any

import pytest

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.oci.mediatypes import OCI_INDEX, OCI_MANIFEST
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.push.docker_load import image_archive, load_into_docker, loadable_manifest

from .fakes import FakeDocker
from .saves import (
    DOCKER_MANIFEST,
    Image,
    canonical_json,
    digest_of,
    hex_of,
    layer_tar,
    make_image,
    make_index,
)

AMD64 = Platform("linux", "amd64")
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}


def put(store: Store, *images: Image) -> None:
    for image in images:
        for data in image.blobs().values():
            store.put_bytes(data)


def artifact() -> bytes:
    """What `oras push` writes: an image manifest whose config is not an image config."""
    blob = b"not a layer"
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.thing",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest_of(b"{}"),
                "size": 2,
            },
            "layers": [{"mediaType": "text/plain", "digest": digest_of(blob), "size": len(blob)}],
        }
    )


def test_an_image_of_the_daemons_platform_is_loaded(store: Store) -> None:
    image = make_image("app")
    put(store, image)
    assert loadable_manifest(store.read_blob, image.digest, OCI_MANIFEST, AMD64) == (image.digest, "")


def test_a_docker_schema2_image_is_loaded(store: Store) -> None:
    image = make_image("app", docker_media_types=True)
    put(store, image)
    assert loadable_manifest(store.read_blob, image.digest, DOCKER_MANIFEST, AMD64) == (image.digest, "")


def test_an_index_loads_the_child_for_the_platform(store: Store) -> None:
    amd64, arm64 = make_image("amd64"), make_image("arm64", arch="arm64")
    put(store, amd64, arm64)
    index = store.put_bytes(make_index([(arm64, ARM64), (amd64, {"os": "linux", "architecture": "amd64"})]))
    assert loadable_manifest(store.read_blob, index, OCI_INDEX, AMD64) == (amd64.digest, "")


def test_an_index_prefers_the_exact_variant(store: Store) -> None:
    v7, v6 = make_image("v7", arch="arm"), make_image("v6", arch="arm")
    put(store, v7, v6)
    index = store.put_bytes(
        make_index(
            [
                (v6, {"os": "linux", "architecture": "arm", "variant": "v6"}),
                (v7, {"os": "linux", "architecture": "arm", "variant": "v7"}),
            ]
        )
    )
    chosen, _ = loadable_manifest(store.read_blob, index, OCI_INDEX, Platform("linux", "arm", "v7"))
    assert chosen == v7.digest


def test_an_index_without_the_platform_is_not_loaded(store: Store) -> None:
    arm64 = make_image("arm64", arch="arm64")
    put(store, arm64)
    index = store.put_bytes(make_index([(arm64, ARM64)]))
    assert loadable_manifest(store.read_blob, index, OCI_INDEX, AMD64) == (
        None,
        "the index has no image for linux/amd64 (it lists linux/arm64/v8)",
    )


def test_an_index_whose_child_was_not_pushed_is_not_loaded(store: Store) -> None:
    amd64 = make_image("amd64")
    index = store.put_bytes(make_index([(amd64, {"os": "linux", "architecture": "amd64"})]))
    assert loadable_manifest(store.read_blob, index, OCI_INDEX, AMD64) == (
        None,
        f"its manifest for linux/amd64 ({amd64.digest}) is not in the store",
    )


def test_an_artifact_is_not_loaded(store: Store) -> None:
    digest = store.put_bytes(artifact())
    chosen, reason = loadable_manifest(store.read_blob, digest, OCI_MANIFEST, AMD64)
    assert chosen is None
    assert reason.startswith("not a container image")


def test_an_image_of_another_platform_is_not_loaded(store: Store) -> None:
    image = make_image("arm64", arch="arm64")
    put(store, image)
    assert loadable_manifest(store.read_blob, image.digest, OCI_MANIFEST, AMD64) == (
        None,
        "a foreign platform linux/arm64",
    )


async def archive_of(store: Store, digest: str, ref: str) -> bytes:
    return b"".join([chunk async for chunk in image_archive(store, digest, ref)])


def read_archive(data: bytes) -> dict[str, bytes | None]:
    """Members by name; None for directories. Strict: a malformed archive raises."""
    found: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", errorlevel=2) as tar:
        for member in tar:
            source = tar.extractfile(member)
            found[member.name] = source.read() if source else None
    return found


async def test_the_archive_has_the_shape_of_docker_save(store: Store) -> None:
    # One layer gzip-compressed, one repeated: both go in once, as pushed.
    plain = layer_tar({"a.txt": b"a" * 5000})
    gzipped = gzip.compress(layer_tar({"b.txt": b"b" * 700}), mtime=0)
    image = make_image("app", layers=[gzipped, plain, plain])
    put(store, image)

    data = await archive_of(store, image.digest, "docker.io/library/app:dev")

    assert len(data) % tarfile.RECORDSIZE == 0
    members = read_archive(data)
    # Blobs first (manifest, config, layers), then the metadata, as Docker writes them.
    blobs = {f"blobs/sha256/{hex_of(d)}": body for d, body in image.blobs().items()}
    assert list(members) == ["blobs", "blobs/sha256", *blobs, "index.json", "manifest.json", "oci-layout"]
    assert members == {
        "blobs": None,
        "blobs/sha256": None,
        **blobs,
        "index.json": members["index.json"],
        "manifest.json": members["manifest.json"],
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
    }
    assert json.loads(members["index.json"] or b"") == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": len(image.manifest),
                "annotations": {
                    "io.containerd.image.name": "docker.io/library/app:dev",
                    "org.opencontainers.image.ref.name": "dev",
                },
            }
        ],
    }
    layer_paths = [f"blobs/sha256/{hex_of(d)}" for d in image.layer_digests]
    assert json.loads(members["manifest.json"] or b"") == [
        {
            "Config": f"blobs/sha256/{hex_of(image.config_digest)}",
            "RepoTags": ["docker.io/library/app:dev"],
            "Layers": layer_paths,
        }
    ]


async def test_the_archive_streams_large_blobs_in_chunks(store: Store) -> None:
    big = layer_tar({"big.bin": bytes(range(256)) * (12 << 12)})  # 12 MiB
    image = make_image("big", layers=[big])
    put(store, image)
    chunks = [chunk async for chunk in image_archive(store, image.digest, "127.0.0.1:5000/big/app:v1")]
    assert max(len(chunk) for chunk in chunks) <= 1 << 20
    members = read_archive(b"".join(chunks))
    assert members[f"blobs/sha256/{hex_of(image.layer_digests[0])}"] == big
    index = json.loads(members["index.json"] or b"")
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "127.0.0.1:5000/big/app:v1"


async def test_the_archive_refuses_to_start_without_all_blobs(store: Store) -> None:
    image = make_image("app")
    store.put_bytes(image.manifest)
    store.put_bytes(image.config)
    with pytest.raises(FileNotFoundError, match=image.layer_digests[0]):
        await archive_of(store, image.digest, "app:1")


async def test_load_into_docker_loads_and_returns_the_image_id(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    image = make_image("app")
    put(store, image)
    docker: Any = FakeDocker()
    with caplog.at_level(logging.INFO, "k3d_registry_dockerd.push"):
        image_id = await load_into_docker(
            store, docker, "docker.io/library/app:dev", image.digest, OCI_MANIFEST
        )
    assert image_id == image.config_digest
    assert docker.loads == ["docker.io/library/app:dev"]
    assert f"loaded docker.io/library/app:dev into Docker as {image_id}" in caplog.text


async def test_load_into_docker_skips_what_docker_cannot_run(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    image = make_image("arm64", arch="arm64")
    put(store, image)
    docker: Any = FakeDocker()
    with caplog.at_level(logging.INFO, "k3d_registry_dockerd.push"):
        assert await load_into_docker(store, docker, "app:1", image.digest, OCI_MANIFEST) is None
    assert docker.loads == []
    assert "not loading app:1 into Docker: a foreign platform linux/arm64" in caplog.text


async def test_load_into_docker_skips_an_image_with_blobs_never_pushed(store: Store) -> None:
    image = make_image("app")
    store.put_bytes(image.manifest)
    store.put_bytes(image.config)
    docker: Any = FakeDocker()
    assert await load_into_docker(store, docker, "app:1", image.digest, OCI_MANIFEST) is None
    assert docker.loads == []
