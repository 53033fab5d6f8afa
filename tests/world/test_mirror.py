"""The registry against real dockerds, real registries and a real containerd node.

containerd falls back to the image's own registry when the mirror fails, so every ctr pull here is
checked to have come through the registry under test: either the image exists only in dockerd (docker.io
is unreachable from this machine) or the registry's own access log shows the blobs it served.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import oci_client
from .daemons import (
    NO_ZERO_COPY,
    Containerd,
    Dockerd,
    Podman,
    RegistryFactory,
    RegistryProcess,
    UpstreamRegistry,
    free_port,
    wait_until,
)
from .images import (
    MiB,
    build_image,
    build_with_podman,
    push_image,
    push_multiplatform,
    rebuild_image,
    skopeo,
    write_image_layout,
)

ACCEPT = {"Accept": oci_client.MANIFEST_ACCEPT}


def node_name(node: Containerd) -> str:
    """`c17`, `c21`: for names each node pulls afresh (the dockerds live through the whole session)."""
    return "c" + "".join(node.version.split(".")[:2])


def exports(registry: RegistryProcess) -> int:
    return len(re.findall(r"exporting \S+ from Docker", registry.log_text()))


def served_blobs(registry: RegistryProcess, user_agent: str = "containerd") -> set[str]:
    """Digests of blobs the registry answered 200/206 for, to clients with this user agent."""
    found = set()
    for line in registry.log_text().splitlines():
        match = re.search(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64})\S* HTTP/1\.1" 20[06] ', line)
        if match and user_agent in line:
            found.add(match.group(1))
    return found


def ctr_ok(node: Containerd, ref: str, **kwargs: object) -> None:
    result = node.pull(ref, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, f"ctr pull {ref} failed:\n{result.stdout}\n{result.stderr}"


def node_digest(node: Containerd, ref: str) -> str:
    out = node.ctr("images", "ls").stdout
    for line in out.splitlines():
        if line.startswith(ref + " "):
            return next(word for word in line.split() if word.startswith("sha256:"))
    raise AssertionError(f"{ref} not in ctr images ls:\n{out}")


def request_while_exporting(
    pool: ThreadPoolExecutor, registry: RegistryProcess, name: str
) -> Future[oci_client.Response]:
    """Asks for NAME:1 in the background and returns once its export is writing blobs."""
    attempt = pool.submit(
        oci_client.request, f"{registry.url}/v2/{name}/manifests/1", headers=ACCEPT, timeout=60
    )
    deadline = time.monotonic() + 60
    while not any(path.name.startswith("blob-") for path in (registry.cache_dir / "tmp").iterdir()):
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.005)
    return attempt


@pytest.mark.parametrize(
    "variant", ["docker26", "docker26_containerd", "docker28", "docker28_containerd", "docker20"]
)
def test_local_only_image_pulls_through_mirror_on_every_docker_variant(
    variant: str, request: pytest.FixtureRequest, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    daemon: Dockerd = request.getfixturevalue(variant)
    image = build_image(
        daemon, f"local-{variant.replace('_', '-')}:dev", layers=3, size=3 * MiB, seed=variant
    )
    registry = registry_under_test(daemon)
    node.set_mirror(registry.addr)

    ctr_ok(node, f"docker.io/library/{image.ref}")

    pulled = oci_client.pull(registry.url, f"library/{image.ref.split(':')[0]}", "dev", ns="docker.io")
    assert node_digest(node, f"docker.io/library/{image.ref}") == pulled.digest
    # Only dockerd has this image (docker.io is unreachable here): the node's layers came from us.
    layers = {layer["digest"] for layer in pulled.manifest["layers"]}
    assert layers <= served_blobs(registry)
    assert exports(registry) == daemon.exports_for(1)


def test_own_namespace_and_digest_pull(
    docker: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "my-app:dev", layers=2, size=2 * MiB, seed="own")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)

    # An image that names the registry itself arrives without ns: Docker's local my-app:dev.
    head = oci_client.request(f"{registry.url}/v2/my-app/manifests/dev", method="HEAD", headers=ACCEPT)
    get = oci_client.request(f"{registry.url}/v2/my-app/manifests/dev", headers=ACCEPT)
    assert head.status == get.status == 200
    assert head.body == b""
    for header in ("docker-content-digest", "content-length", "content-type"):
        assert head.headers[header] == get.headers[header]
    digest = get.headers["docker-content-digest"]
    assert digest == f"sha256:{hashlib.sha256(get.body).hexdigest()}"
    ctr_ok(node, f"{registry.addr}/my-app:dev")

    # library/my-app is the same Docker image; a digest pull needs no tag.
    node.clean()
    ctr_ok(node, f"docker.io/library/my-app@{digest}")
    assert exports(registry) == docker.exports_for(1)


def test_answers_scoped_by_ns_name_the_namespace(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    """distribution-spec, "Registry Proxying": a registry that scopes a request by `ns` SHOULD return it in
    `OCI-Namespace`; the registry's own namespace (no `ns`) has none to return."""
    build_image(docker, "scoped:1", layers=1, size=MiB, seed="scoped")
    registry = registry_under_test(docker)
    scoped = oci_client.request(f"{registry.url}/v2/library/scoped/manifests/1?ns=docker.io", headers=ACCEPT)
    own = oci_client.request(f"{registry.url}/v2/scoped/manifests/1", headers=ACCEPT)
    assert scoped.status == own.status == 200
    assert scoped.headers["oci-namespace"] == "docker.io"
    assert "oci-namespace" not in own.headers
    layer = scoped.json()["layers"][0]["digest"]
    blob = oci_client.request(f"{registry.url}/v2/library/scoped/blobs/{layer}?ns=docker.io")
    assert (blob.status, blob.headers["oci-namespace"]) == (200, "docker.io")


