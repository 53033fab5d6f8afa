"""What `tags/list` and `_catalog` list: Docker's own images and what the cache serves (pushes included),
one page at a time; a repository whose content is private only to requests its content is open to.

One repository's tags ask Docker for that repository alone (a `reference` filter). The catalog is a sorted
snapshot of every repository: a request that starts a listing (no `last`) takes a new one, the pages that
follow it read the same snapshot for a while, so paging through N repositories lists Docker's images once,
not once per page."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..cache.store import Store
from ..common.flights import FreshFlight
from ..docker.engine import Credentials, DockerClient, DockerFailed, DockerUnavailable
from ..oci.errors import RegistryError
from ..oci.reference import DOCKER_HUB, Repository, parse_repository, repository_of, split_repo_tag
from .private import PrivateGuard

log = logging.getLogger(__package__)

# How long a catalog snapshot serves the pages that continue a listing (requests with `last`).
CATALOG_FRESH = 30.0
T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    """A listing request's `n` and `last`: at most `limit` items (None: all) after `last`."""

    last: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Paged:
    items: list[str]
    # More items follow: the answer links to the next page.
    more: bool = False


async def _always(_item: object) -> bool:
    return True


async def take_page(
    items: Sequence[T],
    key: Callable[[T], str],
    page: Page,
    visible: Callable[[T], Awaitable[bool]] = _always,
) -> tuple[list[T], bool]:
    """The page of `items` (sorted by `key`) after `page.last` that `visible` admits, and whether a
    visible item follows it; costs the page and the hidden items within it, not the whole list."""
    if page.limit == 0:
        return [], False
    index = 0 if page.last is None else bisect.bisect_right(items, page.last, key=key)
    taken: list[T] = []
    for position in range(index, len(items)):
        item = items[position]
        if not await visible(item):
            continue
        if page.limit is not None and len(taken) == page.limit:
            return taken, True
        taken.append(item)
    return taken, False


def catalog_name(docker_name: str) -> str | None:
    """The name this registry's own namespace lists a Docker repository by (`alpine`, `team/app`,
    `ghcr.io/org/x`); None when the OCI grammar cannot express it (a registry with a port)."""
    path = docker_name.removeprefix(f"{DOCKER_HUB}/")
    for candidate in (path.removeprefix("library/"), path):
        try:
            if parse_repository(candidate, None).docker_name == docker_name:
                return candidate
        except RegistryError:
            continue
    return None


class Listings:
    def __init__(self, store: Store, docker: DockerClient, guard: PrivateGuard) -> None:
        self.store = store
        self.docker = docker
        self.guard = guard
        # (catalog name, Docker name) of every repository, sorted by name, and when it was taken.
        self._snapshot: list[tuple[str, str]] = []
        self._taken = float("-inf")
        self._listing = FreshFlight()

    async def _docker_tags(self, repo: Repository | None = None) -> list[tuple[str, str]]:
        """(Docker name, tag) of Docker's images, of one repository's only when given; none while Docker
        is unreachable."""
        try:
            listed = await self.docker.repo_tags(repo.familiar("*") if repo else None)
        except (DockerUnavailable, DockerFailed) as exc:
            log.warning("listing Docker's images failed, answering from the cache only: %s", exc)
            return []
        pairs = [pair for pair in map(split_repo_tag, listed) if pair is not None]
        # Docker's filter is a pattern: the names are compared here.
        return [pair for pair in pairs if repo is None or pair[0] == repo.docker_name]

    async def tags(self, repo: Repository, page: Page, credentials: Credentials | None) -> Paged:
        """A page of a repository's tags, Docker's own and those cached, sorted; NAME_UNKNOWN when none,
        and for a private repository what its content answers when the credentials do not open it."""
        await self.guard.admit_repository(repo, credentials)
        record = self.store.record(repo.docker_name)
        found = set(record.tags) if record else set()
        found |= {tag for _, tag in await self._docker_tags(repo)}
        if not found:
            raise RegistryError("NAME_UNKNOWN", f"repository unknown: {repo.name}")
        items, more = await take_page(sorted(found), str, page)
        return Paged(items, more)

    async def catalog(self, page: Page, credentials: Credentials | None) -> Paged:
        """A page of the repositories in this registry's own namespace: Docker's, the cached and the
        pushed ones, by the name `docker images` shows; a private one only when the request's credentials
        open its content."""
        if page.last is None or time.monotonic() - self._taken > CATALOG_FRESH:
            self._snapshot = await self._listing.run("catalog", self._repositories)

        private = self.guard.private_repositories()

        async def visible(entry: tuple[str, str]) -> bool:
            return entry[1] not in private or await self.guard.lists(repository_of(entry[1]), credentials)

        entries, more = await take_page(self._snapshot, lambda entry: entry[0], page, visible)
        return Paged([name for name, _ in entries], more)

    async def _repositories(self) -> list[tuple[str, str]]:
        taken = time.monotonic()
        names = {r.name for r in self.store.records() if r.tags or r.manifests or r.blobs}
        names |= {name for name, _ in await self._docker_tags()}
        listed = {}
        for docker_name in names:
            name = catalog_name(docker_name)
            if name is not None:
                listed[name] = docker_name
        self._taken = taken
        return sorted(listed.items())
