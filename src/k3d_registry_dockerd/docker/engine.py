"""The Docker Engine API as this registry needs it: version, inspect, pull with credentials, save, load, and
the build of the registry's own image.

Failures are turned into a few exception types the mirror can act on; Docker's own message is kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError, DockerStreamError
from aiodocker.utils import compose_auth_header

from ..common import units
from ..common.progress import Transfer
from ..oci.platform import Platform
from .endpoint import DockerEndpoint, resolve_endpoint

log = logging.getLogger(__package__)

# Engine API 1.48 (Docker 28) added the `platform` parameter to image save.
SAVE_PLATFORM_API = (1, 48)
_CONNECTION_ERROR_STATUS = 900  # aiodocker's status for "could not reach the daemon"


class DockerUnavailable(Exception):
    """dockerd cannot be reached (or went away mid-request)."""


class DockerFailed(Exception):
    """dockerd answered an API call with an error (its message is kept)."""


class PullDenied(Exception):
    """The upstream registry refused the pull for lack of (valid) credentials."""


class PullNotFound(Exception):
    """The upstream registry has no such image."""


class PullFailed(Exception):
    """Any other pull failure (upstream unreachable, rate limited, ...)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    # An OAuth refresh token a credential helper stored instead of a password.
    identity_token: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    def registry_auth(self) -> dict[str, str]:
        """Docker's X-Registry-Auth fields for these credentials."""
        if self.identity_token:
            return {"identitytoken": self.identity_token}
        return {"username": self.username, "password": self.password}


@dataclass(frozen=True)
class DaemonInfo:
    server_version: str
    api_version: str
    platform: Platform
    storage_driver: str
    containerd_store: bool
    # "Docker Engine", or "Podman Engine" behind Podman's compatible API.
    product: str = "Docker Engine"
    # The containerd Docker uses and the namespace of its containers and images (API >= 1.46).
    containerd_address: str | None = None
    containerd_namespace: str | None = None
    # Where the daemon keeps its data (`DockerRootDir`; Podman: its storage's graph root), on its side.
    root_dir: str | None = None
    # `OperatingSystem` as the daemon reports it ("Docker Desktop" in Docker Desktop's VM).
    os_name: str = ""

    @property
    def api(self) -> tuple[int, int]:
        major, _, minor = self.api_version.partition(".")
        return int(major), int(minor)

    @property
    def storage(self) -> str:
        if self.containerd_store:
            return f"containerd image store ({self.storage_driver})"
        return f"classic graph driver ({self.storage_driver})"


_AUTH_MARKERS = (
    "unauthorized",
    "authentication required",
    "no basic auth credentials",
    "pull access denied",
    "access denied",
    "denied:",
    "401 unauthorized",
    "403 forbidden",
)
_NOT_FOUND_MARKERS = ("not found", "manifest unknown", "name unknown", "does not exist")
# What a pull reports when dockerd shuts down under it: it cancels its own work, or (containerd image
# store) the stream writing into its containerd's content store breaks.
_SHUTDOWN_MARKERS = ("client connection is closing", "context canceled", "failed to send write")


def shutting_down(message: str) -> bool:
    """Whether Docker's error says it cancelled the call because it is stopping."""
    return any(marker in message.lower() for marker in _SHUTDOWN_MARKERS)


def classify_pull_error(message: str) -> type[Exception]:
    """Maps Docker's pull error text to what the client should hear.

    Docker Hub says "pull access denied" for missing and private repositories alike, so auth is checked
    first: a challenge lets the cluster retry with its pull secret, and a 404 follows if that fails too.
    """
    text = message.lower()
    if shutting_down(message):
        return DockerUnavailable
    if any(marker in text for marker in _AUTH_MARKERS):
        return PullDenied
    if any(marker in text for marker in _NOT_FOUND_MARKERS):
        return PullNotFound
    return PullFailed


def failure_reason(exc: BaseException) -> str:
    """Why a call to Docker failed, in words a person can act on: the operating system's or Docker's
    own message, never aiodocker's internal status codes."""
    if isinstance(exc, DockerError) and exc.status == _CONNECTION_ERROR_STATUS and exc.__context__:
        exc = exc.__context__
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, DockerError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        if exc.errno == errno.EACCES:
            return f"{exc.strerror} (run as a user in the docker group, or as root)"
        return exc.strerror
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "Docker closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "Docker's response ended before it was complete"
    return str(exc) or type(exc).__name__


