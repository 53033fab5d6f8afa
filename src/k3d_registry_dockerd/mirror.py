"""Makes a requested image present in the store: inspect, maybe pull, export; once per image at a time.

Freshness rule: a tag is answered from the store only while Docker still maps it to the image ID the
cached answer was exported from, so a rebuilt local tag is re-exported on its next request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from . import cache, progress, units
from .docker import (
    Credentials,
    DaemonInfo,
    DockerClient,
    DockerFailed,
    DockerUnavailable,
    PullDenied,
    PullFailed,
    PullNotFound,
    failure_reason,
)
from .errors import RegistryError
from .export import (
    INDEX_TYPES,
    ExportError,
    ExportPlan,
    IncompleteImage,
    Platform,
    ThreadedStream,
    index_child,
    plan_manifests,
    platform_text,
    read_save_stream,
    select_root,
)
from .metrics import Metrics
from .progress import PullEvents, Transfer
from .reference import DOCKER_HUB, Digest, Repository, parse_repository, split_repo_tag
from .store import ManifestEntry, RepositoryRecord, Store, TagEntry

log = logging.getLogger(__name__)
T = TypeVar("T")
READY_TIMEOUT = 5.0
LAST_USE_RESOLUTION = 60.0
# How long an image stays safe from --cache-max-size eviction after a client fetched any part of it. A
# pull fetches manifest, config and layers one after another (containerd three at a time), so the gaps
# between its requests are a layer's transfer time; a layer being sent survives eviction anyway (the
# open file outlives its unlink). Five minutes covers 3 GB layers at 10 MB/s.
IN_USE_GRACE = 300.0
ABSENT_LIMIT = 4096


@dataclass
class ExportProgress:
    """An export running now: how far it got, and the blobs it relies on (evictions leave them alone)."""

    # Expected: Docker's figure for the image's size; the save stream is about as long.
    transfer: Transfer
    claimed: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ServedManifest:
    digest: str
    media_type: str
    body: bytes
    # Docker had to pull or export for this answer (a warm one came from the cache as it was).
    cold: bool = False


class SingleFlight:
    """Runs one task per key; concurrent callers share its result. A waiter leaving does not cancel it."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(key, None)
        # Waiters that stayed got the exception; one nobody waited for must not be reported as lost.
        if not task.cancelled():
            task.exception()


