"""What `tags/list` and `_catalog` list: Docker's own images and what the cache serves (pushes included)."""

from __future__ import annotations

import logging

from ..cache.store import Store
from ..docker.engine import DockerClient, DockerFailed, DockerUnavailable
from ..oci.errors import RegistryError
from ..oci.reference import DOCKER_HUB, Repository, parse_repository, split_repo_tag

log = logging.getLogger(__package__)


class Listings:
    def __init__(self, store: Store, docker: DockerClient) -> None:
        self.store = store
        self.docker = docker

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
