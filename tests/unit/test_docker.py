from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from k3d_registry_dockerd.docker import engine as docker_module
from k3d_registry_dockerd.docker.engine import (
    Credentials,
    DaemonInfo,
    DockerClient,
    DockerUnavailable,
    PullDenied,
    PullFailed,
    PullNotFound,
    classify_pull_error,
)
from k3d_registry_dockerd.oci.platform import Platform


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            "pull access denied for foo, repository does not exist or may require 'docker login': "
            "denied: requested access to the resource is denied",
            PullDenied,
        ),
        ('Head "http://127.0.0.1:5002/v2/x/manifests/y": no basic auth credentials', PullDenied),
        ("unauthorized: authentication required", PullDenied),
        (
            'Head "https://registry-1.docker.io/v2/library/x/manifests/1": unauthorized: incorrect username '
            "or password",
            PullDenied,
        ),
        ('Error response from daemon: Get "https://ghcr.io/v2/": denied: denied', PullDenied),
        ("manifest for 127.0.0.1:5001/x:y not found: manifest unknown: manifest unknown", PullNotFound),
        ("manifest unknown", PullNotFound),
        ("name unknown: repository name not known to registry", PullNotFound),
        ('Get "http://127.0.0.1:9/v2/": dial tcp 127.0.0.1:9: connect: connection refused', PullFailed),
        (
            "toomanyrequests: You have reached your pull rate limit. You may increase the limit by "
            "authenticating and upgrading",
            PullFailed,
        ),
        ('Get "https://nosuch.example/v2/": dial tcp: lookup nosuch.example: no such host', PullFailed),
        ("", PullFailed),
        ("error creating lease: grpc: the client connection is closing: context canceled", DockerUnavailable),
        # Docker 28.5's containerd image store, dockerd stopped mid-pull.
        ("failed to copy: failed to send write: EOF", DockerUnavailable),
    ],
)
def test_classify_pull_error(message: str, kind: type[Exception]) -> None:
    assert classify_pull_error(message) is kind
    assert classify_pull_error(message.upper()) is kind


def test_credentials_repr_hides_the_password() -> None:
    credentials = Credentials("puller", "s3cret-pw")
    for text in (
        repr(credentials),
        str(credentials),
        f"{credentials}",
        f"{credentials!r}",
        repr([credentials]),
    ):
        assert "s3cret-pw" not in text
        assert "puller" in text
    assert credentials == Credentials("puller", "s3cret-pw")
    assert credentials.password == "s3cret-pw"


def test_daemon_info() -> None:
    info = DaemonInfo("28.0.1", "1.48", Platform("linux", "arm64", "v8"), "overlayfs", True)
    assert info.api == (1, 48)
    assert info.api >= docker_module.SAVE_PLATFORM_API
    assert DaemonInfo("20.10.24", "1.41", Platform("linux", "amd64"), "overlay2", False).api < (1, 48)
    assert info.storage == "containerd image store (overlayfs)"
    assert "classic" in DaemonInfo("1", "1.41", Platform("linux", "amd64"), "overlay2", False).storage


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_client_without_a_daemon_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    socket = tmp_path / "no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
    client = DockerClient()
    try:
        with pytest.raises(DockerUnavailable) as unreachable:
            await client.daemon()
        assert str(unreachable.value) == (
            f"Docker is unreachable at unix://{socket} (DOCKER_HOST): No such file or directory"
        )
        with pytest.raises(DockerUnavailable):
            await client.inspect("alpine:latest")
        with pytest.raises(DockerUnavailable):
            await client.pull("alpine:latest", None)
        with pytest.raises(DockerUnavailable):
            async with client.save("alpine:latest", None):
                pass
        with pytest.raises(DockerUnavailable):
            await client.load(_chunks(b"tar"))
    finally:
        await client.close()
