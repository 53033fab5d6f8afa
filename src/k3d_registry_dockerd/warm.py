"""`k3d-registry-dockerd warm`: makes images ready in a running registry before a cluster asks for them.

Each image is asked for exactly as a node's first pull asks (containerd's mirror request,
`/v2/<name>/manifests/<reference>?ns=<registry>`), so the registry does what that pull would make it do:
pull through Docker when Docker lacks the image, export it, cache it. A few at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from .oci.errors import RegistryError
from .oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from .oci.reference import Digest, docker_name, parse_repository, parse_tag

DEFAULT_REGISTRY = "http://localhost:5000"
DEFAULT_PARALLEL = 3
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
# A cold pull of a large image through Docker takes minutes; only connecting must be quick.
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)


@dataclass(frozen=True)
class Target:
    """An image as given, and the mirror request a node makes for it."""

    image: str
    ns: str
    name: str
    reference: str


@dataclass(frozen=True)
class Outcome:
    target: Target
    seconds: float
    digest: str | None = None
    # Why it failed, in one sentence; None when the image is ready.
    problem: str | None = None


class RegistryUnreachable(Exception):
    """Nothing answers at the registry's URL."""


def target(image: str) -> Target:
    """Docker's reading of an image reference: `nginx` is `docker.io/library/nginx:latest`, a digest wins
    over a tag. Raises RegistryError for what no registry could hold."""
    text = image.strip()
    name, at, digest = text.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, _, tag = name.rpartition(":")
    reference = str(Digest.parse(digest)) if at else parse_tag(tag or "latest")
    domain, _, path = docker_name(name).partition("/")
    parse_repository(path, domain)
    return Target(text, domain, path, reference)


def _reason(status: int, body: bytes) -> str:
    try:
        error = (json.loads(body).get("errors") or [])[0]
        message = str(error.get("message") or error.get("code"))
        # Docker's own words, when the registry passed them on.
        if isinstance(error.get("detail"), str) and error["detail"]:
            message = f"{message}: {error['detail']}"
    except (ValueError, AttributeError, IndexError, TypeError):
        message = body[:200].decode(errors="replace").strip() or "no reason given"
    return f"{status}: {message}"


async def _warm(session: aiohttp.ClientSession, base: str, wanted: Target) -> Outcome:
    started = time.monotonic()
    url = f"{base}/v2/{wanted.name}/manifests/{wanted.reference}"
    try:
        async with session.get(url, params={"ns": wanted.ns}, headers={"Accept": ACCEPT}) as response:
            body = await response.read()
            seconds = time.monotonic() - started
            if response.status == 200:
                return Outcome(wanted, seconds, digest=response.headers.get("Docker-Content-Digest"))
            return Outcome(wanted, seconds, problem=_reason(response.status, body))
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome(wanted, time.monotonic() - started, problem=f"the request failed: {exc}")


async def _reachable(session: aiohttp.ClientSession, base: str) -> None:
    try:
        async with session.get(f"{base}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as response:
            await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise RegistryUnreachable(
            f"cannot reach the registry at {base}: {exc or type(exc).__name__}"
        ) from exc


async def warm(
    images: list[str],
    *,
    registry: str = DEFAULT_REGISTRY,
    parallel: int = DEFAULT_PARALLEL,
    report: Callable[[Outcome], None] = lambda _outcome: None,
) -> list[Outcome]:
    """Warms every image, `parallel` at a time, reporting each outcome as it comes; the outcomes in the
    order given. Invalid references fail without a request."""
    base = registry.rstrip("/")
    outcomes: dict[int, Outcome] = {}
    wanted: dict[int, Target] = {}
    for number, image in enumerate(images):
        try:
            wanted[number] = target(image)
        except RegistryError as exc:
            outcomes[number] = Outcome(
                Target(image, "", "", ""), 0.0, problem=f"not an image reference: {exc}"
            )
            report(outcomes[number])
    slots = asyncio.Semaphore(max(1, parallel))
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
        await _reachable(session, base)

        async def one(number: int, item: Target) -> None:
            async with slots:
                outcomes[number] = await _warm(session, base, item)
            report(outcomes[number])

        async with asyncio.TaskGroup() as group:
            for number, item in wanted.items():
                group.create_task(one(number, item))
    return [outcomes[number] for number in range(len(images))]
