"""Which sources serve this daemon's images, in the order they are asked: the daemon's own store where it
lies (containerd's content store, zero-copy, Docker's classic store or Podman's storage) when it can be
read, then our cache, exported from Docker.

While the daemon cannot be asked, its store is read as the daemon last described it (`KnownImages`, which
survives restarts): containerd's image records as they are, and for the classic store and Podman's storage
the tags and digests served before, the images the store's own files name for them now.

Also what a push needs of them: a blob the daemon's store serves, copied into our cache; Docker's names of
an image containerd's store serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterator
from typing import Any

from ..cache.store import DigestMismatch, Store
from ..common.flights import SingleFlight
from ..docker.engine import DaemonInfo, DockerClient
from ..oci.reference import Repository, split_repo_tag
from .classic import StoreImages
from .containerd import ContainerdContent
from .content import Blob, BlobFile, ImageContent, ServedManifest
from .discovery import InPlaceContent, InPlaceDiscovery, daemon_name, store_name
from .exported import ExportedContent
from .known import KnownImages
from .pieces import read_all

log = logging.getLogger(__package__)
# No daemon's facts: what `Sources` compares with before it first served while the daemon was down.
_NEVER = object()


def _named(tagged: list[tuple[str, str]]) -> Iterator[tuple[str, str, str]]:
    """(Docker name, tag, image ID) of Docker's `name:tag` listing."""
    for repo_tag, image_id in tagged:
        found = split_repo_tag(repo_tag)
        if found is not None:
            yield found[0], found[1], image_id


