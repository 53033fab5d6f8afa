"""Zero-copy serving of Docker's containerd image store, over the HTTP API, with a fake containerd (image
records in memory, a real content-store directory) and a fake Docker."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.docker.containerd import ContainerdUnavailable, Descriptor
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.sources.containerd import ContainerdContent
from k3d_registry_dockerd.sources.discovery import (
    InPlaceConfig,
    InPlaceDiscovery,
    candidate_addresses,
    discover,
)
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker, LocalImage
from .saves import OCI_INDEX, Image, digest_of, make_image, make_index

NAME = "docker.io/team/app"
REF = f"{NAME}:dev"


class FakeContainerd:
    """The image records of one namespace; `down` makes every call fail as an unreachable socket."""

    namespace = "moby"

    def __init__(self) -> None:
        self.records: dict[str, Descriptor] = {}
        self.down = False
        self.calls: list[str] = []

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise ContainerdUnavailable("containerd at /fake.sock: unavailable: connection refused")

    async def image(self, name: str) -> Descriptor | None:
        self._call(f"get {name}")
        return self.records.get(name)

    async def images(self) -> dict[str, Descriptor]:
        self._call("list")
        return dict(self.records)

    async def close(self) -> None:
        return None


class World:
    def __init__(self, root: Path, docker: FakeDocker, containerd: FakeContainerd, store: Store) -> None:
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)
        self.docker = docker
        self.containerd = containerd
        self.store = store

    def put(self, data: bytes) -> str:
        digest = digest_of(data)
        (self.blobs / digest[7:]).write_bytes(data)
        return digest

    def add(self, name: str, image: Image, *, index: bytes | None = None, skip: tuple[str, ...] = ()) -> str:
        """An image in the content store under `name`, as Docker's containerd store holds it: its
        target is the index when given, else the manifest, and Docker's image ID is that digest."""
        for digest, data in image.blobs().items():
            if digest not in skip:
                self.put(data)
        target = self.put(index) if index is not None else image.digest
        media_type = OCI_INDEX if index is not None else image.media_type
        size = len(index) if index is not None else len(image.manifest)
        self.containerd.records[name] = Descriptor(media_type, target, size)
        self.docker.images[name] = LocalImage(id=target, save=b"")
        return target


@pytest.fixture
def world(tmp_path: Path, store: Store) -> World:
    return World(tmp_path / "content", FakeDocker(containerd_store=True), FakeContainerd(), store)


@pytest.fixture
async def client(aiohttp_client: Any, world: World) -> TestClient:
    metrics = Metrics()
    registry = assemble(world.store, world.docker, metrics=metrics, in_place=InPlaceConfig())  # type: ignore[arg-type]
    registry.discovery.content = ContainerdContent(world.containerd, world.blobs, metrics)  # type: ignore[arg-type]
    # What these tests do to the content store must not race the verification of its recent images at start.
    assert registry.verifier is not None
    registry.verifier.recent = 0
    return await aiohttp_client(create_app(registry))


async def get(client: TestClient, path: str, **headers: str) -> tuple[int, bytes, Any]:
    async with client.get(path, headers=headers) as response:
        return response.status, await response.read(), response.headers


async def test_a_tag_is_served_from_the_content_store_without_an_export(
    client: TestClient, world: World
) -> None:
    image = make_image("zc")
    world.add(REF, image)
    status, body, headers = await get(client, "/v2/team/app/manifests/dev")
    assert status == 200 and body == image.manifest
    assert headers["Docker-Content-Digest"] == image.digest
    for digest, data in image.blobs().items():
        status, blob, _ = await get(client, f"/v2/team/app/blobs/{digest}")
        assert (status, blob) == (200, data)
    # Verified once: served again from the file as it is (sendfile), still the same bytes.
    status, blob, _ = await get(client, f"/v2/team/app/blobs/{image.layer_digests[0]}")
    assert (status, blob) == (200, image.layers[0])
    assert world.docker.saves == []
    assert world.store.records() == []


async def test_docker_s_descriptor_saves_asking_containerd(client: TestClient, world: World) -> None:
    image = make_image("described")
    world.add(REF, image)
    described = {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}
    world.docker.images[REF].inspect["Descriptor"] = described
    status, body, _ = await get(client, "/v2/team/app/manifests/dev")
    assert (status, body) == (200, image.manifest)
    assert world.containerd.calls == []


async def test_a_rebuilt_tag_is_served_fresh(client: TestClient, world: World) -> None:
    world.add(REF, make_image("one"))
    assert (await get(client, "/v2/team/app/manifests/dev"))[0] == 200
    rebuilt = make_image("two")
    world.add(REF, rebuilt)
    status, body, _ = await get(client, "/v2/team/app/manifests/dev")
    assert (status, body) == (200, rebuilt.manifest)


async def test_blobs_of_other_repositories_are_not_served(client: TestClient, world: World) -> None:
    mine, theirs = make_image("mine"), make_image("theirs")
    world.add(REF, mine)
    world.add("docker.io/team/secret:v1", theirs)
    assert (await get(client, "/v2/team/app/manifests/dev"))[0] == 200
    status, _, _ = await get(client, f"/v2/team/app/blobs/{theirs.layer_digests[0]}")
    assert status == 404
    status, _, _ = await get(client, f"/v2/team/app/manifests/{theirs.digest}")
    assert status == 404


async def test_after_a_restart_a_blob_request_finds_the_repository_s_images(
    client: TestClient, world: World
) -> None:
    image = make_image("restart")
    world.add(REF, image)
    status, blob, _ = await get(client, f"/v2/team/app/blobs/{image.layer_digests[1]}")
    assert (status, blob) == (200, image.layers[1])