def test_pull_through_upstream(
    docker: Dockerd,
    docker20: Dockerd,
    upstream: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
) -> None:
    built = build_image(docker20, "pt-src:1", layers=2, size=2 * MiB, seed="pull-through")
    pushed = push_image(docker20, built, upstream, f"team/pulled-{node_name(node)}", "v1")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)
    mark = upstream.log_mark()

    ctr_ok(node, pushed.ref)

    # dockerd pulled it (it now lists it), the node got its layers from us, not from the upstream.
    assert docker.image_id(pushed.ref)
    pulled = oci_client.pull(registry.url, pushed.repository, "v1", ns=upstream.addr)
    assert {layer["digest"] for layer in pulled.manifest["layers"]} <= served_blobs(registry)
    node_requests = [line for line in upstream.log_text()[mark:].splitlines() if "containerd/" in line]
    assert node_requests == []
    assert "pulling " + pushed.ref in registry.log_text()


def test_missing_upstream_image_is_404_and_own_namespace_never_pulls(
    docker: Dockerd, upstream: UpstreamRegistry, registry_under_test: RegistryFactory
) -> None:
    registry = registry_under_test(docker)
    missing = oci_client.request(
        f"{registry.url}/v2/team/nothing/manifests/v1?ns={upstream.addr}", headers=ACCEPT
    )
    assert missing.status == 404
    assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    local = oci_client.request(f"{registry.url}/v2/nothing-here/manifests/v1", headers=ACCEPT)
    assert local.status == 404
    assert local.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert "pulling docker.io/library/nothing-here" not in registry.log_text()


def test_private_upstream_challenge_and_credentialed_pull(
    docker: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
) -> None:
    built = build_image(docker20, "private-src:1", layers=1, size=1 * MiB, seed="private")
    pushed = push_image(docker20, built, upstream_auth, f"secret/app-{node_name(node)}", "v1")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)
    url = f"{registry.url}/v2/{pushed.repository}/manifests/v1?ns={upstream_auth.addr}"

    challenge = oci_client.request(url, headers=ACCEPT)
    assert challenge.status == 401
    assert challenge.headers["www-authenticate"] == f'Basic realm="{upstream_auth.addr}"'
    assert challenge.json()["errors"][0]["code"] == "UNAUTHORIZED"
    # The anonymous first try and its challenge are the normal handshake: no warning, no "recent problem".
    assert " WARNING " not in registry.log_text()
    assert oci_client.request(f"{registry.url}/status.json").json()["problems"] == []

    bad = "Basic " + base64.b64encode(b"puller:wrong").decode()
    refused = oci_client.request(url, headers={**ACCEPT, "Authorization": bad})
    assert refused.status == 403
    assert "www-authenticate" not in refused.headers

    # containerd with a wrong pull secret: one challenge, one refusal, then it gives up on the mirror.
    wrong = node.pull(pushed.ref, user="puller:wrong-pw", timeout=60)
    assert wrong.returncode != 0
    node_requests = [
        re.search(r'" (\d{3}) ', line).group(1)  # type: ignore[union-attr]
        for line in registry.log_text().splitlines()
        if "aiohttp.access" in line and f"/{pushed.repository}/manifests/v1" in line and "containerd/" in line
    ]
    assert node_requests == ["401", "403"]

    user, password = upstream_auth.credentials or ("", "")
    ctr_ok(node, pushed.ref, user=f"{user}:{password}")
    assert docker.image_id(pushed.ref)
    assert password not in registry.log_text()
    assert "wrong-pw" not in registry.log_text()


