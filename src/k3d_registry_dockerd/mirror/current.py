"""Which image a reference names in Docker now: an inspect for every request by tag (shared by the requests
arriving while one runs, so each answer is as fresh as an own inspect), a pull through Docker when Docker
has none, or when --refresh-tags finds a pulled tag due; one pull per reference and credentials.

A pull made with a request's credentials makes its image private (`PrivateGuard.protect`) before the pull
is over, and requests for a reference wait for the pulls of it running now: nobody sees such an image
before it is guarded.

Podman names what `podman build -t my-app:dev` makes `localhost/my-app:dev`, and `podman run my-app:dev`
finds it: a Docker Hub name Podman holds no image for is looked up there too before anything is pulled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..cache.store import TagEntry
from ..common.bounded import BoundedDict
from ..common.flights import FreshFlight, SingleFlight
from ..common.metrics import Metrics
from ..common.progress import Transfer, Transfers
from ..docker.engine import Credentials, DockerClient, DockerFailed, PullDenied, PullFailed, PullNotFound
from ..docker.hostcreds import HostCredentials, HostCredentialsError
from ..oci.errors import RegistryError
from ..oci.reference import Repository
from .answers import MISSING, DockerAnswers
from .private import PrivateGuard

log = logging.getLogger(__package__)
PULLS_REMEMBERED = 4096


@dataclass(frozen=True)
class Current:
    """Docker's image for a reference (its inspect answer), and when this request had Docker pull it."""

    image: dict[str, Any]
    pulled_at: float | None = None


