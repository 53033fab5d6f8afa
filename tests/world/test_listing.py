"""`tags/list` and `_catalog` against real daemons: paging through many tags and repositories returns each
once, in order, with the spec's Link headers (Docker and Podman, whose `reference` filters the listing of
one repository), and a repository pulled with a client's credentials is listed only to credentials its
upstream accepts."""

from __future__ import annotations

import base64
import re

from . import oci_client
from .daemons import Dockerd, Podman, RegistryFactory, RegistryProcess, UpstreamRegistry
from .images import MiB, build_image, push_image

PAGE = 7


def paged(registry: RegistryProcess, path: str, key: str, headers: dict[str, str] | None = None) -> list[str]:
    """Every item of a listing, following its Link headers `n` at a time; each link is the spec's."""
    items: list[str] = []
    url: str | None = f"{path}?n={PAGE}"
    while url is not None:
        response = oci_client.request(f"{registry.url}{url}", headers=headers)
        assert response.status == 200, response.body
        page = response.json()[key]
        assert len(page) <= PAGE
        link = response.headers.get("link")
        if link is None:
            url = None
        else:
            assert len(page) == PAGE
            match = re.fullmatch(r"<([^>]+)>; rel=\"next\"", link)
            assert match, link
            url = match[1]
            assert url == f"{path}?n={PAGE}&last={page[-1]}"
        items += page
    return items


def check_paging(daemon: Dockerd | Podman, registry_under_test: RegistryFactory, prefix: str) -> None:
    source = build_image(daemon, f"{prefix}paged-tags:source", layers=1, size=1 * MiB, seed="paged")
    tags = [f"t{i:02}" for i in range(30)]
    repositories = [f"{prefix}paged-repo-{i:02}" for i in range(10)]
    # A Docker Hub name, which Podman keeps in full (docker.io/library/…) and Docker in short.
    hub = ["docker.io/library/paged-hub:1", "docker.io/library/paged-hub:2"]
    targets = [f"{prefix}paged-tags:{tag}" for tag in tags] + [f"{name}:1" for name in repositories]
    for target in targets + hub:
        if isinstance(daemon, Podman):
            daemon.podman("tag", source.ref, target)
        else:
            daemon.docker("tag", source.ref, target)
    registry = registry_under_test(daemon if isinstance(daemon, Dockerd) else daemon.host)

    listed = paged(registry, f"/v2/{prefix}paged-tags/tags/list", "tags")
    assert listed == sorted([*tags, "source"])
    assert paged(registry, "/v2/paged-hub/tags/list", "tags") == ["1", "2"]
    whole = oci_client.request(f"{registry.url}/v2/_catalog").json()["repositories"]
    catalog = paged(registry, "/v2/_catalog", "repositories")
    assert catalog == whole == sorted(set(whole))
    assert set(repositories) | {f"{prefix}paged-tags", "paged-hub"} <= set(catalog)


def test_paging_through_tags_and_the_catalog_on_docker(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    check_paging(docker26, registry_under_test, "")


def test_paging_through_tags_and_the_catalog_on_podman(
    podman: Podman, registry_under_test: RegistryFactory
) -> None:
    # Podman names what it builds and tags without a registry localhost/…
    check_paging(podman, registry_under_test, "localhost/")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_private_repository_s_tags_are_listed_only_to_accepted_credentials(
    docker26: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    registry_under_test: RegistryFactory,
) -> None:
    user, password = upstream_auth.credentials or ("", "")
    built = build_image(docker20, "listed-private-src:1", layers=1, size=1 * MiB, seed="listed-private")
    pushed = push_image(docker20, built, upstream_auth, "guarded/listed", "v1")
    registry = registry_under_test(docker26)
    ns = f"ns={upstream_auth.addr}"
    manifest = oci_client.request(
        f"{registry.url}/v2/{pushed.repository}/manifests/v1?{ns}",
        headers={**basic(user, password), "Accept": oci_client.MANIFEST_ACCEPT},
    )
    assert manifest.status == 200
    assert "served only to accepted ones" in registry.log_text()

    tags = f"{registry.url}/v2/{pushed.repository}/tags/list?{ns}"
    for attempt in range(2):
        for headers in ({}, basic(user, "guessed-pw")):
            refused = oci_client.request(tags, headers=headers)
            assert refused.status == 401
            assert refused.headers["www-authenticate"] == f'Basic realm="{upstream_auth.addr}"'
            assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
            catalog = oci_client.request(f"{registry.url}/v2/_catalog", headers=headers).json()
            assert not [name for name in catalog["repositories"] if pushed.repository in name]
        listed = oci_client.request(tags, headers=basic(user, password))
        assert listed.status == 200
        assert listed.json() == {"name": pushed.repository, "tags": ["v1"]}
        # A restart keeps it private (the record is in the cache dir).
        if attempt == 0:
            registry.stop()
            registry.start()
    assert "guessed-pw" not in registry.log_text() and password not in registry.log_text()
