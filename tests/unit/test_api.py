"""The HTTP API over a real Mirror and Store, with a fake Docker behind it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from k3d_registry_dockerd.cache.space import FreeSpace
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import (
    Credentials,
    DockerClient,
    DockerFailed,
    DockerUnavailable,
    PullDenied,
    PullFailed,
    PullNotFound,
)
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.web import status as status_module
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import Registry, assemble

from .fakes import FakeDocker, LocalImage, local_image
from .saves import (
    OCI_INDEX,
    OCI_MANIFEST,
    classic_save,
    descriptor,
    digest_of,
    legacy_save,
    make_image,
    make_index,
    oci_layout,
)

ALPINE = "docker.io/library/alpine:latest"
MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def docker() -> FakeDocker:
    fake = FakeDocker()
    fake.images[ALPINE] = local_image("alpine-1", ALPINE)
    return fake


@pytest.fixture
def make_client(aiohttp_client: Any, store: Store, docker: FakeDocker) -> MakeClient:
    async def make(registry: Registry | None = None) -> TestClient:
        return await aiohttp_client(create_app(registry or assemble(store, docker)))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


async def error_of(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"errors"}
    (error,) = body["errors"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# ---- base and manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
async def test_base(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await response.json() == {}


async def test_manifest_by_tag_get_and_head(client: TestClient, docker: FakeDocker) -> None:
    image = docker.images[ALPINE].image
    got = await client.get("/v2/alpine/manifests/latest")
    assert got.status == 200
    body = await got.read()
    assert body == image.manifest
    assert sha(body) == image.digest
    assert got.headers["Docker-Content-Digest"] == image.digest
    assert got.headers["Content-Type"] == OCI_MANIFEST
    assert int(got.headers["Content-Length"]) == len(body)
    assert got.headers["Docker-Distribution-API-Version"] == "registry/2.0"

    head = await client.head("/v2/alpine/manifests/latest")
    assert head.status == 200
    assert await head.read() == b""
    for header in ("Docker-Content-Digest", "Content-Length", "Content-Type"):
        assert head.headers[header] == got.headers[header]
    assert docker.saves == [ALPINE]


async def test_manifest_by_digest_afterwards(client: TestClient, docker: FakeDocker) -> None:
    image = docker.images[ALPINE].image
    await client.get("/v2/alpine/manifests/latest")
    for path in (f"/v2/alpine/manifests/{image.digest}", f"/v2/library/alpine/manifests/{image.digest}"):
        response = await client.get(path)
        assert response.status == 200
        assert await response.read() == image.manifest
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Type"] == OCI_MANIFEST
        head = await client.head(path)
        assert head.status == 200
        assert head.headers["Content-Length"] == str(len(image.manifest))
    assert docker.saves == [ALPINE]


async def test_library_prefix_shares_the_cache(client: TestClient, docker: FakeDocker) -> None:
    first = await client.get("/v2/alpine/manifests/latest")
    second = await client.get("/v2/library/alpine/manifests/latest")
    assert first.headers["Docker-Content-Digest"] == second.headers["Docker-Content-Digest"]
    assert docker.saves == [ALPINE]


async def test_unknown_tag(client: TestClient, docker: FakeDocker) -> None:
    error = await error_of(await client.get("/v2/alpine/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    assert "alpine:nope" in error["message"]
    head = await client.head("/v2/alpine/manifests/nope")
    assert head.status == 404
    assert docker.pulls == []
    assert docker.saves == []


async def test_unknown_digest(client: TestClient, docker: FakeDocker) -> None:
    await error_of(await client.get(f"/v2/alpine/manifests/{sha(b'nothing')}"), 404, "MANIFEST_UNKNOWN")
    assert docker.saves == []


@pytest.mark.parametrize("tag", ["-latest", ".latest", "a" * 129, ".INVALID_MANIFEST_NAME"])
async def test_pulling_an_invalid_tag_is_not_found(client: TestClient, docker: FakeDocker, tag: str) -> None:
    error = await error_of(await client.get(f"/v2/alpine/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    assert "invalid tag" in error["message"]
    assert (await client.head(f"/v2/alpine/manifests/{tag}")).status == 404
    assert docker.inspects == []


async def test_pushing_an_invalid_tag(client: TestClient) -> None:
    response = await client.put("/v2/alpine/manifests/-latest", data=b"{}")
    await error_of(response, 400, "TAG_INVALID")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/a..b/manifests/latest", "NAME_INVALID"),
        ("/v2/alpine/manifests/latest?ns=not%20a%20host", "NAME_INVALID"),
        ("/v2/alpine/manifests/sha256:abc", "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha512:" + "a" * 128, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/latest", "DIGEST_INVALID"),
        ("/v2/alpine/blobs/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/UPPER/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
    ],
)
async def test_invalid_references(client: TestClient, docker: FakeDocker, path: str, code: str) -> None:
    await error_of(await client.get(path), 400, code)
    assert docker.inspects == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/alpine/manifests/latest"),
        ("PATCH", "/v2/alpine/manifests/latest"),
        ("PUT", f"/v2/alpine/blobs/{'sha256:' + 'a' * 64}"),
        ("POST", f"/v2/alpine/blobs/{'sha256:' + 'a' * 64}"),
        ("PATCH", f"/v2/alpine/blobs/{'sha256:' + 'a' * 64}"),
        ("PUT", "/v2/"),
        ("POST", "/v2/"),
        ("DELETE", "/v2/"),
    ],
)
async def test_methods_an_endpoint_lacks_are_unsupported(client: TestClient, method: str, path: str) -> None:
    response = await client.request(method, path, data=b"{}")
    error = await error_of(response, 405, "UNSUPPORTED")
    assert method in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/library/alpine/manifests/latest?ns=docker.io"),
        ("POST", "/v2/library/alpine/blobs/uploads/?ns=docker.io"),
        ("DELETE", f"/v2/library/alpine/blobs/{'sha256:' + 'a' * 64}?ns=docker.io"),
    ],
)
async def test_writes_to_a_mirrored_namespace_are_unsupported(
    client: TestClient, method: str, path: str
) -> None:
    error = await error_of(await client.request(method, path, data=b"{}"), 405, "UNSUPPORTED")
    assert "own namespace" in error["message"]


@pytest.mark.parametrize("path", ["/v2/alpine/things/list", "/v2/_other", "/v3/", "/nothing"])
async def test_unknown_endpoints(client: TestClient, path: str) -> None:
    await error_of(await client.get(path), 404, "NAME_UNKNOWN")


# ---- blobs ------------------------------------------------------------------------------------------


@pytest.fixture
async def layer(client: TestClient, docker: FakeDocker) -> tuple[str, bytes]:
    """The first layer of alpine, after its manifest was fetched."""
    image = docker.images[ALPINE].image
    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    return image.layer_digests[0], image.layers[0]


async def test_blob_get_and_head(client: TestClient, layer: tuple[str, bytes]) -> None:
    digest, data = layer
    response = await client.get(f"/v2/alpine/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"

    head = await client.head(f"/v2/alpine/blobs/{digest}")
    assert head.status == 200
    assert await head.read() == b""
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.headers["Content-Length"] == str(len(data))


async def test_config_and_manifest_are_blobs_too(client: TestClient, docker: FakeDocker, layer: Any) -> None:
    image = docker.images[ALPINE].image
    for digest, data in ((image.config_digest, image.config), (image.digest, image.manifest)):
        response = await client.get(f"/v2/alpine/blobs/{digest}")
        assert response.status == 200
        assert await response.read() == data


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [("bytes=0-", 0, None), ("bytes=5-14", 5, 15), ("bytes=5-", 5, None), ("bytes=-5", -5, None)],
)
async def test_blob_ranges(
    client: TestClient, layer: tuple[str, bytes], range_header: str, start: int, stop: int | None
) -> None:
    digest, data = layer
    response = await client.get(f"/v2/alpine/blobs/{digest}", headers={"Range": range_header})
    assert response.status == 206
    expected = data[start:stop]
    assert await response.read() == expected
    first = start % len(data)
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    assert response.headers["Content-Length"] == str(len(expected))


async def test_blob_range_past_the_end(client: TestClient, layer: tuple[str, bytes]) -> None:
    digest, data = layer
    response = await client.get(f"/v2/alpine/blobs/{digest}", headers={"Range": "bytes=99999999-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_blob_is_never_content_encoded(client: TestClient, layer: tuple[str, bytes]) -> None:
    digest, data = layer
    response = await client.get(
        f"/v2/alpine/blobs/{digest}", headers={"Accept-Encoding": "gzip, br, deflate"}, auto_decompress=False
    )
    assert response.status == 200
    assert "Content-Encoding" not in response.headers
    assert await response.read() == data


async def test_blob_before_any_manifest(client: TestClient, docker: FakeDocker) -> None:
    digest = docker.images[ALPINE].image.layer_digests[0]
    await error_of(await client.get(f"/v2/alpine/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_blob_of_another_repository(client: TestClient, docker: FakeDocker, layer: Any) -> None:
    busybox = "docker.io/library/busybox:latest"
    docker.images[busybox] = local_image("busybox-1", busybox)
    assert (await client.get("/v2/busybox/manifests/latest")).status == 200
    alpine_layer, _ = layer
    error = await error_of(await client.get(f"/v2/busybox/blobs/{alpine_layer}"), 404, "BLOB_UNKNOWN")
    assert alpine_layer in error["message"]
    head = await client.head(f"/v2/busybox/blobs/{alpine_layer}")
    assert head.status == 404
    await error_of(await client.get(f"/v2/alpine/blobs/{sha(b'unknown')}"), 404, "BLOB_UNKNOWN")
    # The same layer under a mirror name of another registry is another repository.
    await error_of(await client.get(f"/v2/alpine/blobs/{alpine_layer}?ns=ghcr.io"), 404, "BLOB_UNKNOWN")


# ---- single flight, freshness, restart --------------------------------------------------------------


async def test_containerd_is_answered_503_in_time_while_the_export_goes_on(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client = await aiohttp_client(create_app(assemble(store, docker), answer_within=0.2))
    docker.save_gate = asyncio.Event()
    containerd = {"User-Agent": "containerd/1.7.24"}
    response = await client.head("/v2/alpine/manifests/latest", headers=containerd)
    assert response.status == 503
    assert response.headers["Retry-After"] == "10"
    assert docker.saves == [ALPINE]  # still running
    # Other clients (docker, skopeo, `warm`) wait for the work, however long it takes.
    waiting = asyncio.ensure_future(client.get("/v2/alpine/manifests/latest"))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    docker.save_gate.set()
    assert (await waiting).status == 200
    assert (await client.get("/v2/alpine/manifests/latest", headers=containerd)).status == 200
    assert docker.saves == [ALPINE]


async def test_a_late_answer_does_not_cut_a_private_pull_short(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    """The 503 leaves the work running: a pull with a pod's secret still ends with the image marked."""
    docker.upstream[REDIS] = local_image("redis-7", REDIS)
    docker.private["docker.io/library/redis"] = Credentials("puller", "s3cret-pw")
    docker.save_gate = asyncio.Event()
    client = await aiohttp_client(create_app(assemble(store, docker), answer_within=0.1))
    headers = {"User-Agent": "containerd/2.1.9", **basic_auth("puller", "s3cret-pw")}
    assert (await client.get(REDIS_PATH, headers=headers)).status == 503
    docker.save_gate.set()
    state = store.root / "private.json"
    while not state.exists() or "redis" not in state.read_text():
        await asyncio.sleep(0.01)
    await error_of(await client.get(REDIS_PATH), 401, "UNAUTHORIZED")
    assert (await client.get(REDIS_PATH, headers=headers)).status == 200


