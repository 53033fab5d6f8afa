"""Served while the daemon is down: what was served (or verified ahead) from Docker's classic store or
Podman's storage is served again from their files while the daemon cannot be asked, across the registry's
restarts; tags never seen are not. Over the HTTP API with fake daemons whose stores are real directories;
and the pure parts: the daemon's records of its tags, and what the registry keeps of what it knew."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import Credentials, DaemonInfo
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.sources import known as known_module
from k3d_registry_dockerd.sources.discovery import InPlaceConfig
from k3d_registry_dockerd.sources.known import STATE_FILE, KnownImages
from k3d_registry_dockerd.sources.storetags import TagRecord, classic_tags, podman_tags
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble
from k3d_registry_dockerd.web.routes import REGISTRY

from .fakes import FakeDocker, LocalImage
from .saves import Image, digest_of, make_image
from .test_api import basic_auth, error_of
from .test_classic import until
from .test_sources_contract import ClassicBackend, PodmanBackend

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
DOWN_LINE = "serving from Docker's classic store while Docker is down"
ID_A, ID_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


class StoreDocker(FakeDocker):
    """Docker on the classic store (or Podman) whose images lie in `root`; `tags` is what its own record
    of tags (repositories.json, images.json) says, written by `tag`."""

    def __init__(self, root: Path, *, podman: bool = False) -> None:
        super().__init__(product="Podman Engine" if podman else "Docker Engine")
        self.root = root
        self.podman = podman
        self.backend = PodmanBackend(root) if podman else ClassicBackend(root)

    async def daemon(self) -> DaemonInfo:
        info = await super().daemon()
        self.last_info = DaemonInfo(
            "5.4.2" if self.podman else "28.5.2",
            "1.41" if self.podman else "1.51",
            info.platform,
            "overlay" if self.podman else "overlay2",
            False,
            product=self.product,
            root_dir=str(self.root),
        )
        return self.last_info

    def build(self, ref: str, seed: str) -> Image:
        """`docker build -t ref`: the image in the store, the tag moved to it in Docker and its record."""
        image = make_image(seed)
        blobs = {d: data for d, data in image.blobs().items() if d != image.digest}
        image_id = self.backend.publish(ref, image.manifest, image.media_type, blobs)["Id"]
        self.images[ref] = LocalImage(image_id, b"", image)
        self.write_tags()
        return image

    def write_tags(self) -> None:
        """The daemon's own record of its tags, as it writes it: Docker's familiar names, Podman's full."""
        if self.podman:
            path = self.root / "overlay-images" / "images.json"
            images = json.loads(path.read_text())
            for entry in images:
                entry["names"] = [ref for ref, image in self.images.items() if image.id[7:] == entry["id"]]
            path.write_text(json.dumps(images))
            return
        repositories: dict[str, dict[str, str]] = {}
        for ref, image in self.images.items():
            name, _, tag = ref.rpartition(":")
            familiar = name.removeprefix("docker.io/").removeprefix("library/")
            repositories.setdefault(familiar, {})[f"{familiar}:{tag}"] = image.id
        path = self.root / "image" / "overlay2" / "repositories.json"
        path.write_text(json.dumps({"Repositories": repositories}))

    def remove(self, ref: str) -> None:
        self.images.pop(ref)
        self.write_tags()


@pytest.fixture
def docker(tmp_path: Path) -> StoreDocker:
    return StoreDocker(tmp_path / "docker")


async def started(aiohttp_client: Any, store: Store, docker: FakeDocker) -> TestClient:
    registry = assemble(store, docker, in_place=InPlaceConfig())
    # Only what the tests serve is known: the store's recent images verified at start would be too.
    assert registry.verifier is not None
    registry.verifier.recent = 0
    return await aiohttp_client(create_app(registry))


async def pulled(client: TestClient, name: str, ref: str, image: Image | None = None) -> bytes:
    """The manifest, then every blob it names, each hashing to its digest."""
    response = await client.get(f"/v2/{name}/manifests/{ref}", headers=ACCEPT)
    assert response.status == 200, await response.text()
    body = await response.read()
    manifest = json.loads(body)
    for digest in [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]:
        blob = await client.get(f"/v2/{name}/blobs/{digest}")
        assert blob.status == 200 and digest_of(await blob.read()) == digest
    if image is not None:
        assert manifest["config"]["digest"] == image.config_digest
    return body