def test_rebuilt_tag_is_served_fresh(
    docker: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    image = build_image(docker, "fresh-app:dev", layers=2, size=2 * MiB, seed="fresh")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)
    ctr_ok(node, "docker.io/library/fresh-app:dev")
    first = node_digest(node, "docker.io/library/fresh-app:dev")

    rebuild_image(docker, image, salt="second")
    node.clean()
    ctr_ok(node, "docker.io/library/fresh-app:dev")
    second = node_digest(node, "docker.io/library/fresh-app:dev")

    assert first != second
    assert exports(registry) == docker.exports_for(2)
    # What was served before stays servable by digest.
    assert oci_client.request(f"{registry.url}/v2/fresh-app/manifests/{first}", headers=ACCEPT).status == 200


def test_ten_simultaneous_pulls_cause_one_export(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "crowd:1", layers=4, size=24 * MiB, seed="crowd")
    registry = registry_under_test(docker)
    since = time.time()
    barrier = threading.Barrier(10)

    def one_pull(_: int) -> str:
        barrier.wait()
        return oci_client.pull(registry.url, "library/crowd", "1", ns="docker.io").digest

    with ThreadPoolExecutor(10) as pool:
        digests = set(pool.map(one_pull, range(10)))
    assert len(digests) == 1
    assert exports(registry) == docker.exports_for(1)
    # Docker's own account: on the containerd image store not a single `docker save`.
    assert len(docker.image_saves(since)) == docker.exports_for(1)
    # The same from the registry's own counters.
    metrics = oci_client.request(f"{registry.url}/metrics").body.decode()
    families = {family.name: family for family in text_string_to_metric_families(metrics)}
    export_counts = [
        s for s in families["k3d_registry_docker_export_seconds"].samples if s.name.endswith("_count")
    ]
    assert [(s.labels["outcome"], s.value) for s in export_counts] == [("ok", 1.0)][: docker.exports_for(1)]
    manifest_200 = [
        s.value
        for s in families["k3d_registry_requests"].samples
        if s.labels.get("route") == "manifest" and s.labels.get("status") == "200"
    ]
    assert manifest_200 == [10.0]


def test_restart_with_warm_cache_needs_no_export(
    docker: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "warm:1", layers=2, size=4 * MiB, seed="warm")
    registry = registry_under_test(docker)
    first = oci_client.pull(registry.url, "warm", "1")
    registry.stop()
    registry.start()
    node.set_mirror(registry.addr)

    ctr_ok(node, "docker.io/library/warm:1")
    assert node_digest(node, "docker.io/library/warm:1") == first.digest
    assert registry.log_text().count("exporting docker.io/library/warm:1") == docker.exports_for(1)