async def test_concurrent_requests_share_one_export(client: TestClient, docker: FakeDocker) -> None:
    docker.save_gate = asyncio.Event()

    async def open_gate_once_all_wait() -> None:
        while not docker.saves:
            await asyncio.sleep(0.001)
        # Requests still inspecting join the export in progress; later ones would find it cached.
        await asyncio.sleep(0.05)
        docker.save_gate.set()

    opener = asyncio.ensure_future(open_gate_once_all_wait())
    responses = await asyncio.gather(*(client.get("/v2/alpine/manifests/latest") for _ in range(10)))
    await opener
    digests = {response.headers["Docker-Content-Digest"] for response in responses}
    assert [response.status for response in responses] == [200] * 10
    assert digests == {docker.images[ALPINE].image.digest}
    assert docker.saves == [ALPINE]


async def test_rebuilt_tag_is_re_exported_and_old_digest_stays(
    client: TestClient, docker: FakeDocker
) -> None:
    old = docker.images[ALPINE].image
    assert (await client.get("/v2/alpine/manifests/latest")).headers["Docker-Content-Digest"] == old.digest
    assert (await client.get("/v2/alpine/manifests/latest")).headers["Docker-Content-Digest"] == old.digest
    assert docker.saves == [ALPINE]

    docker.images[ALPINE] = local_image("alpine-2", ALPINE)
    new = docker.images[ALPINE].image
    response = await client.get("/v2/alpine/manifests/latest")
    assert response.headers["Docker-Content-Digest"] == new.digest != old.digest
    assert docker.saves == [ALPINE, ALPINE]

    by_digest = await client.get(f"/v2/alpine/manifests/{old.digest}")
    assert by_digest.status == 200
    assert await by_digest.read() == old.manifest
    old_layer = await client.get(f"/v2/alpine/blobs/{old.layer_digests[0]}")
    assert old_layer.status == 200
    assert docker.saves == [ALPINE, ALPINE]


