"""Docker's classic store served in place, where it goes wrong: files changed, unreadable or gone. Over the
HTTP API with a fake Docker whose store is a real directory in the classic layout."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.reference import parse_repository
from k3d_registry_dockerd.sources.classic import ClassicContent
from k3d_registry_dockerd.sources.content import BlobPieces
from k3d_registry_dockerd.sources.discovery import InPlaceConfig
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import Registry, assemble

from .fakes import FakeDocker, LocalImage, local_image
from .saves import digest_of
from .test_sources_contract import ClassicBackend

REF = "docker.io/library/app:dev"
PATH = "/v2/app/manifests/dev"


class ClassicDocker(FakeDocker):
    """A Docker on the classic store whose images lie in `root` (its saves are the export path's)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.backend = ClassicBackend(root)

    async def daemon(self) -> DaemonInfo:
        info = await super().daemon()
        self.last_info = DaemonInfo(
            "28.5.2", "1.51", info.platform, "overlay2", False, root_dir=str(self.root)
        )
        return self.last_info


def add_image(fake: ClassicDocker, ref: str, seed: str) -> LocalImage:
    """An image Docker keeps in its classic store under `fake.root`, tagged `ref`."""
    image = local_image(seed, ref)
    assert image.image is not None
    blobs = {d: data for d, data in image.image.blobs().items() if d != image.image.digest}
    inspect = fake.backend.publish(ref, image.image.manifest, image.image.media_type, blobs)
    # Docker's ID of a classic-store image is its config's digest.
    fake.images[ref] = LocalImage(inspect["Id"], image.save, image.image)
    return fake.images[ref]


@pytest.fixture
def docker(tmp_path: Path) -> ClassicDocker:
    fake = ClassicDocker(tmp_path / "docker")
    add_image(fake, REF, "app-1")
    return fake


@pytest.fixture
def registry(store: Store, docker: ClassicDocker) -> Registry:
    made = assemble(store, docker, in_place=InPlaceConfig())  # type: ignore[arg-type]
    # What these tests do to the store must not race the verification of its recent images at start.
    assert made.verifier is not None
    made.verifier.recent = 0
    return made


@pytest.fixture
async def client(aiohttp_client: Any, registry: Registry) -> TestClient:
    return await aiohttp_client(create_app(registry))


def layers(docker: ClassicDocker) -> list[str]:
    return docker.images[REF].image.layer_digests  # type: ignore[union-attr]


def diff_files(docker: ClassicDocker) -> list[Path]:
    return sorted(path for path in (docker.root / "overlay2").rglob("*") if path.is_file())


async def test_an_image_is_served_in_place_without_an_export(
    client: TestClient, docker: ClassicDocker, registry: Registry, store: Store
) -> None:
    response = await client.get(PATH)
    assert response.status == 200
    for digest in layers(docker):
        blob = await client.get(f"/v2/app/blobs/{digest}")
        assert blob.status == 200 and digest_of(await blob.read()) == digest
    assert docker.saves == [] and not list(store.blobs_dir.rglob("*.*"))
    assert isinstance(registry.discovery.content, ClassicContent)
    count = registry.metrics.registry.get_sample_value(
        "k3d_registry_manifest_cache_total", {"result": "in_place"}
    )
    assert count == 1


async def test_a_changed_file_cuts_the_answer_and_its_image_is_exported_next(
    client: TestClient, docker: ClassicDocker, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await client.get(PATH)).status == 200
    victim = diff_files(docker)[0]
    victim.write_bytes(b"X" * victim.stat().st_size)
    digest = next(d for d in layers(docker))
    with pytest.raises(Exception):  # noqa: B017 - the connection is cut: the client sees a broken body
        await (await client.get(f"/v2/app/blobs/{digest}")).read()
    assert "does not hash to its digest" in caplog.text or "do not match" in caplog.text
    assert counted(registry, "k3d_registry_digest_mismatches_total") == 1
    # The next pull of the tag is the export path's.
    assert (await client.get(PATH)).status == 200
    assert docker.saves == [REF]


async def test_unreadable_files_make_the_image_exported(
    client: TestClient, docker: ClassicDocker, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() == 0:
        # Root reads whatever the modes say; a file behind a symlink is as unreadable here.
        victim = diff_files(docker)[0]
        os.rename(victim, victim.with_name("moved"))
        os.symlink(victim.with_name("moved"), victim)
    else:
        for path in diff_files(docker):
            path.chmod(0)
    with caplog.at_level(logging.INFO, logger="k3d_registry_dockerd.sources"):
        assert (await client.get(PATH)).status == 200
    assert docker.saves == [REF]
    assert "not served in place, exported from the daemon instead" in caplog.text


async def test_a_layer_deleted_under_a_pull_fails_it_cleanly_and_is_read_again(
    client: TestClient, docker: ClassicDocker, registry: Registry
) -> None:
    assert (await client.get(PATH)).status == 200
    saved = {path: path.read_bytes() for path in diff_files(docker)}
    for path in saved:
        path.unlink()
    digest = layers(docker)[0]
    with pytest.raises(Exception):  # noqa: B017 - the answer breaks off
        await (await client.get(f"/v2/app/blobs/{digest}")).read()
    # Docker put it back (pulled again): the next request reads the image anew and serves it.
    for path, data in saved.items():
        path.write_bytes(data)
    assert (await client.get(PATH)).status == 200
    blob = await client.get(f"/v2/app/blobs/{digest}")
    assert blob.status == 200 and digest_of(await blob.read()) == digest
    assert docker.saves == []


async def test_a_new_image_s_layers_are_verified_before_its_first_pull(
    client: TestClient, docker: ClassicDocker, registry: Registry
) -> None:
    await until(lambda: docker.event_streams == 1)
    docker.emit("tag", "app:dev", docker.images[REF].id)
    await until(lambda: counted(registry, "k3d_registry_blobs_verified_ahead_total") == len(layers(docker)))
    await first_pull_hashes_nothing(client, docker, registry)


async def first_pull_hashes_nothing(client: TestClient, docker: ClassicDocker, registry: Registry) -> None:
    """The first pull finds the layers verified: each is sent as it is, not hashed on the way."""
    hashed = counted(registry, "k3d_registry_blobs_hashed_total")
    assert (await client.get(PATH)).status == 200
    source = registry.discovery.content
    assert isinstance(source, ClassicContent)
    for digest in layers(docker):
        found = await source.blob(parse_repository("app", None), digest, await docker.daemon())
        assert isinstance(found, BlobPieces) and found.verify is None
        blob = await client.get(f"/v2/app/blobs/{digest}")
        assert blob.status == 200 and digest_of(await blob.read()) == digest
    assert counted(registry, "k3d_registry_blobs_hashed_total") == hashed


async def test_the_store_s_recent_images_are_verified_at_start_without_a_pull(
    aiohttp_client: Any, store: Store, docker: ClassicDocker
) -> None:
    registry = assemble(store, docker, in_place=InPlaceConfig())  # type: ignore[arg-type]
    client = await aiohttp_client(create_app(registry))
    await until(lambda: counted(registry, "k3d_registry_blobs_verified_ahead_total") == len(layers(docker)))
    assert counted(registry, "k3d_registry_blobs_hashed_total") == len(layers(docker))
    await first_pull_hashes_nothing(client, docker, registry)


async def test_a_file_changed_after_verification_ahead_is_hashed_again_on_the_first_pull(
    aiohttp_client: Any, store: Store, docker: ClassicDocker
) -> None:
    registry = assemble(store, docker, in_place=InPlaceConfig())  # type: ignore[arg-type]
    client = await aiohttp_client(create_app(registry))
    await until(lambda: counted(registry, "k3d_registry_blobs_verified_ahead_total") == len(layers(docker)))
    victim = diff_files(docker)[0]
    victim.write_bytes(b"X" * victim.stat().st_size)
    # Its times move as a write's do, even within one tick of the clock files are stamped with.
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert (await client.get(PATH)).status == 200
    broken = 0
    for digest in layers(docker):
        try:
            await (await client.get(f"/v2/app/blobs/{digest}")).read()
        except aiohttp.ClientPayloadError:
            broken += 1
    assert broken == 1
    assert counted(registry, "k3d_registry_digest_mismatches_total") == 1


async def test_at_start_the_images_the_store_took_in_last_are_queued_newest_first(
    store: Store, docker: ClassicDocker
) -> None:
    for number in range(4):
        image = add_image(docker, f"docker.io/library/old:{number}", f"old-{number}")
        # When the store took it in: its config file's modification time.
        config = docker.root / "image" / "overlay2" / "imagedb" / "content" / "sha256" / image.id[7:]
        os.utime(config, (1_700_000_000 + number, 1_700_000_000 + number))
    registry = assemble(store, docker, in_place=InPlaceConfig())  # type: ignore[arg-type]
    verifier = registry.verifier
    assert verifier is not None
    verifier.recent = 3
    # An image the daemon reports new goes first, whatever its store's time.
    verifier._on_event({"Action": "pull", "Actor": {"ID": "x", "Attributes": {"name": "old:0"}}})
    await verifier._queue_recent()
    assert verifier.state()["pending"] == ["old:0", "app:dev", "old:3", "old:2"]
    await registry.stop()


def counted(registry: Registry, name: str) -> float:
    return registry.metrics.registry.get_sample_value(name) or 0.0


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_config_that_does_not_hash_to_the_image_id_sends_the_image_to_the_export_path(
    client: TestClient, docker: ClassicDocker, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    image_id = docker.images[REF].id
    config = docker.root / "image" / "overlay2" / "imagedb" / "content" / "sha256" / image_id.split(":")[1]
    config.write_bytes(config.read_bytes() + b" ")
    with caplog.at_level(logging.INFO, logger="k3d_registry_dockerd.sources"):
        assert (await client.get(PATH)).status == 200
    assert docker.saves == [REF]
    assert "does not hash to the image ID" in caplog.text
    assert registry.metrics.registry.get_sample_value("k3d_registry_digest_mismatches_total") == 1


def pulled_again(docker: ClassicDocker) -> None:
    """`docker rmi` and `docker pull` of the same image: the same ID, its config written anew, its layers'
    files in new directories."""
    images = docker.root / "image" / "overlay2"
    config = images / "imagedb" / "content" / "sha256" / docker.images[REF].id[7:]
    data = config.read_bytes()
    config.unlink()
    config.write_bytes(data)
    for record in (images / "layerdb" / "sha256").iterdir():
        old = (record / "cache-id").read_text()
        new = digest_of(f"again {old}".encode())[7:]
        os.rename(docker.root / "overlay2" / old, docker.root / "overlay2" / new)
        (record / "cache-id").write_text(new)


async def test_an_image_removed_and_pulled_again_is_read_again(
    client: TestClient, docker: ClassicDocker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="k3d_registry_dockerd.sources")
    for _ in range(2):
        assert (await client.get(PATH)).status == 200
        for digest in layers(docker):
            blob = await client.get(f"/v2/app/blobs/{digest}")
            assert blob.status == 200 and digest_of(await blob.read()) == digest
        pulled_again(docker)
    assert docker.saves == []
    assert "came back into the store: reading it again" in caplog.text


def removed(docker: ClassicDocker) -> None:
    """`docker rmi`: the config and the layers' records and files go; the store's tag record stays."""
    images = docker.root / "image" / "overlay2"
    (images / "repositories.json").write_text('{"Repositories": {}}')
    (images / "imagedb" / "content" / "sha256" / docker.images[REF].id[7:]).unlink()
    for record in (images / "layerdb" / "sha256").iterdir():
        (record / "cache-id").unlink()


async def test_an_image_removed_between_docker_s_answer_and_the_read_is_unknown_not_exported(
    client: TestClient, docker: ClassicDocker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="k3d_registry_dockerd.sources")
    removed(docker)
    # The fake Docker still answers the inspect, as dockerd did a moment before the `rmi`.
    answer = await client.get(PATH)
    assert answer.status == 404 and (await answer.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert docker.saves == []
    assert "while it was read" in caplog.text and "exported from the daemon instead" not in caplog.text


async def test_an_image_pulled_again_while_it_is_read_is_read_again(
    client: TestClient, docker: ClassicDocker, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="k3d_registry_dockerd.sources")
    in_place = await registry.sources.in_place(await docker.daemon())
    assert isinstance(in_place, ClassicContent)
    read = in_place._read
    reads: list[str] = []
    records = list((docker.root / "image" / "overlay2" / "layerdb" / "sha256").iterdir())
    cache_ids: dict[Path, str] = {}

    def racing(image_id: str, info: DaemonInfo) -> Any:
        reads.append(image_id)
        if len(reads) == 1:
            # Removed and pulled again while it is read: its layers are not where this read looks.
            pulled_again(docker)
            cache_ids.update({record: (record / "cache-id").read_text() for record in records})
            for record in records:
                (record / "cache-id").write_text("gone")
        else:
            for record, cache_id in cache_ids.items():
                (record / "cache-id").write_text(cache_id)
        return read(image_id, info)

    in_place._read = racing  # type: ignore[method-assign]
    assert (await client.get(PATH)).status == 200
    for digest in layers(docker):
        blob = await client.get(f"/v2/app/blobs/{digest}")
        assert blob.status == 200 and digest_of(await blob.read()) == digest
    assert len(reads) == 2 and docker.saves == []
    assert "came back into the store while it was read: reading it again" in caplog.text