async def status(client: TestClient) -> dict[str, Any]:
    return await (await client.get("/status.json")).json()


# ---- the daemon's own records of its tags ------------------------------------------------------------


def test_docker_s_repositories_json_gives_full_names_and_leaves_digests_out() -> None:
    raw = json.dumps(
        {
            "Repositories": {
                "app": {"app:dev": ID_A, f"app@sha256:{'c' * 64}": ID_A},
                "127.0.0.1:5001/team/app": {"127.0.0.1:5001/team/app:2": ID_B},
                "team/x": {"team/x:3": "not an image ID"},
            }
        }
    ).encode()
    assert classic_tags(raw) == {"docker.io/library/app:dev": ID_A, "127.0.0.1:5001/team/app:2": ID_B}
    assert classic_tags(b'{"Repositories": {}}') == {}
    for junk in (b"[]", b'{"Repositories": {"app": []}}', b"{not json"):
        with pytest.raises(ValueError):
            classic_tags(junk)


def test_podman_s_images_json_gives_every_name_of_every_image() -> None:
    raw = json.dumps(
        [
            {"id": "a" * 64, "names": ["localhost/app:dev", "docker.io/library/app:1"]},
            {"id": "b" * 64, "layer": "x"},
        ]
    ).encode()
    assert podman_tags(raw) == {"localhost/app:dev": ID_A, "docker.io/library/app:1": ID_A}
    for junk in (b'[{"names": ["a:1"]}]', b'{"id": 1}', b"[1]"):
        with pytest.raises(ValueError):
            podman_tags(junk)


def test_a_tag_record_is_parsed_again_only_when_its_file_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parsed: list[bytes] = []

    def parse(raw: bytes) -> dict[str, str]:
        parsed.append(raw)
        return classic_tags(raw)

    path = tmp_path / "repositories.json"
    record = TagRecord(path, parse)
    with caplog.at_level(logging.INFO):
        assert record.tags() == {} and record.tags() == {}
    assert caplog.text.count("cannot be read") == 1
    path.write_text(json.dumps({"Repositories": {"app": {"app:dev": ID_A}}}))
    assert record.tags() == record.tags() == {"docker.io/library/app:dev": ID_A}
    assert len(parsed) == 1
    path.write_text(json.dumps({"Repositories": {"app": {"app:dev": ID_B, "app:1": ID_B}}}))
    assert record.tags()["docker.io/library/app:dev"] == ID_B


# ---- what the registry knew ----------------------------------------------------------------------------

INFO = DaemonInfo("28.5.2", "1.51", Platform("linux", "amd64"), "overlay2", False, root_dir="/var/lib/docker")


async def test_what_was_known_survives_a_restart(store: Store) -> None:
    known = KnownImages(store, "unix:///docker.sock")
    known.saw(INFO)
    known.served("docker.io/library/app", ID_A, tag="dev", digest="sha256:" + "d" * 64)
    known.served("docker.io/library/app", ID_B, tag="dev")
    await known.close()
    again = KnownImages(store, "unix:///docker.sock")
    again.open()
    assert again.info == INFO
    assert again.tag("docker.io/library/app", "dev") == ID_B
    assert again.digest("docker.io/library/app", "sha256:" + "d" * 64) == ID_A
    assert again.images("docker.io/library/app") == [ID_B, ID_A]
    # A tag never served is not known, nor is anything of another daemon's.
    assert again.tag("docker.io/library/app", "never") is None and again.images("other") == []
    elsewhere = KnownImages(store, "unix:///other.sock")
    elsewhere.open()
    assert elsewhere.info is None and elsewhere.tag("docker.io/library/app", "dev") is None


