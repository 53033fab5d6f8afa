"""Pre-exports against real dockerds and a real containerd node: a served tag rebuilt in Docker is exported
with no request (Docker's event stream shows the `save`), and the node's next pull costs no export."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from . import oci_client
from .daemons import NO_ZERO_COPY, Containerd, Dockerd, Podman, RegistryFactory, RegistryProcess, wait_until
from .images import MiB, build_image, build_with_podman, rebuild_image
from .test_mirror import ctr_ok, exports, node_digest, served_blobs

# Long enough for a loaded 2-CPU machine; the pre-export of these small images takes a second.
PROMPT = 60.0


def prefetch_state(registry: RegistryProcess) -> dict[str, Any]:
    state = oci_client.request(f"{registry.url}/status.json").json()["prefetch"]
    assert state is not None
    return state


def wait_following(registry: RegistryProcess) -> None:
    """Until the registry follows Docker's image events (it opens the stream right after starting)."""
    wait_until(
        lambda: prefetch_state(registry)["following"], timeout=PROMPT, what="following Docker's events"
    )


def registry_requests(registry: RegistryProcess, mark: int) -> list[str]:
    """The access log's /v2/ requests after `mark` (a position in the log)."""
    return re.findall(r'"(?:GET|HEAD) /v2/\S*', registry.log_text()[mark:])


