"""Manifests for images whose store keeps none (Docker's classic store, Podman's storage): made from the
image's config and its layers' uncompressed tars, byte for byte as the export path serves them, so an image
has the same digests whichever path serves it.

- Docker >= 25 saves an OCI manifest it marshals itself (compact JSON, its struct's field order).
- Older Docker and Podman save the legacy format without one; this registry builds it the way it always has.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..oci.mediatypes import OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST


def _manifest(config: tuple[str, int], layers: Sequence[tuple[str, int]]) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": d, "size": s} for d, s in layers],
    }


def docker_save_manifest(config: tuple[str, int], layers: Sequence[tuple[str, int]]) -> bytes:
    """The manifest `docker save` of Docker >= 25 writes for an image of its classic store: config (digest,
    size) and layers (diff ID, tar length) in rootfs order, a repeated layer repeated."""
    return json.dumps(_manifest(config, layers), separators=(",", ":")).encode()


def legacy_manifest(config: tuple[str, int], layers: Sequence[tuple[str, int]]) -> bytes:
    """The manifest this registry builds for an image of a legacy save (Docker < 25, Podman)."""
    return json.dumps(_manifest(config, layers), indent=3).encode()
