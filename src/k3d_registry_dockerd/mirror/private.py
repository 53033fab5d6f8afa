"""Content pulled with the credentials a request sent is served again only to requests whose credentials
the upstream accepts for it.

Such an image was private upstream (our anonymous pull was refused first), and Docker keeps it: without
this, anyone who reaches the port could pull it afterwards. A request for it is checked by asking the
upstream through Docker about the digest Docker recorded, with the request's credentials
(`DockerClient.check_pull_access`): the upstream answers as it would answer the client, and nothing moves.
An accepted credential is remembered per repository for a few minutes, so the many requests of one pull
cost one check. The repository's tag names and its place in `_catalog` follow the same check and memory.
Content Docker already had, pulled anonymously or with the host's credentials stays open:
nothing of the client's was needed to get it.

What is private, and the digests served for it (manifests, configs, layers), is kept in the cache
directory, so a restart does not open it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Set
from dataclasses import asdict, dataclass, field
from typing import Any

from ..cache.store import Store
from ..common.bounded import BoundedDict
from ..common.flights import SingleFlight
from ..common.metrics import Metrics
from ..docker.engine import Credentials, DockerClient, DockerUnavailable, PullDenied, PullFailed, PullNotFound
from ..oci.errors import RegistryError
from ..oci.manifests import parse_pushed
from ..oci.reference import Repository, docker_name
from ..sources.content import ServedManifest

log = logging.getLogger(__package__)

STATE_FILE = "private.json"
STATE_VERSION = 1
# How long an accepted credential is taken as accepted again without asking the upstream, and a refused
# one as refused (a client retrying with a wrong secret costs the upstream one request).
REMEMBER_SECONDS = 300.0
REMEMBER_REFUSAL_SECONDS = 10.0
REMEMBERED = 1024


class PrivateStateError(ValueError):
    """The record of private images cannot be read; the message names the file."""


@dataclass
class PrivateRepository:
    # Image ID -> the Docker reference by digest the upstream is asked for when a request wants it.
    images: dict[str, str] = field(default_factory=dict)
    # Digests served for those images (and their image IDs) -> the image ID they belong to.
    digests: dict[str, str] = field(default_factory=dict)


def digest_reference(repo: Repository, image: dict[str, Any]) -> str | None:
    """The `name@sha256:…` Docker recorded when it pulled the image from this repository."""
    for recorded in image.get("RepoDigests") or []:
        name, at, digest = str(recorded).rpartition("@")
        if at and docker_name(name) == repo.docker_name:
            return repo.docker_ref(digest)
    return None


def referenced(served: ServedManifest) -> list[str]:
    """What a client may fetch next because of a manifest: its config and layers, or an index's children."""
    try:
        return parse_pushed(served.body, served.media_type).references
    except RegistryError:
        return []


