"""kubelet's path: containerd's CRI plugin (1.7 and 2.1) pulling through the registry with `config_path`.

Each pull here is ``PullImage`` over the CRI socket, as kubelet sends it for a pod's image (with an
imagePullSecret as an AuthConfig of username and password, no server address). containerd falls back to the
image's own registry when the mirror fails, so every pull that works is proven to have come through the
registry under test: an image only dockerd has (docker.io is unreachable here), the registry's access log
(blobs served to containerd), Docker's event stream (the export), and for upstream images the upstream's
access log (fetched by `docker/…`, never by `containerd/…`).
"""

from __future__ import annotations

import re
import time

import pytest

from . import oci_client
from .cri import CriError, CriNode
from .daemons import Dockerd, RegistryFactory, RegistryProcess, UpstreamRegistry
from .images import MiB, build_image, push_image
from .test_mirror import node_name, served_blobs

_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.1" (?P<status>\d{3}) (?P<bytes>\d+) (?P<seconds>[0-9.]+)s '
    r'"(?P<agent>[^"]*)"'
)


def node_requests(
    registry: RegistryProcess, path_part: str, agent: str = "containerd/"
) -> list[re.Match[str]]:
    """The registry's access-log entries for requests whose path contains ``path_part``, from ``agent``."""
    found = []
    for line in registry.log_text().splitlines():
        match = _ACCESS.search(line)
        if match and path_part in match["path"] and match["agent"].startswith(agent):
            found.append(match)
    return found


# distribution's access log (combined): HOST - - [DATE] "METHOD PATH HTTP/1.1" STATUS SIZE "REFERER" "UA".
_UPSTREAM_ACCESS = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]+\] "[A-Z]+ (?P<path>\S+) [^"]*" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


def upstream_requests(upstream: UpstreamRegistry, mark: int, repository: str) -> list[tuple[str, str]]:
    """(status, user agent) of each request for ``repository`` in the upstream's access log since ``mark``."""
    matches = (_UPSTREAM_ACCESS.match(line) for line in upstream.log_text()[mark:].splitlines())
    return [(m["status"], m["agent"]) for m in matches if m and m["path"].startswith(f"/v2/{repository}/")]


def assert_fetched_by_docker_only(upstream: UpstreamRegistry, mark: int, repository: str) -> None:
    """The upstream served ``repository`` since ``mark``, and only to dockerd: no node went around us."""
    requests = upstream_requests(upstream, mark, repository)
    assert any(status == "200" for status, _ in requests), requests
    assert all(agent.startswith("docker/") for _, agent in requests), requests


def config_digest(pulled: oci_client.Pulled) -> str:
    """The image config's digest (what CRI calls the image ID): the first blob oci_client.pull fetched."""
    return next(iter(pulled.blobs))


def test_kubelet_pulls_a_local_image_through_the_mirror(
    docker: Dockerd, cri_node: CriNode, registry_under_test: RegistryFactory
) -> None:
    name = f"cri-local-{node_name(cri_node)}"
    build_image(docker, f"{name}:dev", layers=2, size=3 * MiB, seed=f"cri-local/{docker.name}")
    registry = registry_under_test(docker)
    cri_node.set_mirror(registry.addr)
    since = time.time()

    # A pod spec's `image: cri-local-…:dev`; containerd normalises it to docker.io/library/….
    image_ref = cri_node.pull_image(f"{name}:dev")

    pulled = oci_client.pull(registry.url, f"library/{name}", "dev", ns="docker.io")
    assert image_ref == config_digest(pulled)
    status = cri_node.image_status(f"{name}:dev")
    assert status is not None
    assert status.id == image_ref
    assert f"docker.io/library/{name}:dev" in status.repo_tags
    assert f"docker.io/library/{name}@{pulled.digest}" in status.repo_digests
    assert image_ref in {image.id for image in cri_node.list_images()}
    # Only dockerd has this image: every blob of it reached containerd from the registry, out of one export.
    assert set(pulled.blobs) <= served_blobs(registry)
    assert len(docker.image_saves(since)) == docker.exports_for(1)

    cri_node.remove_image(f"{name}:dev")
    assert cri_node.image_status(f"{name}:dev") is None
    assert image_ref not in {image.id for image in cri_node.list_images()}


def test_kubelet_pulls_an_upstream_image_through_docker(
    docker: Dockerd,
    docker20: Dockerd,
    upstream: UpstreamRegistry,
    cri_node: CriNode,
    registry_under_test: RegistryFactory,
) -> None:
    built = build_image(docker20, "cri-pt-src:1", layers=2, size=2 * MiB, seed="cri-pull-through")
    pushed = push_image(docker20, built, upstream, f"cri/pulled-{node_name(cri_node)}-{docker.name}", "v1")
    registry = registry_under_test(docker)
    cri_node.set_mirror(registry.addr)
    mark = upstream.log_mark()

    image_ref = cri_node.pull_image(pushed.ref)

    # dockerd fetched it from the upstream (and keeps it); containerd never asked the upstream.
    assert docker.image_id(pushed.ref)
    assert_fetched_by_docker_only(upstream, mark, pushed.repository)
    pulled = oci_client.pull(registry.url, pushed.repository, "v1", ns=upstream.addr)
    assert image_ref == config_digest(pulled)
    assert set(pulled.blobs) <= served_blobs(registry)
    assert f"pulling {pushed.ref}" in registry.log_text()


def test_kubelet_pull_secret_reaches_the_private_upstream_through_the_registry(
    docker: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    cri_node: CriNode,
    registry_under_test: RegistryFactory,
) -> None:
    built = build_image(docker20, "cri-private-src:1", layers=1, size=1 * MiB, seed="cri-private")
    pushed = push_image(
        docker20, built, upstream_auth, f"cri-secret/app-{node_name(cri_node)}-{docker.name}", "v1"
    )
    registry = registry_under_test(docker)
    cri_node.set_mirror(registry.addr)
    manifests = f"/{pushed.repository}/manifests/v1"
    user, password = upstream_auth.credentials or ("", "")

    # No imagePullSecret: the registry challenges (after Docker's anonymous try), containerd has nothing to
    # answer it with, and the upstream, tried directly after the mirror, refuses it too.
    mark = upstream_auth.log_mark()
    with pytest.raises(CriError) as refused:
        cri_node.pull_image(pushed.ref, timeout=120)
    print(f"containerd {cri_node.version}, no pull secret: {refused.value.details}")
    assert [m["status"] for m in node_requests(registry, manifests)] == ["401"]
    assert pushed.ref not in {tag for image in cri_node.list_images() for tag in image.repo_tags}
    direct = upstream_requests(upstream_auth, mark, pushed.repository)
    print(f"containerd {cri_node.version}, no pull secret: the upstream answered {direct}")
    assert all(status == "401" for status, _ in direct), direct

    # With the pull secret (AuthConfig username/password, empty server_address): containerd offers it to
    # the mirror after its 401 challenge, and the registry pulls through Docker with it.
    mark = upstream_auth.log_mark()
    image_ref = cri_node.pull_image(pushed.ref, user, password)
    statuses = [m["status"] for m in node_requests(registry, manifests)][1:]
    print(f"containerd {cri_node.version}, with the pull secret: the registry answered {statuses}")
    assert statuses[:2] == ["401", "200"]
    assert docker.image_id(pushed.ref)
    assert_fetched_by_docker_only(upstream_auth, mark, pushed.repository)
    status = cri_node.image_status(pushed.ref)
    assert status is not None and status.id == image_ref
    assert password not in registry.log_text()
