"""Finding where the daemon's images lie, to serve them in place: Docker's containerd content store (the
containerd image store: zero-copy), the directories of Docker's classic store, or Podman's storage; whether
they can be read from here, and one sentence saying why not when they cannot; and the one line saying how
the registry gets bytes (`bytes_path`), which the status page and `doctor` put first."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cache.verified import VerifiedBlobs
from ..common.metrics import Metrics
from ..docker.containerd import DEFAULT_NAMESPACE, SYSTEM_ADDRESS, ContainerdClient, ContainerdUnavailable
from ..docker.engine import DaemonInfo
from .classic import DIFF_DIRS, ClassicContent, StoreImages
from .containerd import ContainerdContent
from .podman import LAYER_DIRS, PodmanContent

log = logging.getLogger(__package__)
# Where a dockerd started without --exec-root runs its own containerd.
DOCKERD_MANAGED_ADDRESS = "/var/run/docker/containerd/containerd.sock"
RETRY_AFTER = 30.0
# Docker 20.10 (Engine API 1.41) is the oldest whose classic store was tested.
CLASSIC_API = (1, 41)

InPlaceContent = ContainerdContent | StoreImages
# The mounts a registry container lacks to serve this daemon's store in place, as a phrase; None when the
# registry does not run in a container. Given by the program, which knows the mounts of each setup.
Remedy = Callable[[DaemonInfo], str | None]


class Unreadable(str):
    """Why the daemon's store is not served in place, when it is because its files (or containerd's socket)
    are not there to read: mounting them would let it be."""


@dataclass(frozen=True)
class InPlaceConfig:
    """How to find where the daemon keeps its images: given places win over what it reports."""

    enabled: bool = True
    address: str | None = None
    namespace: str | None = None
    # DockerRootDir as seen from here (a container mounting the host's /var/lib/docker elsewhere).
    docker_root: str | None = None
    # The daemon is reached over the network: its files are not here unless a root is given.
    remote: bool = False


def kind_of(info: DaemonInfo) -> str:
    if info.product.startswith("Podman"):
        return "podman"
    return "containerd" if info.containerd_store else "classic"


def daemon_name(info: DaemonInfo) -> str:
    """The daemon as a person calls it: Docker, or Podman behind its Docker-compatible API."""
    return "Podman" if info.product.startswith("Podman") else "Docker"


def store_name(content: InPlaceContent) -> str:
    """Where the daemon keeps its images, as the log and the status page name it."""
    return "containerd's content store" if isinstance(content, ContainerdContent) else content.name


def _kind_served(content: InPlaceContent | None) -> str | None:
    if content is None:
        return None
    if isinstance(content, ContainerdContent):
        return "containerd"
    return "podman" if isinstance(content, PodmanContent) else "classic"


_OFF = {
    "containerd": "zero-copy from containerd is off",
    "classic": "serving Docker's classic store in place is off",
    "podman": "serving Podman's storage in place is off",
}


class InPlaceDiscovery:
    """Finds where the daemon's images lie once its storage is known, and says why not if not.

    Discovery is retried at most every RETRY_AFTER seconds, so a store that becomes readable is used. The
    source found keeps which of its blobs were verified in `verified`."""

    def __init__(
        self,
        config: InPlaceConfig,
        metrics: Metrics,
        remedy: Remedy | None = None,
        verified: VerifiedBlobs | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.remedy = remedy
        self.verified = verified or VerifiedBlobs(metrics=metrics)
        self.content: InPlaceContent | None = None
        # Why images are exported instead, for the log, the status page and `doctor`; None while serving
        # in place or not yet known.
        self.off_reason: str | None = None
        # How the registry gets bytes, in one line: set whenever what serves changes.
        self.path = bytes_path(None, None, enabled=config.enabled)
        # The kind of store last looked for.
        self._kind: str | None = None
        self._tried_at: float | None = None
        self._lock = asyncio.Lock()

    async def source(self, info: DaemonInfo) -> InPlaceContent | None:
        if not self.config.enabled:
            return None
        kind = kind_of(info)
        if _kind_served(self.content) != kind:
            async with self._lock:
                now = time.monotonic()
                due = self._tried_at is None or now - self._tried_at > RETRY_AFTER or self._kind != kind
                if _kind_served(self.content) != kind and due:
                    self._tried_at, self._kind = now, kind
                    await self.close()
                    found = await discover(self.config, info, self.metrics, self.verified)
                    if isinstance(found, str):
                        self._off(f"{found}; images are exported from Docker instead")
                    else:
                        self.content, self.off_reason = found, None
                    self.path = bytes_path(info, found, remedy=self.remedy)
        return self.content if _kind_served(self.content) == kind else None

    def describe(self) -> str:
        """One phrase for the status page: where images are served from in place, or why they are not."""
        if not self.config.enabled:
            return "zero-copy off"
        if isinstance(self.content, ContainerdContent):
            return f"zero-copy from containerd at {self.content.client.address}"
        if isinstance(self.content, ClassicContent | PodmanContent):
            return f"in place from {self.content.name} at {self.content.root} ({self.content.driver})"
        if self.off_reason and self._kind:
            return f"{_OFF[self._kind]}: {self.off_reason}"
        return "zero-copy not checked yet"

    def _off(self, reason: str) -> None:
        if reason != self.off_reason:
            log.info("%s: %s", _OFF[self._kind or "containerd"], reason)
        self.off_reason = reason

    async def close(self) -> None:
        if self.content is not None:
            await self.content.close()
        self.content = None


def bytes_path(
    info: DaemonInfo | None,
    found: InPlaceContent | str | None,
    *,
    enabled: bool = True,
    remedy: Remedy | None = None,
) -> str:
    """How the registry gets bytes for this daemon, in one line that starts with the way: "in place",
    "zero-copy" or "export"; `found` is what discovery found (or why not), and `remedy` says which mounts
    are missing when a mount would help."""
    if not enabled:
        return "export: every image is exported from Docker into the cache (serving in place is turned off)"
    if info is None:
        return "export until Docker answers: where it keeps its images is not known yet"
    if isinstance(found, ContainerdContent):
        return (
            f"zero-copy: {info.product} {info.server_version}'s images are served from containerd's content "
            f"store as they are ({found.blobs_dir}), never exported"
        )
    if isinstance(found, ClassicContent | PodmanContent):
        return (
            f"in place: {info.product} {info.server_version}'s layers are read from {found.name} where they "
            f"lie ({found.root}, {found.driver}), never exported"
        )
    line = (
        f"export: {info.product} {info.server_version}'s images are exported into the cache, because {found}"
    )
    missing = remedy(info) if remedy is not None and isinstance(found, Unreadable) else None
    return f"{line}; {missing}" if missing else line


async def discover(
    config: InPlaceConfig, info: DaemonInfo, metrics: Metrics, verified: VerifiedBlobs | None = None
) -> InPlaceContent | str:
    """The source serving the daemon's images where they lie, or why there is none, as a sentence; it keeps
    which blobs were verified in `verified`."""
    kind = kind_of(info)
    if kind == "containerd":
        return await discover_containerd(config, info, metrics, verified)
    return (
        discover_podman(config, info, metrics, verified)
        if kind == "podman"
        else discover_classic(config, info, metrics, verified)
    )


def discover_classic(
    config: InPlaceConfig, info: DaemonInfo, metrics: Metrics, verified: VerifiedBlobs | None = None
) -> ClassicContent | str:
    """Docker's classic store, when this Docker's is one whose files can be read here."""
    if info.api < CLASSIC_API:
        api = f"Engine API {info.api_version}"
        return f"{info.product} {info.server_version} ({api}) is older than the versions tested"
    if info.storage_driver not in DIFF_DIRS:
        return f"Docker uses the {info.storage_driver} graph driver; only overlay2 and vfs are read in place"
    root = _root(config, info, "Docker")
    if isinstance(root, str):
        return root
    images = root / "image" / info.storage_driver / "imagedb" / "content" / "sha256"
    if not os.access(images, os.R_OK | os.X_OK):
        return Unreadable(
            f"Docker keeps its images in {root}, which cannot be read from here (mount it read-only at the "
            "same path, or name it with --docker-root)"
        )
    log.info(
        "serving Docker's classic store in place: %s (%s%s)",
        root,
        info.storage_driver,
        ", given" if config.docker_root else ", reported by Docker",
    )
    return ClassicContent(root, info.storage_driver, metrics, verified)


def candidate_addresses(config: InPlaceConfig, info: DaemonInfo) -> list[tuple[str, str]]:
    """(address, where it came from), in the order to try."""
    if config.address:
        return [(config.address, "given")]
    found: list[tuple[str, str]] = []
    if info.containerd_address:
        found.append((info.containerd_address, "reported by Docker"))
    found += [(DOCKERD_MANAGED_ADDRESS, "dockerd's default"), (SYSTEM_ADDRESS, "the system containerd")]
    return list(dict.fromkeys(found))


def namespace_of(config: InPlaceConfig, info: DaemonInfo) -> str:
    return config.namespace or info.containerd_namespace or DEFAULT_NAMESPACE


def _root(config: InPlaceConfig, info: DaemonInfo, who: str) -> Path | str:
    """The daemon's data root as seen from here, or why there is none to read."""
    if config.remote and not config.docker_root:
        return f"{who} runs on another machine (DOCKER_HOST names a remote host): its files are not here"
    given = config.docker_root or info.root_dir
    return Path(given) if given else f"{who} reports no data root (DockerRootDir)"


