"""`k3d-registry-dockerd doctor`: checks what serving needs and explains what the findings mean."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .docker import SAVE_PLATFORM_API, DaemonInfo, DockerClient, DockerUnavailable
from .endpoint import DockerEndpoint
from .settings import ENV_ADDR, ENV_CACHE_DIR, Settings

# Engine API 1.44 (Docker 25) is where image save started writing an OCI image layout.
OCI_SAVE_API = (1, 44)


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str
    remedy: str = ""

    def render(self) -> str:
        line = f"{'✓' if self.ok else '✗'} {self.text}"
        return f"{line}\n    → {self.remedy}" if self.remedy else line


def docker_findings(info: DaemonInfo, where: str) -> list[Finding]:
    """What the daemon's version and storage mean for the images this registry serves."""
    api = f"Engine API {info.api_version}"
    if info.api < OCI_SAVE_API:
        api_text = (
            f"{api} (< 1.44): Docker exports the legacy `docker save` format; the registry builds an OCI "
            "manifest for each image, with uncompressed layers and digests of its own"
        )
    elif info.api < SAVE_PLATFORM_API:
        api_text = f"{api}: exports are OCI image layouts, with every platform Docker has of an image"
    else:
        api_text = f"{api}: exports are OCI image layouts, only the daemon's platform ({info.platform})"
    if info.containerd_store:
        storage = (
            f"storage: {info.storage}: manifests and digests are the upstream's own, so digest-pinned "
            "pulls (image@sha256:…) are served exactly"
        )
    else:
        storage = (
            f"storage: {info.storage}: Docker generates manifests on export, so digest-pinned pulls "
            "(image@sha256:…) fall back to the upstream registry; tag pulls are served (enable Docker's "
            "containerd image store to serve upstream digests)"
        )
    return [
        Finding(True, f"{info.product} {info.server_version} reachable at {where}"),
        Finding(True, api_text),
        Finding(True, storage),
    ]


def cache_finding(cache_dir: Path) -> Finding:
    remedy = f"point --cache-dir (or {ENV_CACHE_DIR}) at a directory this user can write"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=cache_dir, prefix=".doctor-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return Finding(False, f"cache dir {cache_dir} is not writable: {exc.strerror or exc}", remedy)
    blobs = [path for path in (cache_dir / "blobs").rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in blobs)
    return Finding(True, f"cache dir {cache_dir} is writable: {len(blobs)} blobs, {size / 1e6:.1f} MB")


def port_finding(settings: Settings) -> Finding:
    host = settings.host or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, settings.port))
    except OSError as exc:
        why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        return Finding(
            False,
            f"listen address {settings.addr}: {why}",
            f"stop what listens there, or choose another --addr (or {ENV_ADDR})",
        )
    return Finding(True, f"listen address {settings.addr} is free")


async def diagnose(settings: Settings, docker: DockerClient) -> list[Finding]:
    findings: list[Finding] = []
    try:
        findings += docker_findings(await docker.daemon(), docker.describe())
    except DockerUnavailable as exc:
        findings.append(
            Finding(
                False,
                str(exc),
                "start Docker, or set DOCKER_HOST to its socket (in a container: mount it with "
                "-v /var/run/docker.sock:/var/run/docker.sock); cached images are still served without it",
            )
        )
    findings.append(cache_finding(settings.cache_dir))
    findings.append(port_finding(settings))
    return findings


async def run(settings: Settings, endpoint: DockerEndpoint) -> int:
    """Prints one line per finding; exit status 1 when something blocks serving."""
    docker = DockerClient(endpoint)
    try:
        findings = await diagnose(settings, docker)
    finally:
        await docker.close()
    for finding in findings:
        print(finding.render())
    return 0 if all(finding.ok for finding in findings) else 1
