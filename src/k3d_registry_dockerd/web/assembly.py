"""One running registry's parts, wired once: each part is the one owner of its state, and gets the others it
uses handed in, so nothing reaches through another part for a third."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..cache.records import Records
from ..cache.space import FreeSpace
from ..cache.store import Store
from ..cache.verified import VerifiedBlobs
from ..common.metrics import Metrics
from ..common.progress import Activity, Transfers
from ..docker.engine import DockerClient, DockerUnavailable
from ..docker.events import ImageEvents
from ..docker.hostcreds import HostCredentials
from ..mirror.answers import DockerAnswers
from ..mirror.current import CurrentImages
from ..mirror.listing import Listings
from ..mirror.mirror import Mirror
from ..mirror.prefetch import Prefetcher
from ..mirror.private import PrivateGuard
from ..mirror.verify import Verifier
from ..push.docker_load import Loads
from ..push.pushes import Pushes
from ..push.uploads import BODY_TIMEOUT, MAX_UPLOADS, Uploads
from ..sources.discovery import InPlaceConfig, InPlaceDiscovery, Remedy
from ..sources.exported import ExportedContent
from ..sources.known import KnownImages
from ..sources.select import Sources

log = logging.getLogger(__package__)


@dataclass
class Registry:
    store: Store
    docker: DockerClient
    metrics: Metrics
    # Pulls and exports running now.
    transfers: Transfers
    # The one writer of the cache's records.
    records: Records
    # Room in the cache dir for exports.
    space: FreeSpace
    exported: ExportedContent
    # Which blobs of the daemon's store were verified, kept in the cache dir across restarts.
    verified: VerifiedBlobs
    discovery: InPlaceDiscovery
    # The daemon's facts and the images served from its store, as last known (for when it is down).
    known: KnownImages
    sources: Sources
    guard: PrivateGuard
    images: CurrentImages
    mirror: Mirror
    listings: Listings
    # Pushed images being loaded into Docker.
    loads: Loads
    pushes: Pushes
    uploads: Uploads
    # Blobs being hashed or put together for clients now: background verification gives way to them.
    sending: Activity
    # The daemon's image events, followed for pre-exports and verification ahead.
    events: ImageEvents
    # None when pre-exports are off.
    prefetcher: Prefetcher | None = None
    # None when nothing is served in place.
    verifier: Verifier | None = None
    _events_task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Opens what is on disk and looks at Docker once; blocking reads run off the event loop."""
        await asyncio.to_thread(self.store.open)
        await asyncio.to_thread(self.guard.open)
        await asyncio.to_thread(self.known.open)
        if self.discovery.config.enabled:
            await asyncio.to_thread(self.verified.open)
        try:
            info = await self.docker.daemon()
        except DockerUnavailable as exc:
            log.warning("%s; serving what is cached and retrying on every request that needs Docker", exc)
            info = None
        await self.sources.start(info)
        self.start_background()

    def start_background(self) -> None:
        """Follows the daemon's events for the pre-exports and verification ahead that are on."""
        for background in (self.prefetcher, self.verifier):
            if background is not None:
                background.start()
        if self.events.wanted:
            self._events_task = asyncio.ensure_future(self.events.run())

    async def stop(self) -> None:
        for background in (self.prefetcher, self.verifier):
            if background is not None:
                await background.close()
        if self._events_task is not None:
            self._events_task.cancel()
            await asyncio.gather(self._events_task, return_exceptions=True)
        await self.loads.close()
        await self.uploads.close()
        await self.discovery.close()
        await self.known.close()
        await self.verified.close()
        await self.docker.close()


def assemble(
    store: Store,
    docker: DockerClient,
    *,
    metrics: Metrics | None = None,
    cache_max_size: int | None = None,
    min_free: int = 0,
    refresh_tags: float | None = None,
    in_place: InPlaceConfig | None = None,
    in_place_remedy: Remedy | None = None,
    host_credentials: HostCredentials | None = None,
    prefetch_max_age: float | None = None,
    verify_ahead: bool = True,
    load_pushed: bool = True,
    allow_docker_delete: bool = False,
    allow_docker_overwrite: bool = False,
    body_timeout: float | None = BODY_TIMEOUT,
    max_uploads: int = MAX_UPLOADS,
) -> Registry:
    """The parts of a registry serving `docker`'s images from `store`. The daemon's own store is looked for
    only with an `in_place` config, pre-exports run only with a `prefetch_max_age`, verification ahead only
    where images are served in place and `verify_ahead` holds."""
    metrics = metrics or Metrics(lambda: (store.blob_count, store.total_bytes))
    transfers = Transfers()
    records = Records(store, metrics, cache_max_size)
    space = FreeSpace(store.root, min_free)
    exported = ExportedContent(store, docker, records, transfers, metrics, space)
    verified = VerifiedBlobs(store, metrics)
    discovery = InPlaceDiscovery(in_place or InPlaceConfig(enabled=False), metrics, in_place_remedy, verified)
    known = KnownImages(store, docker.endpoint.host)
    sources = Sources(docker, exported, known, discovery)
    guard = PrivateGuard(store, docker, metrics)
    events = ImageEvents(docker)
    images = CurrentImages(
        docker,
        guard,
        transfers,
        metrics,
        refresh_tags=refresh_tags,
        host_credentials=host_credentials,
        answers=DockerAnswers(events, sources.tags_version),
    )
    loads = Loads()
    pushes = Pushes(
        docker,
        records,
        sources,
        loads,
        load_pushed=load_pushed,
        allow_docker_delete=allow_docker_delete,
        allow_docker_overwrite=allow_docker_overwrite,
    )
    sending = Activity()
    prefetcher = (
        Prefetcher(docker, events, sources, records, metrics, prefetch_max_age, loads)
        if prefetch_max_age is not None
        else None
    )
    verifier = (
        Verifier(docker, events, sources, known, sending, metrics)
        if discovery.config.enabled and verify_ahead
        else None
    )
    return Registry(
        store=store,
        docker=docker,
        metrics=metrics,
        transfers=transfers,
        records=records,
        space=space,
        exported=exported,
        verified=verified,
        discovery=discovery,
        known=known,
        sources=sources,
        guard=guard,
        images=images,
        mirror=Mirror(docker, images, guard, sources, metrics, loads),
        listings=Listings(store, docker, guard),
        loads=loads,
        pushes=pushes,
        uploads=Uploads(store, metrics, body_timeout=body_timeout, max_uploads=max_uploads),
        sending=sending,
        events=events,
        prefetcher=prefetcher,
        verifier=verifier,
    )