def test_blob_range_requests(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    build_image(docker, "ranged:1", layers=1, size=2 * MiB, seed="range")
    registry = registry_under_test(docker)
    pulled = oci_client.pull(registry.url, "ranged", "1")
    layer = pulled.manifest["layers"][0]
    url = f"{registry.url}/v2/ranged/blobs/{layer['digest']}"
    whole = oci_client.request(url).body
    assert len(whole) == layer["size"]

    size = len(whole)
    cases = {
        "bytes=0-": (0, size - 1),
        "bytes=500-1499": (500, 1499),
        "bytes=500-": (500, size - 1),
        "bytes=-500": (size - 500, size - 1),
    }
    for header, (start, end) in cases.items():
        resp = oci_client.request(url, headers={"Range": header, "Accept-Encoding": "gzip"})
        assert resp.status == 206, header
        assert resp.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert resp.body == whole[start : end + 1]
        assert "content-encoding" not in resp.headers
    assert oci_client.request(url, headers={"Range": f"bytes={size + 10}-"}).status == 416
    head = oci_client.request(url, method="HEAD")
    assert head.headers["content-length"] == str(size)
    assert head.headers["docker-content-digest"] == layer["digest"]
    assert head.headers["accept-ranges"] == "bytes"
    # The blob belongs to "ranged" only.
    other = oci_client.request(f"{registry.url}/v2/other/blobs/{layer['digest']}")
    assert other.status == 404
    assert other.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_large_multilayer_image(
    docker: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    image = build_image(docker, "large:1", layers=5, size=110 * MiB, seed="large")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)
    ctr_ok(node, "docker.io/library/large:1")
    pulled = oci_client.pull(registry.url, "library/large", "1", ns="docker.io")
    assert len(pulled.manifest["layers"]) == image.layer_count
    assert pulled.bytes > 100 * MiB


@pytest.mark.parametrize("variant", ["docker26_containerd", "docker28_containerd"])
def test_containerd_store_serves_original_index_for_host_platform(
    variant: str,
    request: pytest.FixtureRequest,
    upstream: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
) -> None:
    """Docker 28.5 (API 1.51) exports with `platform` only the host's manifest: the registry must still
    serve the upstream's index under the tag, and by its digest."""
    docker: Dockerd = request.getfixturevalue(variant)
    multi = push_multiplatform(upstream, f"multi/{variant}", "1")
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)
    name = f"multi/{variant}"

    ctr_ok(node, f"{upstream.addr}/{name}:1")

    url = f"{registry.url}/v2/{name}/manifests"
    index = oci_client.request(f"{url}/1?ns={upstream.addr}", headers=ACCEPT)
    assert index.headers["docker-content-digest"] == multi.index_digest
    assert f"sha256:{hashlib.sha256(index.body).hexdigest()}" == multi.index_digest  # the upstream's bytes
    head = oci_client.request(f"{url}/1?ns={upstream.addr}", method="HEAD", headers=ACCEPT)
    assert head.headers["docker-content-digest"] == multi.index_digest
    pinned = oci_client.request(f"{url}/{multi.index_digest}?ns={upstream.addr}", headers=ACCEPT)
    assert pinned.status == 200 and pinned.body == index.body
    amd64 = multi.manifests["linux/amd64"]
    assert set(amd64.layer_digests) <= served_blobs(registry)

    # Docker pulled only its own platform. In the registry's own namespace (no pulls) the arm64 child is
    # absent from the export: a 404, never a manifest whose blobs cannot be served.
    docker.docker("tag", f"{upstream.addr}/{name}:1", f"multi-local-{variant.replace('_', '-')}:1")
    arm64 = multi.manifests["linux/arm64"]
    local = f"{registry.url}/v2/multi-local-{variant.replace('_', '-')}/manifests"
    local_index = oci_client.request(f"{local}/1", headers=ACCEPT)
    assert local_index.headers["docker-content-digest"] == multi.index_digest
    absent = oci_client.request(f"{local}/{arm64.digest}", headers=ACCEPT)
    assert absent.status == 404
    assert absent.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    # As a mirror, the foreign child is not pulled through Docker either (containerd 2 asks for every
    # platform's manifest and config of an index): the client gets it from the upstream.
    foreign = oci_client.request(f"{url}/{arm64.digest}?ns={upstream.addr}", headers=ACCEPT)
    assert foreign.status == 404
    assert f"@{arm64.digest}" not in "".join(re.findall(r"pulling \S+ through Docker", registry.log_text()))
    # A digest Docker can serve is pulled through by digest: the host platform's manifest, original bytes.
    pulled = oci_client.pull(registry.url, name, amd64.digest, ns=upstream.addr)
    assert pulled.digest == amd64.digest
    assert set(pulled.blobs) == {amd64.config_digest, *amd64.layer_digests}


@pytest.mark.parametrize("variant", ["docker26", "docker28"])
def test_classic_store_upstream_digest_falls_back(
    variant: str,
    request: pytest.FixtureRequest,
    docker20: Dockerd,
    upstream: UpstreamRegistry,
    registry_under_test: RegistryFactory,
) -> None:
    docker: Dockerd = request.getfixturevalue(variant)
    built = build_image(docker20, "pinned-src:1", layers=1, size=1 * MiB, seed="pinned")
    pushed = push_image(docker20, built, upstream, "team/pinned", "v1")
    docker.docker("pull", pushed.ref)
    registry = registry_under_test(docker)
    resp = oci_client.request(
        f"{registry.url}/v2/team/pinned/manifests/{pushed.digest}?ns={upstream.addr}", headers=ACCEPT
    )
    assert resp.status == 404
    assert "classic image store generates its own manifests" in registry.log_text()


