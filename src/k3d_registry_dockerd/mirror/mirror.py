"""The path of a pull, one step after another: which image the reference names now (`CurrentImages`:
freshness, pulls), whether the request may see it (`PrivateGuard`), and the first source that serves it
(`Sources`: Docker's containerd content store as it lies, else our cache, exported from Docker once per
image ID). So a rebuilt local tag is served fresh on its next request, whichever source serves it.

When Docker cannot be asked, a tag or digest is served from the daemon's own store as the sources find it
without Docker (containerd's image records; Docker's classic store and Podman's storage for what was served
before), else as our cache last had it; the private guard still stands in front of it.
"""

from __future__ import annotations

import logging
from collections.abc import Container

from ..cache.store import TagEntry
from ..common.flights import SingleFlight
from ..common.metrics import Metrics
from ..docker.engine import Credentials, DaemonInfo, DockerClient, DockerUnavailable
from ..oci.errors import RegistryError
from ..oci.reference import Digest, Repository
from ..sources.content import BlobFile, ServedManifest
from ..sources.discovery import InPlaceContent
from ..sources.select import Sources
from .current import CurrentImages
from .private import PrivateGuard

log = logging.getLogger(__package__)


class Mirror:
    def __init__(
        self,
        docker: DockerClient,
        images: CurrentImages,
        guard: PrivateGuard,
        sources: Sources,
        metrics: Metrics,
        loading: Container[str] = (),
    ) -> None:
        self.docker = docker
        self.images = images
        self.guard = guard
        self.sources = sources
        self.metrics = metrics
        # Docker references a pushed image is being loaded into Docker under (owned by the pushes).
        self.loading = loading
        self._digests = SingleFlight()

    # ---- manifests -------------------------------------------------------------------------------

    async def manifest_by_tag(
        self, repo: Repository, tag: str, credentials: Credentials | None
    ) -> ServedManifest:
        exported = self.sources.exported
        cached = exported.cached_tag(repo, tag)
        # Own namespace and mirror requests share a record (same Docker name): a pushed tag stands for
        # that Docker image either way, so a mirror request must not replace it with an upstream pull.
        if cached is not None and cached.pushed and await self._pushed_current(repo, tag, cached):
            self.metrics.manifest_cache.labels("hit").inc()
            return exported.served(repo, cached.digest, cached.media_type)
        try:
            current = await self.images.of_tag(repo, tag, credentials, cached)
            # Before anything is exported for the request.
            owner = await self.guard.admit(repo, credentials, image_id=current.image["Id"])
            served = await self.sources.by_tag(repo, tag, current.image, current.pulled_at)
        except DockerUnavailable as exc:
            return await self._tag_without_docker(repo, tag, credentials, cached, exc)
        if served is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(tag)}")
        if owner is not None:
            await self.guard.served(repo, owner, served)
        return served

    async def _tag_without_docker(
        self,
        repo: Repository,
        tag: str,
        credentials: Credentials | None,
        cached: TagEntry | None,
        exc: DockerUnavailable,
    ) -> ServedManifest:
        found = await self.sources.tag_without_docker(repo, tag, exc)
        if found is not None:
            served, image_id = found
            return await self.guard.admit_served(repo, served, credentials, image_id)
        stale = self.sources.exported.stale(repo, tag)
        if stale is not None:
            await self.guard.admit_served(repo, stale, credentials, cached.image_id if cached else None)
            log.warning("serving cached %s (%s) as it was: %s", repo.familiar(tag), stale.digest, exc)
            self.metrics.manifest_cache.labels("stale").inc()
            return stale
        raise RegistryError("UNAVAILABLE", str(exc)) from exc

    async def _pushed_current(self, repo: Repository, tag: str, pushed: TagEntry) -> bool:
        """A pushed tag wins over Docker's image of that name unless Docker's was changed after the
        push (rebuilt or retagged locally): the newest of the two is served."""
        ref = repo.docker_ref(tag)
        if ref in self.loading:
            return True
        try:
            image = await self.images.inspect(ref)
        except DockerUnavailable:
            return True
        if image is None or image["Id"] == pushed.image_id:
            return True
        log.info("%s changed in Docker after it was pushed here: serving Docker's image", repo.familiar(tag))
        return False

    async def manifest_by_digest(
        self, repo: Repository, digest: Digest, credentials: Credentials | None
    ) -> ServedManifest:
        text = str(digest)
        recorded = self.sources.exported.recorded(repo, text)
        if recorded is not None:
            return await self.guard.admit_served(repo, recorded, credentials)
        image_id = None
        try:
            found, image_id = await self._digests.run(
                f"digest {repo.docker_ref(text)}", lambda: self._by_digest(repo, text, credentials)
            )
        except DockerUnavailable as exc:
            found = await self.sources.digest_without_docker(repo, text, exc)
            if found is None:
                raise RegistryError("UNAVAILABLE", str(exc)) from exc
        if found is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(text)}")
        return await self.guard.admit_served(repo, found, credentials, image_id)

    async def _by_digest(
        self, repo: Repository, digest: str, credentials: Credentials | None
    ) -> tuple[ServedManifest | None, str | None]:
        """A digest from the sources, pulled through Docker first when no image has it; and the ID of
        Docker's image it belongs to, when known. containerd's content store is asked first: it knows
        digests Docker's inspect does not (an index's children); the daemon's store as it lies too."""
        info = await self.docker.daemon()
        in_place = await self.sources.in_place(info)
        if in_place is not None:
            served = await in_place.by_digest(repo, digest, None, info)
            if served is not None:
                return served, None
        ref = repo.docker_ref(digest)
        image = await self.images.inspect(ref)
        if image is None and repo.remote and info.containerd_store:
            if self._foreign_child(repo, digest, info, in_place):
                return None, None
            try:
                image = (await self.images.pull(repo, ref, credentials)).image
            except RegistryError as exc:
                if exc.code == "MANIFEST_UNKNOWN":
                    return None, None
                raise
        if image is None:
            log.info("manifest %s: Docker has no image with that digest", repo.familiar(digest))
            return None, None
        return await self.sources.by_digest(repo, digest, image, info), image["Id"]

    def _foreign_child(
        self, repo: Repository, digest: str, info: DaemonInfo, in_place: InPlaceContent | None
    ) -> bool:
        """Whether `digest` is another platform's image of an index Docker holds for its own platform:
        containerd 2 reads every platform's manifest and config of an index it pulls, and pulling a foreign
        platform's whole image through Docker for that would be wasted."""
        foreign = self.sources.exported.foreign_child(repo, digest, info.platform) or (
            in_place.foreign_child(repo, digest, info.platform) if in_place else None
        )
        if foreign is not None:
            log.info(
                "manifest %s: the %s image of an index Docker holds for %s only; the client gets it from "
                "the upstream",
                repo.familiar(digest),
                foreign,
                info.platform,
            )
        return foreign is not None

    # ---- blobs ----------------------------------------------------------------------------------

    async def blob(
        self, repo: Repository, digest: Digest, credentials: Credentials | None = None
    ) -> BlobFile:
        """A blob's file, if this repository's manifests reference it (and, for private content, the
        request's credentials open it)."""
        text = str(digest)
        await self.guard.admit(repo, credentials, digest=text)
        found = await self.sources.blob(repo, text)
        if found is None:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown to {repo.name}: {text}")
        return found
