"""What every content source promises (`sources.content.ImageContent`), one set of cases run against each:
the export path (our cache, filled by `docker save` of a fake Docker), Docker's containerd content store
read where it lies (a content-store directory and fake image records), Docker's classic store and Podman's
storage read where they lie (image and layer records, tar-split records, the layers' files). A new source
joins by adding a backend below.

The cases: content that is absent, present (manifests by tag and digest, blobs whose bytes match their
digests), an index only one platform of which is complete, blobs and manifests scoped to the repository
that serves them, and Range requests of a source's blob through the HTTP layer's blob sending.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache.records import Records
from k3d_registry_dockerd.cache.space import FreeSpace
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.common.progress import Transfers
from k3d_registry_dockerd.docker.containerd import Descriptor
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.oci.reference import Repository, parse_repository
from k3d_registry_dockerd.sources.classic import ClassicContent, chain_ids
from k3d_registry_dockerd.sources.containerd import ContainerdContent
from k3d_registry_dockerd.sources.content import Blob, BlobFile, BlobPieces, ImageContent
from k3d_registry_dockerd.sources.exported import ExportedContent
from k3d_registry_dockerd.sources.generated import docker_save_manifest, legacy_manifest
from k3d_registry_dockerd.sources.pieces import read_all
from k3d_registry_dockerd.sources.podman import PodmanContent, big_data_name
from k3d_registry_dockerd.web import blobs

from .fakes import FakeDocker, LocalImage
from .saves import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    descriptor,
    digest_of,
    make_image,
    make_index,
    oci_layout,
    tar_split,
    write_diff_dir,
)
from .test_zerocopy import FakeContainerd

AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
INFO = DaemonInfo("28.5.1", "1.51", Platform("linux", "amd64"), "overlayfs", containerd_store=True)


class Backend(Protocol):
    """A source, and how to put an image where it reads images from."""

    content: ImageContent
    # Whether the store keeps indexes (and so images of several platforms).
    indexes: bool

    def publish(self, ref: str, root: bytes, media_type: str, blobs: dict[str, bytes]) -> dict[str, Any]:
        """Makes `ref` an image whose own manifest or index is `root`, with these other blobs present;
        returns Docker's inspect answer for it."""
        ...

    def served_manifest(self, image: Image) -> bytes:
        """The manifest the source serves for `image` (its own, or one made as the export path makes it)."""
        ...


@dataclass
class ExportedBackend:
    """Our cache, filled by exports of a Docker with the containerd image store (original digests)."""

    store: Store
    docker: FakeDocker = field(default_factory=lambda: FakeDocker(containerd_store=True))
    indexes = True

    def __post_init__(self) -> None:
        metrics = Metrics()
        self.content: ImageContent = ExportedContent(
            self.store,
            self.docker,  # type: ignore[arg-type]
            Records(self.store, metrics),
            Transfers(),
            metrics,
            FreeSpace(self.store.root),
        )

    def publish(self, ref: str, root: bytes, media_type: str, blobs: dict[str, bytes]) -> dict[str, Any]:
        layout = oci_layout({**blobs, digest_of(root): root}, [descriptor(root, media_type, name=ref)])
        image = LocalImage(id=digest_of(root), save=layout)
        # Docker resolves the image's own digest reference too.
        self.docker.images[ref] = self.docker.images[f"{ref.rpartition(':')[0]}@{digest_of(root)}"] = image
        return {"Id": digest_of(root)}

    def served_manifest(self, image: Image) -> bytes:
        return image.manifest


@dataclass
class ContainerdBackend:
    """Docker's containerd image store: a content-store directory and containerd's image records."""

    root: Path
    containerd: FakeContainerd = field(default_factory=FakeContainerd)
    indexes = True

    def __post_init__(self) -> None:
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.blobs_dir.mkdir(parents=True)
        metrics = Metrics()
        self.content: ImageContent = ContainerdContent(self.containerd, self.blobs_dir, metrics)  # type: ignore[arg-type]

    def publish(self, ref: str, root: bytes, media_type: str, blobs: dict[str, bytes]) -> dict[str, Any]:
        for data in (*blobs.values(), root):
            (self.blobs_dir / digest_of(data)[7:]).write_bytes(data)
        self.containerd.records[ref] = Descriptor(media_type, digest_of(root), len(root))
        return {"Id": digest_of(root)}

    def served_manifest(self, image: Image) -> bytes:
        return image.manifest


