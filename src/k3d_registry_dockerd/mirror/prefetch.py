"""Pre-export of rebuilt tags: when a tag this registry has served moves to another image in Docker
(`docker build -t`, `tag`, `pull`, `load`), that image is exported in the background, so the cluster's
next pull of the tag is warm.

Docker's image events say when a tag may have moved; whether a pre-export is due is decided from the
cache records and Docker's answer. One runs at a time, the newest move first; it yields to the exports
requests wait for, a request for its image joins it, and a tag that moves again cancels it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..cache.records import Records
from ..cache.store import RepositoryRecord, TagEntry
from ..common import units
from ..common.metrics import Metrics
from ..docker.engine import DockerClient, DockerFailed, DockerUnavailable
from ..docker.events import ImageEvents
from ..oci.errors import RegistryError
from ..oci.reference import repository_of, split_repo_tag
from ..sources.select import Sources

log = logging.getLogger(__package__)
# Docker's actions that can point a tag at another image (a build's final step is a `tag`; the
# containerd image store reports new images as `create`, untagged ones as `delete`; Podman ends a build
# with `build`, naming only the image).
MOVING_ACTIONS = frozenset({"tag", "untag", "pull", "load", "import", "create", "delete", "build"})
# Events come in bursts (a build: several creates and a tag): they are looked at together.
SETTLE = 0.05
RECENT_OUTCOMES = 10


@dataclass(frozen=True)
class Job:
    name: str  # Docker name of the repository, as the cache records key it
    tag: str
    image_id: str
    # Order in which the moves were seen: the newest runs first.
    seen: int

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


class PrefetchQueue:
    """Pre-exports due, one per tag (a tag that moves again replaces its job), newest first."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], Job] = {}
        self._order = itertools.count()

    def want(self, name: str, tag: str, image_id: str) -> Job:
        job = self._jobs.get((name, tag))
        if job is None or job.image_id != image_id:
            job = self._jobs[(name, tag)] = Job(name, tag, image_id, next(self._order))
        return job

    def drop(self, name: str, tag: str) -> Job | None:
        return self._jobs.pop((name, tag), None)

    def pop(self) -> Job | None:
        if not self._jobs:
            return None
        job = max(self._jobs.values(), key=lambda j: j.seen)
        del self._jobs[(job.name, job.tag)]
        return job

    def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.seen, reverse=True)

    def __len__(self) -> int:
        return len(self._jobs)


def served_tags(records: Iterable[RepositoryRecord], now: float, max_age: float) -> dict[str, TagEntry]:
    """The tags worth keeping warm, by `name:tag`: those a client asked for within `max_age` seconds."""
    return {
        f"{record.name}:{tag}": entry
        for record in records
        for tag, entry in record.tags.items()
        if now - (entry.last_used or entry.exported_at) <= max_age
    }


def due(entry: TagEntry, docker_id: str | None) -> bool:
    """Whether Docker's image for a served tag is one the cache does not answer the tag with."""
    return docker_id is not None and docker_id != entry.image_id


def moved_ref(event: dict[str, Any]) -> str | bool | None:
    """The `name:tag` an image event may have moved; True when it may have moved any (Docker names only
    the image ID, as for a classic-store `load` or `untag`); None when it moves none."""
    if event.get("Action") not in MOVING_ACTIONS:
        return None
    actor = event.get("Actor") or {}
    name = str((actor.get("Attributes") or {}).get("name") or actor.get("ID") or "")
    if not name or name.startswith("sha256:"):
        return True
    if "@" in name:
        return None
    found = split_repo_tag(name)
    return f"{found[0]}:{found[1]}" if found else True


def expected_growth(image: dict[str, Any], blob_size: Callable[[str], int | None]) -> int:
    """About how many bytes exporting `image` adds to the cache: Docker's size of the image less its
    layers the cache holds already (an export's layer blobs are named by the layer's diff ID on the
    classic store; elsewhere this counts the whole image, erring on the side of the limit)."""
    size = int(image.get("Size") or 0)
    held = sum(blob_size(layer) or 0 for layer in (image.get("RootFS") or {}).get("Layers") or [])
    return max(size - held, 0)


@dataclass(frozen=True)
class Outcome:
    ref: str
    image_id: str
    outcome: str
    seconds: float
    time: float


