"""Content pulled with a request's credentials is served only to credentials the upstream accepts: the
HTTP API over a real Mirror and Store, with a fake Docker whose upstream has a private repository."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import Credentials
from k3d_registry_dockerd.mirror.private import STATE_FILE, PrivateStateError
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import Registry, assemble

from .fakes import FakeDocker, local_image
from .test_api import basic_auth, error_of

NAME = "registry.example:5000/team/app"
REF = f"{NAME}:v1"
PATH = "/v2/team/app/manifests/v1?ns=registry.example:5000"
OWNER = Credentials("puller", "s3cret-pw")
RIGHT = basic_auth("puller", "s3cret-pw")
WRONG = basic_auth("puller", "guessed")


@pytest.fixture
def docker() -> FakeDocker:
    fake = FakeDocker()
    fake.upstream[REF] = local_image("private-app", REF)
    fake.private[NAME] = OWNER
    return fake


async def start(aiohttp_client: Any, registry: Registry) -> TestClient:
    return await aiohttp_client(create_app(registry))


def manifest_of(body: bytes) -> dict[str, Any]:
    return json.loads(body)


async def pulled_privately(client: TestClient) -> dict[str, Any]:
    """The node's first pull: anonymous (challenged), then with the pod's secret."""
    response = await client.get(PATH)
    await error_of(response, 401, "UNAUTHORIZED")
    response = await client.get(PATH, headers=RIGHT)
    assert response.status == 200
    return manifest_of(await response.read())


async def test_the_puller_is_served_and_others_are_challenged(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client = await start(aiohttp_client, assemble(store, docker))
    manifest = await pulled_privately(client)
    digest = docker.upstream[REF].image.digest  # type: ignore[union-attr]
    assert docker.access_checks == []  # the pull itself proved the credentials
    layer = manifest["layers"][0]["digest"]
    config = manifest["config"]["digest"]
    saves = list(docker.saves)

    for path in (PATH, f"/v2/team/app/manifests/{digest}?ns=registry.example:5000"):
        for headers in ({}, WRONG):
            response = await client.get(path, headers=headers)
            error = await error_of(response, 401, "UNAUTHORIZED")
            assert response.headers["WWW-Authenticate"] == 'Basic realm="registry.example:5000"'
            assert "credentials" in error["message"]
    for blob in (layer, config):
        response = await client.get(f"/v2/team/app/blobs/{blob}?ns=registry.example:5000")
        await error_of(response, 401, "UNAUTHORIZED")
        response = await client.head(f"/v2/team/app/blobs/{blob}?ns=registry.example:5000", headers=WRONG)
        assert response.status == 401
        response = await client.get(f"/v2/team/app/blobs/{blob}?ns=registry.example:5000", headers=RIGHT)
        assert response.status == 200
    assert docker.saves == saves  # nothing exported for a refused request
    # The wrong credentials were put to the upstream once for the digest (the refusal is remembered a
    # few seconds); the right ones not again.
    assert docker.access_checks == [(f"{NAME}@{digest}", Credentials("puller", "guessed"))]


async def test_accepted_credentials_are_checked_again_after_a_restart_then_remembered(
    aiohttp_client: Any, store: Store, docker: FakeDocker, tmp_path: Path
) -> None:
    await pulled_privately(await start(aiohttp_client, assemble(store, docker)))
    assert (store.root / STATE_FILE).is_file()

    restarted = Store(store.root)
    restarted.open()
    client = await start(aiohttp_client, assemble(restarted, docker))
    await error_of(await client.get(PATH), 401, "UNAUTHORIZED")
    for _ in range(3):
        assert (await client.get(PATH, headers=RIGHT)).status == 200
    assert docker.access_checks == [(f"{NAME}@{docker.upstream[REF].image.digest}", OWNER)]  # type: ignore[union-attr]


async def test_accepted_credentials_are_asked_again_once_forgotten(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    registry = assemble(store, docker)  # type: ignore[arg-type]
    registry.guard.remember = 0.0
    client = await start(aiohttp_client, registry)
    await pulled_privately(client)
    before = len(docker.access_checks)
    for _ in range(2):
        assert (await client.get(PATH, headers=RIGHT)).status == 200
    assert len(docker.access_checks) == before + 2
    # The upstream revoked the access: the next request is refused.
    docker.private[NAME] = Credentials("puller", "rotated")
    await error_of(await client.get(PATH, headers=RIGHT), 401, "UNAUTHORIZED")


async def test_unchecked_while_docker_is_down_is_503(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client = await start(aiohttp_client, assemble(store, docker))
    await pulled_privately(client)
    docker.unavailable = True
    # Remembered credentials are served from the cache as it was; others cannot be checked.
    assert (await client.get(PATH, headers=RIGHT)).status == 200
    await error_of(await client.get(PATH, headers=WRONG), 503, "UNAVAILABLE")
    await error_of(await client.get(PATH), 401, "UNAUTHORIZED")


async def test_content_docker_had_or_pulled_anonymously_stays_open(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    docker.images[REF] = docker.upstream[REF]  # pulled on the host, e.g. after `docker login`
    public = "registry.example:5000/team/public:v1"
    docker.upstream[public] = local_image("public-app", public)
    client = await start(aiohttp_client, assemble(store, docker))
    # Credentials on a request for something Docker has do not make it private.
    assert (await client.get(PATH, headers=RIGHT)).status == 200
    assert (await client.get(PATH)).status == 200
    public_path = "/v2/team/public/manifests/v1?ns=registry.example:5000"
    assert (await client.get(public_path)).status == 200
    assert (await client.get(public_path, headers=WRONG)).status == 200
    assert docker.access_checks == []


async def test_content_pulled_with_the_host_s_credentials_stays_open(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    class Host:
        async def lookup(self, domain: str) -> Credentials | None:
            return OWNER

    client = await start(aiohttp_client, assemble(store, docker, host_credentials=Host()))  # type: ignore[arg-type]
    assert (await client.get(PATH)).status == 200
    assert (await client.get(PATH)).status == 200
    assert not (store.root / STATE_FILE).exists()


async def test_a_request_arriving_during_the_private_pull_waits_for_the_guard(
    aiohttp_client: Any, store: Store, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pulled, release = asyncio.Event(), asyncio.Event()
    real_pull = docker.pull

    async def held_pull(ref: str, credentials: Credentials | None, on_event: Any = None) -> None:
        await real_pull(ref, credentials, on_event)
        if credentials is not None:
            pulled.set()
            await release.wait()

    monkeypatch.setattr(docker, "pull", held_pull)
    client = await start(aiohttp_client, assemble(store, docker))
    owner = asyncio.create_task(client.get(PATH, headers=RIGHT))
    await pulled.wait()  # Docker has the image now; it is not marked private yet
    other = asyncio.create_task(client.get(PATH))
    await asyncio.sleep(0.05)
    assert not other.done()
    release.set()
    assert (await owner).status == 200
    await error_of(await other, 401, "UNAUTHORIZED")


async def test_an_unreadable_record_stops_the_start(store: Store, docker: FakeDocker) -> None:
    (store.root / STATE_FILE).write_text("{not json")
    with pytest.raises(PrivateStateError, match="unreadable"):
        assemble(store, docker).guard.open()  # type: ignore[arg-type]


async def test_credentials_never_reach_the_logs(
    aiohttp_client: Any, store: Store, docker: FakeDocker, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(aiohttp_client, assemble(store, docker))
    await pulled_privately(client)
    await client.get(PATH, headers=WRONG)
    assert "s3cret-pw" not in caplog.text and "guessed" not in caplog.text


async def test_a_private_repository_is_listed_only_to_accepted_credentials(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    # A registry without a port: the catalog can name its repositories.
    name = "registry.example/team/app"
    docker.upstream[f"{name}:v1"] = local_image("private-listed", f"{name}:v1")
    docker.private[name] = OWNER
    docker.images["docker.io/library/open:1"] = local_image("open", "docker.io/library/open:1")
    client = await start(aiohttp_client, assemble(store, docker))
    await error_of(await client.get("/v2/team/app/manifests/v1?ns=registry.example"), 401, "UNAUTHORIZED")
    assert (await client.get("/v2/team/app/manifests/v1?ns=registry.example", headers=RIGHT)).status == 200
    tags = "/v2/team/app/tags/list?ns=registry.example"
    for headers in ({}, WRONG):
        response = await client.get(tags, headers=headers)
        await error_of(response, 401, "UNAUTHORIZED")
        assert response.headers["WWW-Authenticate"] == 'Basic realm="registry.example"'
        listed = await (await client.get("/v2/_catalog", headers=headers)).json()
        assert listed == {"repositories": ["open"]}
    assert await (await client.get(tags, headers=RIGHT)).json() == {"name": "team/app", "tags": ["v1"]}
    listed = await (await client.get("/v2/_catalog", headers=RIGHT)).json()
    assert listed == {"repositories": ["open", "registry.example/team/app"]}
    # The same memory as for content: the right credentials were never asked about again, the wrong
    # ones once.
    assert [c for _, c in docker.access_checks] == [Credentials("puller", "guessed")]
    # A page that hides the private repository still says there is nothing after it.
    page = await client.get("/v2/_catalog?n=1")
    assert await page.json() == {"repositories": ["open"]} and "Link" not in page.headers
    page = await client.get("/v2/_catalog?n=1", headers=RIGHT)
    assert (await page.json())["repositories"] == ["open"]
    assert page.headers["Link"] == '</v2/_catalog?n=1&last=open>; rel="next"'


async def test_the_status_page_names_no_private_repository(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    docker.images["docker.io/library/open:1"] = local_image("open", "docker.io/library/open:1")
    client = await start(aiohttp_client, assemble(store, docker))
    await pulled_privately(client)
    assert (await client.get("/v2/library/open/manifests/1")).status == 200
    status = await (await client.get("/status.json")).json()
    assert [image["repository"] for image in status["images"]] == ["docker.io/library/open"]
    assert status["image_count"] == 1
    assert {pull["repository"] for pull in status["pulls"]} == {"docker.io/library/open"}
