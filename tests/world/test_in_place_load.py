"""Many clients at once on layers served where the daemon keeps them: each stream holds no thread and a
bounded amount of memory while its client reads slowly, every client gets the exact bytes, and a layer
nobody sent before is hashed once for all of them. Real daemons (Docker 20.10, 26.1 and 28.5's classic
stores, Docker 28.5's containerd image store, Podman 4.3, 5.4 and 5.4 rootless), real sockets; the bounds
are counts (threads, MiB), never times."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import pytest

from . import oci_client
from .daemons import ROOTLESS_UID, Dockerd, Podman, RegistryFactory, RegistryProcess
from .images import MiB, build_image

STREAMS = 120
# A client's receive buffer: small, so a stream stays unfinished on the registry's side while its client
# waits (the kernel buffers little of it).
RECEIVE_BUFFER = 16 << 10


DAEMONS = [
    "docker20",
    "docker26",
    "docker28",
    "docker28_containerd",
    "podman4",
    "podman5",
    "podman5_rootless",
]


@pytest.fixture(params=DAEMONS)
def daemon(request: pytest.FixtureRequest) -> Dockerd | Podman:
    found: Dockerd | Podman = request.getfixturevalue(request.param)
    return found


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


async def open_stream(addr: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A GET whose answer is read no further than its headers; the body's length."""
    host, port = addr.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return reader, writer, length


async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> str:
    hasher = hashlib.sha256()
    left = length
    while left:
        chunk = await reader.read(min(left, 1 << 20))
        assert chunk, f"the stream ended {left} bytes early"
        hasher.update(chunk)
        left -= len(chunk)
    writer.close()
    return f"sha256:{hasher.hexdigest()}"


async def held_streams(registry: RegistryProcess, paths: list[str]) -> tuple[int, int, list[str]]:
    """Opens a stream per path and holds them all unread: the registry's threads and RSS (KiB) then; the
    digests of the bodies once read to the end."""
    streams = await asyncio.gather(*(open_stream(registry.addr, path) for path in paths))
    await asyncio.sleep(1)
    pid = registry.pid
    assert pid is not None
    threads, rss = status(pid, "Threads"), status(pid, "VmRSS")
    digests = await asyncio.gather(*(finish(*stream) for stream in streams))
    return threads, rss, list(digests)


@pytest.mark.world
async def test_slow_clients_of_layers_served_in_place_hold_no_thread_each(
    daemon: Dockerd | Podman, registry_under_test: RegistryFactory
) -> None:
    ref = "in-place-load:1"
    # A layer of one 24 MiB file (sent with sendfile) and one of 3,000 small files (read in batches).
    build_image(daemon, ref, layers=1, size=24 * MiB, seed="load", busybox=False, small_files=3000)
    # Rootless Podman's storage is read by the user Podman runs as.
    user = ROOTLESS_UID if isinstance(daemon, Podman) and daemon.rootless else None
    # Verification ahead hashing the shared daemon's other images would blur the counts taken here.
    registry = registry_under_test(daemon.host, user=user, extra_args=["--no-verify-ahead"])
    pulled = oci_client.pull(registry.url, "library/in-place-load", "1", ns="docker.io")
    layers = [layer["digest"] for layer in pulled.manifest["layers"]]
    assert len(layers) == 2
    assert registry.pid is not None
    threads_before, rss_before = status(registry.pid, "Threads"), status(registry.pid, "VmRSS")
    hashed = oci_client.metric(registry.url, "k3d_registry_blobs_hashed_total")

    paths = [f"/v2/library/in-place-load/blobs/{layers[i % 2]}?ns=docker.io" for i in range(STREAMS)]
    threads, rss, digests = await held_streams(registry, paths)
    assert digests == [layers[i % 2] for i in range(STREAMS)]
    # Bounded pools, not a thread per stream; a batch or two per stream at most (a thread and a queue of
    # 1 MiB chunks per stream before: 120 threads, ~600 MiB).
    assert threads - threads_before <= 8, (threads_before, threads)
    assert rss - rss_before < 80 * 1024, (rss_before, rss)
    # Verified by the first pull: nothing hashed again.
    assert oci_client.metric(registry.url, "k3d_registry_blobs_hashed_total") == hashed
    # Served where they lie: the cache dir holds no blob.
    assert not [p for p in registry.cache_dir.rglob("*") if p.is_file() and p.stat().st_size > 64 << 10]


@pytest.mark.world
async def test_a_layer_first_sent_to_many_clients_at_once_is_hashed_once(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker26, "in-place-first:1", layers=1, size=8 * MiB, seed="first", busybox=False)
    # No verification ahead: the clients' requests are the first to want the layer hashed.
    registry = registry_under_test(docker26, extra_args=["--no-verify-ahead"])
    manifest = oci_client.request(
        f"{registry.url}/v2/library/in-place-first/manifests/1?ns=docker.io",
        headers={"Accept": oci_client.MANIFEST_ACCEPT},
    ).json()
    layer = manifest["layers"][0]["digest"]
    hashed = oci_client.metric(registry.url, "k3d_registry_blobs_hashed_total")
    paths = [f"/v2/library/in-place-first/blobs/{layer}?ns=docker.io"] * 40
    _threads, _rss, digests = await held_streams(registry, paths)
    assert digests == [layer] * 40
    assert oci_client.metric(registry.url, "k3d_registry_blobs_hashed_total") - hashed <= 1