async def test_restart_serves_the_cache_without_exporting(
    make_client: MakeClient, store: Store, docker: FakeDocker
) -> None:
    image = docker.images[ALPINE].image
    first = await make_client()
    assert (await first.get("/v2/alpine/manifests/latest")).status == 200
    await first.close()

    reopened = Store(store.root)
    reopened.open()
    second = await make_client(assemble(reopened, docker))
    response = await second.get("/v2/alpine/manifests/latest")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == image.digest
    blob = await second.get(f"/v2/alpine/blobs/{image.layer_digests[1]}")
    assert await blob.read() == image.layers[1]
    assert docker.saves == [ALPINE]


# ---- pulls through the ns mirror parameter ----------------------------------------------------------

REDIS = "docker.io/library/redis:7"
REDIS_PATH = "/v2/library/redis/manifests/7?ns=docker.io"


async def test_local_name_never_pulls(client: TestClient, docker: FakeDocker) -> None:
    docker.upstream[REDIS] = local_image("redis-7", REDIS)
    await error_of(await client.get("/v2/library/redis/manifests/7"), 404, "MANIFEST_UNKNOWN")
    assert docker.pulls == []


async def test_mirror_request_pulls_once_then_exports(client: TestClient, docker: FakeDocker) -> None:
    docker.upstream[REDIS] = local_image("redis-7", REDIS)
    for _ in range(2):
        response = await client.get(REDIS_PATH)
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == docker.upstream[REDIS].image.digest
    assert docker.pulls == [(REDIS, None)]
    assert docker.saves == [REDIS]


