"""Verifying ahead: when the daemon reports an image new (pulled, built, tagged, loaded, imported), the blobs
its own store keeps for it are hashed in the background where they lie, so a node's first pull finds them
verified and costs what a later pull does.

One image at a time, the newest first (the one a developer just built is the one about to be pulled); each
blob only while no blob is being hashed or put together for a client, so requests always go first. Every
new image is verified, served before or not: its first serving is exactly the pull this is for. Only where
images are served in place; setups that export have pre-export instead. A verified tag is known
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
        # Reference -> when it was reported, newest highest.
        self._queue: dict[str, int] = {}
        self._order = itertools.count()
        self._queued = asyncio.Event()
        self.running: str | None = None
        self._task: asyncio.Task[None] | None = None
        events.subscribe(self._on_event, lambda: None)

    def _on_event(self, event: dict[str, Any]) -> None:
        ref = new_image(event)
        if ref is None:
            return
        self._queue.pop(ref, None)
        self._queue[ref] = next(self._order)
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
            if not self._queue:
                self._queued.clear()
                continue
            ref = max(self._queue, key=self._queue.__getitem__)
            del self._queue[ref]
            self.running = ref
            try:
                await self._verify(ref)
            except (DockerUnavailable, DockerFailed) as exc:
                log.debug("verifying %s ahead: %s", ref, exc)
            finally:
                self.running = None

    async def _verify(self, ref: str) -> None:
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
        named = None if ref.startswith("sha256:") else split_repo_tag(ref)
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

    def state(self) -> dict[str, Any]:
        """For the status page."""
        return {
            "running": self.running,
            "pending": sorted(self._queue, key=self._queue.__getitem__, reverse=True),
        }


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("verifying ahead stopped: %s", task.exception(), exc_info=task.exception())
