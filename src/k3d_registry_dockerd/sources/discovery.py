"""Finding Docker's containerd for zero-copy: where it listens, its namespace, and whether its content
store can be read from here; one sentence saying why not when it cannot."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..common.metrics import Metrics
from ..docker.containerd import DEFAULT_NAMESPACE, SYSTEM_ADDRESS, ContainerdClient, ContainerdUnavailable
from ..docker.engine import DaemonInfo
from .containerd import ContainerdContent

log = logging.getLogger(__package__)
# Where a dockerd started without --exec-root runs its own containerd.
DOCKERD_MANAGED_ADDRESS = "/var/run/docker/containerd/containerd.sock"
RETRY_AFTER = 30.0


@dataclass(frozen=True)
class ZeroCopyConfig:
    """How to find Docker's containerd: given addresses win over what Docker reports."""

    enabled: bool = True
    address: str | None = None
    namespace: str | None = None


class ContainerdDiscovery:
    """Finds Docker's containerd once Docker is known to use its image store, and says why not if not.

    Discovery is retried at most every RETRY_AFTER seconds, so a containerd that comes later is used."""

    def __init__(self, config: ZeroCopyConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.content: ContainerdContent | None = None
        # Why zero-copy is off, for the log, the status page and `doctor`; None while on or not yet known.
        self.off_reason: str | None = None
        self._tried_at: float | None = None
        self._lock = asyncio.Lock()

    async def source(self, info: DaemonInfo) -> ContainerdContent | None:
        if self.content is not None or not self.config.enabled:
            return self.content
        if not info.containerd_store:
            self._off(f"Docker uses the {info.storage}: every image is exported")
            return None
        async with self._lock:
            now = time.monotonic()
            if self.content is None and (self._tried_at is None or now - self._tried_at > RETRY_AFTER):
                self._tried_at = now
                found = await discover(self.config, info, self.metrics)
                if isinstance(found, str):
                    self._off(f"{found}; images are exported from Docker instead")
                else:
                    self.content = found
                    self.off_reason = None
        return self.content

    def describe(self) -> str:
        """One phrase for the status page: where zero-copy serves from, or why it does not."""
        if not self.config.enabled:
            return "zero-copy off"
        if self.content is not None:
            return f"zero-copy from containerd at {self.content.client.address}"
        return f"zero-copy off: {self.off_reason}" if self.off_reason else "zero-copy not checked yet"

    def _off(self, reason: str) -> None:
        if reason != self.off_reason:
            log.info("zero-copy from containerd is off: %s", reason)
        self.off_reason = reason

    async def close(self) -> None:
        if self.content is not None:
            await self.content.client.close()


def candidate_addresses(config: ZeroCopyConfig, info: DaemonInfo) -> list[tuple[str, str]]:
    """(address, where it came from), in the order to try."""
    if config.address:
        return [(config.address, "given")]
    found: list[tuple[str, str]] = []
    if info.containerd_address:
        found.append((info.containerd_address, "reported by Docker"))
    found += [(DOCKERD_MANAGED_ADDRESS, "dockerd's default"), (SYSTEM_ADDRESS, "the system containerd")]
    return list(dict.fromkeys(found))


def namespace_of(config: ZeroCopyConfig, info: DaemonInfo) -> str:
    return config.namespace or info.containerd_namespace or DEFAULT_NAMESPACE


async def discover(config: ZeroCopyConfig, info: DaemonInfo, metrics: Metrics) -> ContainerdContent | str:
    """Connects to Docker's containerd and checks its content store's files can be read from here;
    the reason as a sentence when not."""
    namespace = namespace_of(config, info)
    reasons = []
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
        return ContainerdContent(client, blobs, metrics)
    return "; ".join(reasons) or "no containerd address"


def _readable(root: Path) -> bool:
    """Whether the content store's files can be read here: containerd creates the root with the first
    blob, so a missing root counts when its parent is there (a directory not mounted has neither)."""
    if root.exists():
        return os.access(root, os.R_OK | os.X_OK)
    return root.parent.is_dir() and os.access(root.parent, os.R_OK | os.X_OK)
