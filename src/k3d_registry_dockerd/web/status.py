"""The status page: what the registry holds and is doing, as JSON and as a self-refreshing HTML page."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Set
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from .. import __version__
from ..cache import maintenance
from ..cache.maintenance import CachedImage
from ..cache.store import Store
from ..common.metrics import Metrics
from ..docker.engine import DaemonInfo, DockerClient, DockerUnavailable
from .assembly import Registry

RECENT_PROBLEMS = 20
READY_TIMEOUT = 5.0
RECENT_PULLS = 20
# Images per page of the status page's list (`status.json?page=N`): its cost stays flat as the cache grows.
IMAGES_PER_PAGE = 50
# A pull is a run of requests from one client for one repository: its manifests, then its blobs
# (containerd fetches three at a time, each layer taking as long as its bytes do).
_SAME_PULL = 600.0
# containerd asks for a tag twice in a row (HEAD to resolve, then GET); both belong to one pull.
_SAME_TAG = 30.0


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors the registry logged, for the status page."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_PROBLEMS)

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.appendleft(
            {"time": record.created, "level": record.levelname.lower(), "message": record.getMessage()}
        )


@dataclass
class Pull:
    client: str
    repository: str
    # The image as the client asked for it: `name:tag`, or `name@digest` for a pull pinned by digest.
    image: str
    cold: bool
    bytes: int
    started: float
    last: float


class RecentPulls:
    """The last pulls clients made: who, what, cold or warm, how much. Fed one response at a time."""

    def __init__(self, limit: int = RECENT_PULLS) -> None:
        self.entries: collections.deque[Pull] = collections.deque(maxlen=limit)

    def _current(self, client: str, repository: str, now: float) -> Pull | None:
        return next(
            (
                p
                for p in self.entries
                if (p.client, p.repository) == (client, repository) and now - p.last < _SAME_PULL
            ),
            None,
        )

    def served(
        self, client: str, repository: str, image: str, nbytes: int, *, tag: bool, cold: bool = False
    ) -> None:
        """A manifest (`tag`: asked for by tag) or blob response of `nbytes` to `client`."""
        now = time.time()
        pull = self._current(client, repository, now)
        starts_pull = tag and (pull is None or pull.image != image or now - pull.started > _SAME_TAG)
        if pull is None or starts_pull:
            pull = Pull(client, repository, image, cold, 0, now, now)
            self.entries.appendleft(pull)
        pull.cold = pull.cold or cold
        pull.bytes += nbytes
        pull.last = now


class ImageList:
    """The cached images, most recently used first, listed again (off the event loop) only after the
    records changed: a status page polling an idle registry costs no walk of the records. Repositories
    `hidden` names (those with private content) are left out: the page answers anyone who reaches the port,
    as `_catalog` does."""

    def __init__(self, store: Store, hidden: Callable[[], Set[str]]) -> None:
        self._store = store
        self._hidden = hidden
        # The records' generation and how many repositories were hidden when the list was made: a
        # repository found private after its record was written is hidden at the next poll too.
        self._made: tuple[int, int] | None = None
        self._images: list[CachedImage] = []
        self._pushed = 0

    async def current(self) -> tuple[list[CachedImage], int]:
        """The images and how many of them were pushed."""
        hidden = self._hidden()
        made = (self._store.generation, len(hidden))
        if made != self._made:
            images = await asyncio.to_thread(maintenance.images, self._store)
            self._images = [image for image in images if image.repository not in hidden]
            self._pushed = sum(image.pushed for image in self._images)
            self._made = made
        return self._images, self._pushed


async def docker_state(docker: DockerClient) -> DaemonInfo | str:
    """Docker's daemon facts, or why it cannot be reached (within READY_TIMEOUT seconds)."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            return await docker.daemon()
    except DockerUnavailable as exc:
        return str(exc)
    except TimeoutError:
        return f"Docker did not answer within {READY_TIMEOUT:.0f}s"


async def readiness(registry: Registry) -> dict[str, str]:
    """Problems that stop the registry from serving new images, by component (the next export not fitting
    in the cache dir too); empty when ready."""
    problems: dict[str, str] = {}
    docker = await docker_state(registry.docker)
    if isinstance(docker, str):
        problems["docker"] = docker
    try:
        await asyncio.to_thread(registry.store.check_writable)
        short = await asyncio.to_thread(registry.space.problem)
    except OSError as exc:
        problems["cache"] = f"cache {registry.store.root} is not writable: {exc.strerror or exc}"
    else:
        if short is not None:
            problems["space"] = short
    return problems


async def _docker(registry: Registry) -> dict[str, Any]:
    where = registry.docker.describe()
    info = await docker_state(registry.docker)
    if isinstance(info, str):
        # "serving from Docker's classic store while Docker is down", once something was.
        return {
            "reachable": False,
            "endpoint": where,
            "problem": info,
            "serving": registry.sources.while_down(),
        }
    return {
        "reachable": True,
        "endpoint": where,
        "product": info.product,
        "version": info.server_version,
        "api_version": info.api_version,
        "platform": str(info.platform),
        "storage": info.storage,
        "zero_copy": registry.discovery.describe(),
    }


def _cache_counts(metrics: Metrics) -> dict[str, float]:
    # From this one counter, not by collecting every metric of the registry once per result.
    counts = dict.fromkeys(("hit", "miss", "stale", "containerd", "in_place"), 0.0)
    for family in metrics.manifest_cache.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("result") in counts:
                counts[sample.labels["result"]] = sample.value
    return counts


async def snapshot(
    registry: Registry, problems: RecentProblems, pulls: RecentPulls, listing: ImageList, page: int = 1
) -> dict[str, Any]:
    """Everything the page shows, each part from its owner; of the images, one page (`page`, from 1)."""
    store = registry.store
    images, pushed = await listing.current()
    private = registry.guard.private_repositories()
    pages = max(1, -(-len(images) // IMAGES_PER_PAGE))
    page = min(max(page, 1), pages)
    shown = images[(page - 1) * IMAGES_PER_PAGE : page * IMAGES_PER_PAGE]
    counts = _cache_counts(registry.metrics)
    answered = sum(counts.values())
    return {
        "version": __version__,
        "time": time.time(),
        # How the registry gets bytes (in place, zero-copy or export), the page's first line.
        "bytes_path": registry.discovery.path,
        "docker": await _docker(registry),
        "cache": {
            "dir": str(store.root),
            "bytes": store.total_bytes,
            "blobs": store.blob_count,
            "limit": registry.records.limit,
            # Answered without an export: from the cache, or from containerd's content store as it is.
            "hit_rate": (answered - counts["miss"]) / answered if answered else None,
            "tag_requests": answered,
        },
        "image_count": len(images),
        "pushed_count": pushed,
        "images_page": {"page": page, "pages": pages, "per_page": IMAGES_PER_PAGE},
        "images": [
            {
                "repository": image.repository,
                "tags": list(image.tags),
                "digest": image.digest,
                "bytes": image.size,
                "last_used": image.last_used,
                "pushed": image.pushed,
            }
            for image in shown
        ],
        "transfers": [transfer.as_json() for transfer in registry.transfers.running()],
        # Free space in the cache dir against what the next export may need.
        "space": (await asyncio.to_thread(registry.space.room)).as_json(),
        # None when pre-exports are off.
        "prefetch": registry.prefetcher.state() if registry.prefetcher is not None else None,
        "pulls": [asdict(pull) for pull in pulls.entries if pull.repository not in private],
        "problems": list(problems.entries),
    }


# Plain HTML with inline style and script: no external assets, works offline.
PAGE = resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")