async def test_it_is_written_only_when_something_changed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real = store.save_state

    def counted(name: str, payload: bytes) -> None:
        writes.append(payload)
        real(name, payload)

    monkeypatch.setattr(store, "save_state", counted)
    known = KnownImages(store, "unix:///docker.sock")
    known.saw(INFO)
    known.served("docker.io/library/app", ID_A, tag="dev", digest=ID_B)
    await known.close()
    assert len(writes) == 1
    # The same answers again, and the same facts in a new object (Docker answered again): nothing to write.
    for _ in range(3):
        known.saw(DaemonInfo(**{**INFO.__dict__}))
        known.served("docker.io/library/app", ID_A, tag="dev", digest=ID_B)
    await known.close()
    assert len(writes) == 1
    known.served("docker.io/library/app", ID_B, tag="dev")
    await known.close()
    assert len(writes) == 2


async def test_it_stays_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_module, "REPOSITORIES_LIMIT", 3)
    known = KnownImages(store, "unix:///docker.sock")
    for number in range(known_module.TAGS_LIMIT + 5):
        known.served("docker.io/library/app", ID_A, tag=f"t{number}", digest=f"sha256:{number:064x}")
    for number in range(5):
        known.served(f"docker.io/library/r{number}", ID_B, tag="1")
    await known.close()
    again = KnownImages(store, "unix:///docker.sock")
    again.open()
    data = json.loads((store.root / STATE_FILE).read_bytes())
    assert sorted(data["repositories"]) == [
        "docker.io/library/r2",
        "docker.io/library/r3",
        "docker.io/library/r4",
    ]
    assert again.tag("docker.io/library/r4", "1") == ID_B
    assert again.tag("docker.io/library/app", "t0") is None


