"""Docker's classic image store (graph drivers overlay2 and vfs) served where it lies: no `docker save`,
nothing copied into our cache.

An image is its config (`image/<driver>/imagedb/content/sha256/<image id>`, the exact bytes: the image
ID is their digest) and its layers, found by chain ID under `image/<driver>/layerdb/sha256/`: the diff
ID, the directory of its files (`cache-id`) and the tar-split record of its original tar. A layer is sent
as that tar, put together as it goes out; the manifest is made as the export path would have it
(`generated`), so the digests are the ones a `docker save` gives.

Bytes are verified: the config when read, each layer while it is sent the first time. A match is kept for
the layer's fingerprint (its record's and files' identities, taken when the image is read), across restarts
(`cache.verified`): a layer whose files changed since is hashed again. A layer whose bytes do not match
makes its image fall back to the export.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache.verified import VerifiedBlobs
from ..common.bounded import BoundedDict
from ..common.flights import SingleFlight
from ..common.hashing import Hashing, file_digest
from ..common.metrics import Metrics
from ..docker.engine import DaemonInfo
from ..oci.errors import RegistryError
from ..oci.mediatypes import OCI_MANIFEST
from ..oci.platform import Platform
from ..oci.reference import Digest, Repository
from . import tarsplit
from .content import Blob, BlobFile, BlobPieces, ServedManifest
from .generated import docker_save_manifest, legacy_manifest
from .pieces import FilePieces, Piece, Pieces, identity
from .storetags import TagRecord, classic_tags

log = logging.getLogger(__package__)
IMAGES_LIMIT = 1024
# Engine API 1.44 (Docker 25): `docker save` writes Docker's own OCI manifest; before, the legacy format.
OCI_SAVE_API = (1, 44)
# Where each graph driver keeps a layer's files: (driver, cache ID) -> path under the root.
DIFF_DIRS = {"overlay2": ("overlay2", "{}", "diff"), "vfs": ("vfs", "dir", "{}")}


@dataclass(frozen=True)
class StoreLayer:
    diff_id: str
    tar: tarsplit.LayerTar
    # What its record and files were when the image was read: a match is kept for exactly these.
    fingerprint: tarsplit.Fingerprint


@dataclass(frozen=True)
class StoreImage:
    """An image as served from its store: the config file, the layers, the manifest made for it."""

    image_id: str
    config: Path
    config_identity: tuple[int, ...]
    manifest: bytes
    digest: str
    layers: dict[str, StoreLayer]


def manifest_for(image_id: str, config_size: int, layers: list[StoreLayer], legacy: bool) -> bytes:
    made = legacy_manifest if legacy else docker_save_manifest
    return made((image_id, config_size), [(layer.diff_id, layer.tar.size) for layer in layers])


def chain_ids(diff_ids: list[str]) -> Iterator[str]:
    """The layer store's keys of an image's layers: each is the digest of its parent's and its diff ID."""
    chain: str | None = None
    for diff_id in diff_ids:
        chain = (
            diff_id
            if chain is None
            else f"sha256:{hashlib.sha256(f'{chain} {diff_id}'.encode()).hexdigest()}"
        )
        yield chain


class ImageMismatch(tarsplit.LayerUnservable):
    """A file of the store does not hold what its digest says."""


