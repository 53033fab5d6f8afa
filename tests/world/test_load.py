"""Loading a pushed image into every real daemon: Docker 26 (both stores), Docker 20.10 and Podman.

The image is built here, blob by blob, the way a client pushes it (a gzip layer, an uncompressed one, a
real config), put into a Store and handed to `load_into_docker`; the daemon's Engine API must then know it
under the pushed name with the layers the config names.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import DockerClient
from k3d_registry_dockerd.oci.mediatypes import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.push.docker_load import load_into_docker

from .daemons import Dockerd, Podman, unix_http
from .images import BUSYBOX, FIXED_MTIME, sha256_digest

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DAEMONS = [
    "docker26",
    "docker26_containerd",
    "docker28",
    "docker28_containerd",
    "docker20",
    "podman4",
    "podman5",
]
# A platform other than the daemon's, by the daemon's architecture.
FOREIGN = {"amd64": Platform("linux", "arm64"), "arm64": Platform("linux", "amd64")}


@pytest.fixture(params=DAEMONS)
def daemon(request: pytest.FixtureRequest) -> Dockerd | Podman:
    found: Dockerd | Podman = request.getfixturevalue(request.param)
    return found


@pytest.fixture
async def docker(daemon: Dockerd | Podman, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DockerClient]:
    monkeypatch.setenv("DOCKER_HOST", daemon.host)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    client = DockerClient()
    yield client
    await client.close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "cache")
    opened.open()
    return opened


def _layer(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed layer tar of (content, mode) per path."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass(frozen=True)
class Pushed:
    digest: str
    config_digest: str
    diff_ids: list[str]


def push_image(store: Store, platform: Platform, seed: str) -> Pushed:
    """Puts a runnable 2-layer image into the store, blob by blob, as a client's push would."""
    bottom = _layer({"bin/busybox": (BUSYBOX.read_bytes(), 0o755)})
    top = _layer({"data/hello.txt": (f"hello from {seed}\n".encode(), 0o644)})
    blobs = [(gzip.compress(bottom, mtime=0), OCI_LAYER_GZIP), (top, OCI_LAYER)]
    diff_ids = [sha256_digest(bottom), sha256_digest(top)]
    config: dict[str, Any] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {"Cmd": ["/bin/busybox", "cat", "/data/hello.txt"], "Labels": {"seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "test_load"}] * 2,
    }
    if platform.variant:
        config["variant"] = platform.variant
    config_raw = json.dumps(config).encode()
    config_digest = store.put_bytes(config_raw)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": [
            {"mediaType": media_type, "digest": store.put_bytes(data), "size": len(data)}
            for data, media_type in blobs
        ],
    }
    return Pushed(store.put_bytes(json.dumps(manifest).encode()), config_digest, diff_ids)


def engine_inspect(daemon: Dockerd | Podman, ref: str) -> dict[str, Any] | None:
    """`GET /images/{ref}/json` straight from the daemon."""
    status, body = unix_http(daemon.socket, "GET", f"/images/{ref}/json")
    if status == 404:
        return None
    assert status == 200, body
    found: dict[str, Any] = json.loads(body)
    return found


def expected_id(daemon: Dockerd | Podman, pushed: Pushed) -> str:
    """The containerd store names an image by its manifest, the others by its config."""
    if isinstance(daemon, Dockerd):
        return daemon.id_of(manifest=pushed.digest, config=pushed.config_digest)
    return pushed.config_digest


@pytest.mark.parametrize(
    ("ref", "listed"),
    [
        ("127.0.0.1:5000/pushed/app:v1", "127.0.0.1:5000/pushed/app:v1"),
        ("docker.io/library/pushed-app:dev", "pushed-app:dev"),
    ],
)
async def test_a_pushed_image_is_loaded_under_its_name(
    daemon: Dockerd | Podman, docker: DockerClient, store: Store, ref: str, listed: str
) -> None:
    pushed = push_image(store, (await docker.daemon()).platform, seed=ref)

    image_id = await load_into_docker(store, docker, ref, pushed.digest, OCI_MANIFEST)

    assert image_id == expected_id(daemon, pushed)
    inspected = engine_inspect(daemon, listed)
    assert inspected is not None, f"{daemon} has no {listed}"
    assert inspected["Id"] == image_id
    assert inspected["RootFS"]["Layers"] == pushed.diff_ids
    # Docker lists the familiar name, Podman the qualified one.
    assert set(inspected["RepoTags"]) & {ref, listed}, inspected["RepoTags"]
    # Podman's runc cannot set its default rlimits in every sandbox; the Docker variants run it.
    if isinstance(daemon, Dockerd):
        assert daemon.docker("run", "--rm", listed).stdout == f"hello from {ref}\n"


async def test_an_index_loads_the_daemons_platform(
    daemon: Dockerd | Podman, docker: DockerClient, store: Store
) -> None:
    platform = (await docker.daemon()).platform
    pushed = push_image(store, platform, seed="index")
    foreign = push_image(store, FOREIGN[platform.architecture], seed="index, foreign")
    manifests = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": image.digest,
            "size": store.blob_size(image.digest),
            "platform": {"os": p.os, "architecture": p.architecture},
        }
        for image, p in ((foreign, FOREIGN[platform.architecture]), (pushed, platform))
    ]
    index = store.put_bytes(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    )

    image_id = await load_into_docker(store, docker, "127.0.0.1:5000/pushed/multi:1", index, OCI_INDEX)

    assert image_id == expected_id(daemon, pushed)
    inspected = engine_inspect(daemon, "127.0.0.1:5000/pushed/multi:1")
    assert inspected is not None
    assert inspected["RootFS"]["Layers"] == pushed.diff_ids


async def test_an_image_of_another_platform_is_skipped(
    daemon: Dockerd | Podman, docker: DockerClient, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    platform = FOREIGN[(await docker.daemon()).platform.architecture]
    pushed = push_image(store, platform, seed="foreign")
    ref = "127.0.0.1:5000/pushed/foreign:1"

    with caplog.at_level(logging.INFO, "k3d_registry_dockerd.push"):
        assert await load_into_docker(store, docker, ref, pushed.digest, OCI_MANIFEST) is None

    assert f"not loading {ref} into Docker: a foreign platform {platform}" in caplog.text
    assert engine_inspect(daemon, ref) is None