def test_docker_down_then_back(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    build_image(docker, "survivor:1", layers=1, size=1 * MiB, seed="down")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    cached = oci_client.pull(registry.url, "survivor", "1")
    docker.stop()
    try:
        assert oci_client.pull(registry.url, "survivor", "1").digest == cached.digest
        resp = oci_client.request(f"{registry.url}/v2/other-image/manifests/1", headers=ACCEPT)
        assert resp.status == 503
        error = resp.json()["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert docker.host in error["message"]
        ready = oci_client.request(f"{registry.url}/readyz")
        assert ready.status == 503
        assert docker.host in ready.json()["problems"]["docker"]
        assert oci_client.request(f"{registry.url}/healthz").status == 200
    finally:
        docker.start()
    deadline = time.monotonic() + 30
    while oci_client.request(f"{registry.url}/v2/survivor/manifests/1", headers=ACCEPT).status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert oci_client.request(f"{registry.url}/readyz").status == 200


def test_registry_starts_without_docker_and_recovers(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "late:1", layers=1, size=1 * MiB, seed="late")
    docker.stop()
    try:
        registry = registry_under_test(docker)
        assert "Docker is unreachable" in registry.log_text()
        resp = oci_client.request(f"{registry.url}/v2/late/manifests/1", headers=ACCEPT)
        assert resp.status == 503
    finally:
        docker.start()
    assert oci_client.pull(registry.url, "late", "1").digest
    assert f"Docker Engine {docker.version}" in registry.log_text()


def test_docker_pull_from_second_daemon_and_skopeo(
    docker: Dockerd, docker20: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    build_image(docker, "shared-app:2", layers=2, size=2 * MiB, seed="second")
    registry = registry_under_test(docker)
    docker20.docker("pull", f"{registry.addr}/shared-app:2")
    assert docker20.layers(f"{registry.addr}/shared-app:2") == docker.layers("shared-app:2")

    layout = tmp_path / "copy"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.addr}/shared-app:2", f"oci:{layout}:x")
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_remote_tags_are_served_as_docker_has_them_unless_refresh_is_set(
    docker: Dockerd, docker20: Dockerd, upstream: UpstreamRegistry, registry_under_test: RegistryFactory
) -> None:
    v1 = build_image(docker20, "moving-src:1", layers=1, size=1 * MiB, seed="moving-1")
    push_image(docker20, v1, upstream, "team/moving", "latest")
    plain = registry_under_test(docker)
    first = oci_client.pull(plain.url, "team/moving", "latest", ns=upstream.addr)

    v2 = build_image(docker20, "moving-src:2", layers=1, size=1 * MiB, seed="moving-2")
    push_image(docker20, v2, upstream, "team/moving", "latest")
    mark = upstream.log_mark()
    assert oci_client.pull(plain.url, "team/moving", "latest", ns=upstream.addr).digest == first.digest
    assert upstream.requests(mark) == []

    refreshing = registry_under_test(docker, extra_args=["--refresh-tags", "0s"])
    second = oci_client.pull(refreshing.url, "team/moving", "latest", ns=upstream.addr)
    assert second.digest != first.digest
    assert docker.layers(f"{upstream.addr}/team/moving:latest") == docker20.layers(v2.ref)

    upstream.stop()
    try:
        third = oci_client.pull(refreshing.url, "team/moving", "latest", ns=upstream.addr)
    finally:
        upstream.start()
    assert third.digest == second.digest
    assert "serving Docker's copy" in refreshing.log_text()


def test_kill_during_export_leaves_only_verified_blobs(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "killed:1", layers=4, size=160 * MiB, seed="killed")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    tmp = registry.cache_dir / "tmp"
    with ThreadPoolExecutor(1) as pool:
        attempt = request_while_exporting(pool, registry, "killed")
        registry.kill()
        with pytest.raises(OSError):
            attempt.result()

    for blob in (registry.cache_dir / "blobs" / "sha256").rglob("*"):
        if blob.is_file():
            digest = hashlib.sha256(blob.read_bytes()).hexdigest()
            assert digest == blob.name, f"{blob} does not match its name"
    registry.start()
    assert list(tmp.iterdir()) == []
    assert oci_client.pull(registry.url, "killed", "1").bytes > 160 * MiB


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../../etc/passwd/manifests/latest",
        "/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest",
        "/v2/library%2F..%2F..%2Fetc/manifests/latest",
        "/v2/alpine/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd",
        "/v2/alpine/blobs/../../../../etc/passwd",
        "/v2//etc/passwd/manifests/latest",
        "/v2/alpine%00/manifests/latest",
        "/v2/alpine/manifests/latest%00",
        "/v2/alpine/manifests/latest?ns=..%2F..%2Fetc",
        "/v2/alpine/manifests/latest?ns=%2Fetc%2Fpasswd",
    ],
)
def test_hostile_paths_get_client_errors(
    path: str, docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    registry = registry_under_test(docker)
    before = sorted(p.name for p in registry.cache_dir.parent.iterdir())
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    connection.putrequest("GET", path, skip_accept_encoding=True)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    assert 400 <= response.status < 500, (response.status, body)
    assert b"root:" not in body
    assert sorted(p.name for p in registry.cache_dir.parent.iterdir()) == before


def test_dockerd_dying_mid_export_ends_the_request_with_503(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "orphan:1", layers=4, size=160 * MiB, seed="orphan")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    tmp = registry.cache_dir / "tmp"
    with ThreadPoolExecutor(1) as pool:
        attempt = request_while_exporting(pool, registry, "orphan")
        docker.kill()
        try:
            response = attempt.result(timeout=30)
        finally:
            docker.start()
    assert response.status == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert list(tmp.iterdir()) == []
    for blob in (registry.cache_dir / "blobs" / "sha256").rglob("*"):
        if blob.is_file():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert oci_client.pull(registry.url, "orphan", "1").bytes > 160 * MiB


def test_podman_compatible_api(
    podman: Podman, node: Containerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    build_with_podman(podman, "localhost/pm-app:1", tmp_path / "context", seed="podman", size=3 * MiB)
    # The export path (Podman's legacy save); test_in_place.py serves Podman's storage where it lies.
    registry = registry_under_test(podman.host, extra_args=NO_ZERO_COPY)
    node.set_mirror(registry.addr)

    # localhost/… names the registry "localhost", so containerd asks the mirror with ns=localhost; there
    # is no registry on localhost:443 to fall back to, so a pull that works came through the mirror.
    ctr_ok(node, "localhost/pm-app:1")
    assert f"Podman Engine {podman.release}" in registry.log_text()
    assert "legacy layout" in registry.log_text()
    pulled = oci_client.pull(registry.url, "pm-app", "1", ns="localhost")
    assert {layer["digest"] for layer in pulled.manifest["layers"]} <= served_blobs(registry)
    assert (
        pulled.manifest["config"]["digest"].removeprefix("sha256:")
        in podman.podman("image", "inspect", "--format", "{{.Id}}", "localhost/pm-app:1").stdout
    )


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("docker26", "classic graph driver"),
        ("docker28", "classic graph driver"),
        ("docker28_containerd", "containerd image store"),
        ("docker26_containerd", "containerd image store"),
        ("docker20", "legacy `docker save` format"),
    ],
)
def test_doctor_explains_each_docker(
    variant: str, expected: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    daemon: Dockerd = request.getfixturevalue(variant)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "k3d_registry_dockerd",
            "doctor",
            "--addr",
            f"127.0.0.1:{free_port()}",
            "--cache-dir",
            str(tmp_path),
        ],
        env={**os.environ, "DOCKER_HOST": daemon.host},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{daemon.version} reachable at {daemon.host} (DOCKER_HOST)" in result.stdout
    assert expected in result.stdout
    assert "✗" not in result.stdout


