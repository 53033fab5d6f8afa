"""A blob sent as pieces (a layer put together from its record and files, or one file not verified yet)
answers every Range and HEAD exactly as the same bytes in a file do (aiohttp's FileResponse), so clients
cannot tell them apart; bytes that do not match, or that cannot be read, never complete a response."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.sources.content import BlobFile, BlobPieces
from k3d_registry_dockerd.sources.pieces import FilePieces
from k3d_registry_dockerd.web import blobs

from .saves import digest_of
from .test_tarsplit import awkward_layer, stored

CALLS = web.AppKey("calls", list)
DATA = awkward_layer()
DIGEST = digest_of(DATA)
SIZE = len(DATA)
RANGES = [
    "bytes=0-0", "bytes=0-9", "bytes=10-19", "bytes=-5", "bytes=-0", f"bytes={SIZE - 10}-", "bytes=0-",
    "bytes=5-1", "bytes=0-1,3-4", "bytes=99999999999999999999-", "bytes=0-99999999999999999999",
    "items=0-1", "bytes=", f"bytes={SIZE}-", f"bytes={SIZE - 1}-{SIZE - 1}", f"bytes=-{SIZE + 1}", "garbage",
    "bytes=-", "bytes=1-a", "bytes= 3-4", "bytes=4-3", "bytes=-1-2", "bytes=700-2000000",
    # Past the digits Python converts to an int.
    f"bytes={'9' * 5000}-", f"bytes=0-{'9' * 5000}", f"bytes=-{'9' * 5000}",
]  # fmt: skip


def verifier(matches: bool, calls: list[int]) -> Callable[[], Awaitable[bool]]:
    async def verify() -> bool:
        calls.append(1)
        await asyncio.sleep(0.01)
        return matches

    return verify


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    layer = stored(tmp_path, DATA)
    sender = blobs.BlobSender()
    calls: list[int] = []

    def pieces_of(kind: str) -> Callable[[int, int, int | None], Any]:
        return layer.reader if kind == "layer" else functools.partial(FilePieces, path)

    async def as_file(request: web.Request) -> web.StreamResponse:
        return await sender.send(request, BlobFile(path, DIGEST), {"Docker-Content-Digest": DIGEST})

    async def as_pieces(request: web.Request) -> web.StreamResponse:
        verify = request.query.get("verify")
        check = verifier(verify == "ok", calls) if verify else None
        blob = BlobPieces(DIGEST, SIZE, pieces_of(request.match_info["kind"]), check)
        try:
            return await sender.send(request, blob, {"Docker-Content-Digest": DIGEST})
        except RegistryError as error:
            return web.json_response(error.body(), status=error.status)

    app = web.Application()
    app.router.add_get("/file", as_file)
    app.router.add_get("/{kind}", as_pieces)
    app[CALLS] = calls
    yield await aiohttp_client(app)
    sender.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("kind", ["layer", "one-file"])
@pytest.mark.parametrize("verify", ["", "ok"])
@pytest.mark.parametrize("asked", RANGES)
async def test_pieces_answer_a_range_as_a_file_does(
    client: Any, method: str, kind: str, verify: str, asked: str
) -> None:
    answers = []
    for path in ("/file", f"/{kind}?verify={verify}"):
        response = await client.request(method, path, headers={"Range": asked})
        body = await response.read()
        answers.append(
            (
                response.status,
                response.headers.get("Content-Range"),
                response.headers.get("Content-Length"),
                body,
            )
        )
    assert answers[1] == answers[0]
    assert answers[0][0] < 500


@pytest.mark.parametrize("kind", ["layer", "one-file"])
async def test_the_whole_blob_is_sent_and_hashed_once_per_request(client: Any, kind: str) -> None:
    response = await client.get(f"/{kind}?verify=ok")
    assert await response.read() == DATA
    assert client.app[CALLS] == [1]


@pytest.mark.parametrize("kind", ["layer", "one-file"])
async def test_bytes_that_do_not_match_never_complete_a_response(client: Any, kind: str) -> None:
    response = await client.get(f"/{kind}?verify=wrong")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    # A part of it is refused before anything is sent.
    partial = await client.get(f"/{kind}?verify=wrong", headers={"Range": "bytes=0-9"})
    assert partial.status == 404


async def test_a_file_gone_mid_layer_cuts_the_response(client: Any, tmp_path: Path) -> None:
    (tmp_path / "diff" / "data" / "big.bin").unlink()
    response = await client.get("/layer")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    # The next request on another connection is answered as usual.
    assert (await (await client.get("/file")).read()) == DATA


@pytest.mark.parametrize("kind", ["layer", "one-file"])
async def test_a_client_leaving_mid_blob_is_no_error(
    client: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Small socket buffers on both ends (accepted sockets inherit the listener's), so most of the blob is
    # still to be sent when the client leaves.
    for site in client.server.runner.sites:
        for listening in site._server.sockets:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for verify in ("", "ok"):
        # A client that reads little and leaves while the blob is going out.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (client.server.host, client.server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET /{kind}?verify={verify} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await reader.readexactly(1000)
        await asyncio.sleep(0.2)
        writer.transport.abort()
    await asyncio.sleep(0.5)
    # Another request is answered as usual, and nothing was logged as an error.
    assert (await (await client.get(f"/{kind}")).read()) == DATA
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
