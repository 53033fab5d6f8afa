"""What clients write: pushed blobs and manifests, loading pushed images into Docker, deletes, referrers.

Pushes go to the registry's own namespace only. Pushed content is kept apart from the export cache in
one respect: it cannot be exported again, so it is never evicted, only deleted by request. Docker's own
images are never removed unless the operator allows it (`--allow-docker-delete`); an image this registry
loaded into Docker for a push is untagged again when that push is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..cache import maintenance
from ..cache.records import Records
from ..cache.store import ManifestEntry, RepositoryRecord, TagEntry
from ..docker.engine import DockerClient, DockerFailed, DockerUnavailable
from ..oci.errors import RegistryError
from ..oci.manifests import PushedManifest, parse_pushed
from ..oci.reference import Digest, Repository, is_digest, parse_repository, parse_tag
from ..sources.select import Sources
from .docker_load import Loads, load_into_docker

log = logging.getLogger(__package__)


def _own(repo: Repository, what: str) -> None:
    if repo.remote:
        raise RegistryError(
            "UNSUPPORTED", f"{what} goes to this registry's own namespace, not to a mirrored one (ns)"
        )


def _without_tags(record: RepositoryRecord, dropped: set[str]) -> RepositoryRecord:
    """The record without these tags (and what only they kept); a Docker tag this registry loaded for
    one of them is forgotten too, as deleting the tag removed it from Docker or found it changed."""
    kept = maintenance.with_tags(record, {t: e for t, e in record.tags.items() if t not in dropped})
    return replace(kept, loaded={t: i for t, i in record.loaded.items() if t not in dropped})


class Pushes:
    def __init__(
        self,
        docker: DockerClient,
        records: Records,
        sources: Sources,
        loads: Loads,
        *,
        load_pushed: bool = True,
        allow_docker_delete: bool = False,
        allow_docker_overwrite: bool = False,
    ) -> None:
        self.docker = docker
        self.records = records
        self.store = records.store
        self.sources = sources
        self.loads = loads
        self.load_pushed = load_pushed
        self.allow_docker_delete = allow_docker_delete
        self.allow_docker_overwrite = allow_docker_overwrite

    # ---- blobs -----------------------------------------------------------------------------------

    def check_writable(self, repo: Repository) -> None:
        _own(repo, "a push")

    async def mount(self, repo: Repository, digest: Digest, source: str) -> bool:
        """Links a blob pushed to another repository into `repo`; False when it cannot (then: upload).

        Only pushed content can be mounted: a blob exported from Docker may belong to a private upstream
        image, and mounting must not make it readable under another name."""
        text = str(digest)
        try:
            origin = parse_repository(source, None)
        except RegistryError:
            return False
        record = self.store.record(origin.docker_name)
        pushed = record is not None and (
            text in record.blobs or any(m.pushed and text in m.references for m in record.manifests.values())
        )
        if not pushed or not self.store.has_blob(text):
            return False
        await self.link(repo, digest)
        log.info("mounted %s from %s into %s", digest, origin.name, repo.name)
        return True

    async def link(self, repo: Repository, digest: Digest) -> None:
        """Makes a stored blob part of `repo`, so it is served there and a manifest may use it."""
        text = str(digest)

        def add(record: RepositoryRecord) -> RepositoryRecord:
            # A delete elsewhere may have removed the file between its commit and this link.
            if not self.store.has_blob(text):
                raise RegistryError(
                    "BLOB_UPLOAD_INVALID", f"blob {text} vanished before it was linked; retry"
                )
            return record if text in record.blobs else replace(record, blobs=[*record.blobs, text])

        await self.records.edit(repo.docker_name, add)

    # ---- manifests -------------------------------------------------------------------------------

    def _check_references(self, record: RepositoryRecord, pushed: PushedManifest) -> None:
        """Everything a pushed manifest points at must be in the repository already."""
        for blob in pushed.blobs:
            if blob.external:
                continue
            if not record.serves_blob(blob.digest) or self.store.blob_size(blob.digest) is None:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN",
                    f"manifest references blob {blob.digest}, which was not pushed to {record.name}",
                    status=400,
                    detail={"digest": blob.digest},
                )
            if self.store.blob_size(blob.digest) != blob.size:
                raise RegistryError(
                    "MANIFEST_INVALID",
                    f"manifest says blob {blob.digest} has {blob.size} bytes, "
                    f"it has {self.store.blob_size(blob.digest)}",
                )
        for child in pushed.children:
            if child.digest not in record.manifests or not self.store.has_blob(child.digest):
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN",
                    f"index references manifest {child.digest}, which was not pushed to {record.name}",
                    status=400,
                    detail={"digest": child.digest},
                )

    async def _adopt_containerd_blobs(self, repo: Repository, pushed: PushedManifest) -> None:
        """Blobs a client did not upload because this repository already served them from containerd's
        content store (its HEAD said so) are copied into the cache and linked, as if pushed."""
        record = self.store.record(repo.docker_name) or RepositoryRecord(repo.docker_name)
        for blob in pushed.blobs:
            if blob.external or (record.serves_blob(blob.digest) and self.store.has_blob(blob.digest)):
                continue
            if await self.sources.keep_in_cache(repo, blob.digest, self.store):
                await self.link(repo, Digest.parse(blob.digest))

    async def put_manifest(
        self, repo: Repository, reference: str, body: bytes, content_type: str | None
    ) -> tuple[str, PushedManifest]:
        """Stores a pushed manifest (and tag); returns its digest. Loads a tagged image into Docker."""
        _own(repo, "a push")
        tag = None if is_digest(reference) else parse_tag(reference)
        named = None if tag else Digest.parse(reference)
        pushed = parse_pushed(body, content_type)
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if named is not None and str(named) != digest:
            raise RegistryError("DIGEST_INVALID", f"manifest hashes to {digest}, not {reference}")
        await self._adopt_containerd_blobs(repo, pushed)
        self._check_references(
            self.store.record(repo.docker_name) or RepositoryRecord(repo.docker_name), pushed
        )
        await asyncio.to_thread(self.store.put_bytes, body, digest)
        image_id = await self._docker_id(repo.docker_ref(tag)) if tag else None
        now = time.time()

        def add(record: RepositoryRecord) -> RepositoryRecord:
            self._check_references(record, pushed)
            entry = ManifestEntry(
                pushed.media_type,
                len(body),
                pushed.references,
                pushed=True,
                subject=pushed.subject,
                artifact_type=pushed.artifact_type,
            )
            tags = dict(record.tags)
            if tag is not None:
                tags[tag] = TagEntry(
                    digest, pushed.media_type, image_id or "", exported_at=now, last_used=now, pushed=True
                )
            return replace(record, manifests={**record.manifests, digest: entry}, tags=tags)

        await self.records.edit(repo.docker_name, add)
        log.info("pushed %s (%s, %d bytes)", repo.familiar(tag or digest), digest, len(body))
        if tag is not None and self.load_pushed:
            self._start_load(repo, tag, digest, pushed.media_type)
        return digest, pushed

    async def _docker_id(self, ref: str) -> str | None:
        """Docker's image ID for a reference; None when it has none or cannot be asked."""
        try:
            image = await self.docker.inspect(ref)
        except DockerUnavailable:
            return None
        return image["Id"] if image else None

    # ---- loading into Docker ---------------------------------------------------------------------

    def _start_load(self, repo: Repository, tag: str, digest: str, media_type: str) -> None:
        """Loads the pushed image into Docker in the background, after the loads of the tag before it.
        While it runs, the mirror serves the pushed manifest for the tag whatever Docker has."""
        self.loads.start(
            repo.docker_ref(tag), lambda previous: self._load(repo, tag, digest, media_type, previous)
        )

    def _loaded_id(self, repo: Repository, tag: str) -> str | None:
        """The image this registry put into Docker under the tag by loading a push, if it did."""
        record = self.store.record(repo.docker_name)
        return record.loaded.get(tag) if record else None

    async def _load(
        self, repo: Repository, tag: str, digest: str, media_type: str, previous: asyncio.Task[None] | None
    ) -> None:
        ref = repo.docker_ref(tag)
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        if not self.allow_docker_overwrite:
            current = await self._docker_id(ref)
            if current is not None and current != self._loaded_id(repo, tag):
                # Anyone who reaches the port can push: a push must not change what `docker run` starts.
                log.warning(
                    "not loading pushed %s into Docker: Docker's own %s (%s) stays as it is, this registry "
                    "did not put it there; this registry serves the pushed image under that name "
                    "(--allow-docker-overwrite lets pushes replace Docker's tags)",
                    repo.familiar(tag),
                    repo.familiar(tag),
                    current,
                )
                return
        try:
            image_id = await load_into_docker(self.store, self.docker, ref, digest, media_type)
        except (DockerUnavailable, DockerFailed, OSError) as exc:
            log.warning("could not load pushed %s into Docker: %s", repo.familiar(tag), exc)
            return
        if image_id is None:
            return

        def mark(record: RepositoryRecord) -> RepositoryRecord:
            tags = record.tags
            entry = tags.get(tag)
            if entry is not None and entry.digest == digest:
                tags = {**tags, tag: replace(entry, image_id=image_id)}
            return replace(record, tags=tags, loaded={**record.loaded, tag: image_id})

        await self.records.edit(repo.docker_name, mark)

    # ---- deletes ---------------------------------------------------------------------------------

    async def delete_manifest(self, repo: Repository, reference: str) -> None:
        if is_digest(reference):
            await self._delete_digest(repo, str(Digest.parse(reference)))
        else:
            await self._delete_tag(repo, parse_tag(reference))

    async def _untag(self, ref: str, expected_id: str | None) -> None:
        """Removes a tag from Docker, provided Docker still maps it to `expected_id` (None: to anything)."""
        try:
            image = await self.docker.inspect(ref)
            if image is None or (expected_id is not None and image["Id"] != expected_id):
                return
            await self.docker.remove(ref)
        except DockerUnavailable as exc:
            raise RegistryError("UNAVAILABLE", str(exc)) from exc
        except DockerFailed as exc:
            raise RegistryError("DENIED", f"Docker refused to remove {ref}", detail=str(exc)) from exc
        log.info("removed %s from Docker", ref)

    def _docker_delete_refused(self, what: str) -> RegistryError:
        return RegistryError(
            "UNSUPPORTED",
            f"{what} is Docker's own image; the registry removes those only with --allow-docker-delete",
        )

    async def _delete_tag(self, repo: Repository, tag: str) -> None:
        ref = repo.docker_ref(tag)
        await self.loads.settled(ref)
        record = self.store.record(repo.docker_name)
        entry = record.tags.get(tag) if record else None
        if repo.remote:
            if entry is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"{repo.familiar(tag)} is not cached")
        elif entry is not None and entry.pushed:
            loaded = self._loaded_id(repo, tag)
            if loaded is not None:
                await self._untag(ref, loaded)
        else:
            docker_id = await self._docker_id(ref)
            if docker_id is None and entry is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(tag)}")
            if docker_id is not None:
                if not self.allow_docker_delete:
                    raise self._docker_delete_refused(repo.familiar(tag))
                await self._untag(ref, None)
        if entry is not None:
            await self._forget(repo, lambda r: _without_tags(r, {tag}))
        log.info("deleted %s%s", repo.familiar(tag), " from the cache" if repo.remote else "")

    async def _docker_refs_of(self, repo: Repository, digest: str) -> tuple[list[str], str] | None:
        """Docker's tags in this repository of the image whose manifest `digest` is served where the
        daemon keeps it, and that image's ID."""
        try:
            info = await self.docker.daemon()
        except DockerUnavailable:
            return None
        return await self.sources.docker_refs_of(repo, digest, info)

    async def _delete_digest(self, repo: Repository, digest: str) -> None:
        record = self.store.record(repo.docker_name)
        if record is None or digest not in record.manifests:
            found = None if repo.remote else await self._docker_refs_of(repo, digest)
            if found is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {repo.familiar(digest)}")
            # Served where the daemon keeps it: Docker's own image, untagged only when allowed.
            if not self.allow_docker_delete:
                raise self._docker_delete_refused(repo.familiar(digest))
            refs, image_id = found
            for ref in refs:
                await self._untag(ref, image_id)
            log.info("deleted %s from Docker (%s)", repo.familiar(digest), ", ".join(refs) or "no tags")
            return
        if not repo.remote:
            if not record.manifests[digest].pushed and not self.allow_docker_delete:
                raise self._docker_delete_refused(repo.familiar(digest))
            for tag in [t for t, e in record.tags.items() if e.digest == digest]:
                await self.loads.settled(repo.docker_ref(tag))
            # Loads that just finished changed the tags' entries.
            record = self.store.record(repo.docker_name) or record
            for tag, entry in record.tags.items():
                expected = record.loaded.get(tag) if entry.pushed else entry.image_id
                if entry.digest == digest and expected:
                    await self._untag(repo.docker_ref(tag), expected)

        def drop(current: RepositoryRecord) -> RepositoryRecord:
            kept = _without_tags(current, {t for t, e in current.tags.items() if e.digest == digest})
            return replace(kept, manifests={d: m for d, m in kept.manifests.items() if d != digest})

        await self._forget(repo, drop)
        log.info("deleted %s%s", repo.familiar(digest), " from the cache" if repo.remote else "")

    async def delete_blob(self, repo: Repository, digest: Digest) -> None:
        _own(repo, "deleting a blob")
        text = str(digest)
        record = self.store.record(repo.docker_name)
        if record is None or not record.serves_blob(text):
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown to {repo.name}: {text}")
        users = [d for d, m in record.manifests.items() if text == d or text in m.references]
        if users:
            # Removing it would leave those manifests unservable: never a manifest whose blobs are gone.
            raise RegistryError(
                "UNSUPPORTED", f"blob {text} is used by manifest {users[0]} in {repo.name}: delete that first"
            )
        await self._forget(repo, lambda r: replace(r, blobs=[b for b in r.blobs if b != text]))
        log.info("deleted blob %s from %s", text, repo.name)

    async def _forget(self, repo: Repository, change: Callable[[RepositoryRecord], RepositoryRecord]) -> None:
        await self.records.edit(repo.docker_name, change, free_blobs=True)

    # ---- referrers -------------------------------------------------------------------------------

    async def referrers(
        self, repo: Repository, digest: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]]:
        """Descriptors of the manifests in `repo` whose subject is `digest`, by digest order."""
        record = self.store.record(repo.docker_name)
        if record is None:
            return []
        found = []
        for candidate, entry in sorted(record.manifests.items()):
            if entry.subject != str(digest):
                continue
            if artifact_type is not None and entry.artifact_type != artifact_type:
                continue
            body = await asyncio.to_thread(self.store.read_blob, candidate)
            if body is None:
                continue
            descriptor: dict[str, Any] = {
                "mediaType": entry.media_type,
                "digest": candidate,
                "size": entry.size,
            }
            if entry.artifact_type:
                descriptor["artifactType"] = entry.artifact_type
            annotations = json.loads(body).get("annotations")
            if annotations:
                descriptor["annotations"] = annotations
            found.append(descriptor)
        return found