async def test_a_digest_pinned_pull_of_an_index_child(client: TestClient, world: World) -> None:
    amd64, arm64 = make_image("amd"), make_image("arm", arch="arm64")
    index = make_index(
        [(amd64, {"os": "linux", "architecture": "amd64"}), (arm64, {"os": "linux", "architecture": "arm64"})]
    )
    # Docker pulled only its own platform: the arm64 child is listed but not held.
    target = world.add("docker.io/library/multi:1", amd64, index=index)
    status, body, headers = await get(client, f"/v2/library/multi/manifests/{target}?ns=docker.io")
    assert (status, body) == (200, index)
    assert headers["Content-Type"] == OCI_INDEX
    status, body, _ = await get(client, f"/v2/library/multi/manifests/{amd64.digest}?ns=docker.io")
    assert (status, body) == (200, amd64.manifest)
    # The foreign child: 404, and no pull through Docker for it.
    status, _, _ = await get(client, f"/v2/library/multi/manifests/{arm64.digest}?ns=docker.io")
    assert status == 404
    assert world.docker.pulls == []


async def test_bytes_that_do_not_match_their_digest_are_never_completed(
    client: TestClient, world: World
) -> None:
    layer = os.urandom(300 << 10)
    image = make_image("bad", layers=[layer])
    world.add(REF, image)
    (world.blobs / image.layer_digests[0][7:]).write_bytes(layer[:-1] + bytes([layer[-1] ^ 1]))
    assert (await get(client, "/v2/team/app/manifests/dev"))[0] == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(client, f"/v2/team/app/blobs/{image.layer_digests[0]}")
    metrics = await (await client.get("/metrics")).text()
    assert "k3d_registry_digest_mismatches_total 1.0" in metrics
    # A range of a file not yet verified is checked whole first.
    status, _, _ = await get(client, f"/v2/team/app/blobs/{image.layer_digests[0]}", Range="bytes=0-9")
    assert status == 404


async def test_a_range_of_an_unverified_blob(client: TestClient, world: World) -> None:
    image = make_image("range", layers=[os.urandom(200 << 10)])
    world.add(REF, image)
    assert (await get(client, "/v2/team/app/manifests/dev"))[0] == 200
    status, body, headers = await get(
        client, f"/v2/team/app/blobs/{image.layer_digests[0]}", Range="bytes=10-19"
    )
    assert (status, body) == (206, image.layers[0][10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{len(image.layers[0])}"


async def test_a_blob_gone_from_the_content_store_is_404_and_the_tag_resolves_again(
    client: TestClient, world: World
) -> None:
    image = make_image("gone")
    world.add(REF, image)
    assert (await get(client, "/v2/team/app/manifests/dev"))[0] == 200
    (world.blobs / image.layer_digests[0][7:]).unlink()
    assert (await get(client, f"/v2/team/app/blobs/{image.layer_digests[0]}"))[0] == 404
    # The image is incomplete now: the tag goes to the export path (here: Docker's save stream).
    world.docker.images[REF] = LocalImage(id=image.digest, save=b"not a tar")
    status, _, _ = await get(client, "/v2/team/app/manifests/dev")
    assert world.docker.saves == [REF]
    assert status >= 400


async def test_an_image_with_blobs_containerd_lacks_is_exported(
    client: TestClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    image = make_image("legacy")
    world.add(REF, image, skip=(image.layer_digests[1],))
    world.docker.images[REF] = LocalImage(id=image.digest, save=b"")
    await get(client, "/v2/team/app/manifests/dev")
    assert world.docker.saves == [REF]
    assert "exporting it from Docker, which makes Docker produce them" in caplog.text


async def test_containerd_unreachable_falls_back_to_the_export(
    client: TestClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.add(REF, make_image("down"))
    world.containerd.down = True
    await get(client, "/v2/team/app/manifests/dev")
    assert world.docker.saves == [REF]
    assert "asking containerd failed, exporting from Docker instead" in caplog.text


def _info(**changes: Any) -> DaemonInfo:
    base = DaemonInfo("28.5.2", "1.51", Platform("linux", "amd64"), "overlayfs", True)
    return DaemonInfo(**{**base.__dict__, **changes})


def test_where_to_look_for_containerd() -> None:
    reported = _info(containerd_address="/run/docker/containerd/containerd.sock")
    assert [a for a, _ in candidate_addresses(InPlaceConfig(), reported)] == [
        "/run/docker/containerd/containerd.sock",
        "/var/run/docker/containerd/containerd.sock",
        "/run/containerd/containerd.sock",
    ]
    given = InPlaceConfig(address="/x/containerd.sock")
    assert candidate_addresses(given, reported) == [("/x/containerd.sock", "given")]


async def test_discovery_says_why_not(tmp_path: Path) -> None:
    config = InPlaceConfig(address=str(tmp_path / "missing.sock"))
    found = await discover(config, _info(), Metrics())
    assert isinstance(found, str)
    assert "missing.sock" in found


async def test_the_classic_store_is_not_read_through_containerd(tmp_path: Path) -> None:
    zero_copy = InPlaceDiscovery(InPlaceConfig(), Metrics())
    assert await zero_copy.source(_info(containerd_store=False, storage_driver="overlay2")) is None
    assert zero_copy.off_reason is not None and "DockerRootDir" in zero_copy.off_reason
    assert zero_copy.describe().startswith("serving Docker's classic store in place is off")


def test_digests_in_fixtures_are_sha256() -> None:
    assert digest_of(b"x") == f"sha256:{hashlib.sha256(b'x').hexdigest()}"