async def test_an_unreadable_file_counts_as_nothing_known(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    (store.root / STATE_FILE).write_text(
        '{"version": 1, "endpoint": "unix:///docker.sock", "daemon": {"x": 1}'
    )
    known = KnownImages(store, "unix:///docker.sock")
    known.open()
    assert known.info is None and "cannot be read" in caplog.text
    (store.root / STATE_FILE).write_text(
        json.dumps({"version": 1, "endpoint": "unix:///docker.sock", "daemon": {"x": 1}, "repositories": {}})
    )
    known.open()
    assert known.info is None


# ---- served from the store's files while the daemon is down -------------------------------------------


async def test_tags_and_digests_served_before_are_served_while_docker_is_down(
    aiohttp_client: Any, store: Store, docker: StoreDocker, caplog: pytest.LogCaptureFixture
) -> None:
    app = docker.build("docker.io/library/app:dev", "app")
    docker.build("docker.io/library/never:1", "never")
    client = await started(aiohttp_client, store, docker)
    body = await pulled(client, "library/app", "dev?ns=docker.io", app)
    digest = digest_of(body)
    docker.unavailable = True
    with caplog.at_level(logging.DEBUG):
        for name, ref in (("app", "dev"), ("library/app", "dev?ns=docker.io"), ("app", digest)):
            assert await pulled(client, name, ref, app) == body
    assert caplog.text.count(DOWN_LINE) == 1
    assert docker.saves == [] and not list(store.blobs_dir.rglob("*.*"))
    state = (await status(client))["docker"]
    assert state["reachable"] is False and state["serving"] == DOWN_LINE
    ready = await client.get("/readyz")
    assert ready.status == 503 and "fake is down" in (await ready.json())["problems"]["docker"]
    # A tag never served is not, though the store has it.
    await error_of(await client.get("/v2/never/manifests/1", headers=ACCEPT), 503, "UNAVAILABLE")

    # Docker answers again: freshness as usual, and the page no longer says it.
    docker.unavailable = False
    moved = docker.build("docker.io/library/app:dev", "app-rebuilt")
    assert json.loads(await pulled(client, "app", "dev", moved))["config"]["digest"] == moved.config_digest
    assert "serving" not in (await status(client))["docker"]


async def test_what_was_served_is_served_after_a_restart_while_docker_is_down(
    aiohttp_client: Any, tmp_path: Path, docker: StoreDocker
) -> None:
    app = docker.build("docker.io/library/app:dev", "app")
    first = await started(aiohttp_client, Store(tmp_path / "cache"), docker)
    body = await pulled(first, "app", "dev", app)
    await first.close()

    # A new process: its Docker client never had an answer.
    docker.unavailable, docker.last_info = True, None
    again = await started(aiohttp_client, Store(tmp_path / "cache"), docker)
    # Found at start as Docker last described it.
    assert (await status(again))["bytes_path"].startswith("in place: Docker Engine 28.5.2")
    # A blob asked for before any manifest (a pull under way when the registry restarted).
    config = await again.get(f"/v2/app/blobs/{app.config_digest}")
    assert config.status == 200 and await config.read() == app.config
    assert await pulled(again, "app", digest_of(body), app) == body
    assert await pulled(again, "library/app", "dev?ns=docker.io", app) == body
    assert (await status(again))["docker"]["serving"] == DOWN_LINE


async def test_the_store_s_own_record_says_what_a_tag_names_now(
    aiohttp_client: Any, store: Store, docker: StoreDocker
) -> None:
    docker.build("docker.io/library/app:dev", "app")
    client = await started(aiohttp_client, store, docker)
    await pulled(client, "app", "dev")
    docker.unavailable = True
    # Retagged in the store's record (say, just before Docker died): the record wins.
    moved = docker.build("docker.io/library/app:dev", "app-moved")
    await pulled(client, "app", "dev", moved)
    # Its tag gone from the record, the image it was last served as, while the store keeps it.
    docker.remove("docker.io/library/app:dev")
    await pulled(client, "app", "dev", moved)
    shutil.rmtree(docker.root / "image" / "overlay2" / "imagedb")
    await error_of(await client.get("/v2/app/manifests/dev", headers=ACCEPT), 503, "UNAVAILABLE")


async def test_a_tag_verified_ahead_is_served_while_docker_is_down(
    aiohttp_client: Any, store: Store, docker: StoreDocker
) -> None:
    client = await started(aiohttp_client, store, docker)
    registry = client.app[REGISTRY]
    await until(lambda: docker.event_streams == 1)
    built = docker.build("docker.io/library/fresh:1", "fresh")
    docker.emit("tag", "fresh:1", docker.images["docker.io/library/fresh:1"].id)
    await until(lambda: registry.known.tag("docker.io/library/fresh", "1") is not None)
    docker.unavailable = True
    await pulled(client, "fresh", "1", built)


async def test_a_private_image_stays_behind_its_credentials_while_docker_is_down(
    aiohttp_client: Any, tmp_path: Path, docker: StoreDocker
) -> None:
    ref = "registry.example:5000/team/app:v1"
    path = "/v2/team/app/manifests/v1?ns=registry.example:5000"
    owner, right, wrong = Credentials("puller", "pw"), basic_auth("puller", "pw"), basic_auth("puller", "x")
    image = docker.build(ref, "private")
    docker.upstream[ref] = docker.images.pop(ref)
    docker.write_tags()
    docker.private["registry.example:5000/team/app"] = owner
    client = await started(aiohttp_client, Store(tmp_path / "cache"), docker)
    await error_of(await client.get(path, headers=ACCEPT), 401, "UNAUTHORIZED")
    assert (await client.get(path, headers={**ACCEPT, **right})).status == 200
    docker.write_tags()
    docker.unavailable = True
    # Remembered credentials are served; others cannot be checked, no credentials are challenged.
    assert (await client.get(path, headers={**ACCEPT, **right})).status == 200
    await error_of(await client.get(path, headers={**ACCEPT, **wrong}), 503, "UNAVAILABLE")
    await error_of(await client.get(path, headers=ACCEPT), 401, "UNAUTHORIZED")
    blob = f"/v2/team/app/blobs/{image.layer_digests[0]}?ns=registry.example:5000"
    await error_of(await client.get(blob), 401, "UNAUTHORIZED")


async def test_podman_s_short_names_follow_its_localhost_images_while_its_service_is_down(
    aiohttp_client: Any, store: Store, tmp_path: Path
) -> None:
    podman = StoreDocker(tmp_path / "storage", podman=True)
    podman.build("localhost/my-app:dev", "my-app")
    client = await started(aiohttp_client, store, podman)
    await pulled(client, "library/my-app", "dev?ns=docker.io")
    podman.unavailable = True
    # `podman build` needs no service: the tag moves in its storage while the service is down.
    rebuilt = podman.build("localhost/my-app:dev", "my-app-rebuilt")
    await pulled(client, "library/my-app", "dev?ns=docker.io", rebuilt)
    state = (await status(client))["docker"]
    assert state["serving"] == "serving from Podman's storage while Podman is down"