def test_doctor_fails_without_docker_and_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "k3d_registry_dockerd", "doctor", "--cache-dir", str(tmp_path)],
            env={
                **os.environ,
                "DOCKER_HOST": f"unix://{tmp_path}/no.sock",
                "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert (
        f"✗ Docker is unreachable at unix://{tmp_path}/no.sock (DOCKER_HOST): No such file" in result.stdout
    )
    assert f"✗ cannot listen on 127.0.0.1:{port}: the port is already in use" in result.stdout
    assert "✓ cache dir" in result.stdout


def test_https_with_a_self_signed_certificate(
    docker: Dockerd, node: Containerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    build_image(docker, "tls-app:1", layers=1, size=1 * MiB, seed="tls")
    tls_env = {"REGISTRY_HTTP_TLS_CERTIFICATE": str(cert), "REGISTRY_HTTP_TLS_KEY": str(key)}
    registry = registry_under_test(docker, env=tls_env, ca_file=cert)
    assert "serving HTTPS with" in registry.log_text()

    # skopeo, trusting the certificate through a cert dir.
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(cert, certs / "ca.crt")
    inspected = json.loads(
        skopeo("inspect", "--no-tags", "--cert-dir", str(certs), f"docker://{registry.addr}/tls-app:1")
    )
    assert inspected["Digest"].startswith("sha256:")

    # containerd, with the certificate as the mirror's CA in hosts.toml.
    hosts = node.hosts_dir / "_default" / "hosts.toml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(
        f'[host."https://{registry.addr}/v2"]\n  capabilities = ["pull", "resolve"]\n  ca = "{cert}"\n'
    )
    ctr_ok(node, "docker.io/library/tls-app:1")
    assert node_digest(node, "docker.io/library/tls-app:1") == inspected["Digest"]

    # No plain HTTP on the TLS port.
    with pytest.raises(OSError):
        oci_client.request(f"http://{registry.addr}/v2/", timeout=5)