def discover_podman(
    config: InPlaceConfig, info: DaemonInfo, metrics: Metrics, verified: VerifiedBlobs | None = None
) -> PodmanContent | str:
    """Podman's storage, when its driver is one read here and its files can be read from here."""
    if info.storage_driver not in LAYER_DIRS:
        return f"Podman uses the {info.storage_driver} storage driver; only overlay and vfs are read in place"
    root = _root(config, info, "Podman")
    if isinstance(root, str):
        return root
    images = root / f"{info.storage_driver}-images" / "images.json"
    # A store that never held an image has no list of them yet: its root being readable is enough.
    fresh = not os.path.exists(images) and os.access(root, os.R_OK | os.X_OK)
    if not fresh and not os.access(images, os.R_OK):
        return Unreadable(
            f"Podman keeps its images in {root}, which cannot be read from here (mount it read-only at the "
            "same path, or name it with --docker-root)"
        )
    log.info("serving Podman's storage in place: %s (%s)", root, info.storage_driver)
    return PodmanContent(root, info.storage_driver, metrics, verified)


async def discover_containerd(
    config: InPlaceConfig, info: DaemonInfo, metrics: Metrics, verified: VerifiedBlobs | None = None
) -> ContainerdContent | str:
    """Connects to Docker's containerd and checks its content store's files can be read from here;
    the reason as a sentence when not."""
    namespace = namespace_of(config, info)
    reasons = []
    # Whether every address failed for want of a mount: no socket there, or a content store not readable.
    unmounted = True
    for address, origin in candidate_addresses(config, info):
        path = address.removeprefix("unix://")
        if not config.address and not os.path.exists(path):
            reasons.append(f"no socket at {path} ({origin})")
            continue
        client = ContainerdClient(address, namespace)
        try:
            version = await client.version()
            root = await client.content_root()
        except ContainerdUnavailable as exc:
            await client.close()
            reasons.append(f"{exc} ({origin})")
            unmounted = False
            continue
        blobs = Path(root or "") / "blobs" / "sha256"
        if not root or not _readable(Path(root)):
            await client.close()
            where = root or "a content store root"
            reasons.append(
                f"containerd {version} at {address} keeps its content in {where}, which cannot be read "
                "from here (mount it at the same path)"
            )
            continue
        log.info(
            "zero-copy from containerd is on: containerd %s at %s (%s), namespace %s, content %s",
            version,
            address,
            origin,
            namespace,
            blobs,
        )
        return ContainerdContent(client, blobs, metrics, verified)
    reason = "; ".join(reasons) or "no containerd address"
    return Unreadable(reason) if reasons and unmounted else reason


def _readable(root: Path) -> bool:
    """Whether the content store's files can be read here: containerd creates the root with the first
    blob, so a missing root counts when its parent is there (a directory not mounted has neither)."""
    if root.exists():
        return os.access(root, os.R_OK | os.X_OK)
    return root.parent.is_dir() and os.access(root.parent, os.R_OK | os.X_OK)
