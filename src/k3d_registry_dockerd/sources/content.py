"""Where an image's bytes come from: one small interface, and its implementations.

- `exported.ExportedContent`: images exported from Docker (`docker save`) into our own cache, and pushes.
- `containerd.ContainerdContent`: Docker's containerd image store, read where it lies.
- `classic.ClassicContent`: Docker's classic graph-driver store (overlay2), read where it lies.

`Mirror` decides what Docker's image is (freshness, pulls) and asks the sources in turn; the HTTP layer
only sees `ServedManifest` and a `Blob` (a verified file, or pieces put together as they are sent), never
which source answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..docker.engine import DaemonInfo
from ..oci.reference import Repository
from .pieces import Pieces


@dataclass(frozen=True)
class ServedManifest:
    digest: str
    media_type: str
    body: bytes
    # Docker had to pull or export for this answer (a warm one came from the cache as it was).
    cold: bool = False


@dataclass(frozen=True)
class BlobFile:
    """A blob whose file is known to hold exactly its bytes."""

    path: Path
    digest: str


@dataclass(frozen=True)
class BlobPieces:
    """A blob sent as pieces (see `pieces`): a layer's tar put together from its store's files, or a file
    not verified yet."""

    digest: str
    size: int
    # The bytes from `start` to `stop`, files of `inline_below` bytes or more as ranges to send as they lie.
    pieces: Callable[[int, int, int | None], Pieces]
    # None when the bytes are known to hash to `digest`. Otherwise this hashes them (once for the requests
    # asking at the same time, and never again once they matched) and says whether they did; OSError when
    # they could not be read.
    verify: Callable[[], Awaitable[bool]] | None = None


Blob = BlobFile | BlobPieces


class ImageContent(Protocol):
    """The content of Docker's images, as one source holds it."""

    async def by_tag(
        self, repo: Repository, tag: str, image: dict[str, Any], info: DaemonInfo, pulled_at: float | None
    ) -> ServedManifest | None:
        """The manifest Docker's current `image` for the tag is served as; None when this source cannot
        serve it (the next source is asked)."""

    async def by_digest(
        self, repo: Repository, digest: str, image: dict[str, Any] | None, info: DaemonInfo
    ) -> ServedManifest | None:
        """The manifest with this digest, if an image of this repository has it; `image` is what Docker
        resolved the digest reference to, if anything."""

    async def blob(self, repo: Repository, digest: str, info: DaemonInfo | None) -> Blob | None:
        """The blob, if a manifest this repository serves references it and it is here; `info` is Docker's
        facts as last known (None before Docker ever answered)."""
