"""A blob put together as it is sent answers every Range and HEAD exactly as the same bytes in a file do
(aiohttp's FileResponse), so clients cannot tell the two apart."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from k3d_registry_dockerd.sources.content import BlobFile, BlobStream
from k3d_registry_dockerd.web import blobs

from .saves import digest_of

DATA = random.Random("ranges").randbytes(300_000)
DIGEST = digest_of(DATA)
RANGES = [
    "bytes=0-0", "bytes=0-9", "bytes=10-19", "bytes=-5", "bytes=-0", "bytes=299990-", "bytes=0-",
    "bytes=5-1", "bytes=0-1,3-4", "bytes=99999999999999999999-", "bytes=0-99999999999999999999",
    "items=0-1", "bytes=", "bytes=300000-", "bytes=299999-299999", "bytes=-300001", "garbage", "bytes=-",
    "bytes=1-a", "bytes= 3-4", "bytes=4-3", "bytes=-1-2",
    # Past the digits Python converts to an int.
    f"bytes={'9' * 5000}-", f"bytes=0-{'9' * 5000}", f"bytes=-{'9' * 5000}",
]  # fmt: skip


def chunks(start: int) -> Iterator[bytes]:
    for offset in range(start, len(DATA), 65536):
        yield DATA[offset : offset + 65536]


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    path = tmp_path / "blob"
    path.write_bytes(DATA)

    async def as_file(request: web.Request) -> web.StreamResponse:
        return await blobs.send(request, BlobFile(path, DIGEST), {"Docker-Content-Digest": DIGEST})

    async def as_stream(request: web.Request) -> web.StreamResponse:
        checked: list[bool] = []
        blob = BlobStream(DIGEST, len(DATA), chunks, checked.append if request.query.get("verify") else None)
        return await blobs.send(request, blob, {"Docker-Content-Digest": DIGEST})

    app = web.Application()
    app.router.add_get("/file", as_file)
    app.router.add_get("/stream", as_stream)
    return await aiohttp_client(app)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("verify", ["", "1"])
@pytest.mark.parametrize("asked", RANGES)
async def test_a_stream_answers_a_range_as_a_file_does(
    client: Any, method: str, verify: str, asked: str
) -> None:
    answers = []
    for path in ("/file", f"/stream?verify={verify}"):
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
