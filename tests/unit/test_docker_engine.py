"""DockerClient against a stand-in Engine API on a unix socket: version negotiation and save parameters."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from k3d_registry_dockerd.docker.engine import (
    Credentials,
    DockerClient,
    DockerFailed,
    PullDenied,
    PullFailed,
    PullNotFound,
)
from k3d_registry_dockerd.oci.platform import Platform


def _tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("oci-layout")
        data = b'{"imageLayoutVersion":"1.0.0"}'
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Engine:
    """Records what the client asked; answers like dockerd of a given API version."""

    def __init__(self, api_version: str, product: str = "Podman Engine") -> None:
        self.api_version = api_version
        self.product = product
        # What `GET /distribution/<ref>/json` answers: status and Docker's message.
        self.distribution_answer: tuple[int, str] = (200, "")
        self.requests: list[tuple[str, dict[str, str]]] = []
        # What `POST /images/load` answers, one JSON line each; the bodies it received.
        self.load_answer: list[dict[str, Any]] = [{"stream": "Loaded image: app:1\n"}]
        self.loaded: list[bytes] = []

    def app(self) -> web.Application:
        async def version(request: web.Request) -> web.Response:
            self.requests.append((request.path, dict(request.query)))
            return web.json_response(
                {
                    "Version": "99.0.0",
                    "ApiVersion": self.api_version,
                    "Os": "linux",
                    "Arch": "arm64",
                    "Components": [{"Name": self.product, "Version": "99.0.0"}],
                }
            )

        async def info(request: web.Request) -> web.Response:
            self.requests.append((request.path, dict(request.query)))
            return web.json_response(
                {"Driver": "overlayfs", "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]]}
            )

        async def save(request: web.Request) -> web.Response:
            self.requests.append((request.path, dict(request.query)))
            return web.Response(body=_tar(), content_type="application/x-tar")

        async def load(request: web.Request) -> web.StreamResponse:
            self.requests.append((request.path, dict(request.query)))
            assert request.headers["Content-Type"] == "application/x-tar"
            self.loaded.append(await request.read())
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for line in self.load_answer:
                await response.write(json.dumps(line).encode() + b"\n")
            return response

        async def distribution(request: web.Request) -> web.Response:
            self.requests.append((request.path, {"auth": request.headers.get("X-Registry-Auth", "")}))
            status, message = self.distribution_answer
            if status != 200:
                return web.json_response({"message": message}, status=status)
            return web.json_response({"Descriptor": {}, "Platforms": []})

        async def create(request: web.Request) -> web.StreamResponse:
            self.requests.append((request.path, dict(request.query)))
            return web.json_response({"status": "Digest: sha256:..."})

        app = web.Application()
        app.router.add_get("/v{api}/distribution/{name:.+}/json", distribution)
        app.router.add_post("/v{api}/images/create", create)
        app.router.add_post("/v{api}/images/load", load)
        app.router.add_get("/version", version)
        app.router.add_get("/v{api}/version", version)
        app.router.add_get("/v{api}/info", info)
        app.router.add_get("/v{api}/images/{name:.+}/get", save)
        return app


@pytest.fixture
async def engine_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[str], Any]]:
    runners: list[web.AppRunner] = []

    async def start(api_version: str, product: str = "Podman Engine") -> Engine:
        engine = Engine(api_version, product)
        runner = web.AppRunner(engine.app())
        await runner.setup()
        socket = tmp_path / f"engine-{len(runners)}.sock"
        await web.UnixSite(runner, str(socket)).start()
        runners.append(runner)
        monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
        monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
        return engine

    yield start
    for runner in runners:
        await runner.cleanup()


async def _save(client: DockerClient) -> bytes:
    async with client.save("docker.io/library/app:1", Platform("linux", "arm64", "v8")) as stream:
        return await stream.read()


async def test_negotiates_the_daemons_api_version_and_reads_its_storage(engine_at: Any) -> None:
    engine = await engine_at("1.41")
    client = DockerClient()
    try:
        info = await client.daemon()
    finally:
        await client.close()
    assert (info.server_version, info.api_version, info.api) == ("99.0.0", "1.41", (1, 41))
    assert info.containerd_store
    assert info.platform == Platform("linux", "arm64", "v8")
    assert info.product == "Podman Engine"
    assert ("/v1.41/info", {}) in engine.requests


async def test_save_asks_for_one_platform_from_api_1_48(engine_at: Any) -> None:
    engine = await engine_at("1.48")
    client = DockerClient()
    try:
        assert await _save(client) == _tar()
    finally:
        await client.close()
    path, query = engine.requests[-1]
    assert path == "/v1.48/images/docker.io/library/app:1/get"
    assert json.loads(query["platform"]) == {"os": "linux", "architecture": "arm64", "variant": "v8"}


async def test_save_exports_everything_before_api_1_48(engine_at: Any) -> None:
    engine = await engine_at("1.45")
    client = DockerClient()
    try:
        await _save(client)
    finally:
        await client.close()
    path, query = engine.requests[-1]
    assert path == "/v1.45/images/docker.io/library/app:1/get"
    assert "platform" not in query


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_load_streams_the_archive_and_returns_what_docker_loaded(engine_at: Any) -> None:
    engine = await engine_at("1.45")
    engine.load_answer = [
        {"stream": "Loaded image: app:1\n"},
        {"stream": "Loaded image ID: sha256:" + "a" * 64 + "\n"},
    ]
    client = DockerClient()
    try:
        assert await client.load(_chunks(b"part one, ", b"part two")) == f"app:1, sha256:{'a' * 64}"
    finally:
        await client.close()
    assert engine.loaded == [b"part one, part two"]
    assert engine.requests[-1] == ("/v1.45/images/load", {"quiet": "1"})


async def test_load_raises_dockers_error(engine_at: Any) -> None:
    engine = await engine_at("1.45")
    message = 'invalid diffID for layer 1: expected "sha256:1", got "sha256:2"'
    engine.load_answer = [{"errorDetail": {"message": message}, "error": message}]
    client = DockerClient()
    try:
        with pytest.raises(DockerFailed, match="invalid diffID for layer 1"):
            await client.load(_chunks(b"tar"))
    finally:
        await client.close()


async def test_load_raises_the_archives_own_error(engine_at: Any) -> None:
    await engine_at("1.45")

    async def failing() -> AsyncIterator[bytes]:
        yield b"tar"
        raise FileNotFoundError("blob gone")

    client = DockerClient()
    try:
        with pytest.raises(FileNotFoundError, match="blob gone"):
            await client.load(failing())
    finally:
        await client.close()


REF = "registry.example:5000/team/app@sha256:" + "a" * 64
CREDENTIALS = Credentials("puller", "s3cret-pw")


async def test_pull_access_is_asked_of_the_registry_through_docker(engine_at: Any) -> None:
    engine = await engine_at("1.45", "Engine")
    client = DockerClient()
    try:
        await client.check_pull_access(REF, "registry.example:5000", CREDENTIALS)
        asked = [query for path, query in engine.requests if path.endswith(f"/distribution/{REF}/json")]
        auth = json.loads(base64.urlsafe_b64decode(asked[0]["auth"]))
        assert auth == {
            "username": "puller",
            "password": "s3cret-pw",
            "serveraddress": "registry.example:5000",
        }
        for status, message, refusal in (
            (401, "unauthorized: authentication required", PullDenied),
            (403, "denied: requested access to the resource is denied", PullDenied),
            (404, "manifest unknown", PullNotFound),
            (500, "Get https://registry.example:5000/v2/: dial tcp: connection refused", PullFailed),
        ):
            engine.distribution_answer = (status, message)
            with pytest.raises(refusal, match=message.split(":")[0]):
                await client.check_pull_access(REF, "registry.example:5000", CREDENTIALS)
    finally:
        await client.close()
    assert not [path for path, _ in engine.requests if path.endswith("/images/create")]


async def test_pull_access_on_podman_is_a_pull_by_digest(engine_at: Any) -> None:
    engine = await engine_at("1.41")
    client = DockerClient()
    try:
        await client.check_pull_access(REF, "registry.example:5000", CREDENTIALS)
    finally:
        await client.close()
    (pulled,) = [query for path, query in engine.requests if path.endswith("/images/create")]
    assert pulled["fromImage"].startswith("registry.example:5000/team/app")
    assert not [path for path, _ in engine.requests if "/distribution/" in path]
