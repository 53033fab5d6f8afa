"""doctor's findings from daemon facts, the cache dir and the listen port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from k3d_registry_dockerd.docker import DaemonInfo
from k3d_registry_dockerd.doctor import Finding, cache_finding, docker_findings, port_finding
from k3d_registry_dockerd.export import Platform
from k3d_registry_dockerd.settings import resolve

AMD64 = Platform("linux", "amd64")


def _texts(info: DaemonInfo) -> str:
    findings = docker_findings(info, "unix:///var/run/docker.sock (default)")
    return "\n".join(finding.render() for finding in findings)


def test_legacy_engine_and_classic_store_are_explained() -> None:
    text = _texts(DaemonInfo("20.10.24", "1.41", AMD64, "overlay2", False))
    assert "Docker Engine 20.10.24 reachable" in text
    assert "(< 1.44): Docker exports the legacy `docker save` format" in text
    assert "digest-pinned pulls (image@sha256:…) fall back to the upstream registry" in text
    assert "✗" not in text


def test_containerd_store_serves_exact_digests() -> None:
    text = _texts(DaemonInfo("26.1.5", "1.45", AMD64, "overlayfs", True, "Docker Engine"))
    assert "OCI image layouts, with every platform" in text
    assert "containerd image store" in text
    assert "served exactly" in text


def test_api_1_48_exports_one_platform() -> None:
    text = _texts(DaemonInfo("28.0.1", "1.48", Platform("linux", "arm64", "v8"), "overlayfs", True))
    assert "only the daemon's platform (linux/arm64/v8)" in text


def test_cache_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    finding = cache_finding(blocker / "cache")
    assert not finding.ok
    assert "--cache-dir" in finding.remedy


def test_cache_dir_size(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "sha256" / "ab" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x" * 2_000_000)
    finding = cache_finding(tmp_path)
    assert finding.ok
    assert "1 blobs, 2.0 MB" in finding.text


def test_port_in_use_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = resolve(addr=f"127.0.0.1:{port}", cache_dir="/tmp/x", log_level=None, refresh_tags=None)
        finding = port_finding(settings)
    assert not finding.ok
    assert "already in use" in finding.text
    assert "--addr" in finding.remedy


def test_render() -> None:
    assert Finding(True, "fine").render() == "✓ fine"
    assert Finding(False, "broken", "fix it").render() == "✗ broken\n    → fix it"