@pytest.mark.parametrize("variant", ["docker26", "docker28", "docker28_containerd", "docker20"])
def test_a_rebuilt_served_tag_is_exported_before_the_node_asks(
    variant: str, request: pytest.FixtureRequest, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    docker: Dockerd = request.getfixturevalue(variant)
    name = f"pre-{variant.replace('_', '-')}-{node.version.split('.')[0]}{node.version.split('.')[1]}"
    image = build_image(docker, f"{name}:dev", layers=3, size=6 * MiB, seed=name)
    # Served in place, nothing is exported; the export path is the one that has something to pre-export.
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    wait_following(registry)
    node.set_mirror(registry.addr)
    ctr_ok(node, f"docker.io/library/{name}:dev")
    first = node_digest(node, f"docker.io/library/{name}:dev")

    mark, since = len(registry.log_text()), time.time()
    rebuilt = rebuild_image(docker, image, salt="rebuilt")
    saves = wait_until(lambda: docker.image_saves(since), timeout=PROMPT, what="Docker's save of the rebuild")
    assert saves == [rebuilt.image_id]
    # Nobody asked the registry for it.
    assert registry_requests(registry, mark) == []
    wait_until(
        lambda: oci_client.metric(registry.url, "k3d_registry_prefetches_total", outcome="exported") == 1,
        timeout=PROMPT,
        what="the pre-export done",
    )
    state = prefetch_state(registry)
    assert [(o["ref"], o["outcome"]) for o in state["recent"]] == [
        (f"docker.io/library/{name}:dev", "exported")
    ]

    node.clean()
    since = time.time()
    exported = exports(registry)
    ctr_ok(node, f"docker.io/library/{name}:dev")
    second = node_digest(node, f"docker.io/library/{name}:dev")
    assert second != first
    # The pull cost no export: Docker saved nothing, the registry exported nothing.
    assert docker.image_saves(since) == []
    assert exports(registry) == exported == 2
    assert oci_client.metric(registry.url, "k3d_registry_prefetch_hits_total", state="ready") == 1
    # The new layers came through the registry (only dockerd has this image).
    pulled = oci_client.pull(registry.url, f"library/{name}", "dev", ns="docker.io")
    assert pulled.digest == second
    assert {layer["digest"] for layer in pulled.manifest["layers"]} <= served_blobs(registry)


def test_a_tag_never_served_is_not_pre_exported(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    served = build_image(docker, "pre-served:dev", layers=2, size=2 * MiB, seed="pre-served")
    unserved = build_image(docker, "pre-unserved:dev", layers=2, size=2 * MiB, seed="pre-unserved")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    wait_following(registry)
    oci_client.pull(registry.url, "pre-served", "dev")

    since = time.time()
    rebuild_image(docker, unserved, salt="rebuilt")
    rebuilt = rebuild_image(docker, served, salt="rebuilt")
    # The served tag's pre-export shows the events were seen; the other tag's rebuild came first.
    wait_until(
        lambda: oci_client.metric(registry.url, "k3d_registry_prefetches_total", outcome="exported") == 1,
        timeout=PROMPT,
        what="the served tag's pre-export",
    )
    assert docker.image_saves(since) == [rebuilt.image_id]
    assert "pre-unserved" not in registry.log_text()


def test_following_resumes_after_dockerd_restarts(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    docker = docker26
    image = build_image(docker, "pre-restart:dev", layers=2, size=2 * MiB, seed="pre-restart")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    wait_following(registry)
    oci_client.pull(registry.url, "pre-restart", "dev")

    docker.stop()
    try:
        wait_until(
            lambda: not prefetch_state(registry)["following"], timeout=PROMPT, what="the stream broken"
        )
        assert "not following Docker's image events" in registry.log_text()
        assert docker.host in prefetch_state(registry)["problem"]
    finally:
        docker.start()
    wait_until(lambda: prefetch_state(registry)["following"], timeout=PROMPT, what="following again")
    assert "following Docker's image events again" in registry.log_text()

    since = time.time()
    rebuilt = rebuild_image(docker, image, salt="after-restart")
    saves = wait_until(lambda: docker.image_saves(since), timeout=PROMPT, what="the pre-export's save")
    assert saves == [rebuilt.image_id]


@pytest.mark.parametrize("variant", ["docker28_containerd", "docker26"])
def test_in_place_has_nothing_to_pre_export_and_verifies_ahead(
    variant: str, request: pytest.FixtureRequest, registry_under_test: RegistryFactory
) -> None:
    docker: Dockerd = request.getfixturevalue(variant)
    name = f"pre-ip-{variant.replace('_', '-')}"
    image = build_image(docker, f"{name}:dev", layers=2, size=2 * MiB, seed=name)
    registry = registry_under_test(docker)
    wait_following(registry)
    oci_client.pull(registry.url, name, "dev")

    since = time.time()
    verified = oci_client.metric(registry.url, "k3d_registry_blobs_verified_ahead_total")
    rebuilt = rebuild_image(docker, image, salt="rebuilt")
    # The rebuilt image's new blobs are hashed where they lie before anything asks for them.
    wait_until(
        lambda: oci_client.metric(registry.url, "k3d_registry_blobs_verified_ahead_total") > verified,
        timeout=PROMPT,
        what="verification ahead",
    )
    pulled = oci_client.pull(registry.url, name, "dev")
    served = docker.id_of(manifest=pulled.digest, config=pulled.manifest["config"]["digest"])
    assert served == rebuilt.image_id == docker.image_id(f"{name}:dev")
    assert docker.image_saves(since) == []
    assert prefetch_state(registry)["recent"] == []


def test_podman_s_rebuilt_tag_is_pre_exported(
    podman: Podman, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    """Podman's compatible API has its own event stream (`podman build` ends in a `tag`)."""
    build_with_podman(podman, "localhost/pm-pre:1", tmp_path / "first", seed="pm-pre", size=2 * MiB)
    registry = registry_under_test(podman.host, extra_args=NO_ZERO_COPY)
    wait_following(registry)
    first = oci_client.pull(registry.url, "pm-pre", "1", ns="localhost")

    build_with_podman(podman, "localhost/pm-pre:1", tmp_path / "second", seed="pm-pre-2", size=2 * MiB)
    wait_until(
        lambda: oci_client.metric(registry.url, "k3d_registry_prefetches_total", outcome="exported") == 1,
        timeout=PROMPT,
        what="the pre-export",
    )
    exported = exports(registry)
    second = oci_client.pull(registry.url, "pm-pre", "1", ns="localhost")
    assert second.digest != first.digest
    assert exports(registry) == exported == 2
    assert oci_client.metric(registry.url, "k3d_registry_prefetch_hits_total", state="ready") == 1
    assert "not following" not in registry.log_text()
