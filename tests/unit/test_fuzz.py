"""Fuzzing the HTTP API in process: a real Mirror and Store, a fake Docker, hostile requests.

Requests go out with `http.client` from a worker thread (so `..`, `%2e%2e`, `%2F`, `%00` reach the server
exactly as written) to the app that `aiohttp_client` serves on the test's event loop. The registry holds
Docker images (one exported), a pushed image and open uploads, so valid paths exist among the junk.

Properties (tests/fuzz_requests.py): no 5xx, every 4xx under /v2/ is OCI error JSON with a known code, a
206 is the bytes it says; nothing is created outside the store root and nothing but the store's own layout
inside it; `/v2/` still answers afterwards. The hypothesis run is derandomized and database-less: the same
requests every run. `K3RD_FUZZ_EXAMPLES` changes how many (default below).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble
from k3d_registry_dockerd.web.routes import REGISTRY

from ..fuzz_requests import (
    CORPUS,
    Nasty,
    Request,
    Seeds,
    Tally,
    cache_strays,
    corpus_fields,
    fuzz,
    send,
    tree,
)
from .fakes import FakeDocker, local_image
from .saves import make_image

ALPINE = "docker.io/library/alpine:latest"
TEAM_APP = "docker.io/team/app:v1"
BUSYBOX = "docker.io/library/busybox:1"
EXAMPLES = int(os.environ.get("K3RD_FUZZ_EXAMPLES", "1500"))
# Every request this module sent, for the summary line at its end.
TOTAL = Tally()


@pytest.fixture(scope="module", autouse=True)
def _report_total(request: pytest.FixtureRequest) -> Iterator[None]:
    """Prints how many requests this module sent, on the terminal (capture is off for the line)."""
    yield
    line = (
        f"test_fuzz: {TOTAL.tried} requests sent in process, statuses {dict(sorted(TOTAL.statuses.items()))}"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


@dataclass
class Registry:
    client: TestClient
    seeds: Seeds
    docker: FakeDocker
    host: str
    port: int

    def send(self, request: Request) -> Any:
        return send(self.host, self.port, request)


async def _push(client: TestClient, name: str, blobs: list[bytes], manifest: bytes, tag: str) -> None:
    for data in blobs:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        response = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data)
        assert response.status == 201, await response.text()
    response = await client.put(
        f"/v2/{name}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert response.status == 201, await response.text()


@pytest.fixture
async def registry(aiohttp_client: Any, store: Store) -> Registry:
    docker = FakeDocker()
    docker.images[ALPINE] = local_image("alpine-1", ALPINE)
    docker.images[TEAM_APP] = local_image("team-app", TEAM_APP)
    docker.upstream[BUSYBOX] = local_image("busybox-1", BUSYBOX)
    client = await aiohttp_client(create_app(assemble(store, docker, load_pushed=False)))
    assert (await client.get("/v2/alpine/manifests/latest")).status == 200
    alpine = docker.images[ALPINE].image
    assert alpine is not None
    pushed = make_image("pushed")
    await _push(client, "pushed/img", [pushed.config, *pushed.layers], pushed.manifest, "v1")
    uploads = []
    for _ in range(3):
        response = await client.post("/v2/pushed/img/blobs/uploads/")
        assert response.status == 202
        uploads.append(("pushed/img", response.headers["Location"].rpartition("/")[2]))
    seeds = Seeds(
        names=["alpine", "library/alpine", "team/app", "pushed/img", "busybox", "nothing/here"],
        tags=["latest", "v1", "1"],
        digests=[
            alpine.digest,
            alpine.config_digest,
            *alpine.layer_digests,
            pushed.digest,
            pushed.config_digest,
        ],
        blobs=[
            ("alpine", alpine.layer_digests[0]),
            ("library/alpine", alpine.config_digest),
            ("pushed/img", pushed.layer_digests[0]),
            ("pushed/img", pushed.config_digest),
        ],
        pushed_repo="pushed/img",
        config=pushed.config_digest,
        manifest_digest=pushed.digest,
        manifest=json.loads(pushed.manifest),
        uploads=uploads,
        ns_values=["docker.io", "index.docker.io", "127.0.0.1:5000", "[::1]:5000", "localhost", "LOCALHOST"],
    )
    assert client.server.host is not None and client.server.port is not None
    return Registry(client, seeds, docker, client.server.host, client.server.port)


def outside_store(tmp_path: Path, store: Store) -> set[str]:
    return tree(tmp_path, skip=[store.root])


async def test_hypothesis_requests_never_break_the_registry(
    registry: Registry, store: Store, tmp_path: Path
) -> None:
    before = outside_store(tmp_path, store)
    tally = Tally()

    await asyncio.to_thread(fuzz, registry.host, registry.port, registry.seeds, tally, max_examples=EXAMPLES)

    TOTAL.tried += tally.tried
    TOTAL.statuses.update(tally.statuses)
    print(f"\nhypothesis: {tally.report()}")
    base = await asyncio.to_thread(registry.send, Request("GET", "/v2/"))
    assert base.status == 200 and json.loads(base.body) == {}
    assert outside_store(tmp_path, store) == before
    assert cache_strays(store.root) == []
    assert tally.tried >= EXAMPLES
    assert not tally.examples, f"problems found:\n{tally.report()}"


@pytest.mark.parametrize("nasty", CORPUS, ids=[n.id for n in CORPUS])
async def test_nasty_request(registry: Registry, store: Store, tmp_path: Path, nasty: Nasty) -> None:
    before = outside_store(tmp_path, store)
    tally = Tally()
    request = nasty.resolve(corpus_fields(registry.seeds))
    uploads_before = len(registry.client.app[REGISTRY].uploads)
    temp_before = set((store.root / "tmp").iterdir())

    answer = await asyncio.to_thread(registry.send, request)

    found = tally.record(request, answer, plain_4xx=nasty.plain_4xx)
    TOTAL.tried += 1
    TOTAL.statuses.update(tally.statuses)
    assert not found, f"{request.describe()}\n-> {answer.describe()}\n{found}"
    if nasty.plain_4xx:
        assert 400 <= answer.status < 500, answer.describe()
    base = await asyncio.to_thread(registry.send, Request("GET", "/v2/"))
    assert base.status == 200
    assert outside_store(tmp_path, store) == before
    assert cache_strays(store.root) == []
    if request.method == "POST" and answer.status >= 400:
        # A refused upload start leaves no session (and no temp file) behind.
        sessions = len(registry.client.app[REGISTRY].uploads) - uploads_before
        temp = sorted(p.name for p in set((store.root / "tmp").iterdir()) - temp_before)
        assert (sessions, temp) == (0, []), (
            f"{request.describe()} was refused ({answer.describe()}) but left {sessions} upload session(s) "
            f"open and temp files {temp} in the cache"
        )
