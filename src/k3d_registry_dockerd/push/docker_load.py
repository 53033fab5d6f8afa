"""Loads a pushed image into dockerd (`POST /images/load`), so `docker images` and `docker run` see it.

The archive has the shape Docker >= 25's `docker save` writes: an OCI layout (what the containerd image
store and Podman read, named by the ``index.json`` annotations) plus the legacy ``manifest.json`` (what the
classic store and Docker < 25 read, named by ``RepoTags``). Layers go in as pushed, gzip or not: every
loader decompresses what it gets and checks it against the config's diff_ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from ..cache.store import Store
from ..docker.engine import DockerClient, DockerFailed
from ..oci.mediatypes import IMAGE_CONFIG_TYPES, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from ..oci.platform import Platform, platform_text
from ..oci.reference import Digest, split_repo_tag

log = logging.getLogger(__package__)

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
# Blobs are read into the archive this much at a time, off the event loop.
CHUNK = 1 << 20
_MTIME = 0  # fixed, like the content: the same image gives the same archive


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _exact(platform: Platform, candidate: dict[str, Any]) -> bool:
    """Variants equal too (`Platform.matches` lets a missing variant match any)."""
    default = "v8" if platform.architecture == "arm64" else None
    return (platform.variant or default) == (candidate.get("variant") or default)


def loadable_manifest(
    read_blob: Callable[[str], bytes | None], digest: str, media_type: str, platform: Platform
) -> tuple[str | None, str]:
    """The digest of the one image manifest to load for a pushed manifest or index, else (None, why).

    Docker runs only images of its own platform and has no use for artifacts (signatures, SBOMs, oras
    pushes); loading those would fail or leave an unusable image, so they are skipped with a reason.
    """
    raw = read_blob(digest)
    if raw is None:
        return None, f"manifest {digest} is not in the store"
    data = _json(raw)
    if data is None:
        return None, f"manifest {digest} is not a JSON object"
    media_type = data.get("mediaType") or media_type
    if media_type in INDEX_TYPES:
        children = [c for c in data.get("manifests") or [] if isinstance(c, dict)]
        matching = [
            c
            for c in children
            if c.get("mediaType", media_type) in MANIFEST_TYPES and platform.matches(c.get("platform"))
        ]
        if not matching:
            listed = ", ".join(platform_text(c.get("platform")) for c in children) or "nothing"
            return None, f"the index has no image for {platform} (it lists {listed})"
        child = next((c for c in matching if _exact(platform, c["platform"])), matching[0])
        if read_blob(child["digest"]) is None:
            return None, f"its manifest for {platform} ({child['digest']}) is not in the store"
        return loadable_manifest(read_blob, child["digest"], child["mediaType"], platform)
    if media_type not in MANIFEST_TYPES:
        return None, f"not an image manifest ({media_type})"
    config = data.get("config") or {}
    if config.get("mediaType") not in IMAGE_CONFIG_TYPES:
        return None, f"not a container image (config {config.get('mediaType')})"
    config_raw = read_blob(config.get("digest", ""))
    image = _json(config_raw) if config_raw is not None else None
    if image is None:
        return None, f"its config {config.get('digest')} is not in the store or not JSON"
    if not platform.matches(image):
        return None, f"a foreign platform {platform_text(image)}"
    return digest, ""


def _header(name: str, size: int | None) -> bytes:
    """A tar header (a directory when `size` is None); tarfile encodes it, PAX only where USTAR can't."""
    info = tarfile.TarInfo(name)
    info.mtime = _MTIME
    if size is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def _open_blob(path: Path) -> tuple[IO[bytes], int]:
    handle = path.open("rb")
    return handle, os.fstat(handle.fileno()).st_size


def _image_blobs(raw: bytes | None) -> tuple[dict[str, Any], list[str]]:
    """A stored image manifest and the digests it needs: itself aside, config then layers (maybe repeated)."""
    manifest = _json(raw) if raw is not None else None
    if manifest is None or not isinstance(manifest.get("config"), dict):
        raise ValueError("not an image manifest in the store")
    return manifest, [manifest["config"]["digest"], *(d["digest"] for d in manifest.get("layers", []))]


def _missing_blobs(store: Store, manifest_digest: str) -> list[str]:
    _manifest, needed = _image_blobs(store.read_blob(manifest_digest))
    return [digest for digest in dict.fromkeys(needed) if not store.has_blob(digest)]


def _repo_tag(ref: str) -> tuple[str, str]:
    """The fully qualified form of ``name:tag``, and the tag."""
    parsed = split_repo_tag(ref)
    if parsed is None:
        raise ValueError(f"{ref!r} is not a name:tag reference")
    name, tag = parsed
    return f"{name}:{tag}", tag


