"""Images served from our own cache: exported from Docker (`docker save`) into the store, or pushed.

Freshness rule (decided by `Mirror`, kept here): a tag is answered from the store only while Docker still
maps it to the image ID the cached answer was exported from, so a rebuilt local tag is re-exported on its
next request.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from ..cache.records import Records
from ..cache.space import INSUFFICIENT_STORAGE, FreeSpace
from ..cache.store import ManifestEntry, RepositoryRecord, Store, TagEntry
from ..common import units
from ..common.bounded import BoundedDict
from ..common.flights import SingleFlight
from ..common.metrics import Metrics
from ..common.progress import Transfer, Transfers
from ..docker.engine import DaemonInfo, DockerClient, DockerFailed, DockerUnavailable, failure_reason
from ..oci.errors import RegistryError
from ..oci.mediatypes import INDEX_TYPES
from ..oci.platform import Platform, foreign_platform
from ..oci.reference import Digest, Repository, split_repo_tag
from .content import BlobFile, ServedManifest
from .plans import ImagePlan, IncompleteImage, plan_manifests
from .savestream import ExportError, ThreadedStream, read_save_stream, select_root

log = logging.getLogger(__package__)
LAST_USE_RESOLUTION = 60.0
ABSENT_LIMIT = 4096
BODY_LIMIT = 1024


@dataclass
class ExportProgress:
    """An export running now: how far it got (expected: Docker's figure for the image's size, which the
    save stream about matches), and whether it may read on."""

    transfer: Transfer
    # A pre-export no request has asked for yet: it pauses while exports for requests run.
    background: bool = False
    # Set while the export may read on.
    go: asyncio.Event = field(default_factory=asyncio.Event)


def saved_as(repo: Repository, tag: str, image: dict[str, Any]) -> str:
    """The reference Docker's `image` of the tag is exported by: the tag's own when Docker names the image
    so, else a name the daemon gives it (Podman's `localhost/` one, found for a short Docker Hub name)."""
    wanted = repo.docker_ref(tag)
    names = [f"{name}:{t}" for name, t in filter(None, map(split_repo_tag, image.get("RepoTags") or []))]
    return wanted if wanted in names or not names else names[0]


def export_key(ref: str, image_id: str) -> str:
    """One export per Docker reference and image ID: requests and a pre-export of the same share it."""
    return f"export {ref} {image_id}"


class ExportedContent:
    """The store's images, exported once per Docker image ID (concurrent requests share the export);
    never anything outside our cache dir. Records are changed (and evicted) through `records`.

    A pre-export (`prefetch`) is the same export started before any request: a request for that image
    joins it, and until one does it yields to the exports requests are waiting for.
    """

    def __init__(
        self,
        store: Store,
        docker: DockerClient,
        records: Records,
        transfers: Transfers,
        metrics: Metrics,
        space: FreeSpace,
    ) -> None:
        self.store = store
        self.docker = docker
        self.records = records
        self.transfers = transfers
        self.metrics = metrics
        self.space = space
        # By export key.
        self._in_progress: dict[str, ExportProgress] = {}
        self.exports = 0
        self._flights = SingleFlight()
        # Export keys of pre-exports no request has joined.
        self._background: set[str] = set()
        self._requests_idle = asyncio.Event()
        self._requests_idle.set()
        # Digests a Docker image was found not to contain, so repeated requests cost no new export.
        self._absent: BoundedDict[tuple[str, str], str] = BoundedDict(ABSENT_LIMIT)
        # Manifest bytes by digest, read from the store once: a tag request costs no file read.
        self._bodies: BoundedDict[str, bytes] = BoundedDict(BODY_LIMIT)

    def cached_tag(self, repo: Repository, tag: str) -> TagEntry | None:
        record = self.store.record(repo.docker_name)
        return record.tags.get(tag) if record else None

    def served(self, repo: Repository, digest: str, media_type: str, *, cold: bool = False) -> ServedManifest:
        body = self._bodies.get(digest)
        if body is None:
            body = self.store.read_blob(digest)
            if body is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest {digest} is no longer in the cache")
            self._bodies[digest] = body
        self.records.fetched(repo.docker_name, digest)
        return ServedManifest(digest, media_type, body, cold)

    def stale(self, repo: Repository, tag: str) -> ServedManifest | None:
        """The tag's cached answer as it was, for when Docker cannot be asked."""
        cached = self.cached_tag(repo, tag)
        if cached is None or not self.store.has_blob(cached.digest):
            return None
        return self.served(repo, cached.digest, cached.media_type)

    def recorded(self, repo: Repository, digest: str) -> ServedManifest | None:
        """A manifest served under this repository before (exported or pushed), still in the cache."""
        record = self.store.record(repo.docker_name)
        if record and digest in record.manifests and self.store.has_blob(digest):
            return self.served(repo, digest, record.manifests[digest].media_type)
        return None

    async def by_tag(
        self, repo: Repository, tag: str, image: dict[str, Any], info: DaemonInfo, pulled_at: float | None
    ) -> ServedManifest:
        image_id = image["Id"]
        # Another request may have finished exporting this image while Docker was asked about it.
        cached = self.cached_tag(repo, tag)
        if cached is not None and cached.image_id == image_id and self.store.has_blob(cached.digest):
            now = time.time()
            used_long_ago = cached.last_used is None or now - cached.last_used > LAST_USE_RESOLUTION
            if cached.prefetched:
                self.metrics.prefetch_hits.labels("ready").inc()
            if pulled_at is not None or used_long_ago or cached.prefetched:
                # Recorded at most once a minute per tag: a record write per pull would be wasted I/O.
                changed = replace(
                    cached, pulled_at=pulled_at or cached.pulled_at, last_used=now, prefetched=False
                )
                await self._update(repo, {}, {tag: changed})
            self.metrics.manifest_cache.labels("hit").inc()
            return self.served(repo, cached.digest, cached.media_type, cold=pulled_at is not None)
        key = export_key(repo.docker_ref(tag), image_id)
        self.metrics.manifest_cache.labels("miss").inc()
        if key in self._background:
            self._promote(key)
            self.metrics.prefetch_hits.labels("running").inc()
        entry = await self._tag_flight(repo, tag, image, info, pulled_at)
        return self.served(repo, entry.digest, entry.media_type, cold=True)

    async def prefetch(self, repo: Repository, tag: str, image: dict[str, Any], info: DaemonInfo) -> None:
        """Exports Docker's `image` of the tag as a request for it would, before any request does."""
        key = export_key(repo.docker_ref(tag), image["Id"])
        if key not in self._flights:
            self._background.add(key)
        try:
            await self._tag_flight(repo, tag, image, info, None)
        finally:
            self._background.discard(key)

    async def _tag_flight(
        self, repo: Repository, tag: str, image: dict[str, Any], info: DaemonInfo, pulled_at: float | None
    ) -> TagEntry:
        """The one export of Docker's `image` for the tag, joined when it already runs."""
        key = export_key(repo.docker_ref(tag), image["Id"])
        size = int(image.get("Size") or 0)
        return await self._flights.run(
            key, lambda: self._export_tag(repo, tag, image, info, pulled_at, size, key)
        )

    def abandon(self, repo: Repository, tag: str, image_id: str) -> bool:
        """Cancels the pre-export of this image for the tag, unless a request has joined it."""
        key = export_key(repo.docker_ref(tag), image_id)
        if key not in self._background:
            return False
        self._background.discard(key)
        return self._flights.cancel(key)

    async def requests_idle(self) -> None:
        """Returns once no export a request waits for is running."""
        await self._requests_idle.wait()

    def _promote(self, key: str) -> None:
        """A request joined a pre-export: from now on it is that request's export."""
        self._background.discard(key)
        export = self._in_progress.get(key)
        if export is not None:
            export.background = False
            export.transfer.kind = "export"
            self._reschedule()

    def _reschedule(self) -> None:
        """Pre-exports read on only while no export for a request runs; those always do."""
        busy = any(not export.background for export in self._in_progress.values())
        if busy:
            self._requests_idle.clear()
        else:
            self._requests_idle.set()
        for export in self._in_progress.values():
            if export.background and busy:
                export.go.clear()
            else:
                export.go.set()

    async def by_digest(
        self, repo: Repository, digest: str, image: dict[str, Any] | None, info: DaemonInfo
    ) -> ServedManifest | None:
        """A manifest served under this repository before, else found in Docker's export of `image`; None
        (logged) when it cannot be served."""
        recorded = self.recorded(repo, digest)
        if recorded is not None or image is None:
            return recorded
        if self._absent.get((repo.docker_name, digest)) == image["Id"]:
            return None
        ref = repo.docker_ref(digest)
        plan = await self._flights.run(
            export_key(ref, image["Id"]), lambda: self._export_digest(repo, ref, digest, image, info)
        )
        if digest in plan.manifests:
            return self.served(repo, digest, plan.manifests[digest].media_type, cold=True)
        self._remember_absent(repo, digest, image["Id"])
        why = (
            "Docker's classic image store generates its own manifests on export, so the upstream's digests "
            "cannot be served (the client falls back to the upstream registry)"
            if not info.containerd_store
            else "the export does not contain it"
        )
        log.warning(
            "manifest %s: not in Docker's export of image %s: %s", repo.familiar(digest), image["Id"], why
        )
        return None

    async def _export_digest(
        self, repo: Repository, ref: str, digest: str, image: dict[str, Any], info: DaemonInfo
    ) -> ImagePlan:
        try:
            plan = await self._export(
                export_key(ref, image["Id"]),
                ref,
                info,
                (ref,),
                int(image.get("Size") or 0),
                lambda plan: self._update(repo, plan.manifests, {}),
            )
        except RegistryError as exc:
            # A cache dir out of room says nothing about the image: the next request tries again.
            if exc.status != INSUFFICIENT_STORAGE:
                self._remember_absent(repo, digest, image["Id"])
            raise
        await self.records.enforce_limit(repo.docker_name, plan.root.digest)
        return plan

    async def blob(self, repo: Repository, digest: str, info: DaemonInfo | None) -> BlobFile | None:
        """A blob a record of the repository references, whatever Docker runs (`info` is not needed)."""
        record = self.store.record(repo.docker_name)
        if record is None or not record.serves_blob(digest) or not self.store.has_blob(digest):
            return None
        self.records.fetched(repo.docker_name, digest)
        return BlobFile(self.store.blob_path(Digest.parse(digest)), digest)

    async def _export_tag(
        self,
        repo: Repository,
        tag: str,
        image: dict[str, Any],
        info: DaemonInfo,
        pulled_at: float | None,
        size: int,
        key: str,
    ) -> TagEntry:
        ref, image_id = saved_as(repo, tag, image), str(image["Id"])
        entries: list[TagEntry] = []

        async def keep(plan: ImagePlan) -> None:
            now = time.time()
            background = key in self._background
            previous = self.cached_tag(repo, tag)
            entry = TagEntry(
                digest=plan.root.digest,
                media_type=plan.manifests[plan.root.digest].media_type,
                image_id=image_id,
                exported_at=now,
                pulled_at=pulled_at or self._previous_pull(repo, tag, image_id),
                # A pre-export is no use of the tag: --prefetch-max-age counts from the last request.
                last_used=previous.last_used if background and previous else now,
                prefetched=background,
            )
            await self._update(repo, plan.manifests, {tag: entry})
            entries.append(entry)

        await self._export(key, ref, info, (ref, repo.docker_ref(tag), repo.familiar(tag), tag), size, keep)
        await self.records.enforce_limit(repo.docker_name, entries[0].digest)
        return entries[0]

    def _previous_pull(self, repo: Repository, tag: str, image_id: str) -> float | None:
        record = self.store.record(repo.docker_name)
        previous = record.tags.get(tag) if record else None
        return previous.pulled_at if previous and previous.image_id == image_id else None

    def foreign_child(self, repo: Repository, digest: str, platform: Platform) -> str | None:
        """The platform of `digest` when an index cached for the repository lists it for another platform
        than Docker's own."""
        record = self.store.record(repo.docker_name)
        for index, entry in record.manifests.items() if record else ():
            if entry.media_type in INDEX_TYPES and digest in entry.references:
                found = foreign_platform(self.store.read_blob(index), digest, platform)
                if found is not None:
                    return found
        return None

    def _remember_absent(self, repo: Repository, digest: str, image_id: str) -> None:
        self._absent[(repo.docker_name, digest)] = image_id

    async def _update(
        self, repo: Repository, manifests: dict[str, ManifestEntry], tags: dict[str, TagEntry]
    ) -> None:
        """Adds manifests and tags to a repository's record; manifests once served stay servable, and
        pushed ones keep their entry (an export of the same bytes does not make them evictable)."""

        def merge(current: RepositoryRecord) -> RepositoryRecord:
            pushed = {d: m for d, m in current.manifests.items() if m.pushed}
            return replace(
                current,
                tags={**current.tags, **tags},
                manifests={**current.manifests, **manifests, **pushed},
            )

        await self.records.edit(repo.docker_name, merge)

    async def _export(
        self,
        key: str,
        ref: str,
        info: DaemonInfo,
        names: tuple[str, ...],
        size: int,
        keep: Callable[[ImagePlan], Awaitable[None]],
    ) -> ImagePlan:
        """Exports an image into the store and has `keep` record what is served of it; whatever else the
        export stored (a failed export's blobs, files Docker adds that no manifest uses) is removed. One
        that cannot fit in the cache dir is refused before Docker is asked."""
        with self.space.reserve(ref, size), self.records.claim() as claimed:
            self.metrics.exports_in_flight.inc()
            background = key in self._background
            transfer = Transfer("pre-export" if background else "export", ref, size)
            export = self._in_progress[key] = ExportProgress(transfer, background=background)
            self._reschedule()
            started, outcome = time.monotonic(), "failed"
            try:
                async with self.transfers.track(export.transfer):
                    plan = await self._save_into_store(ref, info, names, export, claimed)
                await keep(plan)
                outcome = "ok"
                return plan
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                freed = await self.records.discard_unused(claimed)
                if freed:
                    log.info("removed %s the export of %s stored but nothing uses", units.size(freed), ref)
                self._in_progress.pop(key, None)
                self._reschedule()
                self.metrics.exports_in_flight.dec()
                self.metrics.exports.labels(outcome).observe(time.monotonic() - started)

    async def _save_into_store(
        self, ref: str, info: DaemonInfo, names: tuple[str, ...], export: ExportProgress, claimed: set[str]
    ) -> ImagePlan:
        """Streams `docker save` of one image into the store and plans what of it can be served."""
        self.exports += 1
        started = time.monotonic()
        log.info("exporting %s from Docker (export #%d)", ref, self.exports)
        loop = asyncio.get_running_loop()
        try:
            # The containerd image store exports an image's own target (the upstream's index, with the
            # blobs Docker holds) only when asked for the whole image: with `platform` it writes just that
            # platform's manifest, and the index and its digest would be lost. The classic store keeps
            # one platform of an image anyway.
            platform = None if info.containerd_store else info.platform
            async with self.docker.save(ref, platform) as stream:
                reader = ThreadedStream(stream, loop, gate=export.go.wait)
                export.transfer.counter = lambda: reader.bytes_read
                work = asyncio.ensure_future(asyncio.to_thread(read_save_stream, reader, self.store, claimed))
                try:
                    contents = await asyncio.shield(work)
                finally:
                    reader.close()
                    if not work.done():
                        # Cancelled (a superseded pre-export): the worker stops at its next read, and
                        # what it stored must be claimed before the export's leftovers are removed.
                        await asyncio.wait({work})
                        if not work.cancelled():
                            work.exception()
            root = select_root(contents.roots, names)
            plan = plan_manifests(root, self.store.read_blob, self.store.has_blob, info.platform)
        except (DockerUnavailable, RegistryError):
            raise
        except DockerFailed as exc:
            log.error("export of %s failed: %s", ref, exc)
            raise RegistryError(
                "UNAVAILABLE", f"Docker could not export {ref}", status=502, detail=str(exc)
            ) from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            reason = failure_reason(exc)
            log.error("export of %s failed: the stream from Docker broke: %s", ref, reason)
            raise RegistryError("UNAVAILABLE", f"export of {ref} from Docker failed: {reason}") from exc
        except OSError as exc:
            log.error("export of %s failed writing to the cache %s: %s", ref, self.store.root, exc)
            raise RegistryError(
                "UNAVAILABLE",
                f"cannot store {ref} in the cache {self.store.root}: {exc.strerror or exc}",
                status=INSUFFICIENT_STORAGE if exc.errno == errno.ENOSPC else None,
            ) from exc
        except ExportError as exc:
            log.error("export of %s rejected: %s", ref, exc)
            raise RegistryError(
                "UNAVAILABLE", f"export of {ref} from Docker was rejected", status=502, detail=str(exc)
            ) from exc
        except IncompleteImage as exc:
            log.error("cannot serve %s: %s; answering 404 so the client falls back to the upstream", ref, exc)
            raise RegistryError(
                "MANIFEST_UNKNOWN", f"{ref}: Docker's export is incomplete", detail=str(exc)
            ) from exc
        self.space.exported(contents.bytes_written)
        elapsed = time.monotonic() - started
        log.info(
            "exported %s in %.1fs: %s layout, %d new blobs, %s written, serving %s",
            ref,
            elapsed,
            contents.layout,
            contents.blobs_written,
            units.size(contents.bytes_written),
            plan.root.digest,
        )
        return plan