class Prefetcher:
    """Keeps the tags clients pulled warm as they move in Docker (see the module's docstring)."""

    def __init__(
        self,
        docker: DockerClient,
        events: ImageEvents,
        sources: Sources,
        records: Records,
        metrics: Metrics,
        max_age: float,
        loading: Container[str] = (),
    ) -> None:
        self.docker = docker
        self.sources = sources
        self.exported = sources.exported
        self.records = records
        self.store = records.store
        self.metrics = metrics
        self.max_age = max_age
        # Docker references a pushed image is being loaded into Docker under (owned by the pushes).
        self.loading = loading
        self.queue = PrefetchQueue()
        self.running: Job | None = None
        # The running job's tag moved on before its export began.
        self._superseded = False
        self.recent: list[Outcome] = []
        self.events = events
        events.subscribe(self._on_event, self._on_connect)
        self._moved: set[str] = set()
        self._all_moved = False
        self._looked_at = asyncio.Event()
        self._queued = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(coroutine) for coroutine in (self._look_at_moves(), self._export_due())
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)

    async def close(self) -> None:
        if self.running is not None:
            self.exported.abandon(repository_of(self.running.name), self.running.tag, self.running.image_id)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- what moved ------------------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        moved = moved_ref(event)
        if moved is True:
            self._all_moved = True
        elif isinstance(moved, str):
            self._moved.add(moved)
        else:
            return
        self._looked_at.set()

    def _on_connect(self) -> None:
        # Tags may have moved while the stream was closed (or before the registry started).
        self._all_moved = True
        self._looked_at.set()

    async def _look_at_moves(self) -> None:
        while True:
            await self._looked_at.wait()
            await asyncio.sleep(SETTLE)
            self._looked_at.clear()
            everything, refs = self._all_moved, self._moved
            self._all_moved, self._moved = False, set()
            try:
                await self._look_at(None if everything else refs)
            except (DockerUnavailable, DockerFailed) as exc:
                # The event stream breaks too, and its reconnect looks at everything again.
                log.debug("looking at moved tags: %s", exc)

    async def _look_at(self, refs: set[str] | None) -> None:
        """Queues a pre-export for each served tag (of `refs`, or all) whose image in Docker moved."""
        served = served_tags(self.store.records(), time.time(), self.max_age)
        if refs is not None:
            served = {ref: entry for ref, entry in served.items() if ref in refs}
        if not served:
            return
        info = await self.docker.daemon()
        if not await self.sources.exports_needed(info):
            return
        if refs is not None and len(served) == 1:
            ((ref, _),) = served.items()
            image = await self.docker.inspect(ref)
            current = {ref: image["Id"]} if image else {}
        else:
            current = {}
            for repo_tag, image_id in await self.docker.tagged_images():
                found = split_repo_tag(repo_tag)
                if found is not None:
                    current[f"{found[0]}:{found[1]}"] = image_id
        for ref, entry in served.items():
            name, _, tag = ref.rpartition(":")
            self._moved_to(name, tag, entry, current.get(ref))

    def _moved_to(self, name: str, tag: str, entry: TagEntry, docker_id: str | None) -> None:
        running = self.running
        if (
            running is not None
            and (running.name, running.tag) == (name, tag)
            and running.image_id != docker_id
        ):
            # Superseded: the tag moved on (or is gone) before its export was done.
            self._superseded = True
            self.exported.abandon(repository_of(name), tag, running.image_id)
        if docker_id is None or not due(entry, docker_id) or f"{name}:{tag}" in self.loading:
            self.queue.drop(name, tag)
            return
        if running is not None and (running.name, running.tag, running.image_id) == (name, tag, docker_id):
            return
        self.queue.want(name, tag, docker_id)
        self._queued.set()

    # ---- exporting -------------------------------------------------------------------------------

    async def _export_due(self) -> None:
        while True:
            await self._queued.wait()
            await self.exported.requests_idle()
            job = self.queue.pop()
            if job is None:
                self._queued.clear()
                continue
            self.running, self._superseded = job, False
            try:
                await self._export(job)
            finally:
                self.running = None

    async def _export(self, job: Job) -> None:
        repo = repository_of(job.name)
        try:
            info = await self.docker.daemon()
            image = await self.docker.inspect(job.ref)
        except (DockerUnavailable, DockerFailed) as exc:
            log.debug("no pre-export of %s: %s", job.ref, exc)
            return
        if image is None or image["Id"] != job.image_id or not await self.sources.exports_needed(info):
            return  # moved again (its newer job is queued), or nothing to export
        cached = self.exported.cached_tag(repo, job.tag)
        if cached is not None and not due(cached, image["Id"]):
            return  # a request exported it meanwhile
        limit = self.records.limit
        if limit is not None:
            total = self.store.total_bytes
            growth = expected_growth(image, self.store.blob_size)
            if total + growth > limit:
                log.info(
                    "no pre-export of %s: about %s more would take the cache (%s) past its %s limit",
                    repo.familiar(job.tag),
                    units.size(growth),
                    units.size(total),
                    units.size(limit),
                )
                self._done(job, "over_limit", 0.0)
                return
        started = time.monotonic()
        if self._superseded:
            self._done(job, "superseded", 0.0)
            return
        log.info("%s moved to %s in Docker: pre-export started", repo.familiar(job.tag), job.image_id)
        try:
            await self.exported.prefetch(repo, job.tag, image, info)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.info("pre-export of %s stopped: the tag moved on", repo.familiar(job.tag))
            self._done(job, "superseded", time.monotonic() - started)
        except (RegistryError, DockerUnavailable, DockerFailed) as exc:
            reason = exc.message if isinstance(exc, RegistryError) else str(exc)
            log.warning("pre-export of %s failed: %s", repo.familiar(job.tag), reason)
            self._done(job, "failed", time.monotonic() - started)
        else:
            self._done(job, "exported", time.monotonic() - started)

    def _done(self, job: Job, outcome: str, seconds: float) -> None:
        self.metrics.prefetches.labels(outcome).inc()
        self.recent.insert(0, Outcome(job.ref, job.image_id, outcome, seconds, time.time()))
        del self.recent[RECENT_OUTCOMES:]

    def state(self) -> dict[str, Any]:
        """For the status page."""
        return {
            "following": self.events.following,
            "problem": self.events.problem,
            "max_age": self.max_age,
            "pending": [job.ref for job in self.queue.jobs()],
            "running": self.running.ref if self.running else None,
            "recent": [asdict(outcome) for outcome in self.recent],
        }


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pre-exports stopped: %s", task.exception(), exc_info=task.exception())
