"""Where an image's bytes come from: one small interface, and its implementations.

- `exported.ExportedContent`: images exported from Docker (`docker save`) into our own cache, and pushes.
- `containerd.ContainerdContent`: Docker's containerd image store, read where it lies.
- `classic.ClassicContent`: Docker's classic graph-driver store (overlay2), read where it lies.

`Mirror` decides what Docker's image is (freshness, pulls) and asks the sources in turn; the HTTP layer
only sees `ServedManifest` and a `Blob` (a file, or a stream assembled as it is sent), never which source
answered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..docker.engine import DaemonInfo
from ..oci.reference import Repository


@dataclass(frozen=True)
class ServedManifest:
    digest: str
    media_type: str
    body: bytes
    # Docker had to pull or export for this answer (a warm one came from the cache as it was).
    cold: bool = False


@dataclass(frozen=True)
class BlobFile:
    """A blob to send from a file."""

    path: Path
    digest: str
    # None when the file is known to hold exactly `digest`'s bytes. Otherwise the bytes are hashed as
    # they are sent and this is told the outcome (with the opened file's stat), so it is done only once.
    verified: Callable[[bool, os.stat_result], None] | None = None


@dataclass(frozen=True)
class BlobStream:
    """A blob assembled as it is sent, such as a layer's tar from the files its store keeps."""

    digest: str
    size: int
    # The blob's bytes from an offset on, in chunks (blocking: run in a thread of its own). A file that
    # is gone or changed raises OSError mid-stream.
    chunks: Callable[[int], Iterator[bytes]]
    # None when the stream is known to hash to `digest`. Otherwise it is hashed as it is sent, and this is
    # told the outcome, so it is done only once.
    verified: Callable[[bool], None] | None = None


Blob = BlobFile | BlobStream


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
