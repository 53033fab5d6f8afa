"""Validation of manifests clients push: what they are, what they reference, what they refer to.

Pure functions: the caller checks the references against the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import RegistryError
from .mediatypes import (
    DOCKER_MANIFEST,
    IMAGE_CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
)
from .reference import Digest

PUSHABLE_TYPES = MANIFEST_TYPES | INDEX_TYPES


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str
    # Non-distributable layers live elsewhere (`urls`): a manifest may reference them without a push.
    external: bool = False


@dataclass(frozen=True)
class PushedManifest:
    media_type: str
    # Config and layers of an image manifest (blobs), or the children of an index (manifests).
    blobs: list[Descriptor] = field(default_factory=list)
    children: list[Descriptor] = field(default_factory=list)
    subject: str | None = None
    artifact_type: str | None = None

    @property
    def references(self) -> list[str]:
        return [d.digest for d in (*self.blobs, *self.children)]


def _invalid(message: str) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", f"manifest invalid: {message}")


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where} is not a descriptor object")
    digest, size, media_type = value.get("digest"), value.get("size"), value.get("mediaType")
    if not isinstance(digest, str):
        raise _invalid(f"{where} has no digest")
    try:
        Digest.parse(digest)
    except RegistryError as exc:
        raise _invalid(f"{where}: {exc.message}") from exc
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where} has no valid size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where} has no mediaType")
    urls = value.get("urls")
    return Descriptor(digest, size, media_type, external=bool(urls) and isinstance(urls, list))


def _descriptors(data: dict[str, Any], key: str) -> list[Descriptor]:
    values = data.get(key, [])
    if not isinstance(values, list):
        raise _invalid(f"{key} is not a list")
    return [_descriptor(value, f"{key}[{i}]") for i, value in enumerate(values)]


def _media_type(data: dict[str, Any], content_type: str | None) -> str:
    """The manifest's type: its own `mediaType`, which a Content-Type given must agree with."""
    declared = data.get("mediaType")
    header = (content_type or "").partition(";")[0].strip().lower() or None
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType is not a string")
    if declared and header and header in PUSHABLE_TYPES and declared != header:
        raise _invalid(f"Content-Type {header} does not match the manifest's mediaType {declared}")
    # OCI allows leaving mediaType out; then the Content-Type says it, or the shape does.
    media_type = declared or header
    if media_type not in PUSHABLE_TYPES:
        if declared or (header and header != "application/json"):
            raise _invalid(f"unsupported manifest media type {media_type}")
        media_type = OCI_INDEX if "manifests" in data else OCI_MANIFEST
    return media_type


def parse_pushed(body: bytes, content_type: str | None) -> PushedManifest:
    """Checks a pushed manifest's structure; raises MANIFEST_INVALID with the reason."""
    if len(body) > MAX_MANIFEST_SIZE:
        raise RegistryError(
            "SIZE_INVALID",
            f"manifest is {len(body)} bytes, over the limit of {MAX_MANIFEST_SIZE}",
            status=413,
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _invalid("not a JSON object")
    if data.get("schemaVersion") != 2:
        raise _invalid(f"schemaVersion {data.get('schemaVersion')!r} is not supported, only 2")
    media_type = _media_type(data, content_type)
    subject = _descriptor(data["subject"], "subject").digest if data.get("subject") is not None else None
    artifact_type = data.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType is not a string")
    if media_type in INDEX_TYPES:
        if "manifests" not in data:
            raise _invalid("an index needs a manifests list")
        return PushedManifest(
            media_type, children=_descriptors(data, "manifests"), subject=subject, artifact_type=artifact_type
        )
    if "config" not in data:
        raise _invalid("an image manifest needs a config")
    config = _descriptor(data["config"], "config")
    layers = _descriptors(data, "layers")
    if media_type == DOCKER_MANIFEST and config.media_type not in IMAGE_CONFIG_TYPES:
        raise _invalid(f"a Docker manifest's config must be an image config, not {config.media_type}")
    # The referrers API reports an artifact by its artifactType, else by its config's media type.
    return PushedManifest(
        media_type,
        blobs=[config, *layers],
        subject=subject,
        artifact_type=artifact_type or config.media_type,
    )
