"""A fake of the DockerClient surface the registry uses: daemon, inspect, list, pull, save, load, remove,
image events."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from k3d_registry_dockerd.docker.endpoint import DockerEndpoint
from k3d_registry_dockerd.docker.engine import (
    Credentials,
    DaemonInfo,
    DockerUnavailable,
    PullDenied,
    PullNotFound,
)
from k3d_registry_dockerd.oci.platform import Platform
from k3d_registry_dockerd.oci.reference import split_repo_tag

from .saves import Image, classic_save, make_image


@dataclass
class LocalImage:
    """An image Docker has: its ID and the bytes `docker save` streams for it."""

    id: str
    save: bytes
    image: Image | None = None
    # More of Docker's inspect answer (e.g. the containerd image store's Descriptor).
    inspect: dict[str, Any] = field(default_factory=dict)


def local_image(seed: str, name: str) -> LocalImage:
    """An image whose save stream is the classic-store OCI layout, annotated with `name`."""
    image = make_image(seed)
    image_id = f"sha256:{hashlib.sha256(seed.encode()).hexdigest()}"
    return LocalImage(id=image_id, save=classic_save(image, name), image=image)


def familiar(ref: str) -> str:
    """Docker names Hub images in their short form in listings and events."""
    return ref.removeprefix("docker.io/").removeprefix("library/")


class _Images(dict[str, LocalImage]):
    """What Docker has: each change is reported on the image event stream, as Docker reports every one
    (the registry gives Docker's answers again until an event says something changed)."""

    def __init__(self, changed: Any, images: dict[str, LocalImage]) -> None:
        super().__init__(images)
        self._changed = changed

    def __setitem__(self, ref: str, image: LocalImage) -> None:
        super().__setitem__(ref, image)
        self._changed()

    def __delitem__(self, ref: str) -> None:
        super().__delitem__(ref)
        self._changed()

    def pop(self, ref: str, *default: Any) -> Any:
        found = super().pop(ref, *default)
        self._changed()
        return found

    def clear(self) -> None:
        super().clear()
        self._changed()


@dataclass
class FakeDocker:
    """`images` is what Docker has (by full reference), `upstream` what a pull would fetch."""

    platform: Platform = field(default_factory=lambda: Platform("linux", "amd64"))
    containerd_store: bool = False
    images: dict[str, LocalImage] = field(default_factory=dict)
    upstream: dict[str, LocalImage] = field(default_factory=dict)
    unavailable: bool = False
    pull_error: Exception | None = None
    # What an inspect raises instead of answering (Podman's 500 while it prunes, say).
    inspect_error: Exception | None = None
    # Docker name -> the only credentials its upstream accepts (a private repository).
    private: dict[str, Credentials] = field(default_factory=dict)
    save_error: Exception | None = None
    # When set, save() waits for it before streaming (to hold an export in flight).
    save_gate: asyncio.Event | None = None
    inspects: list[str] = field(default_factory=list)
    # The `reference` pattern of each image listing (None: everything).
    listings: list[str | None] = field(default_factory=list)
    pulls: list[tuple[str, Credentials | None]] = field(default_factory=list)
    access_checks: list[tuple[str, Credentials]] = field(default_factory=list)
    saves: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    # How often the image event stream was opened, and the streams open now.
    event_streams: int = 0
    _event_queues: list[asyncio.Queue[dict[str, Any] | Exception]] = field(default_factory=list)

    # Docker's facts when it last answered.
    last_info: DaemonInfo | None = None
    endpoint: DockerEndpoint = field(
        default_factory=lambda: DockerEndpoint("unix:///fake.sock", "default", "default")
    )
    # "Podman Engine" for Podman's compatible API.
    product: str = "Docker Engine"

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "images":
            value = _Images(lambda: self.emit("change", ""), value)
        super().__setattr__(name, value)
        if name == "unavailable" and value:
            # Docker going away breaks its event stream.
            self.break_event_streams()

    def describe(self) -> str:
        return "unix:///fake.sock (default)"

    async def close(self) -> None:
        pass

    async def daemon(self) -> DaemonInfo:
        if self.unavailable:
            raise DockerUnavailable("Docker is unreachable at unix:///fake.sock (default): fake is down")
        self.last_info = DaemonInfo(
            "27.5.1", "1.47", self.platform, "overlay2", self.containerd_store, product=self.product
        )
        return self.last_info

    async def repo_tags(self, pattern: str | None = None) -> list[str]:
        self.listings.append(pattern)
        listed = [ref for ref, _ in await self.tagged_images()]
        return [ref for ref in listed if pattern is None or fnmatch.fnmatchcase(ref, pattern)]

    async def tagged_images(self) -> list[tuple[str, str]]:
        await self.daemon()
        return [(familiar(ref), image.id) for ref, image in self.images.items()]

    @asynccontextmanager
    async def image_events(self) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        await self.daemon()
        queue: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self._event_queues.append(queue)
        self.event_streams += 1

        async def stream() -> AsyncIterator[dict[str, Any]]:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item

        try:
            yield stream()
        finally:
            self._event_queues.remove(queue)

    def emit(self, action: str, name: str, image_id: str = "") -> None:
        """An image event as Docker sends it: `name` is a reference, or an image ID."""
        event = {
            "Type": "image",
            "Action": action,
            "Actor": {"ID": image_id or name, "Attributes": {"name": name}},
        }
        for queue in self._event_queues:
            queue.put_nowait(event)

    def retag(self, ref: str, image: LocalImage) -> None:
        """`docker build -t` or `docker tag`: the reference now names `image`, and Docker says so."""
        self.images[ref] = image
        self.emit("tag", familiar(ref), image.id)

    def break_event_streams(self) -> None:
        """dockerd going away: every open event stream breaks."""
        for queue in self._event_queues:
            queue.put_nowait(DockerUnavailable("Docker is unreachable at unix:///fake.sock: it stopped"))

    async def inspect(self, ref: str) -> dict[str, Any] | None:
        await self.daemon()
        self.inspects.append(ref)
        if self.inspect_error is not None:
            raise self.inspect_error
        # Docker finds an image by its familiar name too (`app:dev` is docker.io/library/app:dev).
        named = split_repo_tag(ref)
        found = self.images.get(ref) or (self.images.get(f"{named[0]}:{named[1]}") if named else None)
        return {"Id": found.id, "RepoTags": [ref], **found.inspect} if found else None

    async def pull(self, ref: str, credentials: Credentials | None, on_event: Any = None) -> None:
        await self.daemon()
        self.pulls.append((ref, credentials))
        if self.pull_error is not None:
            raise self.pull_error
        name = ref.rpartition(":")[0]
        wanted = self.private.get(name)
        if wanted is not None and credentials != wanted:
            raise PullDenied(f"pull access denied for {name}: unauthorized: authentication required")
        if ref not in self.upstream:
            raise PullNotFound(f"manifest for {ref} not found: manifest unknown: manifest unknown")
        pulled = self.upstream[ref]
        if pulled.image is not None:
            pulled.inspect.setdefault("RepoDigests", [f"{name}@{pulled.image.digest}"])
        self.images[ref] = pulled

    async def check_pull_access(self, ref: str, domain: str, credentials: Credentials) -> None:
        self.access_checks.append((ref, credentials))
        await self.daemon()
        name = ref.rpartition("@")[0]
        wanted = self.private.get(name)
        if wanted is not None and credentials != wanted:
            raise PullDenied("unauthorized: authentication required")
        if not any(ref in image.inspect.get("RepoDigests", []) for image in self.images.values()):
            raise PullNotFound(f"manifest for {ref} not found: manifest unknown")

    @asynccontextmanager
    async def save(self, ref: str, platform: Platform | None) -> AsyncIterator[asyncio.StreamReader]:
        await self.daemon()
        self.saves.append(ref)
        if self.save_gate is not None:
            await self.save_gate.wait()
        if self.save_error is not None:
            raise self.save_error
        reader = asyncio.StreamReader()
        reader.feed_data(self.images[ref].save)
        reader.feed_eof()
        yield reader

    async def load(self, archive: AsyncIterator[bytes]) -> str:
        """Keeps the archive as the image's save stream, under the name its index.json gives, with the
        config digest as ID (as the classic store does)."""
        await self.daemon()
        data = b"".join([chunk async for chunk in archive])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
            legacy = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        ref = index["manifests"][0]["annotations"]["io.containerd.image.name"]
        self.loads.append(ref)
        self.images[ref] = LocalImage(id=f"sha256:{legacy[0]['Config'].rpartition('/')[2]}", save=data)
        return ref

    async def remove(self, ref: str) -> None:
        await self.daemon()
        self.removes.append(ref)
        self.images.pop(ref, None)
