"""Cross-repository mounts must not copy a blob pulled with credentials into the own namespace.

tests/world/test_isolation.py checks this against a real private registry, but that one listens on a
port, and a mount's `from` is a repository of the own namespace, whose names cannot hold a port: there the
private repository cannot even be named. A registry without a port can (`registry.example.com/...`), which
needs a fake Docker to stand for it. (Before commit b8157c9 "Mount only pushed blobs" the mount answered
201 and the blob was readable as /v2/public/app/blobs/<digest>.)
"""

from __future__ import annotations

import base64
from typing import Any

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker, local_image

PRIVATE_REF = "registry.example.com/private/iso:v1"


async def test_a_blob_pulled_with_credentials_cannot_be_mounted_into_the_own_namespace(
    aiohttp_client: Any, store: Store
) -> None:
    docker = FakeDocker()
    docker.upstream[PRIVATE_REF] = local_image("private", PRIVATE_REF)
    client = await aiohttp_client(create_app(assemble(store, docker, load_pushed=False)))
    secret = {"Authorization": "Basic " + base64.b64encode(b"puller:s3cret-pw").decode()}
    pulled = await client.get("/v2/private/iso/manifests/v1?ns=registry.example.com", headers=secret)
    assert pulled.status == 200
    assert docker.pulls[0][1] is not None  # Docker pulled it with the credentials
    image = docker.images[PRIVATE_REF].image
    assert image is not None
    layer = image.layer_digests[0]

    mount = await client.post(
        f"/v2/public/app/blobs/uploads/?mount={layer}&from=registry.example.com/private/iso"
    )
    served = await client.get(f"/v2/public/app/blobs/{layer}")

    # Expected: no mount (202, the client uploads the bytes it has), and nothing readable in public/app.
    assert (mount.status, served.status) == (202, 404), (
        f"mount answered {mount.status} (Location {mount.headers.get('Location')}); "
        f"GET /v2/public/app/blobs/{layer} answered {served.status}: a blob pulled with credentials was "
        "linked into a pushed repository of the own namespace, where it is never evicted"
    )