async def image_archive(store: Store, manifest_digest: str, ref: str) -> AsyncIterator[bytes]:
    """Streams an image as a `docker save` tar, reading blobs in CHUNK pieces off the event loop."""
    full_ref, tag = _repo_tag(ref)
    raw = await asyncio.to_thread(store.read_blob, manifest_digest)
    if raw is None:
        raise FileNotFoundError(f"{ref}: manifest {manifest_digest} is not in the store")
    manifest, (config, *layers) = _image_blobs(raw)
    # Checked before the first byte: Docker would otherwise get a truncated archive and a vaguer error.
    missing = await asyncio.to_thread(_missing_blobs, store, manifest_digest)
    if missing:
        raise FileNotFoundError(f"{ref}: blobs {', '.join(missing)} are not in the store")
    blobs = list(dict.fromkeys([manifest_digest, config, *layers]))

    def member(digest: str) -> str:
        return f"blobs/sha256/{Digest.parse(digest).hex}"

    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": manifest.get("mediaType") or OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(raw),
                "annotations": {
                    # The containerd store keeps this name verbatim (a familiar one would never be found
                    # again); Podman reads it too.
                    "io.containerd.image.name": full_ref,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    # Docker's classic loaders accept either form; Podman reading this as a docker-archive would make a
    # familiar name `localhost/…`, so the qualified one it is (Docker still lists the familiar form).
    legacy = [{"Config": member(config), "RepoTags": [full_ref], "Layers": [member(d) for d in layers]}]
    metadata = {
        "index.json": json.dumps(index).encode(),
        "manifest.json": json.dumps(legacy).encode(),
        "oci-layout": OCI_LAYOUT,
    }

    offset = 0
    for directory in ("blobs/", "blobs/sha256/"):
        header = _header(directory, None)
        offset += len(header)
        yield header
    for digest in blobs:
        handle, size = await asyncio.to_thread(_open_blob, store.blob_path(Digest.parse(digest)))
        try:
            header = _header(member(digest), size)
            yield header
            remaining = size
            while remaining:
                chunk = await asyncio.to_thread(handle.read, min(CHUNK, remaining))
                if not chunk:
                    raise OSError(f"blob {digest} ended {remaining} bytes short of its {size}")
                remaining -= len(chunk)
                yield chunk
        finally:
            handle.close()
        padding = _padding(size)
        offset += len(header) + size + len(padding)
        yield padding
    for name, data in metadata.items():
        block = _header(name, len(data)) + data + _padding(len(data))
        offset += len(block)
        yield block
    # Two zero blocks end the archive; like tarfile, fill up the last record.
    end = 2 * tarfile.BLOCKSIZE
    yield tarfile.NUL * (end + -(offset + end) % tarfile.RECORDSIZE)


async def load_into_docker(
    store: Store, docker: DockerClient, ref: str, digest: str, media_type: str
) -> str | None:
    """Loads a pushed manifest or index into Docker as `ref`; Docker's image ID, or None when skipped."""
    info = await docker.daemon()
    chosen, reason = await asyncio.to_thread(
        loadable_manifest, store.read_blob, digest, media_type, info.platform
    )
    if chosen is not None:
        missing = await asyncio.to_thread(_missing_blobs, store, chosen)
        if missing:
            # Non-distributable layers (`urls`) may be referenced without ever being pushed.
            chosen, reason = None, f"blobs {', '.join(missing)} are not in the store"
    if chosen is None:
        log.info("not loading %s into Docker: %s", ref, reason)
        return None
    await docker.load(image_archive(store, chosen, ref))
    image = await docker.inspect(ref)
    if image is None:
        raise DockerFailed(f"Docker reported loading {ref} but has no image by that name")
    log.info("loaded %s into Docker as %s", ref, image["Id"])
    return str(image["Id"])


class Loads:
    """Pushed images being loaded into Docker, by Docker reference: loads of one reference run in push order,
    and while one runs, the pushed manifest is what the tag is served as (the mirror asks `ref in loads`)."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __contains__(self, ref: object) -> bool:
        return ref in self._tasks

    def start(self, ref: str, load: Callable[[asyncio.Task[None] | None], Awaitable[None]]) -> None:
        """Runs `load` (given the load of `ref` still running, to wait for) in the background."""
        task = asyncio.ensure_future(load(self._tasks.get(ref)))
        self._tasks[ref] = task
        task.add_done_callback(lambda done: self._done(ref, done))

    def _done(self, ref: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(ref) is task:
            del self._tasks[ref]
        if not task.cancelled() and task.exception() is not None:
            log.error("loading %s into Docker failed", ref, exc_info=task.exception())

    async def settled(self, ref: str) -> None:
        """Returns once the load of `ref` running now (if any) is over, however it ended."""
        task = self._tasks.get(ref)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def idle(self) -> None:
        """Returns once no load runs, loads started meanwhile included."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
