"""Content pulled with a node's credentials is served only to credentials the upstream accepts (checked
by a pull by digest through Docker, remembered a few minutes, kept across restarts); what Docker had
stays open."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from . import oci_client
from .daemons import Containerd, Dockerd, RegistryFactory, RegistryProcess, UpstreamRegistry
from .images import MiB, build_image, push_image, registry_login
from .test_cri import node_requests
from .test_mirror import ACCEPT, ctr_ok, node_name, served_blobs


def node_statuses(registry: RegistryProcess, path: str, since: int) -> list[str]:
    """Statuses the registry answered containerd with for requests whose path contains `path`, after the
    first `since` of them."""
    return [m["status"] for m in node_requests(registry, path)[since:]]


def upstream_gets(upstream: UpstreamRegistry, mark: int, agent: str, path: str = "") -> list[int]:
    """Statuses of the upstream's GETs since `mark` from clients with this user agent."""
    return [
        r.status
        for r in upstream.requests(mark)
        if r.method == "GET" and r.agent.startswith(agent) and path in r.path
    ]


def test_private_content_is_served_only_to_accepted_credentials(
    docker: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
) -> None:
    user, password = upstream_auth.credentials or ("", "")
    secret = f"{user}:{password}"
    built = build_image(docker20, "guarded-src:1", layers=2, size=1 * MiB, seed="guarded")
    pushed = push_image(docker20, built, upstream_auth, f"guarded/app-{node_name(node)}-{docker.name}", "v1")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)
    manifests = f"/{pushed.repository}/manifests/v1"

    # The first pull: anonymous, challenged, then with the pod's secret, pulled through Docker.
    ctr_ok(node, pushed.ref, user=secret)
    assert docker.image_id(pushed.ref)
    assert served_blobs(registry)
    assert "served only to accepted ones" in registry.log_text()

    # Another node, or a pod without the secret: refused by us; containerd then asks the upstream, which
    # refuses too. Nothing of the image is served to it.
    node.clean()
    since, mark, started = len(node_requests(registry, manifests)), upstream_auth.log_mark(), time.time()
    blobs_since = len(registry.log_text())
    anonymous = node.pull(pushed.ref, timeout=120)
    assert anonymous.returncode != 0
    assert node_statuses(registry, manifests, since) == ["401"]
    assert not [
        line
        for line in registry.log_text()[blobs_since:].splitlines()
        if "/blobs/sha256:" in line and '" 200 ' in line
    ]
    assert docker.image_events("pull", started) == []
    assert upstream_gets(upstream_auth, mark, "docker/") == []  # no credentials, nothing to check
    assert {r.status for r in upstream_auth.requests(mark) if "/manifests/" in r.path} == {401}

    # Wrong credentials: put to the upstream through Docker for the digest, refused; nothing moves.
    since, mark, started = len(node_requests(registry, manifests)), upstream_auth.log_mark(), time.time()
    wrong = node.pull(pushed.ref, user=f"{user}:guessed-pw", timeout=120)
    assert wrong.returncode != 0
    assert "401" in node_statuses(registry, manifests, since)
    assert upstream_gets(upstream_auth, mark, "docker/", "/manifests/sha256:") == [401]
    assert docker.image_events("pull", started) == []
    assert "guessed-pw" not in registry.log_text() and password not in registry.log_text()

    # A restart keeps the image private: the right credentials are checked once, then remembered, and
    # the bytes come through the registry (containerd fetches nothing from the upstream).
    registry.stop()
    registry.start()
    for attempt in range(2):
        node.clean()
        since, mark, started = len(node_requests(registry, manifests)), upstream_auth.log_mark(), time.time()
        ctr_ok(node, pushed.ref, user=secret)
        assert node_statuses(registry, manifests, since)[-1] == "200"
        assert upstream_gets(upstream_auth, mark, "containerd/", "/blobs/") == []
        checks = upstream_gets(upstream_auth, mark, "docker/", "/manifests/sha256:")
        assert checks == ([200] if attempt == 0 else [])
        assert docker.image_saves(started) == docker.image_events("pull", started) == []

    # By hand: a blob and the manifest by digest are guarded too.
    manifest = oci_client.request(
        f"{registry.url}/v2/{pushed.repository}/manifests/v1?ns={upstream_auth.addr}",
        headers={**ACCEPT, "Authorization": "Basic " + base64.b64encode(secret.encode()).decode()},
    )
    assert manifest.status == 200
    digest = manifest.headers["docker-content-digest"]
    layer = next(iter(served_blobs(registry)))
    for path in (f"manifests/{digest}", f"blobs/{layer}"):
        refused = oci_client.request(f"{registry.url}/v2/{pushed.repository}/{path}?ns={upstream_auth.addr}")
        assert refused.status == 401
        assert refused.headers["www-authenticate"] == f'Basic realm="{upstream_auth.addr}"'
    metrics = oci_client.request(f"{registry.url}/metrics").body.decode()
    for outcome in ("allowed", "remembered", "missing"):
        assert f'k3d_registry_private_checks_total{{outcome="{outcome}"}}' in metrics


def test_images_docker_had_stay_open(
    docker26: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
    tmp_path: Path,
) -> None:
    """An image the host pulled itself (after `docker login`) is served to every node, credentials or not."""
    built = build_image(docker20, "hostpulled-src:1", layers=1, size=1 * MiB, seed="hostpulled")
    pushed = push_image(docker20, built, upstream_auth, f"hostpulled/app-{node_name(node)}", "v1")
    env = registry_login(docker26, upstream_auth.addr, upstream_auth.credentials or ("", ""), tmp_path)
    docker26.docker("pull", pushed.ref, env=env)
    registry = registry_under_test(docker26)
    node.set_mirror(registry.addr)
    ctr_ok(node, pushed.ref)
    assert served_blobs(registry)
    node.clean()
    user, password = upstream_auth.credentials or ("", "")
    ctr_ok(node, pushed.ref, user=f"{user}:{password}")
    assert "served only to accepted ones" not in registry.log_text()