class PrivateGuard:
    """Who may see content pulled with a request's credentials (see the module's docstring)."""

    def __init__(
        self, store: Store, docker: DockerClient, metrics: Metrics, remember: float = REMEMBER_SECONDS
    ) -> None:
        self._store = store
        self._docker = docker
        self._metrics = metrics
        # How long an accepted credential counts as accepted without asking again.
        self.remember = remember
        self._repos: dict[str, PrivateRepository] | None = None
        # sha256(repository, credentials) -> (accepted, until when that answer stands).
        self._answers: BoundedDict[bytes, tuple[bool, float]] = BoundedDict(REMEMBERED)
        self._checks = SingleFlight()
        self._saving = asyncio.Lock()

    def open(self) -> None:
        """Reads what is private from the cache directory (blocking)."""
        repos: dict[str, PrivateRepository] = {}
        raw = self._store.read_state(STATE_FILE)
        if raw is not None:
            try:
                data = json.loads(raw)
                if data.get("version") != STATE_VERSION:
                    raise ValueError(f"unknown version {data.get('version')!r}")
                repos = {name: PrivateRepository(**repo) for name, repo in data["repositories"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # Starting without it would serve those images to anyone.
                raise PrivateStateError(
                    f"{self._store.root / STATE_FILE} is unreadable ({exc}): it lists the images pulled with "
                    "a client's credentials; remove it only together with those images in Docker"
                ) from exc
        self._repos = repos

    def _loaded(self) -> dict[str, PrivateRepository]:
        if self._repos is None:
            self.open()
        assert self._repos is not None
        return self._repos

    def owner(
        self, repo: Repository, *, image_id: str | None = None, digest: str | None = None
    ) -> str | None:
        """The private image of this repository a request is for (by its image ID or a digest served for
        it), None when the request is for open content."""
        private = self._loaded().get(repo.docker_name)
        if private is None:
            return None
        if image_id is not None and image_id in private.images:
            return image_id
        return private.digests.get(digest) if digest is not None else None

    async def admit(
        self,
        repo: Repository,
        credentials: Credentials | None,
        *,
        image_id: str | None = None,
        digest: str | None = None,
    ) -> str | None:
        """The private image a request is for (by Docker's image ID or a digest served for it), once the
        request's credentials open it (else 401, or 503 when the upstream cannot be asked); None for open
        content."""
        owner = self.owner(repo, image_id=image_id, digest=digest)
        if owner is not None:
            await self.require(repo, owner, credentials)
        return owner

    async def admit_repository(self, repo: Repository, credentials: Credentials | None) -> None:
        """Returns when the repository has no private content or the request's credentials open it (the
        same check and memory as its content, so its tag names are listed only to whom its content is
        served); else as `require`."""
        private = self._loaded().get(repo.docker_name)
        if private is None or not private.images:
            return
        # Any of its images stands for the repository: the upstream grants access per repository.
        owner = next((image for image, ref in private.images.items() if ref), next(iter(private.images)))
        await self.require(repo, owner, credentials)

    def private_repositories(self) -> Set[str]:
        """The Docker names of the repositories with private content."""
        return self._loaded().keys()

    async def lists(self, repo: Repository, credentials: Credentials | None) -> bool:
        """Whether a catalog answered to these credentials names the repository: never a private one to a
        request without credentials, nor to one whose credentials are refused or cannot be checked now."""
        if repo.docker_name not in self._loaded():
            return True
        if credentials is None:
            return False
        try:
            await self.admit_repository(repo, credentials)
        except RegistryError:
            return False
        return True

    async def admit_served(
        self,
        repo: Repository,
        served: ServedManifest,
        credentials: Credentials | None,
        image_id: str | None = None,
    ) -> ServedManifest:
        """`served`, unless it is private content the request's credentials do not open."""
        owner = await self.admit(repo, credentials, image_id=image_id, digest=served.digest)
        if owner is not None:
            await self.served(repo, owner, served)
        return served

    async def protect(self, repo: Repository, image: dict[str, Any], credentials: Credentials) -> None:
        """Makes an image Docker just pulled with the request's credentials private; those credentials
        are accepted for it (the pull was the check)."""
        image_id = str(image["Id"])
        reference = digest_reference(repo, image)
        if reference is None:
            log.warning(
                "%s was pulled with a client's credentials but Docker recorded no digest for it: it is "
                "served to nobody, as its credentials cannot be checked",
                repo.docker_name,
            )
        private = self._loaded().setdefault(repo.docker_name, PrivateRepository())
        private.images[image_id] = reference or ""
        private.digests[image_id] = image_id
        if reference is not None:
            private.digests[reference.rpartition("@")[2]] = image_id
        log.info(
            "%s (%s) came with a client's credentials: served only to accepted ones",
            reference or repo.docker_name,
            image_id,
        )
        await self._save()
        self._remember_answer(self._key(repo, credentials), True)

    async def served(self, repo: Repository, owner: str, manifest: ServedManifest) -> None:
        """Adds a private image's served manifest and what it references, so requests by digest for them
        are checked too."""
        private = self._loaded()[repo.docker_name]
        new = [d for d in (manifest.digest, *referenced(manifest)) if private.digests.get(d) != owner]
        if new:
            private.digests.update(dict.fromkeys(new, owner))
            await self._save()

    async def require(self, repo: Repository, owner: str, credentials: Credentials | None) -> None:
        """Returns when the upstream accepts the credentials for the private image `owner`; else a 401
        with the challenge (503 when the upstream cannot be asked)."""
        if credentials is None:
            self._metrics.private_checks.labels("missing").inc()
            raise self._challenge(repo, "it was pulled with a client's credentials: send them")
        key = self._key(repo, credentials)
        accepted, until = self._answers.get(key, (False, 0.0))
        if until > time.monotonic():
            self._metrics.private_checks.labels("remembered" if accepted else "refused").inc()
        else:
            reference = self._loaded()[repo.docker_name].images.get(owner, "")
            accepted = await self._checks.run(
                key.hex(), lambda: self._check(repo, key, reference, credentials)
            )
        if not accepted:
            raise self._challenge(repo, f"{repo.domain} does not accept these credentials for it")

    async def _check(self, repo: Repository, key: bytes, reference: str, credentials: Credentials) -> bool:
        if not reference:
            self._metrics.private_checks.labels("refused").inc()
            return False
        try:
            log.info("asking %s whether %s may pull %s", repo.domain, credentials.username, reference)
            await self._docker.check_pull_access(reference, repo.domain, credentials)
        except (PullDenied, PullNotFound) as exc:
            self._metrics.private_checks.labels("refused").inc()
            log.info(
                "%s refused %s's credentials for %s: %s", repo.domain, credentials.username, reference, exc
            )
            self._remember_answer(key, False)
            return False
        except (PullFailed, DockerUnavailable) as exc:
            self._metrics.private_checks.labels("failed").inc()
            log.warning("could not check credentials for %s: %s", reference, exc)
            raise RegistryError(
                "UNAVAILABLE",
                f"{repo.docker_name} was pulled with a client's credentials, and they cannot be checked now",
                detail=str(exc),
            ) from exc
        self._metrics.private_checks.labels("allowed").inc()
        self._remember_answer(key, True)
        return True

    def _challenge(self, repo: Repository, why: str) -> RegistryError:
        return RegistryError(
            "UNAUTHORIZED",
            f"{repo.docker_name} needs credentials {repo.domain} accepts: {why}",
            headers={"WWW-Authenticate": f'Basic realm="{repo.domain}"'},
        )

    def _key(self, repo: Repository, credentials: Credentials) -> bytes:
        parts = (
            repo.docker_name,
            credentials.username,
            credentials.password,
            credentials.identity_token or "",
        )
        return hashlib.sha256("\0".join(parts).encode()).digest()

    def _remember_answer(self, key: bytes, accepted: bool) -> None:
        seconds = self.remember if accepted else min(self.remember, REMEMBER_REFUSAL_SECONDS)
        self._answers[key] = (accepted, time.monotonic() + seconds)

    async def _save(self) -> None:
        async with self._saving:
            repos = {name: asdict(repo) for name, repo in self._loaded().items()}
            payload = json.dumps({"version": STATE_VERSION, "repositories": repos}, indent=1, sort_keys=True)
            await asyncio.to_thread(self._store.save_state, STATE_FILE, payload.encode())