class FreshFlight:
    """Shares a call among concurrent callers, but only one that started after each caller arrived, so
    every answer is as fresh as an own call (a tag rebuilt a moment ago is seen). Callers arriving while
    a call runs share the next one: a thousand nodes asking about one tag cost two calls, not a thousand."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._next: dict[str, asyncio.Task[Any]] = {}

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is None:
            task = self._start(key, factory)
        else:
            task = self._next.get(key) or self._queue(key, running, factory)
        return await asyncio.shield(task)

    def _start(self, key: str, factory: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(factory())
        self._running[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def _queue(
        self, key: str, running: asyncio.Task[Any], factory: Callable[[], Awaitable[T]]
    ) -> asyncio.Task[T]:
        async def after_running() -> T:
            try:
                await asyncio.wait({running})
            finally:
                self._next.pop(key, None)
            return await self._start(key, factory)

        task = asyncio.ensure_future(after_running())
        self._next[key] = task
        task.add_done_callback(lambda done: None if done.cancelled() else done.exception())
        return task

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()


class Mirror:
    def __init__(
        self,
        store: Store,
        docker: DockerClient,
        refresh_tags: float | None = None,
        metrics: Metrics | None = None,
        cache_max_size: int | None = None,
    ) -> None:
        self.store = store
        self.docker = docker
        self.refresh_tags = refresh_tags
        self.cache_max_size = cache_max_size
        self.in_progress: dict[str, ExportProgress] = {}
        # Pulls through Docker running now, by Docker reference.
        self.pulling: dict[str, Transfer] = {}
        self.metrics = metrics or Metrics(store.blobs_dir)
        self._flights = SingleFlight()
        self._inspects = FreshFlight()
        self.exports = 0
        # Digests a Docker image was found not to contain, so repeated requests cost no new export.
        self._absent: dict[tuple[str, str], str] = {}
        self._record_lock = asyncio.Lock()
        # Pushed images being loaded into Docker, by Docker reference (see push.py).
        self.loading: dict[str, asyncio.Task[None]] = {}
        # When a client last fetched (Docker name, digest): pulls in progress, kept from eviction.
        self._fetched: dict[tuple[str, str], float] = {}

    # ---- manifests -------------------------------------------------------------------------------

    async def manifest_by_tag(
        self, repo: Repository, tag: str, credentials: Credentials | None
    ) -> ServedManifest:
        cached = self._cached_tag(repo, tag)
        # Own namespace and mirror requests share a record (same Docker name): a pushed tag stands for
        # that Docker image either way, so a mirror request must not replace it with an upstream pull.
        if cached is not None and cached.pushed and await self._pushed_current(repo, tag, cached):
            self.metrics.manifest_cache.labels("hit").inc()
            return self._served(repo, cached.digest, cached.media_type)
        try:
            return await self._fresh_tag(repo, tag, cached, credentials)
        except DockerUnavailable as exc:
            if cached is not None and self.store.has_blob(cached.digest):
                log.warning("serving cached %s (%s) as it was: %s", repo.familiar(tag), cached.digest, exc)
                self.metrics.manifest_cache.labels("stale").inc()
                return self._served(repo, cached.digest, cached.media_type)
            raise RegistryError("UNAVAILABLE", str(exc)) from exc

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

    def _cached_tag(self, repo: Repository, tag: str) -> TagEntry | None:
        record = self.store.record(repo.docker_name)
        return record.tags.get(tag) if record else None

    async def _fresh_tag(
        self, repo: Repository, tag: str, cached: TagEntry | None, credentials: Credentials | None
    ) -> ServedManifest:
        image, pulled_at = await self._current_image(repo, tag, cached, credentials)
        image_id = image["Id"]
        # Another request may have finished exporting this image while we inspected it.
        cached = self._cached_tag(repo, tag)
        if cached is not None and cached.image_id == image_id and self.store.has_blob(cached.digest):
            now = time.time()
            used_long_ago = cached.last_used is None or now - cached.last_used > LAST_USE_RESOLUTION
            if pulled_at is not None or used_long_ago:
                # Recorded at most once a minute per tag: a record write per pull would be wasted I/O.
                changed = replace(cached, pulled_at=pulled_at or cached.pulled_at, last_used=now)
                await self._update(repo, {}, {tag: changed})
            self.metrics.manifest_cache.labels("hit").inc()
            return self._served(repo, cached.digest, cached.media_type, cold=pulled_at is not None)
        self.metrics.manifest_cache.labels("miss").inc()
        size = int(image.get("Size") or 0)
        entry = await self._flights.run(
            f"export {repo.docker_ref(tag)} {image_id}",
            lambda: self._export_tag(repo, tag, image_id, pulled_at, size),
        )
        return self._served(repo, entry.digest, entry.media_type, cold=True)

    async def manifest_by_digest(
        self, repo: Repository, digest: Digest, credentials: Credentials | None
    ) -> ServedManifest:
        text = str(digest)
        record = self.store.record(repo.docker_name)
        if record and text in record.manifests and self.store.has_blob(text):
            return self._served(repo, text, record.manifests[text].media_type)
        ref = repo.docker_ref(text)
        try:
            found = await self._flights.run(
                f"digest {ref}", lambda: self._export_digest(repo, digest, credentials)
            )
        except DockerUnavailable as exc:
            raise RegistryError("UNAVAILABLE", str(exc)) from exc
        if not found:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(text)}")
        record = self.store.record(repo.docker_name)
        assert record is not None
        return self._served(repo, text, record.manifests[text].media_type, cold=True)

    def _served(
        self, repo: Repository, digest: str, media_type: str, *, cold: bool = False
    ) -> ServedManifest:
        body = self.store.read_blob(digest)
        if body is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest {digest} is no longer in the cache")
        self._note_fetch(repo, digest)
        return ServedManifest(digest, media_type, body, cold)

    # ---- Docker: inspect and pull ---------------------------------------------------------------

    async def _current_image(
        self, repo: Repository, tag: str, cached: TagEntry | None, credentials: Credentials | None
    ) -> tuple[dict[str, Any], float | None]:
        """Docker's image for the tag (pulled if missing or due for refresh) and when it was pulled."""
        ref = repo.docker_ref(tag)
        image = await self._inspect(ref)
        if image is None:
            if not repo.remote:
                raise RegistryError("MANIFEST_UNKNOWN", f"Docker has no image {repo.familiar(tag)}")
            pulled_at = await self._pull(repo, ref, credentials)
            image = await self._inspect(ref)
            if image is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"Docker pulled {ref} but does not list it")
            return image, pulled_at
        if not (repo.remote and self._refresh_due(cached, image)):
            return image, None
        try:
            pulled_at = await self._pull(repo, ref, credentials)
        except RegistryError as exc:
            log.warning("refreshing %s failed, serving Docker's copy: %s", ref, exc.message)
            return image, None
        return await self._inspect(ref) or image, pulled_at

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        """Docker's inspect of `ref`, shared by the requests that arrive while one runs (see FreshFlight)."""
        return await self._inspects.run(ref, lambda: self.docker.inspect(ref))

    def _refresh_due(self, cached: TagEntry | None, image: dict[str, Any]) -> bool:
        if self.refresh_tags is None:
            return False
        if cached is None or cached.image_id != image["Id"] or cached.pulled_at is None:
            return True
        return time.time() - cached.pulled_at > self.refresh_tags

    async def _pull(self, repo: Repository, ref: str, credentials: Credentials | None) -> float:
        key = f"pull {ref} {credentials.username if credentials else ''}"
        await self._flights.run(key, lambda: self._do_pull(repo, ref, credentials))
        return time.time()

    async def _do_pull(self, repo: Repository, ref: str, credentials: Credentials | None) -> None:
        started, outcome = time.monotonic(), "failed"
        transfer = self.pulling[ref] = Transfer("pull", ref)
        try:
            async with progress.logged(transfer):
                await self.docker.pull(ref, credentials, PullEvents(transfer).update)
            outcome = "ok"
        except PullDenied as exc:
            outcome = "denied"
            if credentials is None:
                # The normal handshake: containerd asks anonymously first, and retries with the pod's
                # pull secret after this challenge.
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

    # ---- export ---------------------------------------------------------------------------------

    async def _export_tag(
        self, repo: Repository, tag: str, image_id: str, pulled_at: float | None, size: int
    ) -> TagEntry:
        ref = repo.docker_ref(tag)
        info = await self.docker.daemon()
        entries: list[TagEntry] = []

        async def keep(plan: ExportPlan) -> None:
            now = time.time()
            entry = TagEntry(
                digest=plan.root.digest,
                media_type=plan.manifests[plan.root.digest].media_type,
                image_id=image_id,
                exported_at=now,
                pulled_at=pulled_at or self._previous_pull(repo, tag, image_id),
                last_used=now,
            )
            await self._update(repo, plan.manifests, {tag: entry})
            entries.append(entry)

        await self._export(ref, info, (ref, repo.familiar(tag), tag), size, keep)
        await self._enforce_limit(repo, entries[0].digest)
        return entries[0]

    def _previous_pull(self, repo: Repository, tag: str, image_id: str) -> float | None:
        record = self.store.record(repo.docker_name)
        previous = record.tags.get(tag) if record else None
        return previous.pulled_at if previous and previous.image_id == image_id else None

    def _foreign_child(self, repo: Repository, digest: str, platform: Platform) -> str | None:
        """The platform of `digest` when an index cached for the repository lists it for another platform
        than Docker's own."""
        record = self.store.record(repo.docker_name)
        for index, entry in record.manifests.items() if record else ():
            if entry.media_type in INDEX_TYPES and digest in entry.references:
                child = index_child(self.store.read_blob(index), digest)
                if child is not None and not platform.matches(child.get("platform")):
                    return platform_text(child.get("platform"))
        return None

    async def _export_digest(self, repo: Repository, digest: Digest, credentials: Credentials | None) -> bool:
        """Finds a digest in Docker's export of that image; False (logged) when it cannot be served."""
        text, ref = str(digest), repo.docker_ref(str(digest))
        image = await self._inspect(ref)
        info = await self.docker.daemon()
        if image is None and repo.remote and info.containerd_store:
            foreign = self._foreign_child(repo, text, info.platform)
            if foreign is not None:
                # containerd 2 reads every platform's manifest and config of an index it pulls: pulling a
                # foreign platform's whole image through Docker for that would be wasted.
                log.info(
                    "manifest %s: the %s image of an index Docker holds for %s only; the client gets it "
                    "from the upstream",
                    repo.familiar(text),
                    foreign,
                    info.platform,
                )
                return False
            try:
                await self._pull(repo, ref, credentials)
            except RegistryError as exc:
                if exc.code == "MANIFEST_UNKNOWN":
                    return False
                raise
            image = await self._inspect(ref)
        if image is None:
            log.info("manifest %s: Docker has no image with that digest", repo.familiar(text))
            return False
        if self._absent.get((repo.docker_name, text)) == image["Id"]:
            return False
        try:
            plan = await self._export(
                ref,
                info,
                (ref,),
                int(image.get("Size") or 0),
                lambda plan: self._update(repo, plan.manifests, {}),
            )
        except RegistryError:
            self._remember_absent(repo, text, image["Id"])
            raise
        await self._enforce_limit(repo, plan.root.digest)
        if text in plan.manifests:
            return True
        self._remember_absent(repo, text, image["Id"])
        why = (
            "Docker's classic image store generates its own manifests on export, so the upstream's digests "
            "cannot be served (the client falls back to the upstream registry)"
            if not info.containerd_store
            else "the export does not contain it"
        )
        log.warning(
            "manifest %s: not in Docker's export of image %s: %s", repo.familiar(text), image["Id"], why
        )
        return False

    async def _enforce_limit(self, repo: Repository, digest: str) -> None:
        """Evicts least recently used images past --cache-max-size, keeping the one just exported, the
        ones clients fetched from in the last IN_USE_GRACE seconds and every blob an export still running
        relies on: the cache exceeds the limit only by those."""
        if self.cache_max_size is None:
            return
        limit = self.cache_max_size
        now = time.monotonic()
        self._fetched[(repo.docker_name, digest)] = now
        self._fetched = {key: at for key, at in self._fetched.items() if now - at < IN_USE_GRACE}
        fetched = set(self._fetched)
        in_use: set[str] = set().union(*(export.claimed for export in self.in_progress.values()))
        async with self._record_lock:
            eviction = await asyncio.to_thread(cache.evict, self.store, limit, fetched, in_use)
        if eviction.remaining > limit:
            log.info(
                "cache at %s stays over the %s limit: the rest is in use (fetched in the last %s, or an "
                "export running) and is evicted once idle",
                units.size(eviction.remaining),
                units.size(limit),
                units.duration(IN_USE_GRACE),
            )
        for image in eviction.dropped:
            self.metrics.evictions.inc()
            log.info(
                "evicted %s %s (%s, tags %s) to keep the cache under %s",
                image.repository,
                image.digest,
                units.size(image.size),
                ",".join(image.tags),
                units.size(limit),
            )

    def _note_fetch(self, repo: Repository, digest: str) -> None:
        if self.cache_max_size is not None:
            self._fetched[(repo.docker_name, digest)] = time.monotonic()

    def _remember_absent(self, repo: Repository, digest: str, image_id: str) -> None:
        if len(self._absent) >= ABSENT_LIMIT:
            self._absent.pop(next(iter(self._absent)))
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

        await self.edit_record(repo.docker_name, merge)

    async def edit_record(
        self, name: str, change: Callable[[RepositoryRecord], RepositoryRecord], *, free_blobs: bool = False
    ) -> RepositoryRecord:
        """Applies `change` to a repository's record (an empty one if none) and saves the result, one
        change at a time; `change` raises to refuse. With `free_blobs`, blobs the record no longer needs
        and nothing else uses (exports running included) are removed from the cache."""
        async with self._record_lock:
            current = self.store.record(name) or RepositoryRecord(name=name)
            record = change(current)
            if free_blobs:
                in_use: set[str] = set().union(*(e.claimed for e in self.in_progress.values()))
                await asyncio.to_thread(cache.replace_record, self.store, record, in_use)
            elif record != current:
                await asyncio.to_thread(self.store.save_record, record)
            return record

    async def _export(
        self,
        ref: str,
        info: DaemonInfo,
        names: tuple[str, ...],
        size: int,
        keep: Callable[[ExportPlan], Awaitable[None]],
    ) -> ExportPlan:
        """Exports an image into the store and has `keep` record what is served of it; whatever else the
        export stored (a failed export's blobs, files Docker adds that no manifest uses) is removed."""
        self.metrics.exports_in_flight.inc()
        export = self.in_progress[ref] = ExportProgress(Transfer("export", ref, size))
        started, outcome = time.monotonic(), "failed"
        try:
            async with progress.logged(export.transfer):
                plan = await self._save_into_store(ref, info, names, export)
            await keep(plan)
            outcome = "ok"
            return plan
        finally:
            await self._discard_unused(ref, export.claimed)
            self.in_progress.pop(ref, None)
            self.metrics.exports_in_flight.dec()
            self.metrics.exports.labels(outcome).observe(time.monotonic() - started)

    async def _discard_unused(self, ref: str, stored: set[str]) -> None:
        """Removes blobs an export stored that no record references and no other export relies on."""
        async with self._record_lock:
            others = [e.claimed for r, e in self.in_progress.items() if r != ref]
            unused = stored - cache.referenced(self.store) - set().union(*others)
            freed = await asyncio.to_thread(cache.remove_blobs, self.store, unused)
        if freed:
            log.info("removed %s the export of %s stored but nothing uses", units.size(freed), ref)

    async def _save_into_store(
        self, ref: str, info: DaemonInfo, names: tuple[str, ...], export: ExportProgress
    ) -> ExportPlan:
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
                reader = ThreadedStream(stream, loop)
                export.transfer.counter = lambda: reader.bytes_read
                try:
                    contents = await asyncio.to_thread(read_save_stream, reader, self.store, export.claimed)
                finally:
                    reader.close()
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
                "UNAVAILABLE", f"cannot store {ref} in the cache {self.store.root}: {exc.strerror or exc}"
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

    def blob(self, repo: Repository, digest: Digest) -> Path:
        """The path of a blob, if this repository's manifests reference it."""
        text = str(digest)
        record = self.store.record(repo.docker_name)
        if record is None or not record.serves_blob(text) or not self.store.has_blob(text):
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown to {repo.name}: {text}")
        self._note_fetch(repo, text)
        return self.store.blob_path(digest)
