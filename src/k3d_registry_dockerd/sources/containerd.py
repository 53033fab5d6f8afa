"""Docker's containerd image store served where it lies: no `docker save`, nothing copied into our cache.

containerd says what an image is (its image records, over gRPC, in Docker's namespace) and where its
content store keeps the files (introspection); manifests and blobs are sent from those files, with the
upstream's digests and compressed layers. A manifest is hashed when first read and kept in memory, a blob
hashed the first time it is sent; a match is kept for the file's identity (device, inode, size, times), across
restarts (`cache.verified`): a file containerd wrote again is hashed again.

Measured on a 210 MB image (Docker 28.5, containerd 2.1): containerd's `Content.Read` stream delivers
about 440 MiB/s with hashing, reading the files and hashing them about 850 MiB/s, and sendfile of a
verified file costs next to nothing; so the bytes come from the files and gRPC only answers questions.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..cache.verified import VerifiedBlobs
from ..common.bounded import BoundedDict
from ..common.flights import FreshFlight
from ..common.hashing import Hashing, file_digest
from ..common.metrics import Metrics
from ..docker.containerd import ContainerdClient, ContainerdUnavailable, Descriptor
from ..docker.engine import DaemonInfo
from ..oci.errors import RegistryError
from ..oci.mediatypes import INDEX_TYPES
from ..oci.platform import Platform, foreign_platform
from ..oci.reference import Digest, Repository
from .content import Blob, BlobFile, BlobPieces, ServedManifest
from .pieces import FilePieces, identity
from .plans import ImagePlan, IncompleteImage, Root, plan_manifests

log = logging.getLogger(__package__)
PLAN_LIMIT = 4096
BODY_LIMIT = 1024


class ContainerdContent:
    """The images of one containerd namespace, read from its content store's files under `blobs_dir`."""

    def __init__(
        self,
        client: ContainerdClient,
        blobs_dir: Path,
        metrics: Metrics,
        verified: VerifiedBlobs | None = None,
    ) -> None:
        self.client = client
        self.blobs_dir = blobs_dir
        self.metrics = metrics
        # Root digest -> what of that image is complete enough to serve (content-addressed: it changes
        # only when containerd removes blobs, and then the plan is dropped).
        self._plans: BoundedDict[str, ImagePlan] = BoundedDict(PLAN_LIMIT)
        # Docker name -> root digests resolved for it: what the repository's manifests are.
        self._roots: dict[str, set[str]] = {}
        # Blobs whose files were hashed and matched, by the files' fingerprints, kept across restarts.
        self._verified = verified or VerifiedBlobs(metrics=metrics)
        # Manifest bytes read and verified, by digest: a tag request costs no file read and hash.
        self._bodies: BoundedDict[str, bytes] = BoundedDict(BODY_LIMIT)
        # Image record lookups, shared by the tag requests arriving while one runs (as Docker inspects).
        self._lookups = FreshFlight()
        self._hashing = Hashing()

    async def close(self) -> None:
        self._hashing.close()
        await self.client.close()

    def _path(self, digest: str) -> Path:
        return self.blobs_dir / Digest.parse(digest).hex

    def _read(self, digest: str) -> bytes | None:
        """A manifest's bytes, if present and matching their digest (blocking)."""
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            return None
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            self._mismatch(digest, "a manifest")
            return None
        return data

    def _has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def _mismatch(self, digest: str, what: str) -> None:
        self.metrics.digest_mismatches.inc()
        log.error(
            "%s in containerd's content store (%s) does not match its digest %s: not served",
            what,
            self._path(digest),
            digest,
        )
        self._forget(digest)

    def _forget(self, digest: str) -> None:
        """Drops what was planned from a blob that is gone or wrong: the next request resolves again."""
        self._bodies.pop(digest, None)
        for root, plan in list(self._plans.items()):
            if digest == root or any(
                digest == d or digest in m.references for d, m in plan.manifests.items()
            ):
                del self._plans[root]

    async def _plan(self, target: Descriptor, platform: Platform) -> ImagePlan:
        """What of an image can be served (IncompleteImage when its own platform lacks blobs)."""
        plan = self._plans.get(target.digest)
        if plan is None:
            root = Root(target.digest, target.media_type, target.size)
            plan = await asyncio.to_thread(plan_manifests, root, self._read, self._has, platform)
            self._plans[target.digest] = plan
        return plan

    async def _manifest(self, plan: ImagePlan, digest: str, cold: bool) -> ServedManifest | None:
        body = self._bodies.get(digest)
        if body is None:
            body = await asyncio.to_thread(self._read, digest)
            if body is None:
                self._forget(digest)
                return None
            self._bodies[digest] = body
        self.metrics.manifest_cache.labels("containerd").inc()
        return ServedManifest(digest, plan.manifests[digest].media_type, body, cold)

    async def by_tag(
        self,
        repo: Repository,
        tag: str,
        image: dict[str, Any] | None,
        info: DaemonInfo,
        pulled_at: float | None,
    ) -> ServedManifest | None:
        """Docker's `image` of the tag as containerd's record has it (None: Docker could not be asked)."""
        ref = repo.docker_ref(tag)
        try:
            target = _described(image) or await self._lookups.run(ref, lambda: self.client.image(ref))
        except ContainerdUnavailable as exc:
            log.warning(
                "%s: asking containerd failed, exporting from Docker instead: %s", repo.familiar(tag), exc
            )
            return None
        if target is None and image is None:
            return None
        if target is None:
            log.warning(
                "%s: Docker has it (%s) but containerd's namespace %s has no such image; exporting it",
                repo.familiar(tag),
                image["Id"] if image else "?",
                self.client.namespace,
            )
            return None
        for _attempt in range(2):
            try:
                plan = await self._plan(target, info.platform)
            except IncompleteImage as exc:
                log.info(
                    "%s: containerd's content store lacks blobs of it (%s); exporting it from Docker, "
                    "which makes Docker produce them",
                    repo.familiar(tag),
                    exc,
                )
                return None
            self._roots.setdefault(repo.docker_name, set()).add(target.digest)
            served = await self._manifest(plan, target.digest, pulled_at is not None)
            if served is not None:
                return served
        return None

    async def _repository_plans(
        self, repo: Repository, info: DaemonInfo, *, refresh: bool
    ) -> list[ImagePlan]:
        """Plans of the repository's images: those resolved before, or (`refresh`) every image record
        containerd has under the repository's name."""
        if refresh:
            try:
                records = await self.client.images()
            except ContainerdUnavailable as exc:
                log.warning("listing containerd's images of %s failed: %s", repo.docker_name, exc)
                records = {}
            prefixes = (f"{repo.docker_name}:", f"{repo.docker_name}@")
            for name, target in records.items():
                if not name.startswith(prefixes):
                    continue
                try:
                    await self._plan(target, info.platform)
                except IncompleteImage:
                    continue
                self._roots.setdefault(repo.docker_name, set()).add(target.digest)
        roots = self._roots.get(repo.docker_name, set())
        return [plan for root in list(roots) if (plan := self._plans.get(root)) is not None]

    async def _find(self, repo: Repository, digest: str, info: DaemonInfo, *, blob: bool) -> ImagePlan | None:
        """The plan under this repository that serves `digest` (as a manifest, or any blob of it)."""

        def serves(plan: ImagePlan) -> bool:
            if digest in plan.manifests:
                return True
            return blob and any(digest in m.references for m in plan.manifests.values())

        for refresh in (False, True):
            for plan in await self._repository_plans(repo, info, refresh=refresh):
                if serves(plan):
                    return plan
        return None

    async def by_digest(
        self, repo: Repository, digest: str, image: dict[str, Any] | None, info: DaemonInfo
    ) -> ServedManifest | None:
        if not info.containerd_store:
            return None
        plan = await self._find(repo, digest, info, blob=False)
        if plan is None:
            return None
        return await self._manifest(plan, digest, image is None)

    async def names_of(self, repo: Repository, digest: str) -> list[str]:
        """containerd's image names under this repository whose target is `digest` (Docker's tags of it)."""
        try:
            records = await self.client.images()
        except ContainerdUnavailable:
            return []
        prefixes = (f"{repo.docker_name}:", f"{repo.docker_name}@")
        return sorted(
            name for name, target in records.items() if name.startswith(prefixes) and target.digest == digest
        )

    def foreign_child(self, repo: Repository, digest: str, platform: Platform) -> str | None:
        """The platform of `digest` when an index served under the repository lists it for another
        platform and containerd does not hold it (Docker pulled its own platform only)."""
        for root in self._roots.get(repo.docker_name, ()):
            plan = self._plans.get(root)
            entry = plan.manifests.get(root) if plan else None
            if entry is None or entry.media_type not in INDEX_TYPES or digest not in entry.references:
                continue
            # The index was read and verified when it was served: its bytes are kept.
            found = foreign_platform(self._bodies.get(root) or self._read(root), digest, platform)
            if found is not None:
                return found
        return None

    async def blob(self, repo: Repository, digest: str, info: DaemonInfo) -> Blob | None:
        if not info.containerd_store or await self._find(repo, digest, info, blob=True) is None:
            return None
        path = self._path(digest)
        try:
            # A metadata lookup, as the cache's own blob lookups: no worker thread for it.
            stat = path.stat()
        except FileNotFoundError:
            log.warning(
                "blob %s of %s is gone from containerd's content store (garbage-collected?): 404, the "
                "next request for the image resolves it again",
                digest,
                repo.docker_name,
            )
            self._forget(digest)
            return None
        if self._verified.verified(digest, _fingerprint(stat)):
            return BlobFile(path, digest)
        return BlobPieces(
            digest, stat.st_size, functools.partial(FilePieces, path), functools.partial(self._verify, digest)
        )

    async def verify_ahead(
        self, ref: str, image: dict[str, Any], info: DaemonInfo, idle: Callable[[], Awaitable[None]]
    ) -> int:
        """Hashes the blobs of Docker's `image` (those of its platform) not verified yet, one after another,
        each once `idle` returns; how many were hashed."""
        try:
            target = _described(image) or await self._lookups.run(ref, lambda: self.client.image(ref))
            plan = await self._plan(target, info.platform) if target is not None else None
        except (ContainerdUnavailable, IncompleteImage):
            return 0
        blobs = dict.fromkeys(
            digest
            for entry in (plan.manifests.values() if plan else ())
            for digest in entry.references
            if digest not in plan.manifests  # type: ignore[union-attr]
        )
        hashed = 0
        for digest in blobs:
            if self._verified_now(digest):
                continue
            await idle()
            # A client's pull may have verified it meanwhile.
            if self._verified_now(digest):
                continue
            try:
                await self._verify(digest)
            except FileNotFoundError:
                continue
            hashed += 1
        return hashed

    def stored_at(self, image_id: str) -> float | None:
        """When the image came into the store (pulled, built, loaded): the modification time of its target's
        file (Docker's image ID on this store is the target's digest), written then (blocking); None when
        the content store does not hold it."""
        try:
            return self._path(image_id).stat().st_mtime
        except (OSError, RegistryError):
            return None

    def _verified_now(self, digest: str) -> bool:
        """Whether the blob's file as it is now was verified; true too when it is gone (nothing to verify)."""
        try:
            return self._verified.verified(digest, _fingerprint(self._path(digest).stat()))
        except FileNotFoundError:
            return True

    async def _verify(self, digest: str) -> bool:
        """Whether the blob's file hashes to its digest, hashed once for all who ask at the same time
        (requests and verification ahead); the outcome is kept for that very file."""

        async def hashed() -> bool:
            # No later than the first byte is read: what a racy match is told by.
            started = time.time_ns()
            matched, opened = await self._hashing.run(functools.partial(self._hash, digest))
            self.metrics.blobs_hashed.inc()
            log.debug(
                "hashed %s where it lies (%s): %s",
                digest,
                self._path(digest),
                "a match" if matched else "no match",
            )
            if not matched:
                self._mismatch(digest, "a blob")
            else:
                self._verified.matched(digest, _fingerprint(opened), opened.st_ctime_ns, started)
            return matched

        return await self._hashing.once(digest, hashed)

    def _hash(self, digest: str) -> tuple[bool, os.stat_result]:
        with open(self._path(digest), "rb") as handle:
            opened = os.fstat(handle.fileno())
            return file_digest(handle, opened.st_size) == digest, opened


def _fingerprint(stat: os.stat_result) -> str:
    """The file's identity as a digest: what a match is kept for."""
    return f"sha256:{hashlib.sha256(array('q', identity(stat)).tobytes()).hexdigest()}"


def _described(image: dict[str, Any] | None) -> Descriptor | None:
    """The image's target as Docker's inspect describes it (Engine API >= 1.48 on the containerd image
    store), which saves asking containerd for its image record."""
    found = (image or {}).get("Descriptor") or {}
    if not image or found.get("digest") != image.get("Id") or not found.get("mediaType"):
        return None
    return Descriptor(str(found["mediaType"]), str(found["digest"]), int(found.get("size") or 0))
