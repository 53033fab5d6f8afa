"""`k3d-registry-dockerd doctor`: says first how the registry would get bytes for this Docker, then checks
what serving needs and explains what the findings mean."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp

from . import PRODUCT, configs, server
from .cache import directory
from .common import units
from .common.metrics import Metrics
from .docker.endpoint import DockerEndpoint
from .docker.engine import SAVE_PLATFORM_API, DaemonInfo, DockerClient, DockerUnavailable
from .docker.hostcreds import HostCredentials, HostCredentialsError
from .settings import (
    ENV_ADDR,
    ENV_CONTAINERD_ADDRESS,
    ENV_DOCKER_ROOT,
    ENV_ZERO_COPY,
    Settings,
    cache_dir_problem,
)
from .sources.containerd import ContainerdContent
from .sources.discovery import bytes_path, discover, kind_of
from .web.auth import Htpasswd, HtpasswdError

# Engine API 1.44 (Docker 25) is where image save started writing an OCI image layout.
OCI_SAVE_API = (1, 44)
_PROBE_TIMEOUT = 1.5
_MARKS = {"ok": "✓", "warn": "!", "fail": "✗"}


@dataclass(frozen=True)
class Finding:
    # "ok", "warn" (works, but worth knowing) or "fail" (blocks serving).
    status: str
    text: str
    remedy: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def render(self) -> str:
        line = f"{_MARKS[self.status]} {self.text}"
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
        Finding("ok", f"{info.product} {info.server_version} reachable at {where}"),
        Finding("ok", api_text),
        Finding("ok", storage),
    ]


async def in_place_state(
    settings: Settings, endpoint: DockerEndpoint, info: DaemonInfo
) -> tuple[str, Finding]:
    """From one discovery: the status page's first line (in place, zero-copy or export, as the registry
    would find it), and whether images are served where the daemon keeps them (zero-copy from containerd's
    content store, or Docker's classic store read in place), and why not."""
    kind = {
        "containerd": "zero-copy from containerd",
        "classic": "serving Docker's classic store in place",
        "podman": "serving Podman's storage in place",
    }[kind_of(info)]
    if not settings.zero_copy:
        off = f"{kind}: off ({settings.sources['zero_copy']}), every image is exported"
        return bytes_path(info, None, enabled=False), Finding("ok", off)
    config = server.in_place_config(settings, endpoint)
    found = await discover(config, info, Metrics())
    line = bytes_path(info, found, remedy=partial(configs.missing_mounts, endpoint=endpoint))
    if isinstance(found, str):
        where = (
            f"Docker's containerd socket (or {ENV_CONTAINERD_ADDRESS}) and its content store"
            if info.containerd_store
            else f"the daemon's data root (or {ENV_DOCKER_ROOT} naming where it is mounted)"
        )
        remedy = (
            f"a registry container needs {where}, read-only: {configs.store_mount_options(info, endpoint)}"
        )
        return line, Finding("warn", f"{kind}: off, every image is exported: {found}", remedy)
    if isinstance(found, ContainerdContent):
        await found.client.close()
        return line, Finding(
            "ok",
            f"{kind}: on ({found.client.address}, namespace {found.client.namespace}): images are served "
            f"from {found.blobs_dir} as they are, never exported (off: {ENV_ZERO_COPY}=false)",
        )
    return line, Finding(
        "ok",
        f"{kind}: on ({found.root}): layers are served from the daemon's own files, never exported "
        f"(off: {ENV_ZERO_COPY}=false)",
    )


def cache_finding(cache_dir: Path) -> Finding:
    try:
        directory.prepare(cache_dir)
    except directory.CacheDirError as exc:
        return Finding("fail", cache_dir_problem(exc))
    blobs = [path for path in (cache_dir / "blobs").rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in blobs)
    held = ""
    try:
        with directory.CacheDirLock(cache_dir):
            pass
    except directory.CacheDirError:
        held = ", in use by the running registry"
    return Finding("ok", f"cache dir {cache_dir} is writable: {len(blobs)} blobs, {units.size(size)}{held}")


async def _running_registry(settings: Settings) -> str | None:
    """The version of this registry answering on the port, if it is this registry that answers."""
    host = settings.host if settings.host not in (None, "0.0.0.0", "::") else "127.0.0.1"
    netloc = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    timeout = aiohttp.ClientTimeout(total=_PROBE_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for scheme in ("http", "https"):
            try:
                async with session.get(f"{scheme}://{netloc}/v2/", ssl=insecure) as response:
                    software = response.headers.get("Server", "")
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            name, _, version = software.partition("/")
            return (version or "unknown") if name == PRODUCT else None
    return None


async def port_findings(settings: Settings) -> list[Finding]:
    findings = []
    try:
        for sock in server.listen(settings.host, settings.port):
            sock.close()
        findings.append(Finding("ok", f"listen address {settings.addr} is free"))
    except server.StartError as exc:
        version = await _running_registry(settings)
        if version is None:
            findings.append(Finding("fail", str(exc)))
        else:
            findings.append(
                Finding("ok", f"listen address {settings.addr}: this registry ({version}) serves there")
            )
    if server.loopback_only(settings.host):
        findings.append(
            Finding(
                "warn",
                f"listen address {settings.addr} is loopback only: k3d and kind nodes cannot reach it "
                "(they reach the host as host.k3d.internal, another address)",
                f"listen on all interfaces (--addr :{settings.port}, or {ENV_ADDR}) unless the registry runs "
                "as a container on the cluster's network",
            )
        )
    return findings


def write_access_finding(settings: Settings) -> Finding:
    if settings.htpasswd_path is not None:
        try:
            users = Htpasswd(settings.htpasswd_path, settings.htpasswd_realm).load()
        except HtpasswdError as exc:
            return Finding("fail", str(exc))
        return Finding(
            "ok", f"pushes and deletes need credentials: {len(users)} users in {settings.htpasswd_path}"
        )
    risk = server.write_access_risk(settings)
    if risk is None:
        return Finding("ok", f"pushes need no credentials, and only this machine can reach {settings.addr}")
    return Finding("warn", *risk)


def host_credentials_finding(settings: Settings, credentials: HostCredentials) -> Finding:
    """Which registries the host's Docker credentials would be used for (names only, never secrets)."""
    state = "on" if settings.docker_credentials else "off"
    try:
        names = credentials.registries()
        store = credentials.config().creds_store
    except HostCredentialsError as exc:
        return Finding(
            "warn" if settings.docker_credentials else "ok", f"host's Docker credentials ({state}): {exc}"
        )
    listed = ", ".join(names) if names else "none"
    if store:
        listed += f"; the {store} helper may hold more"
    text = (
        f"host's Docker credentials for pulls without credentials: {state} ({listed} in {credentials.path})"
    )
    if settings.docker_credentials and (names or store):
        return Finding("warn", text, "anyone who can reach the registry can pull what these credentials can")
    return Finding("ok", text)


async def diagnose(settings: Settings, docker: DockerClient) -> tuple[str, list[Finding]]:
    """How bytes would be served (one line), and the findings."""
    findings: list[Finding] = []
    path = bytes_path(None, None, enabled=settings.zero_copy)
    try:
        info = await docker.daemon()
        path, in_place = await in_place_state(settings, docker.endpoint, info)
        findings += [*docker_findings(info, docker.describe()), in_place]
    except DockerUnavailable as exc:
        findings.append(
            Finding(
                "fail",
                str(exc),
                "start Docker, or set DOCKER_HOST to its socket (in a container: mount it with "
                "-v /var/run/docker.sock:/var/run/docker.sock); cached images are still served without it",
            )
        )
    findings.append(await asyncio.to_thread(cache_finding, settings.cache_dir))
    findings += await port_findings(settings)
    findings.append(write_access_finding(settings))
    findings.append(await asyncio.to_thread(host_credentials_finding, settings, HostCredentials()))
    return path, findings


async def run(settings: Settings, endpoint: DockerEndpoint) -> int:
    """Prints how bytes would be served, then one line per finding; exit status 1 when something blocks
    serving."""
    docker = DockerClient(endpoint)
    try:
        path, findings = await diagnose(settings, docker)
    finally:
        await docker.close()
    print(path)
    for finding in findings:
        print(finding.render())
    return 0 if all(finding.ok for finding in findings) else 1
