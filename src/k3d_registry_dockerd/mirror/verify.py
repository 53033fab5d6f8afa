"""Verifying ahead: when the daemon reports an image new (pulled, built, tagged, loaded, imported), the blobs
its own store keeps for it are hashed in the background where they lie, so a node's first pull finds them
verified and costs what a later pull does.

One image at a time, the newest first (the one a developer just built is the one about to be pulled); each
blob only while no blob is being hashed or put together for a client, so requests always go first. Every
new image is verified, served before or not: its first serving is exactly the pull this is for. Only where
images are served in place; setups that export have pre-export instead.

Whenever the daemon's event stream opens (at the registry's start, and again after the daemon restarted:
what happened meanwhile was not reported), the RECENT images its store took in last are queued too, after
those reported new, the newest first. Which came last is the store's own record (`stored_at`: when the
daemon wrote the image's config, or on containerd's store its target), as the Engine API does not say when
an image was pulled: `Created` is when it was built (years ago for a pulled image), and inspect's
`LastTagTime` is unset for pulls on Docker's classic store and for every image on Podman. Blobs an earlier
run verified (`cache.verified`) cost a look at their files, not a hash. A verified tag is known
(`KnownImages`) as a served one is: served from the store while the daemon is down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from ..common import units
from ..common.metrics import Metrics
from ..common.progress import Activity
from ..docker.engine import DockerClient, DockerFailed, DockerUnavailable
from ..docker.events import ImageEvents
from ..oci.reference import split_repo_tag
from ..sources.known import KnownImages
from ..sources.select import Sources

log = logging.getLogger(__package__)
NEW_ACTIONS = frozenset({"pull", "tag", "load", "import", "create", "build"})
QUEUE_LIMIT = 256
# How many of the images the store took in last are verified ahead when the event stream opens.
RECENT = 20
# Queued images: those the daemon reported new go before the most recent ones of its store.
_RECENT, _REPORTED = 0, 1


def new_image(event: dict[str, Any]) -> str | None:
    """The reference (or image ID) an image event reports a new image under; None for other events."""
    if event.get("Action") not in NEW_ACTIONS:
        return None
    actor = event.get("Actor") or {}
    name = str((actor.get("Attributes") or {}).get("name") or actor.get("ID") or "")
    return name or None


class Verifier:
    """Verifies new images' blobs ahead of their first pull (see the module's docstring)."""

    def __init__(
        self,
        docker: DockerClient,
        events: ImageEvents,
        sources: Sources,
        known: KnownImages,
        sending: Activity,
        metrics: Metrics,
    ) -> None:
        self.docker = docker
        self.sources = sources
        self.known = known
        self.sending = sending
        self.metrics = metrics
        # Reference -> (why it is queued, when), the one to verify next highest.
        self._queue: dict[str, tuple[int, int]] = {}
        self._order = itertools.count()
        self._queued = asyncio.Event()
        # How many of the store's most recent images are queued when the event stream opens.
        self.recent = RECENT
        # The event stream (re)opened: the store's most recent images are to be queued.
        self._look_again = False
        self.running: str | None = None
        self._task: asyncio.Task[None] | None = None
        events.subscribe(self._on_event, self._on_connect)

    def _on_event(self, event: dict[str, Any]) -> None:
        ref = new_image(event)
        if ref is not None:
            self._queue.pop(ref, None)
            self._add(ref, _REPORTED)

    def _on_connect(self) -> None:
        self._look_again = True
        self._queued.set()

    def _add(self, ref: str, why: int) -> None:
        self._queue[ref] = (why, next(self._order))
        while len(self._queue) > QUEUE_LIMIT:
            del self._queue[min(self._queue, key=self._queue.__getitem__)]
        self._queued.set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(_report_crash)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._queued.wait()
            if self._look_again:
                self._look_again = False
                try:
                    await self._queue_recent()
                except (DockerUnavailable, DockerFailed) as exc:
                    log.debug("listing the daemon's images to verify ahead: %s", exc)
                continue
            if not self._queue:
                self._queued.clear()
                continue
            ref = max(self._queue, key=self._queue.__getitem__)
            why, _order = self._queue.pop(ref)
            self.running = ref
            try:
                await self._verify(ref, reported=why == _REPORTED)
            except (DockerUnavailable, DockerFailed) as exc:
                log.debug("verifying %s ahead: %s", ref, exc)
            finally:
                self.running = None

    async def _queue_recent(self) -> None:
        """Queues the `recent` images the daemon's store took in last (by one of their tags), the newest
        highest, behind those the daemon reported new."""
        info = await self.docker.daemon()
        in_place = await self.sources.in_place(info)
        if in_place is None or not self.recent:
            return
        names: dict[str, str] = {}
        for tag, image_id in await self.docker.tagged_images():
            if not tag.startswith("<none>"):
                names.setdefault(image_id, tag)
        stored = await asyncio.to_thread(lambda: {i: in_place.stored_at(i) for i in names})
        recent = sorted((at, image_id) for image_id, at in stored.items() if at is not None)[-self.recent :]
        for _at, image_id in recent:
            if names[image_id] not in self._queue:
                self._add(names[image_id], _RECENT)
        if recent:
            log.info(
                "verifying ahead, where they lie, the images %s took in last (%d, the newest first)",
                info.product,
                len(recent),
            )

    async def _verify(self, ref: str, *, reported: bool) -> None:
        """Verifies the image's blobs ahead; a tag the daemon `reported` new is known from then on as a
        served one is (a recent image is queued under any one of its tags: no tag of it was asked for)."""
        info = await self.docker.daemon()
        in_place = await self.sources.in_place(info)
        if in_place is None:
            return
        image = await self.docker.inspect(ref)
        if image is None:
            return
        started = time.monotonic()
        hashed = await in_place.verify_ahead(ref, image, info, self.sending.idle)
        # What was verified is served while the daemon is down, as what was served is; an event names an
        # image by its ID at times, which is no tag.
        named = None if ref.startswith("sha256:") or not reported else split_repo_tag(ref)
        if named is not None:
            self.known.saw(info)
            self.known.served(named[0], str(image["Id"]), tag=named[1])
        if hashed:
            self.metrics.verified_ahead.inc(hashed)
            log.info(
                "verified %d blobs of %s where they lie, ahead of its first pull, in %s",
                hashed,
                ref,
                units.duration(time.monotonic() - started),
            )
        else:
            log.debug(
                "verifying %s ahead: nothing to hash (verified before, or not served where it lies)", ref
            )

    def state(self) -> dict[str, Any]:
        """For the status page."""
        return {
            "running": self.running,
            "pending": sorted(self._queue, key=self._queue.__getitem__, reverse=True),
        }


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("verifying ahead stopped: %s", task.exception(), exc_info=task.exception())
