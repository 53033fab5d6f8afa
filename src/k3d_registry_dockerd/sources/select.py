"""Which sources serve this daemon's images, in the order they are asked: Docker's containerd content store
as it lies (zero-copy) when it can be read, then our cache, exported from Docker.

Also what a push needs of them: a blob containerd's store serves, copied into our cache; Docker's names of
an image containerd's store serves.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..cache.store import DigestMismatch, Store
from ..docker.engine import DaemonInfo, DockerClient
from ..oci.reference import Repository
from .containerd import ContainerdContent
from .content import BlobFile, ImageContent, ServedManifest
from .discovery import ContainerdDiscovery
from .exported import ExportedContent

log = logging.getLogger(__package__)


class Sources:
    def __init__(
        self, docker: DockerClient, exported: ExportedContent, discovery: ContainerdDiscovery | None = None
    ) -> None:
        self.docker = docker
        self.exported = exported
        self.discovery = discovery

    async def containerd(self, info: DaemonInfo) -> ContainerdContent | None:
        """Docker's containerd content store, when Docker uses it and it can be read from here."""
        return await self.discovery.source(info) if self.discovery is not None else None

    def containerd_without_docker(self) -> tuple[ContainerdContent, DaemonInfo] | None:
        """containerd's content store while Docker is away, if zero-copy was on when Docker last answered:
        its image records are the store Docker reads, so they are as fresh as Docker's answer would be."""
        content = self.discovery.content if self.discovery is not None else None
        info = self.docker.last_info
        if content is None or info is None or not info.containerd_store:
            return None
        return content, info

    async def exports_needed(self, info: DaemonInfo) -> bool:
        """Whether Docker's images are served from our cache, exported, rather than where they lie."""
        return await self.containerd(info) is None

    async def ordered(self, info: DaemonInfo) -> list[ImageContent]:
        containerd = await self.containerd(info)
        return [containerd, self.exported] if containerd is not None else [self.exported]

    async def by_tag(
        self, repo: Repository, tag: str, image: dict[str, Any], pulled_at: float | None
    ) -> ServedManifest | None:
        """Docker's current `image` of the tag, from the first source that serves it."""
        info = await self.docker.daemon()
        for source in await self.ordered(info):
            served = await source.by_tag(repo, tag, image, info, pulled_at)
            if served is not None:
                return served
        return None

    async def by_digest(
        self, repo: Repository, digest: str, image: dict[str, Any], info: DaemonInfo
    ) -> ServedManifest | None:
        """A manifest of Docker's `image` by digest, from the first source that serves it."""
        for source in await self.ordered(info):
            served = await source.by_digest(repo, digest, image, info)
            if served is not None:
                return served
        return None

    async def blob(self, repo: Repository, digest: str) -> BlobFile | None:
        """A blob this repository's manifests reference, from our cache, else from containerd's store as
        Docker last described it (no call to Docker: a pull's blobs follow its manifests)."""
        info = self.docker.last_info
        found = await self.exported.blob(repo, digest, info)
        if found is None and info is not None:
            containerd = await self.containerd(info)
            if containerd is not None:
                found = await containerd.blob(repo, digest, info)
        return found

    async def keep_in_cache(self, repo: Repository, digest: str, store: Store) -> bool:
        """Copies a blob this repository serves from containerd's content store into our cache (verified),
        for a push that uses it: pushed content must not depend on what containerd keeps."""
        info = self.docker.last_info
        containerd = await self.containerd(info) if info is not None else None
        found = await containerd.blob(repo, digest, info) if containerd and info else None
        if found is None:
            return False
        try:
            await asyncio.to_thread(store.put_file, found.path, digest)
        except (OSError, DigestMismatch) as exc:
            log.warning("copying %s from containerd's content store into the cache failed: %s", digest, exc)
            return False
        return True

    async def docker_refs_of(self, repo: Repository, digest: str, info: DaemonInfo) -> list[str] | None:
        """Docker's references in this repository whose image is `digest`, when containerd's content store
        serves it (zero-copy); None when it does not."""
        containerd = await self.containerd(info)
        if containerd is None or await containerd.by_digest(repo, digest, None, info) is None:
            return None
        return await containerd.names_of(repo, digest)