@dataclass
class ClassicBackend:
    """Docker's classic store (overlay2): the config in imagedb, each layer's record under its chain ID
    with its tar-split record, the layer's files in its diff directory."""

    root: Path
    indexes = False
    # Each layer's diff directory, by diff ID.
    diff_dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = self.root / "image" / "overlay2"
        (self.images / "imagedb" / "content" / "sha256").mkdir(parents=True)
        self.content: ImageContent = ClassicContent(self.root, "overlay2", Metrics())

    def publish(self, ref: str, root: bytes, media_type: str, blobs: dict[str, bytes]) -> dict[str, Any]:
        manifest = json.loads(root)
        config = blobs[manifest["config"]["digest"]]
        (self.images / "imagedb" / "content" / "sha256" / digest_of(config)[7:]).write_bytes(config)
        diff_ids = [layer["digest"] for layer in manifest["layers"]]
        for chain, diff_id in zip(chain_ids(diff_ids), diff_ids, strict=True):
            record = self.images / "layerdb" / "sha256" / chain[7:]
            record.mkdir(parents=True, exist_ok=True)
            cache_id = hashlib.sha256(f"cache {chain}".encode()).hexdigest()
            (record / "diff").write_text(diff_id)
            (record / "cache-id").write_text(cache_id)
            tar_record, files = tar_split(blobs[diff_id])
            (record / "tar-split.json.gz").write_bytes(tar_record)
            diff = self.diff_dirs[diff_id] = self.root / "overlay2" / cache_id / "diff"
            diff.mkdir(parents=True, exist_ok=True)
            write_diff_dir(diff, files)
        return {"Id": digest_of(config)}

    def served_manifest(self, image: Image) -> bytes:
        layers = [(digest_of(layer), len(layer)) for layer in image.layers]
        return docker_save_manifest((image.config_digest, len(image.config)), layers)


@dataclass
class PodmanBackend:
    """Podman's storage (overlay): images.json with the config as a big-data file, layers.json with each
    layer's parent, digest and length, its tar-split record beside, its files in overlay/<id>/diff."""

    root: Path
    indexes = False
    # Each layer's diff directory, by diff ID.
    diff_dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("overlay-images", "overlay-layers"):
            (self.root / name).mkdir(parents=True)
            (self.root / name / f"{name.partition('-')[2]}.json").write_text("[]")
        self.content: ImageContent = PodmanContent(self.root, "overlay", Metrics())

    def publish(self, ref: str, root: bytes, media_type: str, blobs: dict[str, bytes]) -> dict[str, Any]:
        manifest = json.loads(root)
        config = blobs[manifest["config"]["digest"]]
        layers_json = self.root / "overlay-layers" / "layers.json"
        known = json.loads(layers_json.read_text())
        parent = None
        for number, layer in enumerate(manifest["layers"]):
            layer_id = hashlib.sha256(f"{ref} {number} {layer['digest']}".encode()).hexdigest()
            data = blobs[layer["digest"]]
            record, files = tar_split(data)
            (self.root / "overlay-layers" / f"{layer_id}.tar-split.gz").write_bytes(record)
            diff = self.diff_dirs[layer["digest"]] = self.root / "overlay" / layer_id / "diff"
            diff.mkdir(parents=True)
            write_diff_dir(diff, files)
            entry = {"id": layer_id, "diff-digest": layer["digest"], "diff-size": len(data)}
            known.append({**entry, "parent": parent} if parent else entry)
            parent = layer_id
        layers_json.write_text(json.dumps(known))
        image_id = digest_of(config)
        images_json = self.root / "overlay-images" / "images.json"
        images = json.loads(images_json.read_text())
        images.append({"id": image_id[7:], "layer": parent, "names": [ref], "big-data-names": [image_id]})
        images_json.write_text(json.dumps(images))
        (self.root / "overlay-images" / image_id[7:]).mkdir()
        (self.root / "overlay-images" / image_id[7:] / big_data_name(image_id)).write_bytes(config)
        return {"Id": image_id}

    def served_manifest(self, image: Image) -> bytes:
        layers = [(digest_of(layer), len(layer)) for layer in image.layers]
        return legacy_manifest((image.config_digest, len(image.config)), layers)


