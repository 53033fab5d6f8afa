"""Makes a requested image present and picks the source that serves it: freshness and single-flight.

A tag is resolved through Docker on every request (shared among the requests arriving meanwhile), pulled
through Docker when missing, then served by the first source that can: Docker's containerd content store
as it is (zero-copy), else our cache, exported from Docker once per image ID. So a rebuilt local tag is
served fresh on its next request, whichever source serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ..cache.store import DigestMismatch, Store, TagEntry
from ..common import progress
from ..common.bounded import BoundedDict
from ..common.flights import FreshFlight, SingleFlight
from ..common.metrics import Metrics
from ..common.progress import PullEvents, Transfer
from ..docker.engine import (
    Credentials,
    DaemonInfo,
    DockerClient,
    DockerFailed,
    DockerUnavailable,
    PullDenied,
    PullFailed,
    PullNotFound,
)
from ..docker.hostcreds import HostCredentials, HostCredentialsError
from ..oci.errors import RegistryError
from ..oci.reference import DOCKER_HUB, Digest, Repository, parse_repository, split_repo_tag
from ..sources.containerd import ContainerdContent
from ..sources.content import BlobFile, ImageContent, ServedManifest
from ..sources.discovery import ZeroCopy
from ..sources.exported import ExportedContent
from .private import PrivateContent

log = logging.getLogger(__package__)
READY_TIMEOUT = 5.0
PULLS_REMEMBERED = 4096


class Mirror:
    def __init__(
        self,
        store: Store,
        docker: DockerClient,
        refresh_tags: float | None = None,
        metrics: Metrics | None = None,
        cache_max_size: int | None = None,
        zero_copy: ZeroCopy | None = None,
        host_credentials: HostCredentials | None = None,
    ) -> None:
        self.store = store
        # The docker CLI's stored credentials, for pulls whose request has none (--docker-credentials).
        self.host_credentials = host_credentials
        self.docker = docker
        self.refresh_tags = refresh_tags
        self.metrics = metrics or Metrics(store.blobs_dir)
        self.exported = ExportedContent(store, docker, self.metrics, cache_max_size)
        self.private = PrivateContent(store, docker, self.metrics)
        # Pulls with a request's credentials, by Docker reference, until their image is marked private:
        # a request finding the image meanwhile waits, so it is never served before it is guarded.
        self._protecting: dict[str, list[asyncio.Event]] = {}
        self.zero_copy = zero_copy
        # Pulls through Docker running now, by Docker reference.
        self.pulling: dict[str, Transfer] = {}
        self._flights = SingleFlight()
        self._inspects = FreshFlight()
        # Pushed images being loaded into Docker, by Docker reference (see push.py).
        self.loading: dict[str, asyncio.Task[None]] = {}
        # Docker reference -> (image ID, when this registry pulled it), for tags served without a cache
        # record (zero-copy): --refresh-tags needs to know when they were pulled.
        self._pulled: BoundedDict[str, tuple[str, float]] = BoundedDict(PULLS_REMEMBERED)
        # Docker's facts when it last answered: containerd's image records can be read without Docker.
        self._last_info: DaemonInfo | None = None

    async def _daemon(self) -> DaemonInfo:
        self._last_info = await self.docker.daemon()
        return self._last_info

    def _containerd_without_docker(self) -> tuple[ContainerdContent, DaemonInfo] | None:
        """containerd's content store while Docker is down, if zero-copy was on when Docker last answered:
        its image records are the same store Docker reads, so they are as fresh as Docker's answer."""
        content = self.zero_copy.content if self.zero_copy is not None else None
        if content is None or self._last_info is None or not self._last_info.containerd_store:
            return None
        return content, self._last_info

    async def _containerd(self, info: DaemonInfo) -> ContainerdContent | None:
        return await self.zero_copy.source(info) if self.zero_copy is not None else None

    async def exports_needed(self, info: DaemonInfo) -> bool:
        """Whether Docker's images are served from our cache, exported, rather than from containerd's
        content store as they are."""
        return await self._containerd(info) is None

    async def _sources(self, info: DaemonInfo) -> list[ImageContent]:
        """Where to look for an image's content, in order: containerd's store as it is, then our cache."""
        containerd = await self._containerd(info)
        return [containerd, self.exported] if containerd is not None else [self.exported]

    # ---- manifests -------------------------------------------------------------------------------

    async def manifest_by_tag(
        self, repo: Repository, tag: str, credentials: Credentials | None
    ) -> ServedManifest:
        cached = self.exported.cached_tag(repo, tag)
        # Own namespace and mirror requests share a record (same Docker name): a pushed tag stands for
        # that Docker image either way, so a mirror request must not replace it with an upstream pull.
        if cached is not None and cached.pushed and await self._pushed_current(repo, tag, cached):
            self.metrics.manifest_cache.labels("hit").inc()
            return self.exported.served(repo, cached.digest, cached.media_type)
        try:
            image, pulled_at = await self._current_image(repo, tag, cached, credentials)
            owner = self.private.owner(repo, image_id=image["Id"])
            if owner is not None:
                # Before anything is exported for the request.
                await self.private.require(repo, owner, credentials)
            info = await self._daemon()
            for source in await self._sources(info):
                served = await source.by_tag(repo, tag, image, info, pulled_at)
                if served is not None:
                    if owner is not None:
                        await self.private.served(repo, owner, served)
                    return served
        except DockerUnavailable as exc:
            without = self._containerd_without_docker()
            served = await without[0].by_tag(repo, tag, None, without[1], None) if without else None
            if served is not None:
                await self._allowed(repo, served, credentials)
                log.warning("%s: %s; served as containerd's image record has it", repo.familiar(tag), exc)
                return served
            stale = self.exported.stale(repo, tag)
            if stale is not None:
                await self._allowed(repo, stale, credentials, cached.image_id if cached else None)
                log.warning("serving cached %s (%s) as it was: %s", repo.familiar(tag), stale.digest, exc)
                self.metrics.manifest_cache.labels("stale").inc()
                return stale
            raise RegistryError("UNAVAILABLE", str(exc)) from exc
        raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(tag)}")

    async def _allowed(
        self,
        repo: Repository,
        served: ServedManifest,
        credentials: Credentials | None,
        image_id: str | None = None,
    ) -> ServedManifest:
        """`served`, unless it is private content the request's credentials do not open (see private.py)."""
        owner = self.private.owner(repo, image_id=image_id, digest=served.digest)
        if owner is not None:
            await self.private.require(repo, owner, credentials)
            await self.private.served(repo, owner, served)
        return served

    async def _pushed_current(self, repo: Repository, tag: str, pushed: TagEntry) -> bool:
        """A pushed tag wins over Docker's image of that name unless Docker's was changed after the
        push (rebuilt or retagged locally): the newest of the two is served."""
        ref = repo.docker_ref(tag)
        if ref in self.loading:
            return True
        try:
            image = await self._inspect(ref)
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
        recorded = self.exported.recorded(repo, text)
        if recorded is not None:
            return await self._allowed(repo, recorded, credentials)
        image_id = None
        try:
            found, image_id = await self._flights.run(
                f"digest {repo.docker_ref(text)}", lambda: self._by_digest(repo, text, credentials)
            )
        except DockerUnavailable as exc:
            without = self._containerd_without_docker()
            found = await without[0].by_digest(repo, text, None, without[1]) if without else None
            if found is None:
                raise RegistryError("UNAVAILABLE", str(exc)) from exc
        if found is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(text)}")
        return await self._allowed(repo, found, credentials, image_id)

    async def _by_digest(
        self, repo: Repository, digest: str, credentials: Credentials | None
    ) -> tuple[ServedManifest | None, str | None]:
        """A digest from the sources, pulled through Docker first when no image has it; and the ID of
        Docker's image it belongs to, when known."""
        info = await self._daemon()
        containerd = await self._containerd(info)
        if containerd is not None:
            served = await containerd.by_digest(repo, digest, None, info)
            if served is not None:
                return served, None
        ref = repo.docker_ref(digest)
        image = await self._inspect(ref)
        if image is None and repo.remote and info.containerd_store:
            foreign = self.exported.foreign_child(repo, digest, info.platform) or (
                containerd.foreign_child(repo, digest, info.platform) if containerd else None
            )
            if foreign is not None:
                # containerd 2 reads every platform's manifest and config of an index it pulls: pulling a
                # foreign platform's whole image through Docker for that would be wasted.
                log.info(
                    "manifest %s: the %s image of an index Docker holds for %s only; the client gets it "
                    "from the upstream",
                    repo.familiar(digest),
                    foreign,
                    info.platform,
                )
                return None, None
            try:
                await self._pull(repo, ref, credentials)
            except RegistryError as exc:
                if exc.code == "MANIFEST_UNKNOWN":
                    return None, None
                raise
            image = await self._inspect(ref)
            if image is not None and credentials is not None:
                await self.private.protect(repo, image, credentials)
        if image is None:
            log.info("manifest %s: Docker has no image with that digest", repo.familiar(digest))
            return None, None
        for source in await self._sources(info):
            served = await source.by_digest(repo, digest, image, info)
            if served is not None:
                return served, image["Id"]
        return None, image["Id"]

    # ---- Docker: inspect and pull ---------------------------------------------------------------

    async def _current_image(
        self, repo: Repository, tag: str, cached: TagEntry | None, credentials: Credentials | None
    ) -> tuple[dict[str, Any], float | None]:
        """Docker's image for the tag (pulled if missing or due for refresh) and when it was pulled."""
        ref = repo.docker_ref(tag)
        for protecting in list(self._protecting.get(ref, ())):
            await protecting.wait()
        image = await self._inspect(ref)
        if image is None:
            if not repo.remote:
                raise RegistryError("MANIFEST_UNKNOWN", f"Docker has no image {repo.familiar(tag)}")
            async with self._pulling_with(ref, credentials):
                pulled_at = await self._pull(repo, ref, credentials)
                image = await self._inspect(ref)
                if image is None:
                    raise RegistryError("MANIFEST_UNKNOWN", f"Docker pulled {ref} but does not list it")
                if credentials is not None:
                    await self.private.protect(repo, image, credentials)
            return self._remember_pull(ref, image, pulled_at), pulled_at
        if not (repo.remote and self._refresh_due(ref, cached, image)):
            return image, None
        async with self._pulling_with(ref, credentials):
            try:
                pulled_at = await self._pull(repo, ref, credentials)
            except RegistryError as exc:
                log.warning("refreshing %s failed, serving Docker's copy: %s", ref, exc.message)
                return image, None
            fresh = await self._inspect(ref) or image
            if credentials is not None and fresh["Id"] != image["Id"]:
                await self.private.protect(repo, fresh, credentials)
        return self._remember_pull(ref, fresh, pulled_at), pulled_at

    @contextlib.asynccontextmanager
    async def _pulling_with(self, ref: str, credentials: Credentials | None) -> AsyncIterator[None]:
        """While a pull with a request's credentials runs and its image is marked private, other requests
        for the reference wait (see `_protecting`)."""
        if credentials is None:
            yield
            return
        done = asyncio.Event()
        self._protecting.setdefault(ref, []).append(done)
        try:
            yield
        finally:
            waiting = self._protecting[ref]
            waiting.remove(done)
            if not waiting:
                del self._protecting[ref]
            done.set()

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        """Docker's inspect of `ref`, shared by the requests that arrive while one runs (see FreshFlight)."""
        return await self._inspects.run(ref, lambda: self.docker.inspect(ref))

    def _refresh_due(self, ref: str, cached: TagEntry | None, image: dict[str, Any]) -> bool:
        if self.refresh_tags is None:
            return False
        pulled = (cached.image_id, cached.pulled_at) if cached is not None else self._pulled.get(ref)
        if pulled is None or pulled[0] != image["Id"] or pulled[1] is None:
            return True
        return time.time() - pulled[1] > self.refresh_tags

    async def _pull(self, repo: Repository, ref: str, credentials: Credentials | None) -> float:
        from_host = False
        if credentials is None and self.host_credentials is not None:
            try:
                credentials = await self.host_credentials.lookup(repo.domain)
            except HostCredentialsError as exc:
                log.warning("pulling from %s without the host's Docker credentials: %s", repo.domain, exc)
            from_host = credentials is not None
        who = "the host" if from_host else credentials.username if credentials else ""
        await self._flights.run(f"pull {ref} {who}", lambda: self._do_pull(repo, ref, credentials, from_host))
        return time.time()

    def _remember_pull(self, ref: str, image: dict[str, Any], pulled_at: float) -> dict[str, Any]:
        self._pulled[ref] = (image["Id"], pulled_at)
        return image

    async def _do_pull(
        self, repo: Repository, ref: str, credentials: Credentials | None, from_host: bool = False
    ) -> None:
        started, outcome = time.monotonic(), "failed"
        transfer = self.pulling[ref] = Transfer("pull", ref)
        if from_host:
            log.info("pulling %s with the host's Docker credentials for %s", ref, repo.domain)
        try:
            async with progress.logged(transfer):
                await self.docker.pull(ref, credentials, PullEvents(transfer).update)
            outcome = "ok"
        except PullDenied as exc:
            outcome = "denied"
            if credentials is None or from_host:
                # The normal handshake: containerd asks anonymously first, and retries with the pod's
                # pull secret after this challenge (the host's credentials were not enough either).
                log.info(
                    "pull of %s: %s wants credentials, asking the client for them: %s", ref, repo.domain, exc
                )
                raise RegistryError(
                    "UNAUTHORIZED",
                    f"{repo.domain} requires authentication to pull {ref}",
                    detail=str(exc),
                    headers={"WWW-Authenticate": f'Basic realm="{repo.domain}"'},
                ) from exc
            # Refused credentials get 403, not another challenge, so containerd moves on instead of retrying.
            log.warning("pull of %s refused by %s: %s", ref, repo.domain, exc)
            raise RegistryError(
                "DENIED", f"{repo.domain} refused the credentials for {ref}", detail=str(exc)
            ) from exc
        except PullNotFound as exc:
            outcome = "not_found"
            log.info("pull of %s: not found upstream: %s", ref, exc)
            raise RegistryError("MANIFEST_UNKNOWN", f"{ref} not found upstream", detail=str(exc)) from exc
        except PullFailed as exc:
            log.warning("pull of %s failed: %s", ref, exc)
            raise RegistryError(
                "UNAVAILABLE", f"pulling {ref} through Docker failed", status=502, detail=str(exc)
            ) from exc
        finally:
            self.pulling.pop(ref, None)
            self.metrics.pulls.labels(outcome).observe(time.monotonic() - started)

    # ---- content discovery ----------------------------------------------------------------------

    async def _docker_tags(self) -> list[tuple[str, str]]:
        """(Docker name, tag) of every image Docker has; none while Docker is unreachable."""
        try:
            listed = await self.docker.repo_tags()
        except (DockerUnavailable, DockerFailed) as exc:
            log.warning("listing Docker's images failed, answering from the cache only: %s", exc)
            return []
        return [pair for pair in map(split_repo_tag, listed) if pair is not None]

    async def tags(self, repo: Repository) -> list[str]:
        """Tags of a repository: Docker's own and those cached, sorted; NAME_UNKNOWN when none."""
        record = self.store.record(repo.docker_name)
        found = set(record.tags) if record else set()
        found |= {tag for name, tag in await self._docker_tags() if name == repo.docker_name}
        if not found:
            raise RegistryError("NAME_UNKNOWN", f"repository unknown: {repo.name}")
        return sorted(found)

    async def catalog(self) -> list[str]:
        """Repositories in this registry's own namespace: Docker's, the cached and the pushed ones, by
        the name `docker images` shows (`alpine`, `team/app`); names the OCI grammar cannot express (a
        registry with a port) are left out."""
        records = self.store.records()
        names = {record.name for record in records if record.tags or record.manifests or record.blobs}
        names |= {name for name, _ in await self._docker_tags()}
        found = set()
        for name in names:
            path = name.removeprefix(f"{DOCKER_HUB}/")
            for candidate in (path.removeprefix("library/"), path):
                try:
                    if parse_repository(candidate, None).docker_name == name:
                        found.add(candidate)
                        break
                except RegistryError:
                    continue
        return sorted(found)

    # ---- readiness ------------------------------------------------------------------------------

    async def docker_state(self) -> DaemonInfo | str:
        """Docker's daemon facts, or why it cannot be reached (within READY_TIMEOUT seconds)."""
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                return await self.docker.daemon()
        except DockerUnavailable as exc:
            return str(exc)
        except TimeoutError:
            return f"Docker did not answer within {READY_TIMEOUT:.0f}s"

    async def readiness(self) -> dict[str, str]:
        """Problems that stop this registry from serving new images, by component; empty when ready."""
        problems: dict[str, str] = {}
        docker = await self.docker_state()
        if isinstance(docker, str):
            problems["docker"] = docker
        try:
            await asyncio.to_thread(self.store.check_writable)
        except OSError as exc:
            problems["cache"] = f"cache {self.store.root} is not writable: {exc.strerror or exc}"
        return problems

    # ---- blobs ----------------------------------------------------------------------------------

    async def blob(
        self, repo: Repository, digest: Digest, credentials: Credentials | None = None
    ) -> BlobFile:
        """A blob's file, if this repository's manifests reference it (and, for private content, the
        request's credentials open it)."""
        text = str(digest)
        owner = self.private.owner(repo, digest=text)
        if owner is not None:
            await self.private.require(repo, owner, credentials)
        found = await self.exported.blob(repo, text, None)
        if found is None:
            found = await self._containerd_blob(repo, text)
        if found is None:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown to {repo.name}: {text}")
        return found

    async def _containerd_blob(self, repo: Repository, digest: str) -> BlobFile | None:
        try:
            info = await self._daemon()
            containerd = await self._containerd(info)
        except DockerUnavailable:
            without = self._containerd_without_docker()
            if without is None:
                return None
            containerd, info = without
        return await containerd.blob(repo, digest, info) if containerd is not None else None

    async def keep_in_cache(self, repo: Repository, digest: str) -> bool:
        """Copies a blob this repository serves from containerd's content store into our cache (verified),
        for a push that uses it: pushed content must not depend on what containerd keeps."""
        found = await self._containerd_blob(repo, digest)
        if found is None:
            return False
        try:
            await asyncio.to_thread(self.store.put_file, found.path, digest)
        except (OSError, DigestMismatch) as exc:
            log.warning("copying %s from containerd's content store into the cache failed: %s", digest, exc)
            return False
        return True

    async def docker_refs_of(self, repo: Repository, digest: str) -> list[str] | None:
        """Docker's references in this repository whose image is `digest`, when containerd's content
        store serves it (zero-copy); None when it does not."""
        try:
            info = await self._daemon()
        except DockerUnavailable:
            return None
        containerd = await self._containerd(info)
        if containerd is None or await containerd.by_digest(repo, digest, None, info) is None:
            return None
        return await containerd.names_of(repo, digest)