def test_json_logs(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    build_image(docker, "json-logs:1", layers=1, size=1 * MiB, seed="json")
    registry = registry_under_test(docker, extra_args=[*NO_ZERO_COPY, "--log-format", "json"])
    pulled = oci_client.pull(registry.url, "json-logs", "1")
    layer = pulled.manifest["layers"][0]
    served = f'/blobs/{layer["digest"]} HTTP/1.1" 200 {layer["size"]} '

    def logged() -> list[dict[str, str]]:
        """The entries, once the layer's access line is among them (aiohttp writes it after the answer)."""
        found = [json.loads(line) for line in registry.log_text().splitlines() if line.startswith("{")]
        access = [e["message"] for e in found if e["logger"] == "aiohttp.access"]
        return found if any(served in message for message in access) else []

    entries = wait_until(logged, timeout=10, what="the layer's access-log entry")
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    # ISO 8601 with the offset, as log collectors parse it.
    logged_at = datetime.datetime.fromisoformat(entries[0]["time"])
    assert logged_at.tzinfo is not None
    assert abs(logged_at.timestamp() - time.time()) < 600
    assert any(e["logger"] == "k3d_registry_dockerd.sources" and "exported" in e["message"] for e in entries)


def test_cache_ls_verify_prune(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    build_image(docker, "cached-app:1", layers=2, size=2 * MiB, seed="cache-cmds")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    pulled = oci_client.pull(registry.url, "cached-app", "1")
    registry.stop()

    def cache_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "k3d_registry_dockerd",
                "cache",
                *args,
                "--cache-dir",
                str(registry.cache_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    listing = cache_command("ls")
    assert listing.returncode == 0, listing.stderr
    assert "docker.io/library/cached-app" in listing.stdout
    assert pulled.digest[:19] in listing.stdout
    (row,) = [line for line in listing.stdout.splitlines() if "cached-app" in line]
    assert re.search(r" [0-9.]+ MiB +docker ", row), row

    layer = pulled.manifest["layers"][0]["digest"].removeprefix("sha256:")
    blob = registry.cache_dir / "blobs" / "sha256" / layer[:2] / layer
    blob.write_bytes(b"corrupted on disk")
    verified = cache_command("verify")
    assert verified.returncode == 1
    assert f"removed {blob}" in verified.stdout
    assert not blob.exists()

    assert cache_command("prune").returncode == 2
    pruned = cache_command("prune", "--all")
    assert pruned.returncode == 0
    assert "pruned 1 tags" in pruned.stdout
    assert not any(path.is_file() for path in (registry.cache_dir / "blobs").rglob("*"))

    registry.start()
    assert oci_client.pull(registry.url, "cached-app", "1").digest == pulled.digest
    assert exports(registry) == 2


def test_cache_max_size_evicts_least_recently_used(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "evict-a:1", layers=1, size=4 * MiB, seed="evict-a", busybox=False)
    build_image(docker, "evict-b:1", layers=1, size=4 * MiB, seed="evict-b", busybox=False)
    registry = registry_under_test(docker, extra_args=[*NO_ZERO_COPY, "--cache-max-size", "6MiB"])
    first = oci_client.pull(registry.url, "evict-a", "1")
    # A restart forgets which images pulls are using: nothing keeps evict-a in the cache now.
    registry.stop()
    registry.start()
    second = oci_client.pull(registry.url, "evict-b", "1")
    blobs = registry.cache_dir / "blobs" / "sha256"
    stored = sum(path.stat().st_size for path in blobs.rglob("*") if path.is_file())
    assert stored <= 6 * MiB
    assert "evicted docker.io/library/evict-a" in registry.log_text()
    layer_a = first.manifest["layers"][0]["digest"]
    assert oci_client.request(f"{registry.url}/v2/evict-a/blobs/{layer_a}").status == 404
    assert oci_client.pull(registry.url, "evict-b", "1").digest == second.digest
    # An evicted image comes back with a new export.
    assert oci_client.pull(registry.url, "evict-a", "1").digest == first.digest
    assert exports(registry) == 3


def test_cache_max_size_keeps_what_a_pull_is_fetching(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    """A node that got a manifest and is still fetching layers must get them, even when other exports
    push the cache past its limit meanwhile: the cache overshoots instead and says so."""
    build_image(docker, "in-use-a:1", layers=2, size=4 * MiB, seed="in-use-a", busybox=False)
    build_image(docker, "in-use-b:1", layers=1, size=4 * MiB, seed="in-use-b", busybox=False)
    registry = registry_under_test(docker, extra_args=[*NO_ZERO_COPY, "--cache-max-size", "6MiB"])
    accept = {"Accept": oci_client.MANIFEST_ACCEPT}
    manifest = oci_client.request(f"{registry.url}/v2/in-use-a/manifests/1", headers=accept).json()
    assert "layers" in manifest  # Docker 26's classic store exports one manifest, no index
    oci_client.pull(registry.url, "in-use-b", "1")
    for blob in [manifest["config"], *manifest["layers"]]:
        answer = oci_client.request(f"{registry.url}/v2/in-use-a/blobs/{blob['digest']}")
        assert answer.status == 200
        assert f"sha256:{hashlib.sha256(answer.body).hexdigest()}" == blob["digest"]
    assert "stays over the 6 MiB limit" in registry.log_text()
    assert "evicted docker.io" not in registry.log_text()


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_status_page_in_a_browser(
    chromium: str, docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    image = build_image(docker, "shown-on-status:1", layers=2, size=3 * MiB, seed="status")
    registry = registry_under_test(docker, extra_args=[*NO_ZERO_COPY, "--cache-max-size", "1GiB"])
    oci_client.pull(registry.url, "shown-on-status", "1")
    # Rebuilt after it was served: pre-exported.
    rebuild_image(docker, image, salt="status")
    wait_until(
        lambda: oci_client.request(f"{registry.url}/status.json").json()["prefetch"]["recent"],
        timeout=60,
        what="the pre-export on the status page",
    )
    oci_client.request(f"{registry.url}/v2/not-in-docker/manifests/1")
    layout = write_image_layout(tmp_path / "layout", layer_sizes=(1 * MiB,), seed="status-pushed")
    skopeo(
        "copy", "--dest-tls-verify=false", f"oci:{layout.layout}:1", f"docker://{registry.addr}/pushed-app:1"
    )
    browser = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    dom = subprocess.run(
        [*browser, "--dump-dom", f"{registry.url}/"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "docker.io/library/shown-on-status" in dom
    # The first line: how bytes are served (exported, as --no-zero-copy turned in-place serving off).
    assert '<div class="path" id="bytes-path">export: every image is exported' in dom
    assert "of 1 GiB limit" in dom
    assert '<span class="tag">1</span>' in dom  # the tag, rendered by the page's script
    # Docker's state, pushed images told from Docker's, and who pulled what.
    assert f"Docker Engine {docker.version}" in dom
    assert '<span class="badge pushed">pushed</span>' in dom
    assert '<span class="badge docker">from Docker</span>' in dom
    assert "1 pushed, 1 from Docker" in dom
    pulls = dom[dom.index("Recent pulls") : dom.index("Cached images")]
    assert "<code>127.0.0.1</code>" in pulls and "shown-on-status:1" in pulls
    assert '<span class="badge cold">cold</span>' in pulls
    prefetch = dom[dom.index("Pre-exports of moved tags") : dom.index("Recent pulls")]
    assert "following Docker's image events" in prefetch
    assert "docker.io/library/shown-on-status:1</td>" in prefetch and "<td>exported</td>" in prefetch
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "status-page.png"
    subprocess.run(
        [*browser, "--window-size=1280,900", f"--screenshot={screenshot}", f"{registry.url}/"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tags_list_and_catalog(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    build_image(docker, "listed-app:1", layers=1, size=1 * MiB, seed="listed")
    docker.docker("tag", "listed-app:1", "listed-app:2")
    registry = registry_under_test(docker)
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.addr}/listed-app"))
    assert listed["Tags"] == ["1", "2"]
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{registry.addr}/listed-app:2"))
    assert inspected["RepoTags"] == ["1", "2"]
    catalog = oci_client.request(f"{registry.url}/v2/_catalog").json()
    assert "listed-app" in catalog["repositories"]
    page = oci_client.request(f"{registry.url}/v2/listed-app/tags/list?n=1")
    assert page.json()["tags"] == ["1"]
    assert 'rel="next"' in page.headers["link"]