class StoreImages:
    """Images of a store read where they lie, each served by its manifest, config and layers, with what
    serving them in place needs: repository scoping, verification kept per layer, fallback on mismatch.

    Subclasses read their store's layout (`_read`)."""

    name = "store"
    # Where the daemon records which image each tag names (set by subclasses).
    tag_record: TagRecord

    def __init__(self, root: Path, metrics: Metrics, verified: VerifiedBlobs | None = None) -> None:
        self.root = root
        self.metrics = metrics
        self._images: BoundedDict[str, StoreImage] = BoundedDict(IMAGES_LIMIT)
        # Docker name -> image IDs served under it: what the repository's manifests are.
        self._roots: dict[str, set[str]] = {}
        # Image ID -> why it is exported instead (its files did not hold what they should).
        # (The identity its config file had then: an image removed and pulled again is tried again.)
        self._failed: BoundedDict[str, tuple[str, tuple[int, ...] | None]] = BoundedDict(IMAGES_LIMIT)
        # Layers found to match their diff IDs, by fingerprint, kept across restarts.
        self._verified = verified or VerifiedBlobs(metrics=metrics)
        # Reads of an image's records, shared by the requests that arrive while one runs.
        self._reads = SingleFlight()
        # Layers' records as parsed: reading an image again costs no parse of what is unchanged.
        self._records = tarsplit.ParsedRecords()
        self._hashing = Hashing()

    async def close(self) -> None:
        self._hashing.close()

    def _read(self, image_id: str, info: DaemonInfo) -> StoreImage:
        raise NotImplementedError

    def _config_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def _config_identity(self, image_id: str) -> tuple[int, ...] | None:
        """The identity of the image's config file now (a stat: cheap enough for every request), None when
        the store does not hold it. Every time the image comes into the store the file is written anew."""
        try:
            return identity(self._config_path(image_id).stat())
        except (OSError, RegistryError):
            return None

    def tags_version(self) -> tuple[int, ...] | None:
        """The identity of the daemon's record of its tags (a stat, cheap enough for every request): it
        changes whenever one of its tags does. None when it cannot be read."""
        return self.tag_record.version()

    def stored_at(self, image_id: str) -> float | None:
        """When the image came into the store (pulled, built, loaded): the modification time of its config
        file, which the daemon writes then (blocking); None when the store does not hold it."""
        try:
            return self._config_path(image_id).stat().st_mtime
        except (OSError, RegistryError):
            return None

    def _read_config(self, path: Path, image_id: str) -> tuple[bytes, os.stat_result, list[str]]:
        """The image's config (it must hash to the image ID), its file's stat and its layers' diff IDs."""
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                config = handle.read()
        except OSError as exc:
            raise tarsplit.LayerUnservable(f"its config cannot be read ({exc.strerror})") from exc
        if f"sha256:{hashlib.sha256(config).hexdigest()}" != image_id:
            self.metrics.digest_mismatches.inc()
            raise ImageMismatch(f"its config {path} does not hash to the image ID")
        try:
            return config, stat, [str(d) for d in json.loads(config)["rootfs"]["diff_ids"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise tarsplit.LayerUnservable(f"its config has no rootfs.diff_ids: {exc}") from exc

    async def _image(self, repo: Repository | None, image_id: str, info: DaemonInfo) -> StoreImage | None:
        """The image as read from the store (once), now served under `repo` too (RegistryError as
        `_read_now`). Read to verify it ahead (no `repo`), it is not kept: a client's first request reads it
        again, so a layer whose files changed since it was verified ahead has another fingerprint and is
        hashed again."""
        now = self._config_identity(image_id)
        found = self._images.get(image_id)
        if found is not None and now != found.config_identity:
            # Removed and pulled (built, loaded) again: the same ID, but layers in new directories.
            log.info("%s came back into the store: reading it again", image_id)
            del self._images[image_id]
            found = None
        failed = self._failed.get(image_id)
        if failed is not None and failed[1] != now:
            del self._failed[image_id]
        if found is None and image_id not in self._failed:
            found = await self._read_now(image_id, info, now)
            if found is None:
                return None
            if repo is not None:
                self._images[image_id] = found
        if found is not None and repo is not None:
            self._roots.setdefault(repo.docker_name, set()).add(image_id)
        return found

    async def verify_ahead(
        self, ref: str, image: dict[str, Any], info: DaemonInfo, idle: Callable[[], Awaitable[None]]
    ) -> int:
        """Hashes the layers of Docker's `image` not verified yet, one after another, each once `idle`
        returns; how many were hashed."""
        try:
            found = await self._image(None, str(image["Id"]), info)
        except RegistryError:  # gone from the store meanwhile
            return 0
        if found is None:
            return 0
        hashed = 0
        for layer in found.layers.values():
            if self._done(layer):
                continue
            await idle()
            # A client's pull may have verified it meanwhile.
            if self._done(layer):
                continue
            try:
                matched = await self._verify_layer(found, layer)
            except OSError as exc:
                log.info("verifying %s of %s ahead stopped: %s", layer.diff_id, ref, exc.strerror or exc)
                return hashed
            hashed += 1
            if not matched:
                break
        return hashed

    async def _read_now(
        self, image_id: str, info: DaemonInfo, before: tuple[int, ...] | None
    ) -> StoreImage | None:
        """The image read from the store, whose config file had the identity `before` just now; None when
        it cannot be served from there (so it is exported). An image removed or pulled again while it was
        read (`docker rmi`, a prune, a re-pull: its files go or move) is no reason to export it: one that
        came back is read again, one that is gone is MANIFEST_UNKNOWN, as Docker would now answer."""
        for _attempt in range(2):
            try:
                return await self._reads.run(image_id, lambda: asyncio.to_thread(self._read, image_id, info))
            except tarsplit.LayerUnservable as exc:
                after = self._config_identity(image_id)
                if after is None and self.tag_record.version() is not None:
                    log.info("%s left %s while it was read (%s)", image_id, self.name, exc)
                    raise RegistryError(
                        "MANIFEST_UNKNOWN", f"image {image_id} was removed from the daemon's store"
                    ) from exc
                if after is None or after == before:
                    self._give_up(image_id, str(exc))
                    return None
                log.info("%s came back into the store while it was read: reading it again", image_id)
                before = after
        self._give_up(image_id, "it changed in the store every time it was read")
        return None

    def _give_up(self, image_id: str, why: str) -> None:
        if image_id not in self._failed:
            log.info("%s: not served in place, exported from the daemon instead: %s", image_id, why)
        self._failed[image_id] = why, self._config_identity(image_id)
        self._images.pop(image_id, None)

    def _served(self, image: StoreImage, cold: bool) -> ServedManifest:
        self.metrics.manifest_cache.labels("in_place").inc()
        return ServedManifest(image.digest, OCI_MANIFEST, image.manifest, cold)

    async def by_tag(
        self, repo: Repository, tag: str, image: dict[str, Any], info: DaemonInfo, pulled_at: float | None
    ) -> ServedManifest | None:
        found = await self._image(repo, str(image["Id"]), info)
        return self._served(found, pulled_at is not None) if found is not None else None

    def _serving(self, repo: Repository) -> Iterator[StoreImage]:
        for image_id in list(self._roots.get(repo.docker_name, ())):
            found = self._images.get(image_id)
            if found is not None:
                yield found

    async def by_digest(
        self, repo: Repository, digest: str, image: dict[str, Any] | None, info: DaemonInfo
    ) -> ServedManifest | None:
        for found in self._serving(repo):
            if found.digest == digest:
                return self._served(found, False)
        if image is not None:
            found = await self._image(repo, str(image["Id"]), info)
            if found is not None and found.digest == digest:
                return self._served(found, True)
        return None

    def image_of(self, repo: Repository, digest: str) -> str | None:
        """The ID of the image whose manifest `digest` is served under the repository."""
        return next((found.image_id for found in self._serving(repo) if found.digest == digest), None)

    def tagged(self) -> dict[str, str]:
        """The daemon's own record of its tags, `name:tag` -> image ID, as its files have it now (blocking):
        what a tag names while the daemon cannot be asked."""
        return self.tag_record.tags()

    def holds(self, image_id: str) -> bool:
        """Whether the store still keeps the image (its config file), without reading it (blocking)."""
        return self._config_path(image_id).is_file()

    async def adopt(self, repo: Repository, image_id: str, info: DaemonInfo) -> bool:
        """Serves the image under `repo` from now on, blobs included, as an answer by tag would, if the
        store still keeps it: what the registry served before it restarted is found again this way."""
        if image_id not in self._images and not await asyncio.to_thread(self.holds, image_id):
            return False
        try:
            return await self._image(repo, image_id, info) is not None
        except RegistryError:
            return False

    def foreign_child(self, repo: Repository, digest: str, platform: Platform) -> str | None:
        """Never: these stores keep no indexes."""
        return None

    async def blob(self, repo: Repository, digest: str, info: DaemonInfo | None) -> Blob | None:
        for found in self._serving(repo):
            if digest == found.image_id:
                return self._config(found)
            layer = found.layers.get(digest)
            if layer is not None:
                return self._layer(found, layer)
        return None

    def _config(self, image: StoreImage) -> Blob | None:
        try:
            stat = image.config.stat()
        except FileNotFoundError:
            self._images.pop(image.image_id, None)
            return None
        if identity(stat) == image.config_identity:
            return BlobFile(image.config, image.image_id)

        async def verify() -> bool:
            config = image.config
            matched = await self._hashing.run(lambda: _file_matches(config, image.image_id))
            if not matched:
                self._mismatch(image, None)
            return matched

        return BlobPieces(image.image_id, stat.st_size, functools.partial(FilePieces, image.config), verify)

    def _layer(self, image: StoreImage, layer: StoreLayer) -> BlobPieces:
        loop = asyncio.get_running_loop()

        def lost(exc: OSError) -> None:
            self._lost(image, layer, exc)

        def pieces(start: int, stop: int, inline_below: int | None) -> Pieces:
            return _Watched(layer.tar.reader(start, stop, inline_below), loop, lost)

        verify = None if self._done(layer) else functools.partial(self._verify_layer, image, layer)
        return BlobPieces(layer.diff_id, layer.tar.size, pieces, verify)

    def _done(self, layer: StoreLayer) -> bool:
        return self._verified.verified(layer.diff_id, layer.fingerprint.digest)

    async def _verify_layer(self, image: StoreImage, layer: StoreLayer) -> bool:
        """Whether the layer's files put together hash to its diff ID, hashed once for all who ask at the
        same time (requests and verification ahead)."""

        async def hashed() -> bool:
            # No later than the first byte is read: what a racy match is told by.
            started = time.time_ns()
            try:
                matched = await self._hashing.run(layer.tar.digest) == layer.diff_id
            except OSError as exc:
                self._lost(image, layer, exc)
                raise
            self.metrics.blobs_hashed.inc()
            log.debug(
                "hashed %s where it lies (%s): %s",
                layer.diff_id,
                layer.tar.diff_dir,
                "a match" if matched else "no match",
            )
            fingerprint = layer.fingerprint
            if matched:
                self._verified.matched(layer.diff_id, fingerprint.digest, fingerprint.newest_change, started)
            else:
                self._mismatch(image, layer)
            return matched

        return await self._hashing.once(f"{layer.diff_id} {layer.fingerprint.digest}", hashed)

    def _lost(self, image: StoreImage, layer: StoreLayer, exc: OSError) -> None:
        if self._images.get(image.image_id) is not image:
            return
        log.warning(
            "layer %s of %s is gone from the daemon's store or changed (%s): the next request reads the "
            "image again",
            layer.diff_id,
            image.image_id,
            exc.strerror or exc,
        )
        self._images.pop(image.image_id, None)

    def _mismatch(self, image: StoreImage, layer: StoreLayer | None) -> None:
        what = f"layer {layer.diff_id}" if layer is not None else f"config {image.image_id}"
        self.metrics.digest_mismatches.inc()
        log.error(
            "%s of %s in the daemon's store does not hash to its digest: not served", what, image.image_id
        )
        self._give_up(image.image_id, f"its {what} did not match its digest")


class ClassicContent(StoreImages):
    """Docker's classic store under `root` (DockerRootDir as seen from here), graph driver `driver`."""

    name = "Docker's classic store"

    def __init__(
        self, root: Path, driver: str, metrics: Metrics, verified: VerifiedBlobs | None = None
    ) -> None:
        super().__init__(root, metrics, verified)
        self.driver = driver
        self._image_dir = root / "image" / driver
        self._diff_dir = DIFF_DIRS[driver]
        self.tag_record = TagRecord(self._image_dir / "repositories.json", classic_tags)

    def _config_path(self, image_id: str) -> Path:
        return self._image_dir / "imagedb" / "content" / "sha256" / Digest.parse(image_id).hex

    def _config_path(self, image_id: str) -> Path:
        return self._image_dir / "imagedb" / "content" / "sha256" / Digest.parse(image_id).hex

    def _read(self, image_id: str, info: DaemonInfo) -> StoreImage:
        config_path = self._config_path(image_id)
        config, stat, diff_ids = self._read_config(config_path, image_id)
        layers = [
            self._layer_of(chain, diff_id)
            for chain, diff_id in zip(chain_ids(diff_ids), diff_ids, strict=True)
        ]
        legacy = info.api < OCI_SAVE_API
        manifest = manifest_for(image_id, len(config), layers, legacy)
        return StoreImage(
            image_id,
            config_path,
            identity(stat),
            manifest,
            f"sha256:{hashlib.sha256(manifest).hexdigest()}",
            {layer.diff_id: layer for layer in layers},
        )

    def _layer_of(self, chain: str, diff_id: str) -> StoreLayer:
        record = self._image_dir / "layerdb" / "sha256" / Digest.parse(chain).hex
        try:
            recorded = (record / "diff").read_text().strip()
            cache_id = (record / "cache-id").read_text().strip()
        except OSError as exc:
            raise tarsplit.LayerUnservable(
                f"layer {diff_id} has no record in {record} ({exc.strerror})"
            ) from exc
        if recorded != diff_id or not cache_id or "/" in cache_id:
            raise tarsplit.LayerUnservable(f"layer record {record} is not that of {diff_id}")
        diff_dir = self.root.joinpath(*(part.format(cache_id) for part in self._diff_dir))
        tar = self._records.read(record / "tar-split.json.gz", diff_dir)
        return StoreLayer(diff_id, tar, tar.check())


def _file_matches(path: Path, digest: str) -> bool:
    with open(path, "rb") as handle:
        return file_digest(handle, os.fstat(handle.fileno()).st_size) == digest


class _Watched:
    """A layer's pieces that tell their source, on the event loop, when a file is gone or changed."""

    def __init__(self, pieces: Pieces, loop: asyncio.AbstractEventLoop, lost: Callable[[OSError], None]):
        self._pieces = pieces
        self._loop = loop
        self._lost = lost

    def close(self) -> None:
        self._pieces.close()

    @property
    def done(self) -> bool:
        return self._pieces.done

    def next(self, limit: int, max_files: int = 8) -> list[Piece]:
        try:
            return self._pieces.next(limit, max_files)
        except OSError as exc:
            self._loop.call_soon_threadsafe(self._lost, exc)
            raise
