"""The first line of the status page and of `doctor`: how the registry gets bytes for this daemon (in place,
zero-copy or export), and the mounts a registry container lacks when it exports though it need not."""

from __future__ import annotations

from pathlib import Path

import pytest

from k3d_registry_dockerd import configs
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.docker.containerd import ContainerdClient
from k3d_registry_dockerd.docker.endpoint import DockerEndpoint
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.sources import discovery
from k3d_registry_dockerd.sources.classic import ClassicContent
from k3d_registry_dockerd.sources.containerd import ContainerdContent
from k3d_registry_dockerd.sources.discovery import InPlaceConfig, InPlaceDiscovery, Unreadable, bytes_path
from k3d_registry_dockerd.sources.podman import PodmanContent

AMD64 = Platform("linux", "amd64")
LOCAL = DockerEndpoint("unix:///var/run/docker.sock", "default", "default")
CONTENT = "/var/lib/containerd/io.containerd.content.v1.content"


def _classic(root: Path) -> DaemonInfo:
    return DaemonInfo("26.1.5", "1.45", AMD64, "overlay2", False, root_dir=str(root))


def _in_container(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, inside: bool) -> None:
    marker = tmp_path / ".dockerenv"
    if inside:
        marker.touch()
    else:
        marker.unlink(missing_ok=True)
    monkeypatch.setattr(configs, "CONTAINER_MARKERS", (str(marker),))


async def test_each_way_in_one_line(tmp_path: Path) -> None:
    metrics = Metrics()
    info = _classic(tmp_path)
    classic = bytes_path(info, ClassicContent(tmp_path, "overlay2", metrics))
    assert classic == (
        f"in place: Docker Engine 26.1.5's layers are read from Docker's classic store where they lie "
        f"({tmp_path}, overlay2), never exported"
    )
    podman = DaemonInfo("5.4.2", "1.41", AMD64, "overlay", False, "Podman Engine", root_dir=str(tmp_path))
    assert bytes_path(podman, PodmanContent(tmp_path, "overlay", metrics)).startswith(
        "in place: Podman Engine 5.4.2's layers are read from Podman's storage where they lie"
    )
    client = ContainerdClient(str(tmp_path / "containerd.sock"), "moby")
    try:
        zero_copy = bytes_path(info, ContainerdContent(client, tmp_path / "blobs" / "sha256", metrics))
    finally:
        await client.close()
    assert zero_copy.startswith("zero-copy: Docker Engine 26.1.5's images are served from containerd's")
    assert zero_copy.endswith(f"({tmp_path}/blobs/sha256), never exported")
    assert bytes_path(info, "Docker uses the btrfs graph driver") == (
        "export: Docker Engine 26.1.5's images are exported into the cache, because Docker uses the btrfs "
        "graph driver"
    )
    assert bytes_path(info, Unreadable("not here"), remedy=lambda info: "mount it").endswith(
        "because not here; mount it"
    )
    # Only a reason a mount would fix gets the remedy.
    assert bytes_path(info, "too old", remedy=lambda info: "mount it").endswith("because too old")
    assert bytes_path(None, None).startswith("export until Docker answers")
    assert bytes_path(info, None, enabled=False).startswith("export: every image is exported")


async def test_a_container_without_the_mounts_is_told_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "docker"
    remedy = lambda info: configs.missing_mounts(info, LOCAL)  # noqa: E731
    found = InPlaceDiscovery(InPlaceConfig(), Metrics(), remedy)
    assert found.path.startswith("export until Docker answers")
    _in_container(monkeypatch, tmp_path, inside=True)
    await found.source(_classic(root))
    assert found.path.startswith("export: Docker Engine 26.1.5's images are exported into the cache, because")
    assert found.path.endswith(
        f"to serve them in place, give the registry container the mounts `config k3d` prints: "
        f"-v {root}:{root}:ro"
    )
    # On the host the reason is the remedy: the files are there, only not readable by this user.
    _in_container(monkeypatch, tmp_path, inside=False)
    on_host = InPlaceDiscovery(InPlaceConfig(), Metrics(), remedy)
    await on_host.source(_classic(root))
    assert "-v " not in on_host.path and "cannot be read from here" in on_host.path
    # A daemon on another machine has no faster path: nothing to mount.
    _in_container(monkeypatch, tmp_path, inside=True)
    remote = InPlaceDiscovery(InPlaceConfig(remote=True), Metrics(), remedy)
    await remote.source(_classic(root))
    assert "another machine" in remote.path and "-v " not in remote.path
    # Once the files are there it serves them in place, and says so.
    (root / "image" / "overlay2" / "imagedb" / "content" / "sha256").mkdir(parents=True)
    readable = InPlaceDiscovery(InPlaceConfig(), Metrics(), remedy)
    await readable.source(_classic(root))
    assert readable.path.startswith("in place: ")
    await readable.close()


async def test_containerd_without_its_socket_names_both_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _in_container(monkeypatch, tmp_path, inside=True)
    missing = [(str(tmp_path / "containerd.sock"), "reported by Docker")]
    monkeypatch.setattr(discovery, "candidate_addresses", lambda config, info: missing)
    remedy = lambda info: configs.missing_mounts(info, LOCAL)  # noqa: E731
    found = InPlaceDiscovery(InPlaceConfig(), Metrics(), remedy)
    await found.source(DaemonInfo("29.1.2", "1.52", AMD64, "overlayfs", True))
    assert found.path.startswith("export: ") and f"no socket at {tmp_path}/containerd.sock" in found.path
    sockets = "-v /run/containerd/containerd.sock:/run/containerd/containerd.sock"
    assert found.path.endswith(f"the mounts `config k3d` prints: {sockets} -v {CONTENT}:{CONTENT}:ro")
    assert "to serve them zero-copy, give the registry container" in found.path


async def test_a_containerd_that_refuses_is_not_a_missing_mount(tmp_path: Path) -> None:
    """A socket that is there but does not answer: mounting changes nothing, so no remedy is offered."""
    config = InPlaceConfig(address=str(tmp_path / "given.sock"))
    found = await discovery.discover_containerd(
        config, DaemonInfo("29.1.2", "1.52", AMD64, "overlayfs", True), Metrics()
    )
    assert isinstance(found, str) and not isinstance(found, Unreadable)
