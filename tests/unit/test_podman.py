"""Podman's ways: its storage's file names, and short Docker Hub names found as its `localhost/` images."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.sources.discovery import InPlaceConfig, discover_podman
from k3d_registry_dockerd.sources.podman import PodmanContent, big_data_name
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker, local_image


def test_big_data_files_are_named_as_containers_storage_names_them() -> None:
    assert big_data_name("manifest") == "manifest"
    assert big_data_name("sha256:02ef") == "=" + base64.b64encode(b"sha256:02ef").decode()
    assert big_data_name("Manifest") == "=" + base64.b64encode(b"Manifest").decode()


async def test_a_short_docker_hub_name_finds_podman_s_localhost_image(
    aiohttp_client: Any, store: Store
) -> None:
    podman = FakeDocker(product="Podman Engine")
    podman.images["localhost/my-app:dev"] = local_image("my-app", "localhost/my-app:dev")
    client = await aiohttp_client(create_app(assemble(store, podman)))
    for path in ("/v2/library/my-app/manifests/dev?ns=docker.io", "/v2/my-app/manifests/dev"):
        response = await client.get(path)
        assert response.status == 200, await response.text()
    # Exported by the name Podman gives it, once; nothing was pulled from Docker Hub.
    assert podman.saves == ["localhost/my-app:dev"] and podman.pulls == []
    manifest = await (await client.get("/v2/my-app/manifests/dev")).json()
    layer = manifest["layers"][0]["digest"]
    assert (await client.get(f"/v2/library/my-app/blobs/{layer}?ns=docker.io")).status == 200


async def test_docker_itself_pulls_a_name_it_lacks(aiohttp_client: Any, store: Store) -> None:
    docker = FakeDocker()
    docker.images["localhost/my-app:dev"] = local_image("my-app", "localhost/my-app:dev")
    client = await aiohttp_client(create_app(assemble(store, docker)))
    assert (await client.get("/v2/library/my-app/manifests/dev?ns=docker.io")).status == 404
    assert docker.pulls == [("docker.io/library/my-app:dev", None)] and docker.saves == []


def test_a_podman_store_that_never_held_an_image_is_read_in_place(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    info = DaemonInfo("5.4.2", "1.41", Platform("linux", "amd64"), "overlay", False, product="Podman Engine")
    given = InPlaceConfig(docker_root=str(root))
    assert isinstance(discover_podman(given, info, Metrics()), PodmanContent)
    # Not there at all (not mounted): exported, and why.
    missing = InPlaceConfig(docker_root=str(tmp_path / "nowhere"))
    assert "cannot be read from here" in str(discover_podman(missing, info, Metrics()))