class CurrentImages:
    def __init__(
        self,
        docker: DockerClient,
        guard: PrivateGuard,
        transfers: Transfers,
        metrics: Metrics,
        *,
        refresh_tags: float | None = None,
        host_credentials: HostCredentials | None = None,
        answers: DockerAnswers | None = None,
    ) -> None:
        self.docker = docker
        self.guard = guard
        self.transfers = transfers
        self.metrics = metrics
        self.refresh_tags = refresh_tags
        # The docker CLI's stored credentials, for pulls whose request has none (--docker-credentials).
        self.host_credentials = host_credentials
        self._inspects = FreshFlight()
        # Docker's answers, given again while nothing changed them.
        self._answers = answers
        self._pulls = SingleFlight()
        # Docker reference -> one event per request waiting for a pull of it, set when that pull is over.
        self._pulling: dict[str, list[asyncio.Event]] = {}
        # Docker reference -> (image ID, when this registry pulled it), for --refresh-tags of tags served
        # without a cache record (zero-copy).
        self._pulled: BoundedDict[str, tuple[str, float]] = BoundedDict(PULLS_REMEMBERED)

    async def inspect(self, ref: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """Docker's inspect of `ref`: as kept while nothing changed it (see DockerAnswers), else asked
        for, shared by the requests that arrive while one runs (see FreshFlight). `fresh` always asks
        (after a change this registry made: its event may not have arrived yet). An error Docker answers
        with (Podman's in the middle of a prune, say) is a 503: the node tries the upstream."""
        try:
            return await self._inspect(ref, fresh)
        except DockerFailed as exc:
            log.warning("looking up %s in Docker failed: %s", ref, exc)
            raise RegistryError("UNAVAILABLE", f"Docker failed to look up {ref}", detail=str(exc)) from exc

    async def _inspect(self, ref: str, fresh: bool) -> dict[str, Any] | None:
        answers = self._answers
        if answers is None:
            return await self._inspects.run(ref, lambda: self.docker.inspect(ref))
        if not fresh and (kept := answers.get(ref)) is not MISSING:
            return kept

        async def asked() -> dict[str, Any] | None:
            token = answers.token()
            image = await self.docker.inspect(ref)
            answers.keep(ref, token, image)
            return image

        return await self._inspects.run(ref, asked)

    async def of_tag(
        self, repo: Repository, tag: str, credentials: Credentials | None, cached: TagEntry | None = None
    ) -> Current:
        """Docker's image for the tag, pulled if Docker has none or (`cached`: what the cache answers the
        tag with) a refresh is due."""
        ref = repo.docker_ref(tag)
        await self.settled(ref)
        image = await self.inspect(ref)
        if image is None:
            local = await self._podman_local(repo, tag)
            if local is not None:
                return local
            if not repo.remote:
                raise RegistryError("MANIFEST_UNKNOWN", f"Docker has no image {repo.familiar(tag)}")
            return await self.pull(repo, ref, credentials)
        if not (repo.remote and self._refresh_due(ref, cached, image)):
            return Current(image)
        try:
            return await self.pull(repo, ref, credentials, previous=image)
        except RegistryError as exc:
            log.warning("refreshing %s failed, serving Docker's copy: %s", ref, exc.message)
            return Current(image)

    async def _podman_local(self, repo: Repository, tag: str) -> Current | None:
        """Podman's `localhost/` image for a Docker Hub name it holds no image of, as its own short-name
        lookup finds it."""
        local = repo.podman_local()
        if local is None or not (await self.docker.daemon()).product.startswith("Podman"):
            return None
        image = await self.inspect(local.docker_ref(tag))
        if image is None:
            return None
        log.info(
            "%s: Podman has no such image; serving its %s, as `podman run` would",
            repo.familiar(tag),
            local.docker_ref(tag),
        )
        return Current(image)

    async def settled(self, ref: str) -> None:
        """Returns once the pulls of `ref` running now are over (and their images guarded)."""
        for pulling in list(self._pulling.get(ref, ())):
            await pulling.wait()

    def _refresh_due(self, ref: str, cached: TagEntry | None, image: dict[str, Any]) -> bool:
        if self.refresh_tags is None:
            return False
        pulled = (cached.image_id, cached.pulled_at) if cached is not None else self._pulled.get(ref)
        if pulled is None or pulled[0] != image["Id"] or pulled[1] is None:
            return True
        return time.time() - pulled[1] > self.refresh_tags

    async def pull(
        self,
        repo: Repository,
        ref: str,
        credentials: Credentials | None,
        previous: dict[str, Any] | None = None,
    ) -> Current:
        """Has Docker pull `ref` (with the request's credentials, else the host's when allowed) and returns
        its image; `previous` is Docker's image before a refresh. Concurrent pulls with the same
        credentials are one."""
        from_host = None
        if credentials is None and self.host_credentials is not None:
            try:
                from_host = await self.host_credentials.lookup(repo.domain)
            except HostCredentialsError as exc:
                log.warning("pulling from %s without the host's Docker credentials: %s", repo.domain, exc)
        who = "the host" if from_host else credentials.username if credentials else ""
        done = asyncio.Event()
        self._pulling.setdefault(ref, []).append(done)
        try:
            return await self._pulls.run(
                f"pull {ref} {who}", lambda: self._pulled_image(repo, ref, credentials, from_host, previous)
            )
        finally:
            waiting = self._pulling[ref]
            waiting.remove(done)
            if not waiting:
                del self._pulling[ref]
            done.set()

    async def _pulled_image(
        self,
        repo: Repository,
        ref: str,
        credentials: Credentials | None,
        from_host: Credentials | None,
        previous: dict[str, Any] | None,
    ) -> Current:
        await self._pull(repo, ref, credentials or from_host, from_host is not None)
        pulled_at = time.time()
        image = await self.inspect(ref, fresh=True)
        if image is None and previous is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"Docker pulled {ref} but does not list it")
        image = image or previous
        assert image is not None
        if credentials is not None and (previous is None or image["Id"] != previous["Id"]):
            await self.guard.protect(repo, image, credentials)
        self._pulled[ref] = (image["Id"], pulled_at)
        return Current(image, pulled_at)

    async def _pull(
        self, repo: Repository, ref: str, credentials: Credentials | None, from_host: bool
    ) -> None:
        started, outcome = time.monotonic(), "failed"
        if from_host:
            log.info("pulling %s with the host's Docker credentials for %s", ref, repo.domain)
        try:
            async with self.transfers.track(Transfer("pull", ref)) as transfer:
                await self.docker.pull(ref, credentials, transfer)
            outcome = "ok"
        except PullDenied as exc:
            outcome = "denied"
            if credentials is None or from_host:
                # The normal handshake: containerd asks anonymously first, and retries with the pod's
                # pull secret after this challenge (the host's credentials were not enough either).
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
            self.metrics.pulls.labels(outcome).observe(time.monotonic() - started)