async def test_answers_to_requests_scoped_by_ns_name_it(client: TestClient, docker: FakeDocker) -> None:
    """distribution-spec, "Registry Proxying": a registry using `ns` SHOULD return it in OCI-Namespace."""
    docker.upstream[REDIS] = local_image("redis-7", REDIS)
    manifest = await client.get(REDIS_PATH)
    assert manifest.headers["OCI-Namespace"] == "docker.io"
    layer = json.loads(await manifest.read())["layers"][0]["digest"]
    blob = await client.get(f"/v2/library/redis/blobs/{layer}?ns=docker.io")
    assert (blob.status, blob.headers["OCI-Namespace"]) == (200, "docker.io")
    # As the client sent it, also on errors and listings.
    missing = await client.get("/v2/library/nothing/manifests/1?ns=127.0.0.1%3A5001")
    assert (missing.status, missing.headers["OCI-Namespace"]) == (404, "127.0.0.1:5001")
    tags = await client.get("/v2/library/redis/tags/list?ns=docker.io")
    assert tags.headers["OCI-Namespace"] == "docker.io"
    for unscoped in (
        await client.get("/v2/library/redis/manifests/7"),
        await client.put("/v2/library/redis/manifests/7?ns=docker.io", data=b"{}"),
        await client.get("/v2/library/redis/manifests/7?ns=not%20a%20host"),
    ):
        assert "OCI-Namespace" not in unscoped.headers


@pytest.mark.parametrize("ns", ["index.docker.io", "registry-1.docker.io"])
async def test_docker_hub_aliases_pull_from_docker_io(
    client: TestClient, docker: FakeDocker, ns: str
) -> None:
    docker.upstream[REDIS] = local_image("redis-7", REDIS)
    assert (await client.get(f"/v2/redis/manifests/7?ns={ns}")).status == 200
    assert docker.pulls == [(REDIS, None)]