class Sources:
    def __init__(
        self,
        docker: DockerClient,
        exported: ExportedContent,
        known: KnownImages,
        discovery: InPlaceDiscovery | None = None,
    ) -> None:
        self.docker = docker
        self.exported = exported
        self.known = known
        self.discovery = discovery
        # Reads of a repository's known images into the store's source, for blobs asked for first.
        self._adoptions = SingleFlight()
        # The daemon's facts as last known (the very object: a new one each time it answers) when answers last
        # began to come from its store while it was down, and the line the log said so in.
        self._down_since: object = _NEVER
        self._down_line = ""

    async def start(self, info: DaemonInfo | None) -> None:
        """Finds the daemon's own store at start, as the daemon describes it (`info`) or, when it cannot be
        asked, as it was last known."""
        if info is None:
            if self.known.info is not None:
                await self.in_place(self.known.info)
        elif await self.in_place(info) is not None:
            self.known.saw(info)

    def last_info(self) -> DaemonInfo | None:
        """The daemon's facts as last known: from its last answer, else from before the registry started."""
        return self.docker.last_info or self.known.info

    async def in_place(self, info: DaemonInfo) -> InPlaceContent | None:
        """The daemon's own store, when it can be read from here."""
        return await self.discovery.source(info) if self.discovery is not None else None

    def tags_version(self) -> Hashable | None:
        """The identity of the daemon's own record of its tags, where it is read (see StoreImages); it
        changes whenever a tag does."""
        content = self.discovery.content if self.discovery is not None else None
        return content.tags_version() if isinstance(content, StoreImages) else None

    def _served_in_place(
        self, repo: Repository, image_id: str, info: DaemonInfo, *, tag: str | None = None, digest: str
    ) -> None:
        self.known.saw(info)
        self.known.served(repo.docker_name, image_id, tag=tag, digest=digest)

    async def _without_docker(self) -> tuple[InPlaceContent, DaemonInfo] | None:
        """The daemon's own store as the daemon last described it, for when it cannot be asked."""
        info = self.last_info()
        in_place = await self.in_place(info) if info is not None else None
        return (in_place, info) if in_place is not None else None

    async def tag_without_docker(
        self, repo: Repository, tag: str, why: Exception
    ) -> tuple[ServedManifest, str | None] | None:
        """The tag's image from the daemon's own store while the daemon cannot be asked (`why`), and its ID
        when known: as containerd's image record has it (the store Docker reads, as fresh as Docker's answer
        would be); from the classic store or Podman's storage only a tag served before, as the image the
        store's files name for it now, else the one it was served as while the store keeps it."""
        found = await self._without_docker()
        if found is None:
            return None
        in_place, info = found
        image_id = None
        if isinstance(in_place, ContainerdContent):
            served = await in_place.by_tag(repo, tag, None, info, None)
        else:
            image_id = await self._image_of_tag(in_place, repo, tag, info)
            served = await in_place.by_tag(repo, tag, {"Id": image_id}, info, None) if image_id else None
        if served is None:
            return None
        if image_id is not None:
            self.known.served(repo.docker_name, image_id, tag=tag, digest=served.digest)
        self._serving_while_down(in_place, info, why, repo.familiar(tag))
        return served, image_id

    async def _image_of_tag(
        self, in_place: StoreImages, repo: Repository, tag: str, info: DaemonInfo
    ) -> str | None:
        known = self.known.tag(repo.docker_name, tag)
        if known is None:
            return None
        tagged = await asyncio.to_thread(in_place.tagged)
        # Podman's `localhost/` image of a short Docker Hub name, as its own lookup (and the tag's) finds it.
        local = repo.podman_local() if info.product.startswith("Podman") else None
        for named in (repo, local):
            image_id = tagged.get(named.docker_ref(tag)) if named is not None else None
            if image_id is not None:
                return image_id
        return known if await asyncio.to_thread(in_place.holds, known) else None

    async def digest_without_docker(
        self, repo: Repository, digest: str, why: Exception
    ) -> ServedManifest | None:
        """A manifest of the daemon's own store by digest while the daemon cannot be asked (`why`): from
        containerd's image records, else one served before for an image the store still keeps."""
        found = await self._without_docker()
        if found is None:
            return None
        in_place, info = found
        served = await in_place.by_digest(repo, digest, None, info)
        if served is None and isinstance(in_place, StoreImages):
            image_id = self.known.digest(repo.docker_name, digest)
            if image_id is not None and await in_place.adopt(repo, image_id, info):
                served = await in_place.by_digest(repo, digest, None, info)
        if served is not None:
            self._serving_while_down(in_place, info, why, repo.familiar(digest))
        return served

    def _serving_while_down(
        self, in_place: InPlaceContent, info: DaemonInfo, why: Exception, what: str
    ) -> None:
        """Logs one line when answers begin to come from the daemon's store while the daemon is away (again:
        the daemon's facts are a new object after each time it answered)."""
        if self._down_since is not self.docker.last_info:
            self._down_since = self.docker.last_info
            self._down_line = f"serving from {store_name(in_place)} while {daemon_name(info)} is down"
            log.warning("%s, as its files have it now: %s", self._down_line, why)
        log.debug("%s answered from %s", what, store_name(in_place))

    def while_down(self) -> str | None:
        """The log's "serving from … while … is down" once an answer came from the daemon's store since the
        daemon went away, until it answers again; None otherwise (asked while the daemon cannot be)."""
        return self._down_line if self._down_since is self.docker.last_info else None

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
                if source is not self.exported:
                    self._served_in_place(repo, str(image["Id"]), info, tag=tag, digest=served.digest)
                return served
        return None

    async def by_digest(
        self, repo: Repository, digest: str, image: dict[str, Any], info: DaemonInfo
    ) -> ServedManifest | None:
        """A manifest of Docker's `image` by digest, from the first source that serves it."""
        for source in await self.ordered(info):
            served = await source.by_digest(repo, digest, image, info)
            if served is not None:
                if source is not self.exported:
                    self._served_in_place(repo, str(image["Id"]), info, digest=digest)
                return served
        return None

    async def blob(self, repo: Repository, digest: str) -> Blob | None:
        """A blob this repository's manifests reference, from our cache, else from the daemon's store as
        Docker last described it (no call to Docker: a pull's blobs follow its manifests)."""
        found = await self.exported.blob(repo, digest, self.last_info())
        if found is None:
            found = await self._in_place_blob(repo, digest)
        return found

    async def _in_place_blob(self, repo: Repository, digest: str) -> Blob | None:
        info = self.last_info()
        in_place = await self.in_place(info) if info is not None else None
        if in_place is None:
            return None
        found = await in_place.blob(repo, digest, info)
        if found is None and isinstance(in_place, StoreImages) and self.known.images(repo.docker_name):
            # Asked for before any manifest since the registry started (a pull it was serving when it
            # stopped): the images served under the repository before are served again.
            await self._adoptions.run(repo.docker_name, lambda: self._adopt_known(in_place, repo, info))
            found = await in_place.blob(repo, digest, info)
        return found

    async def _adopt_known(self, in_place: StoreImages, repo: Repository, info: DaemonInfo) -> None:
        for image_id in self.known.images(repo.docker_name):
            await in_place.adopt(repo, image_id, info)

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
