"""doctor's findings from daemon facts, the cache dir and the listen port."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import bcrypt

from k3d_registry_dockerd import __version__
from k3d_registry_dockerd.cache.directory import CacheDirLock
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.endpoint import DockerEndpoint
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.docker.hostcreds import HostCredentials
from k3d_registry_dockerd.doctor import (
    Finding,
    cache_finding,
    docker_findings,
    host_credentials_finding,
    in_place_state,
    port_findings,
    write_access_finding,
)
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.settings import Settings, resolve
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker

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
    assert finding.status == "fail"
    assert "--cache-dir" in finding.text


def test_cache_dir_size_in_binary_units(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "sha256" / "ab" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x" * (2 << 20))
    finding = cache_finding(tmp_path)
    assert finding.ok
    assert "1 blobs, 2 MiB" in finding.text


def test_cache_dir_held_by_a_running_registry(tmp_path: Path) -> None:
    with CacheDirLock(tmp_path):
        finding = cache_finding(tmp_path)
    assert finding.ok and "in use by the running registry" in finding.text


def _settings(addr: str, **options: str) -> Settings:
    return resolve(addr=addr, cache_dir="/tmp/x", log_level=None, refresh_tags=None, env={}, **options)


async def test_port_in_use_by_something_else_blocks() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        findings = await port_findings(_settings(f"127.0.0.1:{port}"))
    assert findings[0].status == "fail"
    assert "already in use" in findings[0].text and "--addr" in findings[0].text


async def test_port_served_by_this_registry_is_recognized(aiohttp_server: Any, tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    running = await aiohttp_server(create_app(assemble(store, FakeDocker())))
    findings = await port_findings(_settings(f"127.0.0.1:{running.port}"))
    assert findings[0].status == "ok"
    assert f"this registry ({__version__}) serves there" in findings[0].text


async def test_loopback_only_is_a_warning() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    findings = await port_findings(_settings(f"127.0.0.1:{port}"))
    assert [f.status for f in findings] == ["ok", "warn"]
    assert "host.k3d.internal" in findings[1].text


def test_write_access(tmp_path: Path) -> None:
    open_to_all = write_access_finding(_settings(":5000"))
    assert open_to_all.status == "warn"
    assert "anyone who can reach :5000 can push" in open_to_all.text
    assert "htpasswd -Bc FILE USER" in open_to_all.remedy
    assert write_access_finding(_settings("127.0.0.1:5000")).status == "ok"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode() + "\n")
    guarded = write_access_finding(_settings(":5000", htpasswd_path=str(htpasswd)))
    assert guarded.status == "ok" and "1 users" in guarded.text
    htpasswd.write_text("alice:$apr1$md5\n")
    assert write_access_finding(_settings(":5000", htpasswd_path=str(htpasswd))).status == "fail"


def test_render() -> None:
    assert Finding("ok", "fine").render() == "✓ fine"
    assert Finding("warn", "careful", "do this").render() == "! careful\n    → do this"
    assert Finding("fail", "broken", "fix it").render() == "✗ broken\n    → fix it"


async def in_place_finding(settings: Settings, endpoint: DockerEndpoint, info: DaemonInfo) -> Finding:
    return (await in_place_state(settings, endpoint, info))[1]


async def test_in_place_findings(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    local = DockerEndpoint("unix:///var/run/docker.sock", "default", "default")
    settings = resolve(addr=None, cache_dir=str(tmp_path), log_level=None, refresh_tags=None, env=env)
    root = tmp_path / "docker"
    classic = DaemonInfo("28.5.2", "1.51", AMD64, "overlay2", False, root_dir=str(root))
    unreadable = await in_place_finding(settings, local, classic)
    assert unreadable.status == "warn" and "classic store in place: off" in unreadable.text
    assert str(root) in unreadable.text and "K3D_REGISTRY_DOCKERD_DOCKER_ROOT" in unreadable.remedy
    assert unreadable.remedy.endswith(f"read-only: -v {root}:{root}:ro")
    (root / "image" / "overlay2" / "imagedb" / "content" / "sha256").mkdir(parents=True)
    readable = await in_place_finding(settings, local, classic)
    assert readable.status == "ok" and f"classic store in place: on ({root})" in readable.text
    remote = DockerEndpoint("tcp://build-host:2375", "default", "DOCKER_HOST")
    assert "another machine" in (await in_place_finding(settings, remote, classic)).text
    containerd = DaemonInfo("28.5.2", "1.51", AMD64, "overlayfs", True)
    off = resolve(
        addr=None, cache_dir=str(tmp_path), log_level=None, refresh_tags=None, no_zero_copy=True, env=env
    )
    assert "off (flag --no-zero-copy)" in (await in_place_finding(off, local, containerd)).text
    missing = resolve(
        addr=None,
        cache_dir=str(tmp_path),
        log_level=None,
        refresh_tags=None,
        containerd_address=str(tmp_path / "none.sock"),
        env=env,
    )
    unreachable = await in_place_finding(missing, local, containerd)
    assert unreachable.status == "warn"
    assert "every image is exported" in unreachable.text and "none.sock" in unreachable.text
    content = "/var/lib/containerd/io.containerd.content.v1.content"
    mounts = f"-v /run/containerd/containerd.sock:/run/containerd/containerd.sock -v {content}:{content}:ro"
    assert unreachable.remedy.endswith(mounts)


def test_host_credentials_are_listed_by_registry_name_only(tmp_path: Path) -> None:
    config = {
        "auths": {"https://index.docker.io/v1/": {"auth": "dTpzM2NyZXQ="}},
        "credHelpers": {"gcr.io": "gcloud"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    credentials = HostCredentials({"DOCKER_CONFIG": str(tmp_path)})
    off = host_credentials_finding(
        resolve(addr=None, cache_dir=None, log_level=None, refresh_tags=None, env={}), credentials
    )
    assert off.status == "ok" and "off (docker.io, gcr.io in " in off.text
    on_settings = resolve(
        addr=None, cache_dir=None, log_level=None, refresh_tags=None, docker_credentials=True, env={}
    )
    on = host_credentials_finding(on_settings, credentials)
    assert on.status == "warn" and "on (docker.io, gcr.io" in on.text and "anyone" in on.remedy
    assert "s3cret" not in on.render() and "dTpzM2NyZXQ=" not in on.render()
