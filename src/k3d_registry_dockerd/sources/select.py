"""Which sources serve this daemon's images, in the order they are asked: the daemon's own store where it
lies (containerd's content store, zero-copy, or Docker's classic store) when it can be read, then our
cache, exported from Docker.

Also what a push needs of them: a blob the daemon's store serves, copied into our cache; Docker's names of
an image containerd's store serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterator
from typing import Any

from ..cache.store import DigestMismatch, Store
from ..docker.engine import DaemonInfo, DockerClient
from ..oci.reference import Repository, split_repo_tag
from .classic import StoreImages
from .containerd import ContainerdContent
from .content import Blob, BlobFile, ImageContent, ServedManifest
from .discovery import InPlaceContent, InPlaceDiscovery
from .exported import ExportedContent
from .pieces import read_all

log = logging.getLogger(__package__)


def _named(tagged: list[tuple[str, str]]) -> Iterator[tuple[str, str, str]]:
    """(Docker name, tag, image ID) of Docker's `name:tag` listing."""
    for repo_tag, image_id in tagged:
        found = split_repo_tag(repo_tag)
        if found is not None:
            yield found[0], found[1], image_id


class Sources:
    def __init__(
        self, docker: DockerClient, exported: ExportedContent, discovery: InPlaceDiscovery | None = None
    ) -> None:
        self.docker = docker
        self.exported = exported
        self.discovery = discovery

    async def in_place(self, info: DaemonInfo) -> InPlaceContent | None:
        """The daemon's own store, when it can be read from here."""
        return await self.discovery.source(info) if self.discovery is not None else None

    def tags_version(self) -> Hashable | None:
        """The identity of the daemon's own record of its tags, where it is read (see StoreImages); it
        changes whenever a tag does."""
        content = self.discovery.content if self.discovery is not None else None
        return content.tags_version() if isinstance(content, StoreImages) else None

    def containerd_without_docker(self) -> tuple[ContainerdContent, DaemonInfo] | None:
        """containerd's content store while Docker is away, if zero-copy was on when Docker last answered:
        its image records are the store Docker reads, so they are as fresh as Docker's answer would be."""
        content = self.discovery.content if self.discovery is not None else None
        info = self.docker.last_info
        if not isinstance(content, ContainerdContent) or info is None or not info.containerd_store:
            return None
        return content, info

    async def exports_needed(self, info: DaemonInfo) -> bool:
        """Whether Docker's images are served from our cache, exported, rather than where they lie."""
        return await self.in_place(info) is None

    async def ordered(self, info: DaemonInfo) -> list[ImageContent]:
        in_place = await self.in_place(info)
        return [in_place, self.exported] if in_place is not None else [self.exported]

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

    async def blob(self, repo: Repository, digest: str) -> Blob | None:
        """A blob this repository's manifests reference, from our cache, else from the daemon's store as
        Docker last described it (no call to Docker: a pull's blobs follow its manifests)."""
        info = self.docker.last_info
        found = await self.exported.blob(repo, digest, info)
        if found is None:
            found = await self._in_place_blob(repo, digest)
        return found

    async def _in_place_blob(self, repo: Repository, digest: str) -> Blob | None:
        info = self.docker.last_info
        in_place = await self.in_place(info) if info is not None else None
        return await in_place.blob(repo, digest, info) if in_place is not None else None

    async def keep_in_cache(self, repo: Repository, digest: str, store: Store) -> bool:
        """Copies a blob this repository serves from the daemon's store into our cache (verified), for a
        push that uses it: pushed content must not depend on what the daemon keeps."""
        found = await self._in_place_blob(repo, digest)
        if found is None:
            return False
        try:
            if isinstance(found, BlobFile):
                await asyncio.to_thread(store.put_file, found.path, digest)
            else:
                chunks = read_all(found.pieces(0, found.size, None))
                await asyncio.to_thread(store.put_chunks, chunks, digest)
        except (OSError, DigestMismatch) as exc:
            log.warning("copying %s from the daemon's store into the cache failed: %s", digest, exc)
            return False
        return True

    async def docker_refs_of(
        self, repo: Repository, digest: str, info: DaemonInfo
    ) -> tuple[list[str], str] | None:
        """Docker's references in this repository to the image whose manifest `digest` is served where the
        daemon keeps it, and that image's ID; None when no such image is served there."""
        in_place = await self.in_place(info)
        if isinstance(in_place, ContainerdContent):
            if await in_place.by_digest(repo, digest, None, info) is None:
                return None
            # On the containerd image store an image's ID is its target's digest.
            return await in_place.names_of(repo, digest), digest
        image_id = in_place.image_of(repo, digest) if in_place is not None else None
        if image_id is None:
            return None
        tagged = await self.docker.tagged_images()
        names = (
            f"{name}:{tag}" for name, tag, i in _named(tagged) if name == repo.docker_name and i == image_id
        )
        return sorted(names), image_id
