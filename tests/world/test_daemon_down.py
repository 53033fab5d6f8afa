"""Served while the daemon is down: Docker's classic store (20.10, 26.1, 28.5) and Podman's storage (4.3 and
5.4, rootful and rootless) keep their files when dockerd is SIGKILLed or Podman's service stops. What the
registry served from them is served again from those files, byte for byte and by the same digests, with no
export, across the registry's own restart; a tag never served answers 503, a layer whose files go answers
no whole blob, and once the daemon is back a tag rebuilt is served fresh at once. (Docker's containerd
store is served from containerd's records while its containerd runs: test_zero_copy.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from k3d_registry_dockerd.sources.classic import DIFF_DIRS, chain_ids

from . import oci_client
from .daemons import ROOTLESS_UID, Containerd, Dockerd, Podman, RegistryFactory, RegistryProcess
from .images import MiB, build_image
from .test_in_place import cache_blobs
from .test_mirror import ctr_ok, exports, node_name, served_blobs

DAEMONS = ["docker20", "docker26", "docker28", "podman4", "podman5", "podman5_rootless"]


@pytest.fixture(params=DAEMONS)
def daemon(request: pytest.FixtureRequest) -> Dockerd | Podman:
    found: Dockerd | Podman = request.getfixturevalue(request.param)
    return found


def named(daemon: Dockerd | Podman, name: str) -> tuple[str, str, str]:
    """(the daemon's reference of `name:1`, the repository a client asks for, its `ns`): Docker Hub's
    name for Docker, Podman's own `localhost/` one for Podman."""
    if isinstance(daemon, Podman):
        return f"localhost/{name}:1", name, "localhost"
    return f"{name}:1", f"library/{name}", "docker.io"


def start_registry(registry_under_test: RegistryFactory, daemon: Dockerd | Podman) -> RegistryProcess:
    rootless = isinstance(daemon, Podman) and daemon.rootless
    return registry_under_test(daemon.host, user=ROOTLESS_UID if rootless else None)


def down_line(daemon: Dockerd | Podman) -> str:
    if isinstance(daemon, Podman):
        return "serving from Podman's storage while Podman is down"
    return "serving from Docker's classic store while Docker is down"


def go_down(daemon: Dockerd | Podman) -> None:
    """dockerd dies (SIGKILL); Podman's API service stops (its CLI and storage stay)."""
    if isinstance(daemon, Dockerd):
        daemon.kill()
    else:
        daemon.stop()


def top_layer_files(daemon: Dockerd | Podman, ref: str) -> Path:
    """The directory holding the files of the image's top layer, found through the store's records."""
    if isinstance(daemon, Podman):
        store = daemon.root / "store"
        image_id = daemon.image_id(ref).removeprefix("sha256:")
        images = json.loads((store / "overlay-images" / "images.json").read_text())
        layer = next(image["layer"] for image in images if image["id"] == image_id)
        return store / "overlay" / layer / "diff"
    chain = list(chain_ids(daemon.layers(ref)))[-1].removeprefix("sha256:")
    record = daemon.data_root / "image" / daemon.driver / "layerdb" / "sha256" / chain
    cache_id = (record / "cache-id").read_text().strip()
    return daemon.data_root.joinpath(*(part.format(cache_id) for part in DIFF_DIRS[daemon.driver]))


def manifest_status(registry: RegistryProcess, repository: str, ref: str, ns: str) -> int:
    url = f"{registry.url}/v2/{repository}/manifests/{ref}?ns={ns}"
    return oci_client.request(url, headers={"Accept": oci_client.MANIFEST_ACCEPT}).status


def test_what_was_served_is_served_from_the_store_while_the_daemon_is_down(
    daemon: Dockerd | Podman, registry_under_test: RegistryFactory, request: pytest.FixtureRequest
) -> None:
    seed = f"down-{request.node.callspec.params['daemon']}"
    ref, repository, ns = named(daemon, "dn-app")
    never_ref, never, _ = named(daemon, "dn-never")
    gone_ref, gone, _ = named(daemon, "dn-gone")
    build_image(daemon, ref, layers=2, size=3 * MiB, seed=seed)
    build_image(daemon, never_ref, layers=1, size=1 * MiB, seed=f"{seed}-never")
    build_image(daemon, gone_ref, layers=1, size=2 * MiB, seed=f"{seed}-gone")
    gone_files = top_layer_files(daemon, gone_ref)
    registry = start_registry(registry_under_test, daemon)
    first = oci_client.pull(registry.url, repository, "1", ns=ns)
    assert oci_client.pull(registry.url, repository, first.digest, ns=ns).blobs == first.blobs
    gone_pull = oci_client.pull(registry.url, gone, "1", ns=ns)
    mark = len(registry.log_text())

    go_down(daemon)
    try:
        # By tag and by digest, every blob hashing to its digest (the client checks), the same as before.
        for reference in ("1", first.digest, "1"):
            again = oci_client.pull(registry.url, repository, reference, ns=ns)
            assert (again.digest, again.blobs) == (first.digest, first.blobs)
        # Nothing exported (the daemon could not), nothing copied.
        assert exports(registry) == 0 and cache_blobs(registry.cache_dir) == []
        log = registry.log_text()[mark:]
        assert log.count(down_line(daemon)) == 1, log
        ready = oci_client.request(f"{registry.url}/readyz")
        assert ready.status == 503 and daemon.host in ready.json()["problems"]["docker"]
        state = oci_client.request(f"{registry.url}/status.json").json()["docker"]
        assert state["reachable"] is False and state["serving"] == down_line(daemon)
        # A tag the registry never served is not served, though the store has it.
        assert manifest_status(registry, never, "1", ns) == 503
        if isinstance(daemon, Podman) and daemon.release == "4":
            # `podman build` needs no service (4.3's CLI runs here without it): the tag is served as the
            # storage's own record names it now.
            build_image(daemon, ref, layers=2, size=3 * MiB, seed=f"{seed}-while-down")
            moved = oci_client.pull(registry.url, repository, "1", ns=ns)
            assert moved.digest != first.digest
            assert moved.manifest["config"]["digest"] == daemon.image_id(ref)
            build_image(daemon, ref, layers=2, size=3 * MiB, seed=seed)
            assert oci_client.pull(registry.url, repository, "1", ns=ns).digest == first.digest

        # What it knew survives its own restart.
        registry.stop()
        registry.start()
        restarted = oci_client.pull(registry.url, repository, first.digest, ns=ns)
        assert restarted.blobs == first.blobs
        assert oci_client.pull(registry.url, repository, "1", ns=ns).digest == first.digest
        assert exports(registry) == 0 and cache_blobs(registry.cache_dir) == []

        # A layer whose files go while the daemon is down: that answer breaks off, the next says 503.
        layer = gone_pull.manifest["layers"][-1]["digest"]
        assert manifest_status(registry, gone, "1", ns) == 200
        gone_files.rename(gone_files.with_name("diff-away"))
        try:
            with pytest.raises(Exception):  # noqa: B017 - the connection is cut, or the blob is refused
                response = oci_client.request(f"{registry.url}/v2/{gone}/blobs/{layer}?ns={ns}")
                assert response.status == 200, response.status
            assert manifest_status(registry, gone, "1", ns) == 503
        finally:
            gone_files.with_name("diff-away").rename(gone_files)
    finally:
        daemon.start()

    # The daemon is back: a tag rebuilt is served as it is now, at once.
    build_image(daemon, ref, layers=2, size=3 * MiB, seed=f"{seed}-rebuilt")
    rebuilt = oci_client.pull(registry.url, repository, "1", ns=ns)
    assert rebuilt.digest != first.digest
    assert rebuilt.manifest["config"]["digest"] == daemon.image_id(ref)
    assert exports(registry) == 0


def test_a_node_pulls_while_docker_is_down(
    docker26: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    docker = docker26
    name = f"dn-node-{node_name(node)}"
    build_image(docker, f"{name}:1", layers=2, size=3 * MiB, seed=name)
    registry = registry_under_test(docker)
    served = oci_client.pull(registry.url, f"library/{name}", "1", ns="docker.io")
    node.set_mirror(registry.addr)
    docker.kill()
    try:
        # docker.io is not reachable here: the node's pull works only through the registry.
        ctr_ok(node, f"docker.io/library/{name}:1")
        assert set(served.blobs) <= served_blobs(registry)
        assert re.search(r"serving from Docker's classic store while Docker is down", registry.log_text())
    finally:
        docker.start()
