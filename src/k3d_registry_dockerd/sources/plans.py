"""Which manifests of an image are complete enough to serve: an index when the daemon's platform's child
is, an image manifest when its config and every layer are present. Shared by every source that serves from
files (our cache, containerd's content store)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cache.store import ManifestEntry
from ..oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_SIZE, OCI_MANIFEST
from ..oci.platform import Platform, platform_text


class IncompleteImage(Exception):
    """An image lacks blobs a manifest needs (e.g. moby/moby#49473), so it must not be served."""


@dataclass(frozen=True)
class Root:
    """An image's own manifest or index, and the names it goes by (a save stream's annotations)."""

    digest: str
    media_type: str
    size: int
    names: tuple[str, ...] = ()


@dataclass
class ImagePlan:
    """What of an image is served: its manifests (and what each references) by digest."""

    root: Root
    manifests: dict[str, ManifestEntry] = field(default_factory=dict)


def plan_manifests(
    root: Root,
    read: Callable[[str], bytes | None],
    has_blob: Callable[[str], bool],
    platform: Platform,
) -> ImagePlan:
    """Decides which manifests of an image are complete enough to serve.

    An index is served when the child for `platform` is complete (clients of other platforms get 404 for
    their absent children and fall back upstream); a manifest only when all its blobs are present.
    """
    plan = ImagePlan(root=root)
    raw = read(root.digest)
    if raw is None:
        raise IncompleteImage(f"the image lacks its own manifest {root.digest}")
    media_type, data = _parse_manifest(raw, root.media_type, root.digest)
    if media_type in INDEX_TYPES:
        children = data.get("manifests", [])
        wanted = None
        for child in children:
            entry = _complete_manifest(child, read, has_blob)
            if entry is None:
                continue
            plan.manifests[child["digest"]] = entry
            if wanted is None and platform.matches(child.get("platform")):
                wanted = child["digest"]
        if wanted is None:
            listed = ", ".join(platform_text(c.get("platform")) for c in children) or "nothing"
            raise IncompleteImage(
                f"index {root.digest} has no complete manifest for {platform} (it lists {listed}; "
                "the export lacks the blobs of the others)"
            )
        plan.manifests[root.digest] = ManifestEntry(media_type, len(raw), [c["digest"] for c in children])
        return plan
    entry = _complete_manifest({"digest": root.digest, "mediaType": media_type}, read, has_blob)
    if entry is None:
        raise IncompleteImage(f"manifest {root.digest} references blobs the export does not contain")
    plan.manifests[root.digest] = entry
    return plan


def _parse_manifest(raw: bytes, media_type: str, digest: str) -> tuple[str, dict[str, Any]]:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise IncompleteImage(f"manifest {digest} is {len(raw)} bytes, larger than clients accept")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IncompleteImage(f"manifest {digest} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IncompleteImage(f"manifest {digest} is not a JSON object")
    return data.get("mediaType") or media_type, data


def _complete_manifest(
    descriptor: dict[str, Any], read: Callable[[str], bytes | None], has_blob: Callable[[str], bool]
) -> ManifestEntry | None:
    """The entry for an image manifest whose config and layers are all present, else None."""
    raw = read(descriptor["digest"])
    if raw is None:
        return None
    media_type, data = _parse_manifest(raw, descriptor.get("mediaType", OCI_MANIFEST), descriptor["digest"])
    if media_type not in MANIFEST_TYPES:
        return None
    references = [data["config"]["digest"], *(layer["digest"] for layer in data.get("layers", []))]
    if not all(has_blob(digest) for digest in references):
        return None
    return ManifestEntry(media_type, len(raw), references)