@pytest.fixture(params=["exported", "containerd", "classic", "podman"])
def backend(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> Backend:
    if request.param == "exported":
        return ExportedBackend(store)
    if request.param == "classic":
        return ClassicBackend(tmp_path / "docker")
    if request.param == "podman":
        return PodmanBackend(tmp_path / "storage")
    return ContainerdBackend(tmp_path / "content")


APP = parse_repository("team/app", "docker.io")
OTHER = parse_repository("team/other", "docker.io")


def ref(repo: Repository, tag: str) -> str:
    return repo.docker_ref(tag)


@dataclass
class Published:
    image: Image
    inspect: dict[str, Any]


def publish_image(backend: Backend, repo: Repository, tag: str, seed: str) -> Published:
    image = make_image(seed)
    blobs = {d: data for d, data in image.blobs().items() if d != image.digest}
    return Published(image, backend.publish(ref(repo, tag), image.manifest, OCI_MANIFEST, blobs))


def file_digest(found: Blob) -> str:
    if isinstance(found, BlobFile):
        data = found.path.read_bytes()
    else:
        data = b"".join(read_all(found.pieces(0, found.size, None)))
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


async def served_blob(content: ImageContent, repo: Repository, digest: str) -> Blob | None:
    found = await content.blob(repo, digest, INFO)
    if isinstance(found, BlobPieces) and found.verify is not None:
        # What the HTTP layer has done by the time it sent a blob not verified yet.
        assert await found.verify()
    return found


# ---- absent -----------------------------------------------------------------------------------------


async def test_nothing_is_served_that_no_image_of_the_repository_holds(backend: Backend) -> None:
    unknown = digest_of(b"no image has this")
    assert await backend.content.by_digest(APP, unknown, None, INFO) is None
    assert await backend.content.blob(APP, unknown, INFO) is None


# ---- present ----------------------------------------------------------------------------------------


async def test_an_image_is_served_by_tag_and_digest_with_its_blobs(backend: Backend) -> None:
    published = publish_image(backend, APP, "v1", "present")
    image, manifest = published.image, backend.served_manifest(published.image)
    served = await backend.content.by_tag(APP, "v1", published.inspect, INFO, None)
    assert served is not None
    assert (served.digest, served.media_type, served.body) == (digest_of(manifest), OCI_MANIFEST, manifest)
    # Asked by digest, with or without Docker's answer for that digest.
    for inspect in (published.inspect, None):
        again = await backend.content.by_digest(APP, served.digest, inspect, INFO)
        assert again is not None and again.body == manifest
    for digest in (image.config_digest, *image.layer_digests):
        found = await served_blob(backend.content, APP, digest)
        assert found is not None and found.digest == digest and file_digest(found) == digest


# ---- an index only partly present -------------------------------------------------------------------


async def test_an_index_is_served_with_its_complete_child_and_not_the_absent_one(backend: Backend) -> None:
    if not backend.indexes:
        pytest.skip("this store keeps no indexes")
    mine, foreign = make_image("partial-amd64"), make_image("partial-arm64", arch="arm64")
    index = make_index([(mine, AMD64), (foreign, ARM64)])
    inspect = backend.publish(ref(APP, "multi"), index, OCI_INDEX, mine.blobs())
    served = await backend.content.by_tag(APP, "multi", inspect, INFO, None)
    assert served is not None and (served.digest, served.body) == (digest_of(index), index)
    # containerd asks for the children by digest next; Docker resolves none of them to an image.
    child = await backend.content.by_digest(APP, mine.digest, None, INFO)
    assert child is not None and child.body == mine.manifest
    assert await backend.content.by_digest(APP, foreign.digest, None, INFO) is None
    assert await backend.content.blob(APP, foreign.layer_digests[0], INFO) is None
    found = await served_blob(backend.content, APP, mine.layer_digests[0])
    assert found is not None and file_digest(found) == mine.layer_digests[0]


# ---- repository scoping -----------------------------------------------------------------------------


async def test_a_repository_serves_only_what_its_own_manifests_reference(backend: Backend) -> None:
    published = publish_image(backend, APP, "v1", "scoped")
    served = await backend.content.by_tag(APP, "v1", published.inspect, INFO, None)
    assert served is not None
    image = published.image
    assert await backend.content.blob(OTHER, image.layer_digests[0], INFO) is None
    assert await backend.content.by_digest(OTHER, served.digest, None, INFO) is None
    assert await backend.content.blob(APP, image.layer_digests[0], INFO) is not None


async def test_an_image_asked_for_by_digest_first_is_served(backend: Backend) -> None:
    """A digest-pinned pull: Docker resolves the digest to its image before anything was served."""
    published = publish_image(backend, APP, "v1", "pinned")
    image, manifest = published.image, backend.served_manifest(published.image)
    served = await backend.content.by_digest(APP, digest_of(manifest), published.inspect, INFO)
    assert served is not None and served.body == manifest
    assert await backend.content.blob(APP, image.config_digest, INFO) is not None


# ---- Range, through the HTTP layer ------------------------------------------------------------------


@pytest.fixture
def blob_client(aiohttp_client: Any, backend: Backend) -> Iterator[Any]:
    sender = blobs.BlobSender()

    async def start() -> TestClient:
        async def send(request: web.Request) -> web.StreamResponse:
            found = await backend.content.blob(APP, request.match_info["digest"], INFO)
            if found is None:
                raise web.HTTPNotFound()
            return await sender.send(request, found, {"Docker-Content-Digest": found.digest})

        app = web.Application()
        app.router.add_get("/{digest}", send)
        return await aiohttp_client(app)

    yield start
    sender.close()


async def test_part_of_a_blob_is_sent_as_asked_and_all_of_it_again(
    backend: Backend, blob_client: Any
) -> None:
    published = publish_image(backend, APP, "v1", "ranged")
    assert await backend.content.by_tag(APP, "v1", published.inspect, INFO, None) is not None
    layer = published.image.layers[0]
    digest = digest_of(layer)
    client = await blob_client()
    partial = await client.get(f"/{digest}", headers={"Range": "bytes=10-19"})
    assert partial.status == 206 and await partial.read() == layer[10:20]
    assert partial.headers["Content-Range"] == f"bytes 10-19/{len(layer)}"
    whole = await client.get(f"/{digest}")
    assert whole.status == 200 and await whole.read() == layer
    tail = await client.get(f"/{digest}", headers={"Range": "bytes=-5"})
    assert tail.status == 206 and await tail.read() == layer[-5:]