def _product(version: dict[str, Any]) -> str:
    """The engine's name from /version: Docker reports a component "Engine", Podman "Podman Engine"."""
    names = [str(c.get("Name")) for c in version.get("Components") or [] if isinstance(c, dict)]
    if not names or names[0] == "Engine":
        return "Docker Engine"
    return names[0]


class PullEvents:
    """Reads dockerd's pull progress stream (per-layer JSON events) into a Transfer's byte counts."""

    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer
        self.layers: dict[str, tuple[int, int]] = {}
        self.done_layers: set[str] = set()

    def update(self, event: dict[str, Any]) -> None:
        layer, status = event.get("id"), event.get("status", "")
        if layer and status in ("Pull complete", "Already exists"):
            self.done_layers.add(layer)
            total = self.layers.get(layer, (0, 0))[1]
            self.layers[layer] = (total, total)
        detail = event.get("progressDetail") or {}
        if layer and status == "Downloading" and detail.get("total"):
            self.layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
        self.transfer.received = sum(current for current, _ in self.layers.values())
        self.transfer.expected = sum(total for _, total in self.layers.values())


class DockerClient:
    """One long-lived Engine API client; reconnects (and renegotiates the API version) by itself.

    The endpoint is resolved once, as the docker CLI would (see endpoint.py), and handed to aiodocker with
    a connector of our own, so aiodocker's own guesses (other socket paths, environment) never apply.
    """

    def __init__(self, endpoint: DockerEndpoint | None = None) -> None:
        self.endpoint = endpoint or resolve_endpoint(os.environ)
        self._docker: aiodocker.Docker | None = None
        self._connector: aiohttp.BaseConnector | None = None
        self._info: DaemonInfo | None = None
        # Docker's facts when it last answered, kept while it is away.
        self.last_info: DaemonInfo | None = None

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            socket_path = self.endpoint.socket_path
            if socket_path is not None:
                self._connector = aiohttp.UnixConnector(socket_path)
            else:
                self._connector = aiohttp.TCPConnector(ssl=self.endpoint.ssl_context() or True)
            # "auto" asks the daemon for its API version: Docker 29 refuses < 1.44, Docker 20.10 speaks 1.41.
            self._docker = aiodocker.Docker(
                url=self.endpoint.base_url, connector=self._connector, api_version="auto"
            )
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None
        if self._connector is not None:
            await self._connector.close()
            self._connector = None

    def describe(self) -> str:
        return self.endpoint.describe()

    def _failure(self, exc: BaseException, what: str) -> DockerUnavailable | DockerFailed:
        """What a failed call raises: Docker's refusal (DockerFailed, its words after `what`), or Docker gone
        (not reached, the connection broke, or it cancelled the call because it is stopping)."""
        if (
            isinstance(exc, DockerError)
            and exc.status != _CONNECTION_ERROR_STATUS
            and not shutting_down(exc.message)
        ):
            return DockerFailed(f"{what}: {exc.message}")
        return self._lost(exc)

    @asynccontextmanager
    async def _calling(self, what: str) -> AsyncIterator[aiodocker.Docker]:
        """The client for one call, once Docker's facts are known; its failures raised as `_failure` says."""
        await self.daemon()
        try:
            yield self._client()
        except (DockerError, aiohttp.ClientError, OSError) as exc:
            raise self._failure(exc, what) from exc

    @asynccontextmanager
    async def _opened(self, what: str, path: str, params: dict[str, Any]) -> AsyncIterator[Any]:
        """A streamed response, once Docker answered; only opening it is Docker's failure (`_failure`): what
        goes wrong while the caller reads it (a stream that breaks, a cache that is full) is the caller's."""
        async with contextlib.AsyncExitStack() as stack:
            async with self._calling(what) as client:
                response = await stack.enter_async_context(client._query(path, params=params, timeout=None))
            yield response

    def _lost(self, exc: BaseException) -> DockerUnavailable:
        reason = failure_reason(exc)
        if self._info is not None:
            log.warning("lost contact with Docker at %s: %s", self.describe(), reason)
        self._info = None
        if self._docker is not None:
            self._docker.api_version = "auto"
        return DockerUnavailable(f"Docker is unreachable at {self.describe()}: {reason}")

    async def daemon(self) -> DaemonInfo:
        """Version, API version and storage of the daemon; logged whenever contact is (re)made."""
        if self._info is not None:
            return self._info
        try:
            client = self._client()
            version = await client.version()
            info = await client.system.info()
        except (DockerError, aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, DockerError) and exc.status != _CONNECTION_ERROR_STATUS:
                raise DockerUnavailable(f"Docker at {self.describe()} failed: {failure_reason(exc)}") from exc
            raise self._lost(exc) from exc
        driver_status = dict((row[0], row[1]) for row in info.get("DriverStatus") or [] if len(row) == 2)
        arch = version.get("Arch") or "amd64"
        self._info = DaemonInfo(
            server_version=str(version.get("Version")),
            api_version=str(version.get("ApiVersion")),
            platform=Platform(version.get("Os") or "linux", arch, "v8" if arch == "arm64" else None),
            storage_driver=str(info.get("Driver")),
            containerd_store="snapshotter" in driver_status.get("driver-type", ""),
            product=_product(version),
            containerd_address=(info.get("Containerd") or {}).get("Address") or None,
            containerd_namespace=((info.get("Containerd") or {}).get("Namespaces") or {}).get("Containers")
            or None,
            root_dir=info.get("DockerRootDir") or None,
            os_name=str(info.get("OperatingSystem") or ""),
        )
        self.last_info = self._info
        log.info(
            "%s %s (API %s, %s) at %s, storage: %s",
            self._info.product,
            self._info.server_version,
            self._info.api_version,
            self._info.platform,
            self.describe(),
            self._info.storage,
        )
        return self._info

    async def inspect(self, ref: str) -> dict[str, Any] | None:
        """The image's inspect data, or None when Docker does not have it."""
        async with self._calling(f"inspecting {ref}") as client:
            try:
                return await client.images.inspect(ref)
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise

    async def repo_tags(self, pattern: str | None = None) -> list[str]:
        """Every `name:tag` Docker has (`docker images`), or those matching a `reference` pattern
        (`alpine:*`; Docker and Podman match it against the short and the full name)."""
        # The Engine API's filter (JSON), sent as the event stream's is: aiodocker 0.27's images.list
        # deprecates a JSON string, and pyproject allows releases older than its mapping form.
        params = {"filters": json.dumps({"reference": [pattern]})} if pattern is not None else {}
        async with self._calling("listing images") as client:
            listed = await client._query_json("images/json", params=params)
        return [tag for image in listed for tag in image.get("RepoTags") or []]

    async def tagged_images(self) -> list[tuple[str, str]]:
        """(`name:tag`, image ID) of every tag Docker has, in one call."""
        async with self._calling("listing images") as client:
            listed = await client.images.list()
        return [(tag, str(image.get("Id"))) for image in listed for tag in image.get("RepoTags") or []]

    @asynccontextmanager
    async def image_events(self) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Docker's image events from now on (`docker events --filter type=image`), once the stream is
        open: Docker sends its headers at once, so nothing that happens after entering is missed. The
        stream ending or breaking (dockerd stopped) raises DockerUnavailable."""
        params = {"filters": json.dumps({"type": ["image"]})}
        async with self._opened("following events", "events", params=params) as response:
            yield self._events(response.content)

    async def _events(self, stream: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in stream:
                if line.strip():
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        except (aiohttp.ClientError, OSError) as exc:
            raise self._lost(exc) from exc
        except ValueError as exc:
            raise DockerFailed(f"Docker's event stream is not JSON: {exc}") from exc
        raise self._lost(ConnectionResetError(errno.ECONNRESET, "Docker closed its event stream"))

    async def remove(self, ref: str) -> None:
        """`docker rmi <ref>`: untags it, and deletes the image when that was its last name."""
        async with self._calling(f"removing {ref}") as client:
            await client.images.delete(ref)

    async def pull(self, ref: str, credentials: Credentials | None, transfer: Transfer | None = None) -> None:
        """Pulls through dockerd; its progress stream counts into `transfer`."""
        await self.daemon()
        auth = credentials.registry_auth() if credentials is not None else None
        started = time.monotonic()
        log.info("pulling %s through Docker%s", ref, " with credentials" if credentials else "")
        events = PullEvents(transfer or Transfer("pull", ref))
        async with self._calling(f"pulling {ref}") as client:
            try:
                async for event in client.images.pull(ref, auth=auth, stream=True):
                    events.update(event)
            except (DockerStreamError, DockerError) as exc:
                # Docker's words say whether the upstream refused, lacks the image, or failed otherwise.
                if isinstance(exc, DockerStreamError) or exc.status != _CONNECTION_ERROR_STATUS:
                    kind = classify_pull_error(exc.message)
                    if kind is not DockerUnavailable:
                        raise kind(exc.message) from exc
                raise
        log.info("pulled %s in %s", ref, units.duration(time.monotonic() - started))

    async def check_pull_access(self, ref: str, domain: str, credentials: Credentials) -> None:
        """Returns when the registry lets these credentials pull `ref` (a digest reference), asked through
        Docker; raises PullDenied, PullNotFound or PullFailed with Docker's words otherwise.

        Docker's distribution lookup (`GET /distribution/<ref>/json`) asks the registry every time and
        stores nothing, where a pull by digest of an image Docker holds is answered from its own store on
        the classic store. Podman has no such lookup: there it is a pull by digest, which moves no tag."""
        info = await self.daemon()
        if info.product.startswith("Podman"):
            await self.pull(ref, credentials)
            return
        header = compose_auth_header(credentials.registry_auth(), domain)
        async with self._calling(f"looking up {ref}") as client:
            try:
                await client._query_json(f"distribution/{ref}/json", headers={"X-Registry-Auth": header})
            except DockerError as exc:
                kind = {401: PullDenied, 403: PullDenied, 404: PullNotFound}.get(exc.status)
                if kind is None and exc.status != _CONNECTION_ERROR_STATUS:
                    kind = classify_pull_error(exc.message)
                if kind is None or kind is DockerUnavailable:
                    raise
                raise kind(exc.message) from exc

    @asynccontextmanager
    async def save(self, ref: str, platform: Platform | None) -> AsyncIterator[aiohttp.StreamReader]:
        """The `docker save` tar stream of one image; only `platform` where the engine can filter."""
        info = await self.daemon()
        params: dict[str, Any] = {}
        if platform is not None and info.api >= SAVE_PLATFORM_API:
            params["platform"] = platform.as_json()
        # aiodocker's export_image takes no query parameters; its _query is the same request path.
        async with self._opened(f"saving {ref}", f"images/{ref}/get", params=params) as response:
            yield response.content

    async def build(self, context: BinaryIO, tag: str, buildargs: dict[str, str]) -> AsyncIterator[str]:
        """`docker build` of a tar build context, as the Engine API's build endpoint runs it (the classic
        builder): its output lines as they come; a failed step raises DockerFailed with Docker's words."""
        async with self._calling(f"building {tag}") as client:
            events = client.images.build(
                fileobj=context, encoding="identity", tag=tag, buildargs=buildargs, forcerm=True, stream=True
            )
            async for event in events:
                for line in str(event.get("stream") or "").splitlines():
                    yield line

    async def load(self, archive: AsyncIterator[bytes]) -> str:
        """`docker load` of a tar stream, sent as it is produced; the names (or IDs) Docker reports loaded.

        An error raised by `archive` itself comes out as that error, not as a lost connection (aiohttp
        would wrap it into one).
        """
        await self.daemon()
        client = self._client()
        source_failed: list[BaseException] = []

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in archive:
                    yield chunk
            except BaseException as exc:
                source_failed.append(exc)
                raise

        loaded: list[str] = []
        try:
            # aiodocker's import_image takes no `quiet`; it is this same request. aiohttp streams the body.
            async with client._query(
                "images/load",
                "POST",
                params={"quiet": True},
                data=body(),
                headers={"Content-Type": "application/x-tar"},
                timeout=None,
                chunked=True,
            ) as response:
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        continue
                    if "error" in event or "errorDetail" in event:
                        detail = event.get("errorDetail") or {}
                        raise DockerFailed(f"loading an image: {detail.get('message') or event.get('error')}")
                    for text in str(event.get("stream") or "").splitlines():
                        what, colon, name = text.partition(":")
                        if colon and what.startswith("Loaded image"):
                            loaded.append(name.strip())
        except (DockerError, aiohttp.ClientError, OSError) as exc:
            if source_failed:
                raise source_failed[0] from exc
            raise self._failure(exc, "loading an image") from exc
        except ValueError as exc:
            raise DockerFailed(f"loading an image: Docker answered with something not JSON: {exc}") from exc
        return ", ".join(loaded)