async def test_pull_denied_without_credentials_challenges(client: TestClient, docker: FakeDocker) -> None:
    docker.pull_error = PullDenied(
        "pull access denied for redis, repository does not exist or may require 'docker login': "
        "denied: requested access to the resource is denied"
    )
    response = await client.get(REDIS_PATH)
    error = await error_of(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == 'Basic realm="docker.io"'
    assert "pull access denied" in error["detail"]
    assert docker.pulls == [(REDIS, None)]


async def test_pull_denied_with_credentials_is_403(client: TestClient, docker: FakeDocker) -> None:
    docker.pull_error = PullDenied("unauthorized: incorrect username or password")
    response = await client.get(REDIS_PATH, headers=basic_auth("puller", "s3cret-pw"))
    await error_of(response, 403, "DENIED")
    assert "WWW-Authenticate" not in response.headers
    assert docker.pulls == [(REDIS, Credentials("puller", "s3cret-pw"))]


async def test_pull_with_credentials(client: TestClient, docker: FakeDocker) -> None:
    docker.upstream["127.0.0.1:5002/team/app:v1"] = local_image("private", "127.0.0.1:5002/team/app:v1")
    response = await client.get(
        "/v2/team/app/manifests/v1?ns=127.0.0.1:5002", headers=basic_auth("puller", "pw:with:colons")
    )
    assert response.status == 200
    assert docker.pulls == [("127.0.0.1:5002/team/app:v1", Credentials("puller", "pw:with:colons"))]


async def test_non_basic_authorization_is_ignored(client: TestClient, docker: FakeDocker) -> None:
    # Only Basic credentials can be handed to dockerd; anything else is an anonymous pull.
    response = await client.get(REDIS_PATH, headers={"Authorization": "Bearer abc"})
    await error_of(response, 404, "MANIFEST_UNKNOWN")
    assert docker.pulls == [(REDIS, None)]


async def test_pull_not_found(client: TestClient, docker: FakeDocker) -> None:
    error = await error_of(await client.get(REDIS_PATH), 404, "MANIFEST_UNKNOWN")
    assert "manifest unknown" in error["detail"]
    assert docker.pulls == [(REDIS, None)]


async def test_pull_failed_is_bad_gateway(client: TestClient, docker: FakeDocker) -> None:
    docker.pull_error = PullFailed(
        'Get "http://127.0.0.1:9/v2/": dial tcp 127.0.0.1:9: connect: connection refused'
    )
    error = await error_of(await client.get("/v2/x/manifests/1?ns=127.0.0.1:9"), 502, "UNAVAILABLE")
    assert "connection refused" in error["detail"]


async def test_pull_not_found_by_explicit_exception(client: TestClient, docker: FakeDocker) -> None:
    docker.pull_error = PullNotFound("manifest for x not found")
    await error_of(await client.get(REDIS_PATH), 404, "MANIFEST_UNKNOWN")


# ---- Docker unavailable ------------------------------------------------------------------------------


async def test_docker_unavailable_serves_the_cache(client: TestClient, docker: FakeDocker) -> None:
    image = docker.images[ALPINE].image
    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    docker.unavailable = True

    cached = await client.get("/v2/alpine/manifests/latest")
    assert cached.status == 200
    assert cached.headers["Docker-Content-Digest"] == image.digest
    assert await cached.read() == image.manifest
    assert (await client.get(f"/v2/alpine/manifests/{image.digest}")).status == 200
    assert (await client.get(f"/v2/alpine/blobs/{image.layer_digests[0]}")).status == 200

    error = await error_of(await client.get("/v2/alpine/manifests/edge"), 503, "UNAVAILABLE")
    assert "unix:///fake.sock (default)" in error["message"]
    error = await error_of(await client.get(f"/v2/alpine/manifests/{sha(b'other')}"), 503, "UNAVAILABLE")
    assert "unix:///fake.sock (default)" in error["message"]


async def test_real_client_without_daemon_is_503(
    make_client: MakeClient, store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    socket = tmp_path / "absent.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
    real = DockerClient()
    try:
        client = await make_client(assemble(store, real))
        error = await error_of(await client.get("/v2/alpine/manifests/latest"), 503, "UNAVAILABLE")
        assert f"unix://{socket} (DOCKER_HOST): No such file or directory" in error["message"]
    finally:
        await real.close()


async def test_docker_lost_during_export_is_503(client: TestClient, docker: FakeDocker) -> None:
    docker.save_error = DockerUnavailable("Docker is unreachable at unix:///x.sock (DOCKER_HOST): gone")
    await error_of(await client.get("/v2/alpine/manifests/latest"), 503, "UNAVAILABLE")


async def test_docker_lost_during_digest_export_is_503(client: TestClient, docker: FakeDocker) -> None:
    image = docker.images[ALPINE].image
    docker.images[f"docker.io/library/alpine@{image.digest}"] = docker.images[ALPINE]
    docker.save_error = DockerUnavailable("Docker is unreachable at unix:///x.sock (DOCKER_HOST): gone")
    await error_of(await client.get(f"/v2/alpine/manifests/{image.digest}"), 503, "UNAVAILABLE")


async def test_docker_failing_export_is_502(client: TestClient, docker: FakeDocker) -> None:
    docker.save_error = DockerFailed("saving alpine: no such image")
    error = await error_of(await client.get("/v2/alpine/manifests/latest"), 502, "UNAVAILABLE")
    assert "no such image" in error["detail"]


# ---- refresh of remote tags ---------------------------------------------------------------------------


async def test_refresh_tags(make_client: MakeClient, store: Store, docker: FakeDocker) -> None:
    docker.images[REDIS] = docker.upstream[REDIS] = local_image("redis-7", REDIS)
    digest = docker.images[REDIS].image.digest
    plain = await make_client()
    assert (await plain.get(REDIS_PATH)).status == 200
    assert docker.pulls == []  # Docker had it and refreshing is off
    assert store.record("docker.io/library/redis").tags["7"].pulled_at is None

    refreshing = await make_client(assemble(store, docker, refresh_tags=0.0))
    docker.pull_error = PullFailed("toomanyrequests: rate limit")
    response = await refreshing.get(REDIS_PATH)
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert docker.pulls == [(REDIS, None)]

    docker.pull_error = None
    response = await refreshing.get(REDIS_PATH)
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert docker.pulls == [(REDIS, None), (REDIS, None)]
    assert store.record("docker.io/library/redis").tags["7"].pulled_at is not None
    assert docker.saves == [REDIS]

    # Local names are Docker's own images: never refreshed.
    assert (await refreshing.get("/v2/alpine/manifests/latest")).status == 200
    assert [ref for ref, _ in docker.pulls] == [REDIS, REDIS]


async def test_refresh_picks_up_a_new_upstream_image(
    make_client: MakeClient, store: Store, docker: FakeDocker
) -> None:
    docker.images[REDIS] = local_image("redis-7", REDIS)
    docker.upstream[REDIS] = local_image("redis-7-new", REDIS)
    client = await make_client(assemble(store, docker, refresh_tags=0.0))
    response = await client.get(REDIS_PATH)
    assert response.headers["Docker-Content-Digest"] == docker.upstream[REDIS].image.digest
    assert docker.pulls == [(REDIS, None)]
    assert docker.saves == [REDIS]


# ---- other save stream shapes through the mirror ------------------------------------------------------


async def test_containerd_store_index(client: TestClient, docker: FakeDocker) -> None:
    amd64 = make_image("ctr-amd64")
    arm64 = make_image("ctr-arm64", arch="arm64")
    index = make_index(
        [(amd64, {"os": "linux", "architecture": "amd64"}), (arm64, {"os": "linux", "architecture": "arm64"})]
    )
    name = "docker.io/library/multi:1"
    save = oci_layout({**amd64.blobs(), digest_of(index): index}, [descriptor(index, OCI_INDEX, name=name)])
    docker.images[name] = LocalImage("sha256:" + "c" * 64, save)

    response = await client.get("/v2/multi/manifests/1")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.headers["Docker-Content-Digest"] == digest_of(index)
    assert await response.read() == index
    child = await client.get(f"/v2/multi/manifests/{amd64.digest}")
    assert child.status == 200
    assert await child.read() == amd64.manifest
    assert (await client.get(f"/v2/multi/blobs/{amd64.layer_digests[0]}")).status == 200
    assert docker.saves == [name]
    # The absent arm64 child is not served; Docker has no image by that digest either.
    await error_of(await client.get(f"/v2/multi/manifests/{arm64.digest}"), 404, "MANIFEST_UNKNOWN")


async def test_a_foreign_child_is_not_pulled_through_docker(client: TestClient, docker: FakeDocker) -> None:
    """containerd 2 reads every platform's manifest of an index: on the containerd store the registry must
    not make Docker pull a whole foreign image for that; the client gets it from the upstream."""
    docker.containerd_store = True
    amd64 = make_image("pt-amd64")
    arm64 = make_image("pt-arm64", arch="arm64")
    index = make_index(
        [(amd64, {"os": "linux", "architecture": "amd64"}), (arm64, {"os": "linux", "architecture": "arm64"})]
    )
    name = "docker.io/library/multi:1"
    save = oci_layout({**amd64.blobs(), digest_of(index): index}, [descriptor(index, OCI_INDEX, name=name)])
    docker.upstream[name] = LocalImage(digest_of(index), save)
    docker.upstream[f"docker.io/library/multi@{arm64.digest}"] = LocalImage(arm64.digest, save)

    assert (await client.get("/v2/library/multi/manifests/1?ns=docker.io")).status == 200
    await error_of(
        await client.get(f"/v2/library/multi/manifests/{arm64.digest}?ns=docker.io"), 404, "MANIFEST_UNKNOWN"
    )
    assert docker.pulls == [(name, None)]


async def test_index_without_the_platform_is_404(client: TestClient, docker: FakeDocker) -> None:
    docker.platform = Platform("linux", "arm64", "v8")
    amd64 = make_image("only-amd64")
    index = make_index([(amd64, {"os": "linux", "architecture": "amd64"})])
    name = "docker.io/library/amd64only:1"
    save = oci_layout({**amd64.blobs(), digest_of(index): index}, [descriptor(index, OCI_INDEX, name=name)])
    docker.images[name] = LocalImage("sha256:" + "d" * 64, save)
    error = await error_of(await client.get("/v2/amd64only/manifests/1"), 404, "MANIFEST_UNKNOWN")
    assert "linux/arm64" in error["detail"]


async def test_incomplete_export_is_404(client: TestClient, docker: FakeDocker) -> None:
    image = make_image("incomplete")
    blobs = image.blobs()
    del blobs[image.layer_digests[0]]
    name = "docker.io/library/incomplete:1"
    docker.images[name] = LocalImage(
        "sha256:" + "e" * 64, oci_layout(blobs, [descriptor(image.manifest, OCI_MANIFEST, name=name)])
    )
    await error_of(await client.get("/v2/incomplete/manifests/1"), 404, "MANIFEST_UNKNOWN")


async def test_corrupt_export_is_502(client: TestClient, store: Store, docker: FakeDocker) -> None:
    image = make_image("corrupt")
    name = "docker.io/library/corrupt:1"
    docker.images[name] = LocalImage(
        "sha256:" + "f" * 64, classic_save(image, name, blobs={image.layer_digests[0]: b"tampered"})
    )
    error = await error_of(await client.get("/v2/corrupt/manifests/1"), 502, "UNAVAILABLE")
    assert image.layer_digests[0] in error["detail"]
    # What the rejected export stored before the bad blob showed up is gone again.
    assert list(store.blobs_dir.glob("*/*")) == []
    assert list(store.tmp_dir.iterdir()) == []


async def test_export_keeps_only_what_is_served(client: TestClient, store: Store, docker: FakeDocker) -> None:
    """Docker >= 25 also saves v1 layer JSONs under blobs/; no manifest uses them, so they are not kept."""
    image = make_image("extras")
    extra = b'{"id": "v1 layer json"}'
    name = "docker.io/library/extras:1"
    docker.images[name] = LocalImage(
        "sha256:" + "2" * 64, classic_save(image, name, blobs={sha(extra): extra})
    )
    assert (await client.get("/v2/extras/manifests/1")).status == 200
    assert not store.has_blob(sha(extra))
    assert {f"sha256:{p.name}" for p in store.blobs_dir.glob("*/*")} == set(image.blobs())


async def test_legacy_export(client: TestClient, docker: FakeDocker) -> None:
    image = make_image("legacy-app")
    name = "docker.io/team/app:v1"
    docker.images[name] = LocalImage("sha256:" + "1" * 64, legacy_save(image, ["team/app:v1"]))
    response = await client.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_MANIFEST
    manifest = json.loads(await response.read())
    assert manifest["config"]["digest"] == image.config_digest
    layer = await client.get(f"/v2/team/app/blobs/{image.layer_digests[1]}")
    assert await layer.read() == image.layers[1]


async def test_digest_absent_from_the_export_is_remembered(client: TestClient, docker: FakeDocker) -> None:
    upstream_digest = sha(b"the registry's own manifest")
    docker.images[f"docker.io/library/alpine@{upstream_digest}"] = docker.images[ALPINE]
    for _ in range(2):
        await error_of(await client.get(f"/v2/alpine/manifests/{upstream_digest}"), 404, "MANIFEST_UNKNOWN")
    assert docker.saves == [f"docker.io/library/alpine@{upstream_digest}"]


async def test_healthz_and_readyz(client: TestClient, docker: FakeDocker, store: Store) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json()) == {"status": "ok"}

    docker.unavailable = True
    down = await client.get("/readyz")
    assert down.status == 503
    assert "unix:///fake.sock (default)" in (await down.json())["problems"]["docker"]
    assert (await client.get("/healthz")).status == 200


async def test_readyz_reports_an_unwritable_cache(client: TestClient, store: Store) -> None:
    store.tmp_dir.rmdir()
    try:
        response = await client.get("/readyz")
    finally:
        store.tmp_dir.mkdir()
    assert response.status == 503
    assert str(store.root) in (await response.json())["problems"]["cache"]


async def test_an_export_that_cannot_fit_is_refused_before_docker_is_asked(
    make_client: MakeClient, store: Store, docker: FakeDocker
) -> None:
    """Room is asked of the cache dir's filesystem: a floor beyond any disk makes every export too big."""
    client = await make_client(assemble(store, docker, min_free=1 << 50))
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "below the 1024 TiB --min-free" in (await ready.json())["problems"]["space"]
    error = await error_of(await client.get("/v2/alpine/manifests/latest"), 507, "UNAVAILABLE")
    assert error["message"].startswith(f"not exporting {ALPINE}: the cache dir {store.root} has ")
    assert "free space there" in error["message"]
    assert docker.saves == []
    assert not any(store.tmp_dir.iterdir())
    space = (await (await client.get("/status.json")).json())["space"]
    assert (space["needed"], space["because"], space["short"]) == (1 << 50, "--min-free", True)


async def test_readyz_wants_room_for_the_largest_recent_export(
    client: TestClient, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    space = (await (await client.get("/status.json")).json())["space"]
    assert space["needed"] > 0 and space["because"].startswith("the largest of the last 1 exports")
    assert (await client.get("/readyz")).status == 200
    monkeypatch.setattr(FreeSpace, "free", lambda _self: space["needed"] - 1)
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "the next export may be refused" in (await ready.json())["problems"]["space"]


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_metrics(client: TestClient, docker: FakeDocker) -> None:
    image = docker.images[ALPINE].image
    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    layer = json.loads(image.manifest)["layers"][0]
    assert (await client.get(f"/v2/alpine/blobs/{layer['digest']}")).status == 200
    assert (await client.get("/v2/alpine/manifests/nope")).status == 404

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    requests = "k3d_registry_requests_total"
    assert _sample(text, requests, route="manifest", method="GET", status="200") == 2
    assert _sample(text, requests, route="manifest", method="GET", status="404") == 1
    assert _sample(text, requests, route="blob", method="GET", status="200") == 1
    assert _sample(text, "k3d_registry_served_bytes_total", route="blob") == layer["size"]
    assert _sample(text, "k3d_registry_manifest_cache_total", result="miss") == 1
    assert _sample(text, "k3d_registry_manifest_cache_total", result="hit") == 1
    assert _sample(text, "k3d_registry_docker_export_seconds_count", outcome="ok") == 1
    assert _sample(text, "k3d_registry_exports_in_flight") == 0
    assert _sample(text, "k3d_registry_cache_blobs") >= 3
    assert _sample(text, "k3d_registry_cache_bytes") >= layer["size"]


async def test_metrics_count_pulls_by_outcome(client: TestClient, docker: FakeDocker) -> None:
    await client.get(REDIS_PATH)
    text = await (await client.get("/metrics")).text()
    assert _sample(text, "k3d_registry_docker_pull_seconds_count", outcome="not_found") == 1


async def test_status_page_and_json(client: TestClient, docker: FakeDocker) -> None:
    page = await client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert "status.json" in html
    assert "http://" not in html and "https://" not in html  # no external assets

    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    assert (await client.get("/v2/alpine/manifests/nope")).status == 404
    docker.unavailable = True
    assert (await client.get("/v2/alpine/manifests/other")).status == 503
    status = await (await client.get("/status.json")).json()
    (image,) = status["images"]
    assert image["repository"] == "docker.io/library/alpine"
    assert image["tags"] == ["latest"]
    assert image["bytes"] > 0
    assert status["cache"]["bytes"] >= image["bytes"]
    assert status["cache"]["hit_rate"] == 0.0
    assert status["transfers"] == []
    assert any("Docker" in problem["message"] for problem in status["problems"])
    assert status["docker"]["reachable"] is False
    assert "fake is down" in status["docker"]["problem"]
    (pull,) = status["pulls"]
    assert (pull["client"], pull["image"], pull["cold"]) == ("127.0.0.1", "alpine:latest", True)
    assert pull["bytes"] > 0
    assert image["pushed"] is False


async def test_recent_pulls_say_who_pulled_what_cold_or_warm(
    client: TestClient, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(status_module.time, "time", lambda: clock[0])
    for _ in range(2):
        head = await client.head("/v2/library/alpine/manifests/latest?ns=docker.io")
        digest = head.headers["Docker-Content-Digest"]
        body = await (await client.get(f"/v2/library/alpine/manifests/{digest}?ns=docker.io")).read()
        served = len(body)
        for layer in json.loads(body)["layers"]:
            assert (
                await client.get(f"/v2/library/alpine/blobs/{layer['digest']}?ns=docker.io")
            ).status == 200
            served += layer["size"]
        clock[0] += 60
    status = await (await client.get("/status.json")).json()
    assert status["docker"]["reachable"] is True
    warm, cold = [p for p in status["pulls"] if p["repository"] == "docker.io/library/alpine"][:2]
    assert (cold["client"], cold["image"], cold["cold"]) == ("127.0.0.1", "alpine:latest", True)
    assert (warm["image"], warm["cold"]) == ("alpine:latest", False)
    assert warm["bytes"] == served


async def test_tags_list_and_pagination(client: TestClient, docker: FakeDocker) -> None:
    for tag in ("3.19", "3.20", "edge"):
        docker.images[f"docker.io/library/alpine:{tag}"] = docker.images[ALPINE]
    whole = await client.get("/v2/alpine/tags/list")
    assert whole.status == 200
    assert await whole.json() == {"name": "alpine", "tags": ["3.19", "3.20", "edge", "latest"]}
    assert "Link" not in whole.headers

    first = await client.get("/v2/library/alpine/tags/list?n=2&ns=docker.io")
    assert (await first.json())["tags"] == ["3.19", "3.20"]
    link = first.headers["Link"]
    assert link.startswith("</v2/library/alpine/tags/list?") and link.endswith('>; rel="next"')
    assert "n=2" in link and "last=3.20" in link and "ns=docker.io" in link
    second = await client.get(link[1 : link.index(">")])
    assert (await second.json())["tags"] == ["edge", "latest"]
    assert "Link" not in second.headers

    await error_of(await client.get("/v2/nothing/tags/list"), 404, "NAME_UNKNOWN")
    await error_of(await client.get("/v2/alpine/tags/list?n=x"), 400, "UNSUPPORTED")


async def test_catalog(client: TestClient, docker: FakeDocker) -> None:
    docker.images["docker.io/someone/tool:1"] = docker.images[ALPINE]
    docker.images["127.0.0.1:5001/team/app:1"] = docker.images[ALPINE]
    docker.images["ghcr.io/org/thing:2"] = docker.images[ALPINE]
    body = await (await client.get("/v2/_catalog")).json()
    # A registry with a port cannot be named in this registry's own namespace.
    assert body == {"repositories": ["alpine", "ghcr.io/org/thing", "someone/tool"]}
    paged = await client.get("/v2/_catalog?n=1&last=ghcr.io/org/thing")
    assert (await paged.json())["repositories"] == ["someone/tool"]


async def test_one_repository_s_tags_ask_docker_for_that_repository(
    client: TestClient, docker: FakeDocker
) -> None:
    for ref in ("docker.io/library/alpine:3.20", "docker.io/library/alpine-extra:1", "docker.io/x/alpine:2"):
        docker.images[ref] = docker.images[ALPINE]
    body = await (await client.get("/v2/alpine/tags/list")).json()
    assert body == {"name": "alpine", "tags": ["3.20", "latest"]}
    assert docker.listings == ["alpine:*"]
    assert (await client.get("/v2/x/alpine/tags/list")).status == 200
    assert docker.listings[-1] == "x/alpine:*"


async def test_catalog_pages_read_one_listing(client: TestClient, docker: FakeDocker) -> None:
    names = [f"app{i:02}" for i in range(23)]
    for name in names:
        docker.images[f"docker.io/library/{name}:1"] = docker.images[ALPINE]
    seen: list[str] = []
    url: str | None = "/v2/_catalog?n=7"
    pages = 0
    while url is not None:
        response = await client.get(url)
        seen += (await response.json())["repositories"]
        link: Any = response.headers.get("Link")
        url = link[1 : link.index(">")] if link else None
        pages += 1
    assert seen == sorted([*names, "alpine"]) and pages == 4
    assert docker.listings == [None]
    # A new listing (no `last`) sees what changed since.
    docker.images["docker.io/library/zzz:1"] = docker.images[ALPINE]
    assert (await (await client.get("/v2/_catalog")).json())["repositories"][-1] == "zzz"
    assert docker.listings == [None, None]
